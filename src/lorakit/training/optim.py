"""The optimizer and its schedule: AdamW (or paged 8-bit AdamW) over parameter groups (a classifier head at its own
lr, LoRA+'s B matrices faster), linear warmup, then cosine, linear or constant."""
from __future__ import annotations

import math

import torch

from ..config import RunConfig
from ..errors import UserError
from .setup import Plan, Run


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
