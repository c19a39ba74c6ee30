"""The training loop: a plain loop over accelerate.Accelerator, so `accelerate launch` / `torchrun` run it unchanged.

AdamW with warmup and a cosine/linear/constant schedule, gradient accumulation and clipping, mixed precision where
the device has it, gradient checkpointing, validation every N steps with early stopping, checkpoints that resume
to the same result, and at the end: the adapter (PEFT format), run.json and loss.png.
"""
from __future__ import annotations

import json
import math
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapters import adapter_state_dict, load_adapter_state, save_adapter
from .config import RunConfig
from .inject import add_lora, parameter_report
from .lora import LoRAConfig
from .models import head_name, load_model
from .tasks import encode_splits, load_splits

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
    train_loss: list = field(default_factory=list)  # [step, loss]
    val_history: list = field(default_factory=list)  # {step, loss, accuracy?}


def lr_lambda(schedule: str, warmup_steps: int, total: int):
    """Linear warmup, then cosine or linear decay to 0 (or constant)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return f


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None,
                group: int = 32) -> list[list[int]]:
    """The micro-batches of one epoch, drawn from (seed, epoch) only, so resuming replays them exactly.

    With `lengths`, each run of `group` batches of the shuffled order is sorted by length before it is cut into
    batches (then the batches are shuffled): rows of a batch have similar lengths and padding mostly disappears.
    """
    g = torch.Generator().manual_seed(seed * 1009 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not lengths:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    span = batch_size * group
    batches = []
    for i in range(0, n, span):
        chunk = sorted(order[i:i + span], key=lambda j: -lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


def batch_tokens(batch: dict) -> int:
    m = batch.get("attention_mask")
    return int(m.sum()) if m is not None and m.dim() == 2 else batch["input_ids"].numel()


def mixed_precision(cfg: RunConfig) -> str:
    """'auto': bf16 on a GPU that has it, else fp32 (bf16 matmuls are 7-100x slower on AVX2 CPUs)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@torch.no_grad()
def validate(model, examples: list, collate, batch_size: int, device, autocast) -> dict:
    """Mean loss over the examples (weighted by batch size); accuracy too for classifiers."""
    was_training = model.training
    model.eval()
    loss_sum, n, correct, classifier = 0.0, 0, 0, False
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        with autocast():
            out = model(**batch)
        loss_sum += out.loss.float().item() * len(chunk)
        n += len(chunk)
        classifier = out.logits.dim() == 2  # (batch, labels): a sequence classifier
        if classifier:
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    result = {"loss": loss_sum / max(n, 1)}
    if classifier:
        result["accuracy"] = correct / max(n, 1)
    return result


def save_checkpoint(out: Path, model, optimizer, scheduler, state: TrainState, best_state: dict | None) -> None:
    """Adapter tensors (safetensors), optimizer, scheduler, RNG and loop position, written atomically."""
    tmp = out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(adapter_state_dict(model), tmp / "adapter_model.safetensors")
    if best_state is not None:
        save_file(best_state, tmp / "best_adapter.safetensors")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
               tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    final = out / CHECKPOINT
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_checkpoint(out: Path, model, optimizer, scheduler) -> tuple[TrainState, dict | None]:
    ck = out / CHECKPOINT
    load_adapter_state(model, load_file(ck / "adapter_model.safetensors"))
    best = load_file(ck / "best_adapter.safetensors") if (ck / "best_adapter.safetensors").exists() else None
    blob = torch.load(ck / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return TrainState(**json.loads((ck / "state.json").read_text())), best


def versions() -> dict:
    import accelerate
    import transformers

    from . import __version__
    return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version(), "machine": platform.machine()}


def plot_losses(state: TrainState, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if state.train_loss:
        steps, losses = zip(*state.train_loss)
        ax.plot(steps, losses, color="#9ab", lw=1, label="train (per step)")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="#258", lw=2, label=f"train (mean of {k})")
    if state.val_history:
        ax.plot([v["step"] for v in state.val_history], [v["loss"] for v in state.val_history], "o-",
                color="#d62", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Train `cfg`'s adapter; returns the run directory (adapter/, run.json, loss.png)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    out = Path(cfg.out or Path("runs") / cfg.name)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg))
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    log = print if main else (lambda *a, **k: None)
    splits = load_splits(cfg)
    if not splits.train:
        from .data import DataError
        raise DataError(f"{cfg.data}: the training split is empty")
    model, tok = load_model(cfg.model, cfg.task, num_labels=len(splits.labels) if splits.labels else None)
    if splits.labels:
        model.config.id2label = dict(enumerate(splits.labels))
        model.config.label2id = {n: i for i, n in enumerate(splits.labels)}
    head = head_name(model) if cfg.task == "classify" else None
    lcfg = LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets, exclude=cfg.exclude,
                      trainable=(head,) if head else (), rslora=cfg.rslora)
    set_seed(cfg.seed)
    add_lora(model, lcfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen base's activations must carry grad to reach LoRA
    report = parameter_report(model)
    log(f"lorakit: {cfg.name}: {cfg.model} ({type(model).__name__}), task {cfg.task}")
    log(f"lorakit: {report}")
    data = encode_splits(cfg, splits, tok, model)
    for note, n in data.notes.items():
        log(f"lorakit: {note}: {n:,} training/validation records")

    head_params = set(id(p) for p in model.get_submodule(head).parameters()) if head else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in head_params]}]
    if head_params:
        groups.append({"params": [p for p in params if id(p) in head_params], "lr": cfg.head_lr or cfg.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    micro_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, int(cfg.warmup * total), total))
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    state, best_state = TrainState(), None
    if resume:
        if not (out / CHECKPOINT).is_dir():
            from .errors import UserError
            raise UserError(f"--resume: no checkpoint in {out / CHECKPOINT}; train without --resume first")
        state, best_state = load_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler)
        log(f"lorakit: resumed at step {state.step} (epoch {state.epoch}, batch {state.micro})")
    log(f"lorakit: {len(data.train):,} training rows, batch {cfg.batch_size} x accumulation {cfg.grad_accum}, "
        f"{total} optimizer steps, lr {cfg.lr:g} ({cfg.schedule}), precision {mixed_precision(cfg)}")

    bar = tqdm(total=total, initial=state.step, desc=f"train {cfg.name}", disable=not main, dynamic_ncols=True,
               mininterval=1.0)
    model.train()
    t_loop = time.perf_counter() - state.train_seconds
    while state.step < total and not state.stopped_early:
        order = epoch_order(len(data.train), cfg.batch_size, cfg.seed, state.epoch,
                            data.lengths if cfg.group_by_length else None)
        while state.micro < len(order) and state.step < total:
            group = order[state.micro:state.micro + cfg.grad_accum]
            loss_sum = 0.0
            for idx in group:
                batch = {k: v.to(device) for k, v in data.collate([data.train[i] for i in idx]).items()}
                with accelerator.autocast():
                    loss = model(**batch).loss / len(group)
                accelerator.backward(loss)
                loss_sum += loss.item()
                state.tokens += batch_tokens(batch)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.micro += len(group)
            state.step += 1
            state.train_loss.append([state.step, loss_sum])
            state.train_seconds = time.perf_counter() - t_loop
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
            if data.val and (state.step % eval_every == 0 or state.step == total):
                val = validate(model, data.val, data.collate, cfg.batch_size, device, accelerator.autocast)
                state.val_history.append({"step": state.step, **val})
                bar.write(f"step {state.step}: val loss {val['loss']:.4f}"
                          + (f", val accuracy {val['accuracy']:.4f}" if "accuracy" in val else ""))
                if state.best_val is None or val["loss"] < state.best_val:
                    state.best_val, state.best_step, state.bad_evals = val["loss"], state.step, 0
                    # a copy: on CPU the state dict's tensors are the live parameters themselves
                    best_state = {k: v.clone() for k, v in adapter_state_dict(accelerator.unwrap_model(model)).items()}
                else:
                    state.bad_evals += 1
                    if cfg.early_stopping and state.bad_evals >= cfg.early_stopping:
                        state.stopped_early = True
                        bar.write(f"early stop at step {state.step}: no val improvement in {state.bad_evals} evaluations")
                        break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and main:
                save_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler, state, best_state)
        if state.micro >= len(order):
            state.epoch, state.micro = state.epoch + 1, 0
    bar.close()

    net = accelerator.unwrap_model(model)
    if main:
        if cfg.checkpoint_every:
            save_checkpoint(out, net, optimizer, scheduler, state, best_state)
        if best_state is not None and state.best_step != state.step:
            load_adapter_state(net, best_state)  # ship the adapter of the best validation loss
            log(f"lorakit: keeping the adapter of step {state.best_step} (best val loss {state.best_val:.4f})")
        meta = {"task": cfg.task, "model": cfg.model, "labels": splits.labels, "template": cfg.template,
                "max_length": cfg.max_length, "run": cfg.name}
        save_adapter(net, out / "adapter", metadata=meta)
        run = {"config": cfg.to_dict(), "versions": versions(), "parameters": report.to_dict(),
               "data": splits.stats | {"train_rows": len(data.train), "val_rows": len(data.val),
                                       "test_rows": len(splits.test), "notes": data.notes},
               "metrics": {"final_train_loss": state.train_loss[-1][1] if state.train_loss else None,
                           "best_val_loss": state.best_val, "best_step": state.best_step,
                           "val_history": state.val_history, "stopped_early": state.stopped_early},
               "timings": {"total_s": time.perf_counter() - t_start, "train_s": state.train_seconds,
                           "steps": state.step, "tokens": state.tokens,
                           "tokens_per_s": state.tokens / max(state.train_seconds, 1e-9)},
               "train_loss": state.train_loss}
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        plot_losses(state, out / "loss.png", f"{cfg.name}: {cfg.model} + LoRA r={cfg.r}")
        log(f"lorakit: adapter -> {out / 'adapter'}; run.json and loss.png in {out}")
    accelerator.wait_for_everyone()
    return out
