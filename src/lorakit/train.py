"""The training loop: a plain loop over accelerate.Accelerator, so `accelerate launch` / `torchrun` run it unchanged.

`train()` is the whole run as named steps: set up the run (data, model, LoRA, kernels, wrapping), check the launch,
plan the steps, build the optimizer and schedule, resume, fit, finish. `fit()` is the loop on one screen;
`train_step()` one optimizer step. Checkpoints are in checkpoint.py, run.json and loss.png in run_record.py.
AdamW with warmup and a cosine/linear/constant schedule, gradient accumulation and clipping, mixed precision where
the device has it, gradient checkpointing, validation every N steps with early stopping. With method=full the same
loop trains every parameter and saves a whole model directory (model/) instead of an adapter.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .adapters import save_adapter
from .checkpoint import CHECKPOINT, TrainState, load_checkpoint, load_weights_state, save_checkpoint, weights_state
from .config import RunConfig
from .data import DataError
from .distributed import all_sum, rank_share, wrap_model
from .errors import TrainingStopped, UserError
from .files import atomic_dir
from .inject import ParameterReport, add_lora, parameter_report
from .kernels import compile_blocks, fuse_swiglu
from .lora import LoRAConfig
from .loss import causal_lm_loss, heldout_loss_sum, label_only_supported
from .models import head_name, is_seq2seq, load_model
from .run_record import timings, versions, write_run_record
from .tasks import Encoded, Splits, encode_splits, load_splits


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
    """Tokens a batch feeds the model: its attention mask's ones (padding not counted)."""
    m = batch.get("attention_mask")
    return int(m.sum()) if m is not None and m.dim() == 2 else batch["input_ids"].numel()


def mixed_precision(cfg: RunConfig) -> str:
    """'auto': bf16 on a GPU that has it, else fp32 (CPUs without bf16 units run bf16 matmuls far slower)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@torch.no_grad()
def validate(model, examples: list, collate, batch_size: int, device, autocast, accelerator=None) -> dict:
    """Held-out loss, token-weighted over the trained tokens (as `lorakit eval` computes it); accuracy too for
    classifiers (one target per example).

    On several processes each rank takes every world-th example, all run the same number of batches (FSDP needs
    every rank in every forward; a rank out of examples repeats one with weight 0) and the sums are added up.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    seq2seq = is_seq2seq(accelerator.unwrap_model(model) if accelerator else model)
    mine = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    was_training = model.training
    model.eval()
    loss_sum, targets, correct, examples_seen, classifier = 0.0, 0, 0, 0, False
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1 if chunk else 0
        batch = {k: v.to(device) for k, v in collate(chunk or examples[:1]).items()}
        with autocast():
            summed, n, logits = heldout_loss_sum(model, batch, seq2seq)
        loss_sum, targets = loss_sum + summed * weight, targets + n * weight
        classifier = logits.dim() == 2  # (batch, labels): a sequence classifier
        if classifier:
            correct += int((logits.argmax(-1) == batch["labels"]).sum()) * weight
            examples_seen += len(chunk)
    model.train(was_training)
    if accelerator is not None:
        loss_sum, targets, correct, examples_seen = all_sum([loss_sum, targets, correct, examples_seen], accelerator)
    result = {"loss": loss_sum / max(targets, 1)}
    if classifier:
        result["accuracy"] = correct / max(examples_seen, 1)
    return result


def make_optimizer(cfg: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' paged 8-bit AdamW (QLoRA's choice) where bitsandbytes and CUDA are there."""
    if cfg.optimizer == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is None or not torch.cuda.is_available():
            raise UserError("optimizer paged_adamw_8bit needs bitsandbytes and a CUDA GPU; use optimizer: adamw")
        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)



def save_full_model(model, tokenizer, path: Path, meta: dict, state: dict | None = None) -> None:
    """A whole fine-tuned model as a transformers directory (safetensors) with lorakit.json beside it."""
    if state is not None:
        load_weights_state(model, state, full=True)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lorakit.json").write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class Run:
    """What the steps of a run share: its config and directory, the launch, the model and its data."""

    cfg: RunConfig
    out: Path
    accelerator: Accelerator
    model: torch.nn.Module  # the model being trained (plain, whatever the launch)
    wrapped: torch.nn.Module  # what forward and backward run through: model, or its DDP/FSDP wrapper
    tokenizer: object
    splits: Splits
    data: Encoded
    report: ParameterReport
    trained: list  # the parameters that train, in model order
    head_params: set  # names of a classifier head's parameters (their own lr)
    strategy: str
    fsdp: bool
    label_only: bool
    started: float

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def full(self) -> bool:
        return self.cfg.method == "full"

    def log(self, message: str) -> None:
        """Print on rank 0 only, above the progress bar."""
        if self.main:
            tqdm.write(message)


@dataclass
class Plan:
    """How many micro-batches make an epoch, optimizer steps in all, and how often to validate."""

    global_batch: int
    micro_per_epoch: int
    total: int
    eval_every: int


def make_accelerator(cfg: RunConfig) -> Accelerator:
    # Launched on several processes without a GPU, accelerate runs DDP over gloo only when told cpu=True.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision(cfg), cpu=launched and not torch.cuda.is_available())


def check_launch(cfg: RunConfig, world: int) -> str:
    """The strategy this launch uses; combinations that cannot run on it are a UserError before anything loads."""
    strategy = "ddp" if cfg.strategy == "auto" else cfg.strategy
    if strategy == "fsdp" and world > 1:
        for wanted, what in ((cfg.quantize, "quantize=nf4"), (cfg.method == "full", "method full"),
                             (cfg.compile, "compile")):
            if wanted:
                raise UserError(f"{what} with --strategy fsdp is not supported: use DDP (the default)")
    return strategy


def build_model(cfg: RunConfig, labels: list[str] | None):
    """The base model with the task's head, LoRA (or every parameter trainable for method=full) and the kernels."""
    model, tokenizer = load_model(cfg.model, cfg.task, num_labels=len(labels) if labels else None)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    head = head_name(model) if cfg.task == "classify" else None
    set_seed(cfg.seed)
    if cfg.method == "full":
        model.requires_grad_(True)
    else:
        add_lora(model, LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                                   exclude=cfg.exclude, trainable=(head,) if head else (), rslora=cfg.rslora,
                                   dora=cfg.dora, init=cfg.init, quantize=cfg.quantize or None,
                                   quantize_all=cfg.quantize_all, quant_backend=cfg.quant_backend))
    if cfg.fuse_swiglu:
        fuse_swiglu(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen base's activations must carry grad to reach LoRA
    return model, tokenizer, head


def set_up(cfg: RunConfig, accelerator, strategy: str) -> Run:
    """Data, model, LoRA and kernels, encoded splits, and the model wrapped for this launch."""
    started = time.perf_counter()
    log = tqdm.write if accelerator.is_main_process else (lambda message: None)
    set_seed(cfg.seed)
    splits = load_splits(cfg)
    for stats in splits.loaded.values():
        log(f"data: {stats}")
    if not splits.train:
        raise DataError(f"{cfg.data}: the training split is empty")
    empty = [name for name, part in (("validation", splits.val), ("test", splits.test)) if not part]
    if empty:
        log(f"lorakit: note: {len(splits.train):,} training records and no {' or '.join(empty)} records "
            f"(split {'/'.join(f'{x:g}' for x in cfg.split)}): nothing to validate or test on; add records or give "
            "val_data / test_data")
    model, tokenizer, head = build_model(cfg, splits.labels)
    report = parameter_report(model)
    log(f"lorakit: {cfg.name}: {cfg.model} ({type(model).__name__}), task {cfg.task}")
    log(f"lorakit: {report}")
    data = encode_splits(cfg, splits, tokenizer, model)
    for note, n in data.notes.items():
        log(f"lorakit: {note}: {n:,} training/validation records")
    if cfg.compile:
        log(f"lorakit: compiling {compile_blocks(model)} blocks (torch.compile; the first steps are slow)")
    head_params = {f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()} if head else set()
    # on one process the model is not wrapped, so the loss may call its backbone and head itself (DDP/FSDP need
    # their wrapper's forward)
    world = accelerator.num_processes
    label_only = cfg.label_only_loss and world == 1 and cfg.task != "classify" and label_only_supported(model)
    wrapped, fsdp = wrap_model(model, accelerator, strategy)  # FSDP swaps in sharded parameters: build AdamW after
    model = accelerator.unwrap_model(wrapped)
    trained = [p for p in model.parameters() if p.requires_grad]
    return Run(cfg, run_dir(cfg), accelerator, model, wrapped, tokenizer, splits, data,
               report, trained, head_params, strategy, fsdp, label_only, started)


def plan_steps(run: Run) -> Plan:
    """Micro-batches per epoch (a last partial global batch is left out on several processes), steps in all."""
    cfg, rows = run.cfg, len(run.data.train)
    global_batch = cfg.batch_size * run.world
    micro_per_epoch = rows // global_batch if run.world > 1 else math.ceil(rows / global_batch)
    if micro_per_epoch < 1:
        raise UserError(f"{rows} training rows cannot fill one global batch of {global_batch}")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return Plan(global_batch, micro_per_epoch, total, cfg.eval_every or steps_per_epoch)


def param_groups(model: torch.nn.Module, cfg: RunConfig, head_params: set[str]) -> list[dict]:
    """The optimizer's groups: everything trained at lr; a classifier head at head_lr; with loraplus_lr_ratio
    (LoRA+, Hayou et al. 2024) the LoRA B matrices, and 1-D parameters as PEFT's create_loraplus_optimizer
    groups them, at lr x ratio: B starts at zero and learns best with the larger step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = cfg.loraplus_lr_ratio
    faster = {n for n, p in named if ratio and n not in head_params and (".lora_B." in n or p.ndim == 1)}
    groups = [{"params": [p for n, p in named if n not in head_params and n not in faster]}]
    if faster:
        groups.append({"params": [p for n, p in named if n in faster], "lr": cfg.lr * ratio})
    if head_params:
        groups.append({"params": [p for n, p in named if n in head_params], "lr": cfg.head_lr or cfg.lr})
    return groups


def build_optimizer(run: Run, plan: Plan):
    """AdamW over `param_groups` and the warmup-then-decay schedule over the planned steps."""
    cfg = run.cfg
    optimizer = make_optimizer(cfg, param_groups(run.model, cfg, run.head_params))
    if not run.fsdp:
        optimizer = run.accelerator.prepare_optimizer(optimizer)
    schedule = lr_lambda(cfg.schedule, int(cfg.warmup * plan.total), plan.total)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def start_state(run: Run, optimizer, scheduler, resume: bool) -> tuple[TrainState, dict | None]:
    """A fresh loop state, or the checkpoint's (weights, optimizer, scheduler and RNG restored) with --resume."""
    if run.world > 1:
        torch.manual_seed(run.cfg.seed + run.accelerator.process_index)  # ranks draw different dropout masks
    if not resume:
        return TrainState(), None
    if not (run.out / CHECKPOINT).is_dir():
        raise UserError(f"--resume: no checkpoint in {run.out / CHECKPOINT}; train without --resume first")
    state, best_state = load_checkpoint(run.out, run.model, optimizer, scheduler, run.accelerator, run.fsdp,
                                        run.full)
    state.stopped_by = ""  # what stopped it last time (a signal, a non-finite loss) is over
    run.log(f"lorakit: resumed at step {state.step} (epoch {state.epoch}, batch {state.micro})")
    return state, best_state


def log_plan(run: Run, plan: Plan) -> None:
    cfg, world = run.cfg, run.world
    loraplus = f", LoRA+ B matrices at lr x {cfg.loraplus_lr_ratio:g}" if cfg.loraplus_lr_ratio else ""
    run.log(f"lorakit: {len(run.data.train):,} training rows, {plan.total} optimizer steps, lr {cfg.lr:g} "
            f"({cfg.schedule}{loraplus}), precision {mixed_precision(cfg)}")
    run.log(f"lorakit: global batch {plan.global_batch * cfg.grad_accum} = {cfg.batch_size} per device x "
            f"{world} process{'es' if world > 1 else ''}{f' ({run.strategy})' if world > 1 else ''} x "
            f"{cfg.grad_accum} accumulation step{'s' if cfg.grad_accum > 1 else ''}")
    if world > 1 and len(run.data.train) % plan.global_batch:
        run.log(f"lorakit: each epoch leaves out the last {len(run.data.train) % plan.global_batch} rows "
                "(a partial global batch)")


def train_step(run: Run, optimizer, scheduler, group: list[list[int]]) -> tuple[float, int]:
    """One optimizer step over the micro-batches of `group` (gradient accumulation); returns the step's mean loss
    and its tokens, summed over all processes. A non-finite loss is returned without stepping."""
    loss_sum, tokens = 0.0, 0
    for rows in group:
        rows = rank_share(rows, run.accelerator.process_index, run.world) if run.world > 1 else rows
        batch = {k: v.to(run.accelerator.device) for k, v in run.data.collate([run.data.train[i] for i in rows]).items()}
        with run.accelerator.autocast():
            loss = (causal_lm_loss(run.wrapped, batch) if run.label_only else run.wrapped(**batch).loss) / len(group)
        run.accelerator.backward(loss)
        loss_sum += loss.item()
        tokens += batch_tokens(batch)
    loss_sum, tokens = all_sum([loss_sum / run.world, tokens], run.accelerator)
    if math.isfinite(loss_sum):  # a non-finite loss is never applied: the weights stay those of the last good step
        if run.cfg.max_grad_norm:
            run.accelerator.clip_grad_norm_(run.trained, run.cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, int(tokens)


def validate_and_keep_best(run: Run, state: TrainState, best_state: dict | None) -> dict | None:
    """Validate, record it, and return the weights of the best validation loss so far; sets stopped_early when
    `early_stopping` evaluations in a row brought no improvement."""
    with torch.compiler.set_stance("force_eager"):  # eval-mode shapes: not worth another compile
        val = validate(run.wrapped, run.data.val, run.data.collate, run.cfg.batch_size, run.accelerator.device,
                       run.accelerator.autocast, run.accelerator)
    state.val_history.append({"step": state.step, **val})
    run.log(f"step {state.step}: val loss {val['loss']:.4f}"
            + (f", val accuracy {val['accuracy']:.4f}" if "accuracy" in val else ""))
    if state.best_val is None or val["loss"] < state.best_val:
        state.best_val, state.best_step, state.bad_evals = val["loss"], state.step, 0
        # a copy: on CPU the state dict's tensors are the live parameters themselves
        return {k: v.clone() for k, v in weights_state(run.model, run.full).items()}
    state.bad_evals += 1
    if run.cfg.early_stopping and state.bad_evals >= run.cfg.early_stopping:
        state.stopped_early = True
        run.log(f"early stop at step {state.step}: no val improvement in {state.bad_evals} evaluations")
    return best_state


def fit(run: Run, plan: Plan, optimizer, scheduler, state: TrainState, best_state: dict | None,
        stop: StopRequest) -> dict | None:
    """The loop: epochs of length-grouped micro-batches drawn from (seed, epoch), an optimizer step per
    `grad_accum` of them, validation and checkpoints on their schedules, until the last step, early stopping, a
    non-finite loss or a stop request. Returns the best validation weights."""
    cfg = run.cfg
    bar = tqdm(total=plan.total, initial=state.step, desc=f"train {cfg.name}", disable=not run.main,
               dynamic_ncols=True, mininterval=1.0)
    run.wrapped.train()
    loop_started = time.perf_counter() - state.train_seconds
    while state.step < plan.total and not state.stopped_early:
        order = epoch_order(len(run.data.train), plan.global_batch, cfg.seed, state.epoch,
                            run.data.lengths if cfg.group_by_length else None)[:plan.micro_per_epoch]
        while state.micro < len(order) and state.step < plan.total:
            group = order[state.micro:state.micro + cfg.grad_accum]
            loss, tokens = train_step(run, optimizer, scheduler, group)
            if not math.isfinite(loss):
                state.stopped_by = "loss"
                run.log(f"lorakit: step {state.step + 1}: the loss is {loss}; stopped before applying it")
                break
            state.micro, state.step, state.tokens = state.micro + len(group), state.step + 1, state.tokens + tokens
            state.train_loss.append([state.step, loss])
            state.train_seconds = time.perf_counter() - loop_started
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
            if run.data.val and (state.step % plan.eval_every == 0 or state.step == plan.total):
                best_state = validate_and_keep_best(run, state, best_state)
                if state.stopped_early:
                    break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(run.out, run.model, optimizer, scheduler, state, best_state, run.accelerator,
                                run.fsdp, run.full)
            if (signal_name := stop.asked(run.accelerator)):
                state.stopped_by = signal_name
                break
        if state.stopped_by:
            break
        if state.micro >= len(order):
            state.epoch, state.micro = state.epoch + 1, 0
    bar.close()
    return best_state


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM while training: the current step finishes, a checkpoint is written, the run stops
    and says how to resume. A second Ctrl-C stops at once. On several processes every rank stops at the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log) -> None:
        self.name, self.log, self.previous = "", log, {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        if self.name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        self.log(f"lorakit: {self.name}: finishing this step, then writing a checkpoint (Ctrl-C again: stop now)")

    def asked(self, accelerator) -> str:
        """The signal's name once one came (to any rank), else ''."""
        if accelerator.num_processes == 1:
            return self.name
        return (self.name or "SIGTERM") if all_sum([float(bool(self.name))], accelerator)[0] else ""


def finish(run: Run, optimizer, scheduler, state: TrainState, best_state: dict | None) -> None:
    """The last checkpoint; the adapter (or model/) of the best validation step; run.json and loss.png."""
    cfg, what = run.cfg, "model" if run.full else "adapter"
    if cfg.checkpoint_every or state.stopped_by:
        save_checkpoint(run.out, run.model, optimizer, scheduler, state, best_state, run.accelerator, run.fsdp,
                        run.full)
    if state.stopped_by and state.stopped_by != "loss":
        run.accelerator.wait_for_everyone()
        return  # interrupted: the checkpoint is the result; --resume finishes the run
    keep_best = best_state is not None and state.best_step != state.step
    result = best_state if keep_best else weights_state(run.model, run.full)  # collective under FSDP
    if run.main:
        if keep_best:
            run.log(f"lorakit: keeping the {what} of step {state.best_step} (best val loss {state.best_val:.4f})")
        meta = {"task": cfg.task, "model": cfg.model, "labels": run.splits.labels, "template": cfg.template,
                "max_length": cfg.max_length, "run": cfg.name, "quantize": cfg.quantize or None, "method": cfg.method}
        if run.full:
            save_full_model(run.model, run.tokenizer, run.out / "model", meta, result if keep_best else None)
        else:
            save_adapter(run.model, run.out / "adapter", metadata=meta, state=result)
        record = {"config": cfg.to_dict(), "versions": versions(), "parameters": run.report.to_dict(),
                  "data": run.splits.stats | {"train_rows": len(run.data.train), "val_rows": len(run.data.val),
                                              "test_rows": len(run.splits.test), "notes": run.data.notes},
                  "distributed": {"processes": run.world, "strategy": run.strategy if run.world > 1 else "none",
                                  "global_batch": cfg.batch_size * run.world * cfg.grad_accum},
                  "timings": timings(state, time.perf_counter() - run.started)}
        method = "full fine-tune" if run.full else f"{'QLoRA' if cfg.quantize else 'LoRA'} r={cfg.r}"
        write_run_record(run.out, record, state, f"{cfg.name}: {cfg.model} + {method}")
        run.log(f"lorakit: {what} -> {run.out / what}; run.json and loss.png in {run.out}")
    run.accelerator.wait_for_everyone()


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train `cfg`'s adapter (or, with method=full, the whole model); returns the run directory (adapter/ or
    model/, run.json, loss.png).

    Under `accelerate launch` / `torchrun` every process runs this: `batch_size` is per device, each global
    micro-batch (batch_size x processes) is split between the ranks, and only rank 0 logs and writes.
    """
    accelerator = make_accelerator(cfg)
    strategy = check_launch(cfg, accelerator.num_processes)
    check_run_dir(run_dir(cfg), resume, overwrite)
    run = set_up(cfg, accelerator, strategy)
    plan = plan_steps(run)
    optimizer, scheduler = build_optimizer(run, plan)
    state, best_state = start_state(run, optimizer, scheduler, resume)
    log_plan(run, plan)
    with StopRequest(run.log) as stop:
        best_state = fit(run, plan, optimizer, scheduler, state, best_state, stop)
    finish(run, optimizer, scheduler, state, best_state)
    if state.stopped_by:
        raise stopped(run, state)
    return run.out


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out or Path("runs") / cfg.name)


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Never train over a finished run or an unfinished one's checkpoint without being told to."""
    if resume or overwrite:
        return
    if (out / "run.json").is_file():
        raise UserError(f"{out} already holds a finished run (run.json); pass --out NEW_DIR for a new run or "
                        "--overwrite to replace it")
    if (out / CHECKPOINT).is_dir():
        raise UserError(f"{out} holds the checkpoint of an unfinished run; pass --resume to continue it, "
                        "--out NEW_DIR for a new run, or --overwrite to start again")


def stopped(run: Run, state: TrainState) -> TrainingStopped:
    """The one-line account of a run that stopped early on purpose, with the exit code that goes with it."""
    where = f"checkpoint in {run.out / CHECKPOINT}"
    if state.stopped_by == "loss":
        kept = (f"the adapter of step {state.best_step} (best validation loss)" if state.best_step else
                f"the weights of step {state.step}, the last good one")
        return TrainingStopped(
            f"step {state.step + 1}: the training loss is not finite (nan or inf), so training stopped before "
            f"applying it. Likely causes: a learning rate too high (lr {run.cfg.lr:g}: try 10x lower), fp16 overflow "
            f"(use bf16 or no mixed precision), or broken records. Saved: {kept} in {run.out}, {where}", 1)
    code = 128 + getattr(signal, state.stopped_by, signal.SIGINT)
    return TrainingStopped(f"interrupted ({state.stopped_by}) after step {state.step} of the run; {where}; "
                           "continue with the same command and --resume", code)
