"""The training loop: a plain loop over accelerate.Accelerator, so `accelerate launch` / `torchrun` run it unchanged.

AdamW with warmup and a cosine/linear/constant schedule, gradient accumulation and clipping, mixed precision where
the device has it, gradient checkpointing, validation every N steps with early stopping, checkpoints that resume
to the same result, and at the end: the adapter (PEFT format), run.json and loss.png. With method=full the same
loop trains every parameter and saves a whole model directory (model/) instead of an adapter.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapters import adapter_state_dict, load_adapter_state, save_adapter
from .config import RunConfig
from .distributed import all_sum, load_optimizer_state, optimizer_state, rank_share, wrap_model
from .inject import add_lora, parameter_report
from .lora import LoRAConfig
from .loss import causal_lm_loss, label_only_supported
from .models import compile_blocks, fuse_swiglu, head_name, load_model
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
def validate(model, examples: list, collate, batch_size: int, device, autocast, accelerator=None) -> dict:
    """Mean loss over the examples (weighted by batch size); accuracy too for classifiers.

    On several processes each rank takes every world-th example, all run the same number of batches (FSDP needs
    every rank in every forward; a rank out of examples repeats one with weight 0) and the sums are added up.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    was_training = model.training
    model.eval()
    loss_sum, n, correct, classifier = 0.0, 0, 0, False
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1 if chunk else 0
        batch = {k: v.to(device) for k, v in collate(chunk or examples[:1]).items()}
        with autocast():
            out = model(**batch)
        loss_sum += out.loss.float().item() * len(chunk) * weight
        n += len(chunk) * weight
        classifier = out.logits.dim() == 2  # (batch, labels): a sequence classifier
        if classifier:
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum()) * weight
    model.train(was_training)
    if accelerator is not None:
        loss_sum, n, correct = all_sum([loss_sum, n, correct], accelerator)
    result = {"loss": loss_sum / max(n, 1)}
    if classifier:
        result["accuracy"] = correct / max(n, 1)
    return result


def weights_state(net, full: bool) -> dict[str, torch.Tensor]:
    """What training changes: the adapter's tensors, or (method=full) every tensor once (tied weights once)."""
    if not full:
        return adapter_state_dict(net)
    seen, out = set(), {}
    for k, v in net.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


def load_weights_state(net, state: dict[str, torch.Tensor], full: bool) -> None:
    if full:
        with torch.no_grad():
            own = net.state_dict()
            for k, v in state.items():
                own[k].copy_(v)
    else:
        load_adapter_state(net, state)


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_checkpoint(out: Path, model, optimizer, scheduler, state: TrainState, best_state: dict | None,
                    accelerator, fsdp: bool = False, full: bool = False) -> None:
    """Adapter tensors (safetensors), optimizer, scheduler, loop position and every rank's RNG, written atomically.

    Every rank calls this (gathering sharded state is collective); rank 0 writes all but the per-rank RNG files.
    """
    main = accelerator.is_main_process
    adapter = weights_state(model, full)
    optim = optimizer_state(model, optimizer, fsdp)
    tmp = out / f"{CHECKPOINT}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if main:
        save_file(adapter, tmp / "adapter_model.safetensors")
        if best_state is not None:
            save_file(best_state, tmp / "best_adapter.safetensors")
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        tmp.rename(out / CHECKPOINT)
    accelerator.wait_for_everyone()


def load_checkpoint(out: Path, model, optimizer, scheduler, accelerator, fsdp: bool = False, full: bool = False
                    ) -> tuple[TrainState, dict | None]:
    ck = out / CHECKPOINT
    load_weights_state(model, load_file(ck / "adapter_model.safetensors"), full)
    best = load_file(ck / "best_adapter.safetensors") if (ck / "best_adapter.safetensors").exists() else None
    blob = torch.load(ck / "trainer_state.pt", weights_only=True)
    load_optimizer_state(model, optimizer, blob["optimizer"], fsdp)
    scheduler.load_state_dict(blob["scheduler"])
    rng_file = ck / f"rng_{accelerator.process_index}.pt"
    rng = torch.load(rng_file if rng_file.exists() else ck / "rng_0.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**json.loads((ck / "state.json").read_text())), best


def peak_memory() -> dict:
    """This process's peak memory so far: max allocated on a GPU, else peak RSS (loading included)."""
    if torch.cuda.is_available():
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9, "memory_kind": "GPU allocated"}
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, "memory_kind": "RSS"}


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


def save_full_model(net, tok, path: Path, meta: dict, state: dict | None = None) -> None:
    """A whole fine-tuned model as a transformers directory (safetensors) with lorakit.json beside it."""
    if state is not None:
        load_weights_state(net, state, full=True)
    net.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "lorakit.json").write_text(json.dumps(meta, indent=2) + "\n")


def make_optimizer(cfg: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged 8-bit AdamW (QLoRA's choice) where bitsandbytes and CUDA are there."""
    if cfg.optimizer == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is None or not torch.cuda.is_available():
            from .errors import UserError
            raise UserError("optimizer paged_adamw_8bit needs bitsandbytes and a CUDA GPU; use optimizer: adamw")
        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Train `cfg`'s adapter (or, with method=full, the whole model); returns the run directory (adapter/ or
    model/, run.json, loss.png).

    Under `accelerate launch` / `torchrun` every process runs this: `batch_size` is per device, each global
    micro-batch (batch_size x processes) is split between the ranks, and only rank 0 logs and writes.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    out = Path(cfg.out or Path("runs") / cfg.name)
    # Launched on several processes without a GPU, accelerate runs DDP over gloo only when told cpu=True.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), cpu=launched and not torch.cuda.is_available())
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    log = print if main else (lambda *a, **k: None)
    set_seed(cfg.seed)
    with contextlib.redirect_stdout(sys.stdout if main else io.StringIO()):
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
                      trainable=(head,) if head else (), rslora=cfg.rslora, quantize=cfg.quantize or None,
                      quantize_all=cfg.quantize_all, quant_backend=cfg.quant_backend)
    set_seed(cfg.seed)
    full = cfg.method == "full"
    if full:
        model.requires_grad_(True)
    else:
        add_lora(model, lcfg)
    if cfg.fuse_swiglu:
        fuse_swiglu(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen base's activations must carry grad to reach LoRA
    report = parameter_report(model)
    log(f"lorakit: {cfg.name}: {cfg.model} ({type(model).__name__}), task {cfg.task}")
    log(f"lorakit: {report}")
    data = encode_splits(cfg, splits, tok, model)
    for note, n in data.notes.items():
        log(f"lorakit: {note}: {n:,} training/validation records")

    strategy = "ddp" if cfg.strategy == "auto" else cfg.strategy
    if cfg.quantize and strategy == "fsdp" and world > 1:
        from .errors import UserError
        raise UserError("quantize=nf4 with --strategy fsdp is not supported yet: use DDP (the default) for QLoRA")
    if full and strategy == "fsdp" and world > 1:
        from .errors import UserError
        raise UserError("method full with --strategy fsdp is not supported: use DDP (the default)")
    if cfg.compile and strategy == "fsdp" and world > 1:
        from .errors import UserError
        raise UserError("compile with --strategy fsdp is not supported: use DDP (the default)")
    if cfg.compile:
        log(f"lorakit: compiling {compile_blocks(model)} blocks (torch.compile; the first steps are slow)")
    head_names = {f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()} if head else set()
    # on one process the model is not wrapped, so the loss may call its backbone and head itself (DDP/FSDP need
    # their wrapper's forward)
    label_only = cfg.label_only_loss and world == 1 and cfg.task != "classify" and label_only_supported(model)
    model, fsdp = wrap_model(model, accelerator, strategy)  # FSDP swaps in sharded parameters: build AdamW after
    net = accelerator.unwrap_model(model)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": [p for n, p in named if n not in head_names]}]
    if head_names:
        groups.append({"params": [p for n, p in named if n in head_names], "lr": cfg.head_lr or cfg.lr})
    optimizer = make_optimizer(cfg, groups)
    if not fsdp:
        optimizer = accelerator.prepare_optimizer(optimizer)
    global_batch = cfg.batch_size * world
    micro_per_epoch = len(data.train) // global_batch if world > 1 else math.ceil(len(data.train) / global_batch)
    if micro_per_epoch < 1:
        from .errors import UserError
        raise UserError(f"{len(data.train)} training rows cannot fill one global batch of {global_batch}")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, int(cfg.warmup * total), total))
    device = accelerator.device
    if world > 1:
        torch.manual_seed(cfg.seed + rank)  # ranks draw different dropout masks

    state, best_state = TrainState(), None
    if resume:
        if not (out / CHECKPOINT).is_dir():
            from .errors import UserError
            raise UserError(f"--resume: no checkpoint in {out / CHECKPOINT}; train without --resume first")
        state, best_state = load_checkpoint(out, net, optimizer, scheduler, accelerator, fsdp, full)
        log(f"lorakit: resumed at step {state.step} (epoch {state.epoch}, batch {state.micro})")
    log(f"lorakit: {len(data.train):,} training rows, {total} optimizer steps, lr {cfg.lr:g} ({cfg.schedule}), "
        f"precision {mixed_precision(cfg)}")
    log(f"lorakit: global batch {cfg.batch_size * world * cfg.grad_accum} = {cfg.batch_size} per device x "
        f"{world} process{'es' if world > 1 else ''}{f' ({strategy})' if world > 1 else ''} x "
        f"{cfg.grad_accum} accumulation step{'s' if cfg.grad_accum > 1 else ''}")
    if world > 1 and len(data.train) % global_batch:
        log(f"lorakit: each epoch leaves out the last {len(data.train) % global_batch} rows (a partial global batch)")

    bar = tqdm(total=total, initial=state.step, desc=f"train {cfg.name}", disable=not main, dynamic_ncols=True,
               mininterval=1.0)
    say = bar.write if main else (lambda *a, **k: None)
    model.train()
    t_loop = time.perf_counter() - state.train_seconds
    while state.step < total and not state.stopped_early:
        order = epoch_order(len(data.train), global_batch, cfg.seed, state.epoch,
                            data.lengths if cfg.group_by_length else None)[:micro_per_epoch]
        while state.micro < len(order) and state.step < total:
            group = order[state.micro:state.micro + cfg.grad_accum]
            loss_sum, tokens = 0.0, 0
            for idx in group:
                rows = rank_share(idx, rank, world) if world > 1 else idx
                batch = {k: v.to(device) for k, v in data.collate([data.train[i] for i in rows]).items()}
                with accelerator.autocast():
                    loss = (causal_lm_loss(model, batch) if label_only else model(**batch).loss) / len(group)
                accelerator.backward(loss)
                loss_sum += loss.item()
                tokens += batch_tokens(batch)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, tokens = all_sum([loss_sum / world, tokens], accelerator)
            state.micro += len(group)
            state.step += 1
            state.tokens += int(tokens)
            state.train_loss.append([state.step, loss_sum])
            state.train_seconds = time.perf_counter() - t_loop
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
            if data.val and (state.step % eval_every == 0 or state.step == total):
                with torch.compiler.set_stance("force_eager"):  # eval-mode shapes: not worth another compile
                    val = validate(model, data.val, data.collate, cfg.batch_size, device, accelerator.autocast,
                                   accelerator)
                state.val_history.append({"step": state.step, **val})
                say(f"step {state.step}: val loss {val['loss']:.4f}"
                    + (f", val accuracy {val['accuracy']:.4f}" if "accuracy" in val else ""))
                if state.best_val is None or val["loss"] < state.best_val:
                    state.best_val, state.best_step, state.bad_evals = val["loss"], state.step, 0
                    # a copy: on CPU the state dict's tensors are the live parameters themselves
                    best_state = {k: v.clone() for k, v in weights_state(net, full).items()}
                else:
                    state.bad_evals += 1
                    if cfg.early_stopping and state.bad_evals >= cfg.early_stopping:
                        state.stopped_early = True
                        say(f"early stop at step {state.step}: no val improvement in {state.bad_evals} evaluations")
                        break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(out, net, optimizer, scheduler, state, best_state, accelerator, fsdp, full)
        if state.micro >= len(order):
            state.epoch, state.micro = state.epoch + 1, 0
    bar.close()

    if cfg.checkpoint_every:
        save_checkpoint(out, net, optimizer, scheduler, state, best_state, accelerator, fsdp, full)
    keep_best = best_state is not None and state.best_step != state.step
    final = best_state if keep_best else weights_state(net, full)  # gathered on every rank: collective under FSDP
    if main:
        if keep_best:
            log(f"lorakit: keeping the {'model' if full else 'adapter'} of step {state.best_step} (best val loss {state.best_val:.4f})")
        meta = {"task": cfg.task, "model": cfg.model, "labels": splits.labels, "template": cfg.template,
                "max_length": cfg.max_length, "run": cfg.name, "quantize": cfg.quantize or None, "method": cfg.method}
        if full:
            save_full_model(net, tok, out / "model", meta, final if keep_best else None)
        else:
            save_adapter(net, out / "adapter", metadata=meta, state=final)
        run = {"config": cfg.to_dict(), "versions": versions(), "parameters": report.to_dict(),
               "data": splits.stats | {"train_rows": len(data.train), "val_rows": len(data.val),
                                       "test_rows": len(splits.test), "notes": data.notes},
               "distributed": {"processes": world, "strategy": strategy if world > 1 else "none",
                               "global_batch": cfg.batch_size * world * cfg.grad_accum},
               "metrics": {"final_train_loss": state.train_loss[-1][1] if state.train_loss else None,
                           "best_val_loss": state.best_val, "best_step": state.best_step,
                           "val_history": state.val_history, "stopped_early": state.stopped_early},
               "timings": {"total_s": time.perf_counter() - t_start, "train_s": state.train_seconds,
                           "steps": state.step, "tokens": state.tokens,
                           "tokens_per_s": state.tokens / max(state.train_seconds, 1e-9), **peak_memory()},
               "train_loss": state.train_loss}
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        what = "full fine-tune" if full else f"{'QLoRA' if cfg.quantize else 'LoRA'} r={cfg.r}"
        plot_losses(state, out / "loss.png", f"{cfg.name}: {cfg.model} + {what}")
        log(f"lorakit: {'model' if full else 'adapter'} -> {out / ('model' if full else 'adapter')}; "
            f"run.json and loss.png in {out}")
    accelerator.wait_for_everyone()
    return out
