"""What a run is: `RunConfig`, every setting of one training run, each checked against its choices and ranges."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError
from .paths import data_file, run_dir
from .choices import (CHAT_TASKS, DTYPES, INFER_DTYPES, INITS, METHODS, OPTIMIZERS, PRECISIONS, PREFERENCE_LOSSES,
                      QUANT_BACKENDS, QUANTIZE, REFERENCE_FREE, REPORT_TO, SCHEDULES, STRATEGIES,
                      TARGET_PRESETS, TASKS, TEMPLATES, TRAIN_ON, default_template, one_of)


class ConfigError(UserError):
    """A recipe or flag that cannot be used; the message names the file and key."""


@dataclass
class RunConfig:
    """Everything one training run needs. YAML sections are only grouping: keys are unique across them."""

    # model
    model: str = "smollm2"
    task: str = "instruct"
    name: str = ""
    # data
    data: str = ""
    val_data: str = ""
    test_data: str = ""
    labels: list[str] = field(default_factory=list)
    text_field: str = "text"
    label_field: str = "label"
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    balance: bool = False
    max_records: int = 0  # 0: all; else the first N after shuffling, for quick runs
    max_eval_records: int = 0  # caps test (and val, unless max_val_records is set)
    max_val_records: int = 0
    skip_invalid: bool = False
    template: str = ""  # alpaca, chat or chatml; "": chat for task chat, else alpaca
    train_on_prompt: bool = False
    train_on: str = "all"  # chat: the loss on every assistant turn, or on the last one only
    max_length: int = 256
    pack: bool = False
    share_prefix: bool = True  # packed rows keep a prompt preamble their examples share once (same loss, fewer tokens)
    group_by_length: bool = True  # batch examples of similar length: far less padding
    # lora
    method: str = "lora"  # lora, qlora (lora on an NF4 base) or full (every parameter trained)
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"  # or attention, mlp (TARGET_PRESETS), module names, a regex
    exclude: list[str] = field(default_factory=list)
    rslora: bool = False
    dora: bool = False  # DoRA: magnitude per output feature x direction of W + s·B·A (engine/dora.py)
    init: str = "kaiming"  # kaiming, gaussian, pissa or olora: LoRA's starting A and B (INITS)
    quantize: str = ""  # "nf4": QLoRA (base weights of the adapted layers in 4-bit NormalFloat)
    quantize_all: bool = False  # with quantize: the non-adapted linears too
    quant_backend: str = "auto"  # torch (lorakit's NF4), bitsandbytes (Linear4bit); auto: bitsandbytes where installed
    # train
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    optimizer: str = "adamw"  # or paged_adamw_8bit (bitsandbytes, CUDA)
    head_lr: float = 0.0  # 0: same as lr
    loraplus_lr_ratio: float = 0.0  # LoRA+: B matrices at lr x ratio (PEFT's create_loraplus_optimizer); 0: off
    full_lr: float = 0.0  # lr when method is full (0: lr); `lorakit compare` defaults it to lr/10
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of steps
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    precision: str = "auto"  # frozen base in bf16 or fp32; auto: bf16 where the hardware computes it (DTYPES)
    mixed_precision: str = "auto"  # autocast over fp32 weights (a GPU's fp16); auto: none when precision is bf16
    gradient_checkpointing: bool = False
    fuse_swiglu: bool = True  # Llama-style MLPs keep one activation fewer for backward (exact; see kernels.py)
    label_only_loss: bool = True  # LM head + loss on labelled positions only, in chunks (exact; see loss.py)
    compile: bool = False  # torch.compile each decoder block (CPU: needs a C++ compiler)
    eval_every: int = 0  # 0: once per epoch
    early_stopping: int = 0  # evaluations without val improvement before stopping; 0: off
    checkpoint_every: int = 0
    strategy: str = "auto"  # on several processes: ddp (auto) or fsdp
    report_to: list[str] = field(default_factory=list)  # trackers besides metrics.jsonl: tensorboard, mlflow, trackio
    seed: int = 42
    out: str = ""
    # preference (task preference)
    loss: str = "sigmoid"  # sigmoid (DPO), ipo, hinge, robust; reference-free orpo, simpo (PREFERENCE_LOSSES)
    beta: float = 0.1  # DPO's beta (IPO's tau); ORPO's lambda; SimPO's beta
    label_smoothing: float = 0.0  # sigmoid: cDPO's flip probability; robust; simpo
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    precompute_reference: bool = False  # the reference log-probabilities once, before the first step (kept in the run)
    init_adapter: str = ""  # start from this trained adapter (a run or adapter directory); the preference reference
    # eval
    max_new_tokens: int = 64
    infer_dtype: str = "auto"  # generation and evaluation: fp32 (exact), bf16 or int8 weights; auto as precision
    num_samples: int = 5

    recipe_path: str = ""

    def data_file(self, name: str, key: str = "data") -> Path:
        """One of this run's data files (`key`: data, val_data or test_data), resolved against its recipe."""
        return data_file(name, self.recipe_path, key)

    @property
    def out_dir(self) -> Path:
        """The run directory: `out`, else runs/NAME."""
        return run_dir(self.out, self.name)

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = {f.name: f for f in fields(RunConfig)}
SECTIONS = ("model", "data", "lora", "preference", "train", "eval")


def coerce(key: str, value, where: str):
    """Convert a YAML or command-line value to the field's type, with an error naming the key."""
    default = getattr(RunConfig(), key)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return _finite(float(value), key, where)
        if isinstance(default, list):
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            return [float(v) for v in items] if key == "split" else items
        if key == "targets" and isinstance(value, list):
            return value
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} = {value!r} is not a valid {type(default).__name__}") from None


def _finite(number: float, key: str, where: str) -> float:
    if not math.isfinite(number):
        raise ConfigError(f"{where}: {key} = {number} is not a finite number")
    return number


def _check_choice(cfg: RunConfig, key: str, choices: tuple[str, ...], where: str) -> None:
    value = getattr(cfg, key)
    if value not in choices:
        raise ConfigError(f"{where}: {key} {value!r} must be {one_of(choices)}")


def _check_preference(cfg: RunConfig, where: str) -> None:
    """The preference keys: their ranges, and never set where they do nothing."""
    defaults = RunConfig()
    keys = ("loss", "beta", "label_smoothing", "simpo_gamma", "precompute_reference")
    if cfg.task != "preference":
        given = [k for k in keys if getattr(cfg, k) != getattr(defaults, k)]
        if given:
            raise ConfigError(f"{where}: {', '.join(given)} set, but they apply to task preference only "
                              f"(this run's task is {cfg.task})")
        return
    _check_choice(cfg, "loss", PREFERENCE_LOSSES, where)
    if not cfg.beta > 0:
        raise ConfigError(f"{where}: beta must be > 0, got {cfg.beta:g}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"{where}: label_smoothing must be in [0, 0.5), got {cfg.label_smoothing:g}")
    if cfg.label_smoothing and cfg.loss not in ("sigmoid", "robust", "simpo"):
        raise ConfigError(f"{where}: label_smoothing applies to losses sigmoid (cDPO), robust and simpo, not {cfg.loss}")
    if cfg.simpo_gamma != defaults.simpo_gamma and cfg.loss != "simpo":
        raise ConfigError(f"{where}: simpo_gamma applies to loss simpo, not {cfg.loss}")
    if cfg.precompute_reference and cfg.loss in REFERENCE_FREE:
        raise ConfigError(f"{where}: loss {cfg.loss} uses no reference model: leave precompute_reference out")
    if cfg.method == "full":
        raise ConfigError(f"{where}: task preference trains an adapter against its base (the reference): method lora "
                          "or qlora, not full")
    if cfg.pack:
        raise ConfigError(f"{where}: task preference packs each pair into a row of its own (the prompt once, then both "
                          "replies): leave pack out")


def _check_report_to(cfg: RunConfig, where: str) -> None:
    """report_to: trackers from REPORT_TO, several allowed; `none` alone (or nothing) means metrics.jsonl only."""
    bad = [t for t in cfg.report_to if t not in REPORT_TO]
    if bad:
        raise ConfigError(f"{where}: report_to {bad[0]!r} must be {one_of(REPORT_TO)} (several: tensorboard,mlflow)")
    if "none" in cfg.report_to and len(cfg.report_to) > 1:
        raise ConfigError(f"{where}: report_to lists none beside {', '.join(t for t in cfg.report_to if t != 'none')}; "
                          "give the trackers, or none alone")
    cfg.report_to = list(dict.fromkeys(t for t in cfg.report_to if t != "none"))


# key: the interval its values must lie in, as "[1, )" reads; checked for every run, so a sweep's cell with a bad
# value fails before the first cell trains rather than when it runs
RANGES = {"batch_size": "[1, )", "grad_accum": "[1, )", "max_length": "[1, )", "r": "[1, )", "alpha": "(0, )",
          "dropout": "[0, 1)", "lr": "(0, )", "head_lr": "[0, )", "full_lr": "[0, )", "weight_decay": "[0, )",
          "warmup": "[0, 1]", "max_grad_norm": "[0, )", "max_records": "[0, )", "max_eval_records": "[0, )",
          "max_val_records": "[0, )", "eval_every": "[0, )", "early_stopping": "[0, )", "checkpoint_every": "[0, )",
          "max_new_tokens": "[1, )", "num_samples": "[0, )"}


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in an interval written "[0, 1)", "(0, )" (no upper bound) and the like."""
    low, high = (part.strip("[]() ") for part in interval.split(","))
    above = value >= float(low) if interval[0] == "[" else value > float(low)
    below = not high or (value <= float(high) if interval[-1] == "]" else value < float(high))
    return math.isfinite(value) and above and below


def _check_ranges(cfg: RunConfig, where: str) -> None:
    for key, interval in RANGES.items():
        value = getattr(cfg, key)
        if not in_interval(value, interval):
            raise ConfigError(f"{where}: {key} must be in {interval.replace(', )', ', ∞)')}, got {value:g}")


def validate(cfg: RunConfig, where: str) -> RunConfig:
    if not cfg.template:
        cfg.template = default_template(cfg.task)
    if cfg.task in CHAT_TASKS and cfg.template == "alpaca":
        raise ConfigError(f"{where}: task {cfg.task} renders conversations in a chat template: template chat (the "
                          "model's own) or chatml, not alpaca")
    _check_preference(cfg, where)
    for key, choices in (("task", TASKS), ("schedule", SCHEDULES), ("template", TEMPLATES), ("train_on", TRAIN_ON),
                         ("method", METHODS), ("quant_backend", QUANT_BACKENDS), ("optimizer", OPTIMIZERS),
                         ("init", INITS), ("strategy", STRATEGIES), ("mixed_precision", PRECISIONS),
                         ("precision", DTYPES), ("infer_dtype", INFER_DTYPES)):
        _check_choice(cfg, key, choices, where)
    _check_report_to(cfg, where)
    if cfg.quantize not in ("",) + QUANTIZE:
        raise ConfigError(f"{where}: quantize {cfg.quantize!r} must be {one_of(QUANTIZE)} or empty")
    if cfg.precision == "bf16" and (cfg.method == "full" or cfg.mixed_precision not in ("auto", "no")):
        raise ConfigError(f"{where}: precision bf16 stores the frozen base in bf16; " + (
            "method full trains every weight, so nothing is frozen: use mixed_precision bf16 (autocast) instead"
            if cfg.method == "full" else f"mixed_precision {cfg.mixed_precision} autocasts over fp32 weights: "
            "choose one of the two"))
    if cfg.method == "full" and cfg.quantize:
        raise ConfigError(f"{where}: method full trains every weight in full precision; it cannot use quantize")
    if cfg.method == "full" and cfg.full_lr > 0:  # a full fine-tune wants ~10x less than LoRA's lr
        cfg.lr = cfg.full_lr
    if cfg.method == "qlora" or cfg.quantize:  # one meaning each: qlora is lora with quantize=nf4
        cfg.method, cfg.quantize = "qlora", cfg.quantize or "nf4"
    _check_ranges(cfg, where)
    if isinstance(cfg.targets, str) and "," in cfg.targets:
        cfg.targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    if isinstance(cfg.targets, str) and cfg.targets not in TARGET_PRESETS:
        try:
            re.compile(cfg.targets)
        except re.error as e:
            raise ConfigError(f"{where}: targets {cfg.targets!r} is not a valid regular expression ({e}); use "
                              f"{one_of(TARGET_PRESETS)}, names like q_proj,v_proj, or a regex such as "
                              "re:.*(q|v)_proj") from None
    if cfg.init in ("pissa", "olora") and (cfg.quantize or cfg.method == "full"):
        raise ConfigError(f"{where}: init {cfg.init} rewrites the base weights from their SVD or QR: it needs method "
                          f"lora on a full-precision base, not {'quantize=nf4' if cfg.quantize else 'method full'}")
    if cfg.loraplus_lr_ratio < 0 or (cfg.loraplus_lr_ratio and cfg.method == "full"):
        raise ConfigError(f"{where}: loraplus_lr_ratio {cfg.loraplus_lr_ratio:g}: " + (
            "LoRA+ sets the LoRA B matrices' learning rate; a full fine-tune has none" if cfg.method == "full" else
            "must be > 0 (B matrices train at lr x ratio; LoRA+ suggests 16), or leave it out for plain LoRA"))
    if len(cfg.split) != 3 or min(cfg.split) < 0 or abs(sum(cfg.split) - 1) > 1e-6:
        raise ConfigError(f"{where}: split must be three fractions for train, validation and test that sum to 1, "
                          f"e.g. 0.8,0.1,0.1; got {','.join(f'{x:g}' for x in cfg.split)}")
    if cfg.epochs <= 0:
        raise ConfigError(f"{where}: epochs must be > 0, got {cfg.epochs:g}")
    if cfg.max_steps < 0:
        raise ConfigError(f"{where}: max_steps must be >= 1 (or 0 in a recipe: no limit), got {cfg.max_steps}")
    return cfg
