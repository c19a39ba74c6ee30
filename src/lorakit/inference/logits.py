"""fp32 logits for a model cast to bf16 or int8: the LM head's products summed in fp32 and left unrounded.

A bf16 GEMM rounds its output to bf16: at the size of a model's logits (10-30) that is a step of 1/16 to 1/8, coarse
enough to turn near ties between tokens into exact ties and to reorder them. On SmolLM2 that rounding was half of
bf16's teacher-forced top-1 disagreement with fp32 (docs/precision.md); llama.cpp keeps its logits in fp32 for the
same reason. The head's weight stays as it is (bf16, or int8 codes with block scales): the C++ kernel
(models/csrc/skinny_gemm.h's skinny_logits) reads it once for the few rows of a decode step and writes fp32. For batches
(PACKED_ROWS rows or more) `pack_for_batches` gives a bf16 head a copy laid out for AMX (models/csrc/amx_gemm.h): oneDNN's
micro-kernel then computes on tiles and keeps its fp32 sums. From PACK_ONCE_ROWS rows without that copy (a
teacher-forced pass over many positions) the head is laid out for AMX for that call; otherwise past the kernel's 32
rows, without AMX, for int8 and off the CPU, fp32 GEMMs on the weight widened a chunk at a time.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.frozen_base import PACKED_ROWS, DenseBase, StoredLinear
from .compiled_step import extension
from .int8 import CHUNK_ROWS, rebuild

PACK_ONCE_ROWS = 256  # rows from which laying a bf16 head out for AMX for one call beats fp32 GEMMs on it


def head_storage(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, block scales or None) of an LM head that can give fp32 logits: a bias-free bf16 nn.Linear, or a
    StoredLinear of int8 codes; None for anything else (fp32 heads, trained copies, quantised otherwise)."""
    if type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.bfloat16:
        return module.weight, None
    if isinstance(module, StoredLinear) and module.bias is None and module.frozen.kind == "int8":
        return module.frozen.stored()
    return None


def logits_forward(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The head's output in fp32: x (rounded to bf16) times the weight, exact products summed in fp32. A head that no
    longer holds such a weight, or a product that needs gradients, runs the module's own forward."""
    storage = head_storage(head)
    if storage is None or (torch.is_grad_enabled() and (x.requires_grad or storage[0].requires_grad)):
        return type(head).forward(head, x)
    weight, scales = storage
    ext = extension() if x.device.type == "cpu" else None
    if ext is not None:
        rows = x.numel() // x.shape[-1]
        base = head.__dict__.get("packed_base")
        packed = base.packed() if isinstance(base, LogitsBase) and base.weight is weight else None
        if packed is None and rows >= PACK_ONCE_ROWS and scales is None and ext.amx_supported():
            packed = ext.pack_for_amx(weight)  # many positions at once (a loss over a batch): worth a copy
        if packed is not None and rows >= PACKED_ROWS:
            return ext.amx_logits(x, packed, weight.shape[0])
        return ext.skinny_logits(x, weight, scales)
    x2 = x.to(torch.bfloat16).float().reshape(-1, x.shape[-1])
    parts = []
    for n0 in range(0, weight.shape[0], CHUNK_ROWS):
        w = weight[n0:n0 + CHUNK_ROWS]
        parts.append(F.linear(x2, w.float() if scales is None else rebuild(w, scales[n0:n0 + CHUNK_ROWS])))
    return torch.cat(parts, dim=-1).view(*x.shape[:-1], -1)


def keep_fp32_logits(model: nn.Module) -> bool:
    """Make a bf16 or int8 model's LM head give fp32 logits (its forward replaced by `logits_forward`); False where
    the head is not one `head_storage` takes. Safe to run again."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or head_storage(head) is None:
        return False
    head.forward = types.MethodType(logits_forward, head)
    if not isinstance(head.__dict__.get("packed_base"), LogitsBase):  # oneDNN's layout, for products it no longer runs
        head.__dict__.pop("packed_base", None)
    head.__dict__["gives_fp32_logits"] = logits_forward  # what compiled_step checks the forward against
    return True


class LogitsBase(DenseBase):
    """A bf16 head's weight with, while packed, the copy models/csrc/amx_gemm.h reads (in place of oneDNN's layout)."""

    def laid_out(self, w: torch.Tensor) -> torch.Tensor | None:
        ext = extension()
        return ext.pack_for_amx(w) if ext is not None and ext.amx_supported() else None


def batch_base(module: nn.Module) -> DenseBase:
    """What `pack_for_batches` packs for a plain bf16 linear: the AMX copy for a head giving fp32 logits."""
    return LogitsBase(module.weight) if "gives_fp32_logits" in vars(module) else DenseBase(module.weight)
