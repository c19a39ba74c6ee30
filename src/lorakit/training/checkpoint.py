"""Checkpoints that resume to the same result: what training changed, the optimizer and scheduler, where the loop
is (`TrainState`) and every rank's RNG, written to a temporary directory and renamed into place."""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..engine.peft_format import adapter_state_dict, load_adapter_state, read_safetensors
from ..files import normal_modes
from .distributed import load_optimizer_state, optimizer_state

CHECKPOINT = "checkpoint"


@dataclass
class TrainState:
    """Where the loop is: everything a checkpoint needs besides weights, optimizer and RNG."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches of this epoch already consumed
    tokens: int = 0
    train_seconds: float = 0.0
    best_val: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    stopped_by: str = ""  # why the loop ended before its last step: a signal's name, or "loss"
    train_loss: list = field(default_factory=list)  # [step, loss]
    val_history: list = field(default_factory=list)  # {step, loss, accuracy?}
    train_metrics: list = field(default_factory=list)  # {step, rewards/..., logps/...}: an objective's own metrics


def weights_state(model, full: bool) -> dict[str, torch.Tensor]:
    """What training changes: the adapter's tensors, or (method=full) every tensor once (tied weights once)."""
    if not full:
        return adapter_state_dict(model)
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


def load_weights_state(model, state: dict[str, torch.Tensor], full: bool) -> None:
    """Copy `state` (as weights_state returns it) into the model in place."""
    if not full:
        load_adapter_state(model, state)
        return
    with torch.no_grad():
        own = model.state_dict()
        for k, v in state.items():
            own[k].copy_(v)


def rng_state() -> dict:
    """This process's random generators: torch (and CUDA) and Python's."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(out: Path, model, optimizer, scheduler, state: TrainState, best_state: dict | None,
                    accelerator, fsdp: bool = False, full: bool = False) -> None:
    """Adapter tensors (safetensors), optimizer, scheduler, loop position and every rank's RNG, written atomically.

    Every rank calls this (gathering sharded state is collective); rank 0 writes all but the per-rank RNG files.
    """
    main = accelerator.is_main_process
    weights = weights_state(model, full)
    optim = optimizer_state(model, optimizer, fsdp)
    tmp = out / f"{CHECKPOINT}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if main:
        save_file(weights, tmp / "adapter_model.safetensors")
        if best_state is not None:
            save_file(best_state, tmp / "best_adapter.safetensors")
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
    accelerator.wait_for_everyone()
    if main:
        normal_modes(tmp)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        tmp.rename(out / CHECKPOINT)
    accelerator.wait_for_everyone()


def load_checkpoint(out: Path, model, optimizer, scheduler, accelerator, fsdp: bool = False, full: bool = False
                    ) -> tuple[TrainState, dict | None]:
    """Restore what save_checkpoint wrote into the model, optimizer, scheduler and RNG; returns (state, best)."""
    ck = out / CHECKPOINT
    load_weights_state(model, read_safetensors(ck / "adapter_model.safetensors"), full)
    best = read_safetensors(ck / "best_adapter.safetensors") if (ck / "best_adapter.safetensors").exists() else None
    blob = torch.load(ck / "trainer_state.pt", weights_only=True)
    load_optimizer_state(model, optimizer, blob["optimizer"], fsdp)
    scheduler.load_state_dict(blob["scheduler"])
    rng_file = ck / f"rng_{accelerator.process_index}.pt"
    set_rng_state(torch.load(rng_file if rng_file.exists() else ck / "rng_0.pt", weights_only=True))
    return TrainState(**json.loads((ck / "state.json").read_text())), best
