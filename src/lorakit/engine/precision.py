"""The float type a model's frozen weights are stored and computed in: fp32, or bf16 where the hardware computes it.

bf16 halves the bytes every matrix product reads and, on CPUs with AVX-512 BF16 or AMX and on GPUs with bf16 units,
runs those products about twice as fast. `store_frozen` casts the frozen weights once (no cast per step, as autocast
does), while whatever trains (LoRA A/B, DoRA magnitudes, a new head) stays fp32 with its optimizer state: the
adapter's own Function computes in bf16 and hands fp32 gradients back (function.py). Generation's dtypes, bf16 and
int8, are inference/precision.py's.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
from torch import nn

from .config import LoRAError
from .layer import LoRALinear
from .trained_copies import TrainedCopies

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether `device_type` computes bf16 matrix products natively: a CUDA device with bf16, a CPU with AVX-512
    BF16 or AMX tiles. Elsewhere bf16 products are emulated and slower than fp32. LORAKIT_NATIVE_BF16=0 or 1
    overrides the detection (a VM that hides CPU flags; the tests, which run as on a CPU without bf16 units)."""
    forced = os.environ.get("LORAKIT_NATIVE_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str, device_type: str = "cpu", what: str = "precision") -> torch.dtype:
    """`name` (auto, fp32 or bf16) as a dtype: auto is bf16 where `native_bf16`, else fp32. An explicit bf16 where
    the hardware lacks it still runs, with one line saying it will be slower."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device_type) else torch.float32
    if name not in DTYPES:
        raise LoRAError(f"{what} {name!r} must be auto, fp32 or bf16")
    if name == "bf16" and not native_bf16(device_type):
        _slower_note(what, device_type)
    return DTYPES[name]


@functools.cache
def _slower_note(what: str, device_type: str) -> None:
    print(f"lorakit: {what} bf16 on a {device_type} without native bf16 units (AVX-512 BF16, AMX or a bf16 GPU): it "
          "runs, slower than fp32 there", file=sys.stderr, flush=True)


def dtype_name(dtype: torch.dtype) -> str:
    """bf16 for bfloat16; fp32 for anything else (a quantised model's first parameter may be its packed codes)."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def cast_params(model: nn.Module, dtype: torch.dtype, frozen_only: bool) -> None:
    """Each floating-point parameter of `model` (tied ones once; with frozen_only, those that do not train) to
    `dtype`, in place of the old storage."""
    for param in {id(p): p for p in model.parameters()}.values():
        if param.is_floating_point() and param.dtype != dtype and not (frozen_only and param.requires_grad):
            param.data = param.data.to(dtype)


def _cast_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook: floating inputs to the dtype of the module's own parameters (a trained fp32 module in a
    bf16 model, or a frozen bf16 one fed fp32 by a trained module before it)."""
    dtype = next(module.parameters(recurse=False)).dtype
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


@torch.no_grad()
def store_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every frozen floating-point parameter of `model` in `dtype`, once; what trains keeps its dtype.
    Buffers (rotary frequencies, quantisation scales) keep theirs. Modules that train in full get their inputs cast
    to their own dtype, and so do plain linears and layer norms after them, so the dtypes meet at module edges."""
    if dtype == torch.float32:
        return model
    cast_params(model, dtype, frozen_only=True)
    trained = {id(m) for copies in model.modules() if isinstance(copies, TrainedCopies)
               for m in copies.copies.modules()}
    for module in model.modules():
        own = next(module.parameters(recurse=False), None)
        if own is not None and (id(module) in trained or type(module) in (nn.Linear, nn.LayerNorm)):
            module.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
        if isinstance(module, LoRALinear) and module.frozen.kind == "bitsandbytes":
            module.frozen.linear.compute_dtype = dtype
    return model
