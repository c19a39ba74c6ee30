"""Modules an adapter trains in full (a new classification head): one copy per adapter, the original kept for the base.

PEFT's `modules_to_save` semantics. `add_lora(..., trainable=["classifier"])` wraps the module in `TrainedCopies`;
each adapter that trains it gets its own copy, made from the original when the adapter is added. Forward runs the
active adapter's copy, the original when adapters are disabled or the active adapter trains no copy, and in a
batch that mixes adapters by row (`adapters_by_row`) each row's own.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .config import LoRAError


class TrainedCopies(nn.Module):
    """The original module plus one trained copy per adapter; see the module docstring."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.row_adapters: list[str | None] | None = None

    def add(self, adapter: str) -> nn.Module:
        """A fresh copy of the original for `adapter` (the base's values, as PEFT starts it)."""
        self.copies[adapter] = copy.deepcopy(self.original)
        return self.copies[adapter]

    def remove(self, adapter: str) -> None:
        del self.copies[adapter]
        if self.active == adapter:
            self.active = None

    def module_for(self, adapter: str | None) -> nn.Module:
        return self.copies[adapter] if adapter in self.copies else self.original

    def __getattr__(self, name: str):
        """Attributes of the module in use (`weight`, `out_features`, ...), as on the module before wrapping."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original", "copies"):
                raise
            return getattr(self.module_for(None if self.disabled else self.active), name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        return self.module_for(None if self.disabled else self.active)(x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Row i of `x` through the copy of row_adapters[i] (the original for None)."""
        names = self.row_adapters
        if x.shape[0] != len(names):
            raise LoRAError(f"a batch of {x.shape[0]} rows for adapters_by_row over {len(names)} rows")
        out = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            y = self.module_for(name)(x[rows], *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out


def trained_copies(model: nn.Module):
    """(qualified name, TrainedCopies) for every wrapped module of `model`."""
    for name, m in model.named_modules():
        if isinstance(m, TrainedCopies):
            yield name, m
