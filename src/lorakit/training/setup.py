"""Setting a run up: the launch (one process, DDP or FSDP), the model with its adapter and kernels, the data read,
split and encoded for it, the plan of steps, and the checks that refuse to overwrite work."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..config import RunConfig
from ..config.paths import check_writable
from ..engine import LoRAConfig, ParameterReport, add_lora, load_adapter, parameter_report, read_adapter_config
from ..engine.precision import resolve_dtype, store_frozen
from ..errors import DataError, UserError
from ..models import adapter_dir, compile_blocks, fuse_swiglu, head_name, is_seq2seq, load_model
from ..models.attention import use_attention_kernel
from ..models.rms_norm import use_norm_kernel
from ..data import Encoded, Splits, encode, read, split
from .checkpoint import CHECKPOINT
from .distributed import wrap_model
from .loss import label_only_supported, supervised_objective
from .preference import REFERENCE, preference_objective, reference_adapter


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
    objective: Callable  # (model, batch) -> (loss, metrics): the LM loss, or a preference loss
    reference: str | None  # a preference run's reference adapter (None: the base, adapters off)
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


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_dtype(cfg: RunConfig) -> torch.dtype:
    """What the frozen base is stored and computed in (`precision`): auto is bf16 where the hardware computes it,
    except where nothing is frozen (method full), autocast was asked for, or FSDP shards the parameters (its flat
    parameters hold one dtype)."""
    fsdp = cfg.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.precision == "bf16" and fsdp:
        raise UserError("precision bf16 with --strategy fsdp is not supported: use DDP (the default) or precision fp32")
    if cfg.precision == "auto" and (cfg.method == "full" or cfg.mixed_precision not in ("auto", "no") or fsdp):
        return torch.float32
    return resolve_dtype(cfg.precision, device_type())


def mixed_precision(cfg: RunConfig) -> str:
    """accelerate's autocast: 'auto' is none where the base is stored in bf16 (precision), bf16 on a GPU that has it,
    else none (CPUs without bf16 units run bf16 matmuls far slower)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if base_dtype(cfg) == torch.bfloat16:
        return "no"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def precision_note(cfg: RunConfig) -> str:
    """The run's precision in words, for the plan line and run.json."""
    if base_dtype(cfg) == torch.bfloat16:
        return "bf16 (frozen base stored in bf16; adapters and optimizer fp32)"
    autocast = mixed_precision(cfg)
    return "fp32" if autocast == "no" else f"fp32 weights, {autocast} autocast"


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
    elif cfg.init_adapter:
        start_from_adapter(model, cfg)
    else:
        add_lora(model, LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                                   exclude=cfg.exclude, trainable=(head,) if head else (), rslora=cfg.rslora,
                                   dora=cfg.dora, init=cfg.init, quantize=cfg.quantize or None,
                                   quantize_all=cfg.quantize_all, quant_backend=cfg.quant_backend))
    if cfg.fuse_swiglu:
        fuse_swiglu(model)
    store_frozen(model, base_dtype(cfg))
    if device_type() == "cpu" and not cfg.compile:  # torch.compile traces ATen, not a C++ extension
        use_attention_kernel(model)
        use_norm_kernel(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen base's activations must carry grad to reach LoRA
    return model, tokenizer, head


def start_from_adapter(model: torch.nn.Module, cfg: RunConfig) -> None:
    """Train on from a saved adapter (`init_adapter`: a run or adapter directory) as adapter "default"; a
    preference run also loads it, frozen, as "reference", which its loss compares against. Its own LoRA settings
    (rank, alpha, targets, dropout) are the ones that apply."""
    path = adapter_dir(cfg.init_adapter)
    if cfg.task == "preference":
        load_adapter(model, path, REFERENCE, quantize=cfg.quantize or None, quant_backend=cfg.quant_backend)
    load_adapter(model, path, "default", quantize=cfg.quantize or None, quant_backend=cfg.quant_backend)
    saved = read_adapter_config(path)
    tqdm.write(f"lorakit: starting from the adapter in {path} (r={saved.get('r')}, alpha={saved.get('lora_alpha')}, "
               f"dropout {saved.get('lora_dropout') or 0}); the recipe's r, alpha, targets and dropout do not apply"
               + ("; it is also the frozen reference" if cfg.task == "preference" else ""))


def objective_for(cfg: RunConfig, model: torch.nn.Module, world: int) -> Callable:
    """The loss a step minimises: a preference loss for task preference; else the LM loss (label-only and chunked on
    one process for the models it is exact for; DDP/FSDP need their wrapper's forward) or the model's own."""
    if cfg.task == "preference":
        return preference_objective(cfg, reference_adapter(cfg))
    label_only = cfg.label_only_loss and world == 1 and cfg.task != "classify" and label_only_supported(model)
    return supervised_objective(label_only)


def set_up(cfg: RunConfig, accelerator, strategy: str) -> Run:
    """Data, model, LoRA and kernels, encoded splits, and the model wrapped for this launch."""
    started = time.perf_counter()
    log = tqdm.write if accelerator.is_main_process else (lambda message: None)
    set_seed(cfg.seed)
    splits = split(read(cfg), cfg)
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
    data = encode(splits, cfg, tokenizer, is_seq2seq(model))
    for note, n in data.notes.items():
        log(f"lorakit: {note}: {n:,} training/validation records")
    if cfg.compile:
        log(f"lorakit: compiling {compile_blocks(model)} blocks (torch.compile; the first steps are slow)")
    head_params = {f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()} if head else set()
    objective = objective_for(cfg, model, accelerator.num_processes)
    wrapped, fsdp = wrap_model(model, accelerator, strategy)  # FSDP swaps in sharded parameters: build AdamW after
    model = accelerator.unwrap_model(wrapped)
    trained = [p for p in model.parameters() if p.requires_grad]
    return Run(cfg, cfg.out_dir, accelerator, model, wrapped, tokenizer, splits, data, report, trained, head_params,
               strategy, fsdp, objective, reference_adapter(cfg), started)


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


def log_plan(run: Run, plan: Plan) -> None:
    cfg, world = run.cfg, run.world
    loraplus = f", LoRA+ B matrices at lr x {cfg.loraplus_lr_ratio:g}" if cfg.loraplus_lr_ratio else ""
    run.log(f"lorakit: {len(run.data.train):,} training rows, {plan.total} optimizer steps, lr {cfg.lr:g} "
            f"({cfg.schedule}{loraplus}), precision {precision_note(cfg)}")
    run.log(f"lorakit: global batch {plan.global_batch * cfg.grad_accum} = {cfg.batch_size} per device x "
            f"{world} process{'es' if world > 1 else ''}{f' ({run.strategy})' if world > 1 else ''} x "
            f"{cfg.grad_accum} accumulation step{'s' if cfg.grad_accum > 1 else ''}")
    if world > 1 and len(run.data.train) % plan.global_batch:
        run.log(f"lorakit: each epoch leaves out the last {len(run.data.train) % plan.global_batch} rows "
                "(a partial global batch)")


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Never train over a finished run or an unfinished one's checkpoint without being told to, nor start a run
    whose folder cannot be written."""
    check_writable(out, "--out", directory=True)
    if resume or overwrite:
        return
    if (out / "run.json").is_file():
        raise UserError(f"{out} already holds a finished run (run.json); pass --out NEW_DIR for a new run or "
                        "--overwrite to replace it")
    if (out / CHECKPOINT).is_dir():
        raise UserError(f"{out} holds the checkpoint of an unfinished run; pass --resume to continue it, "
                        "--out NEW_DIR for a new run, or --overwrite to start again")
