"""What an adapter is: `LoRAConfig` (rank, scale, dropout, targets, variants, quantisation) and the engine's error."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Sequence

from ..config.choices import INITS, QUANT_BACKENDS, TARGET_PRESETS
from ..errors import UserError


class LoRAError(UserError):
    """A mistake in LoRA configuration or use; the message says what to do."""


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` is not a regular expression Python can compile, or None when it is."""
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return None


@dataclass
class LoRAConfig:
    """What to adapt and how: rank, scale, dropout, which modules get LoRA and which are trained in full."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | Sequence[str] = "all-linear"  # a preset (all-linear, attention, mlp), module names or a regex
    exclude: Sequence[str] = ()
    trainable: Sequence[str] = ()
    rslora: bool = False
    dora: bool = False  # DoRA: a trained magnitude per output feature times the direction of W + s·B·A
    init: str = "kaiming"  # A and B at the start: kaiming, gaussian, pissa or olora (INITS; PEFT's init_lora_weights)
    quantize: str | None = None  # "nf4": QLoRA, the adapted layers' base weights stored in 4-bit NormalFloat
    quantize_all: bool = False  # with quantize: every other linear too (not the heads, not `trainable` modules)
    quant_backend: str = "auto"  # "torch" (quant.py), "bitsandbytes" (Linear4bit), "auto": bitsandbytes where installed

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoRAError(f"r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise LoRAError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.quantize not in (None, "nf4"):
            raise LoRAError(f"quantize must be None or 'nf4', got {self.quantize!r}")
        if self.init not in INITS:
            raise LoRAError(f"init {self.init!r} is not one of {', '.join(INITS)}")
        if self.init in ("pissa", "olora") and self.quantize:
            raise LoRAError(f"init {self.init} rewrites the base weights from their SVD or QR; it needs a "
                            "full-precision base, not quantize=nf4 (train PiSSA/OLoRA with method lora)")
        if self.quant_backend not in QUANT_BACKENDS:
            raise LoRAError(f"quant_backend must be one of {', '.join(QUANT_BACKENDS)}, got {self.quant_backend!r}")
        if not isinstance(self.targets, str):
            self.targets = tuple(self.targets)
            if not self.targets:
                raise LoRAError(f"targets is empty: use {', '.join(TARGET_PRESETS)}, a list of module names, or a "
                                "regex string")
        elif self.targets not in TARGET_PRESETS and (problem := regex_problem(self.targets)):
            raise LoRAError(f"targets {self.targets!r} is not a valid regular expression ({problem}); use "
                            f"{', '.join(TARGET_PRESETS)}, module names like q_proj,v_proj, or a regex such as "
                            "'.*(q|v)_proj'")
        self.exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        self.trainable = (self.trainable,) if isinstance(self.trainable, str) else tuple(self.trainable)

    @property
    def scaling(self) -> float:
        """The factor on B·A·x: alpha/r, or alpha/sqrt(r) for rank-stabilised LoRA."""
        return lora_scaling(self.r, self.alpha, self.rslora)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """alpha/r (LoRA paper) or alpha/sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


