"""int8 weights for generation: each frozen linear's weight as int8 codes with an fp32 scale for every block of 32
along a row (llama.cpp's q8_0 blocks, its scales fp16), computing in bf16 (`--dtype int8`).

A decode step reads every weight once per token, so its speed is the bytes it reads: int8 reads about half of bf16
(9 bits a weight with the scales, which the kernel broadcasts straight from memory in fp32). The codes are
round(w / s) with s = max|w| / 127 over the block (symmetric); one scale per whole row instead (11% fewer bytes)
measured a point and a half lower teacher-forced top-1 agreement on SmolLM2 (docs/precision.md). The products run in the C++ step's own kernel for the few rows of a decode step
(models/csrc/skinny_gemm.cpp: each block of codes times its scale in registers, against the bf16 activations, summed
in fp32, rounded to bf16 once), and, for a prompt's many rows, as bf16 GEMMs on weights rebuilt a chunk at a time.
Adapters stay unmerged in bf16 beside an int8 base, or are merged before it is quantised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import LoRALinear
from ..engine.dora import base_changed
from ..engine.frozen_base import FrozenBase, StoredLinear
from ..engine.layer import is_conv1d
from .compiled_step import extension

KERNEL_ROWS = 32  # the int8 kernel's row limit (kMaxRowsInt8); more rows go to bf16 GEMMs on rebuilt chunks
CHUNK_ROWS = 4096  # weight rows rebuilt in bf16 at a time for those: a few MB, reused
BLOCK = 32  # weights per scale along a row: the kernel's step


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in), scales fp32 (out, ceil(in / 32))) with w[n, k] ≈ codes[n, k] · scales[n, k // 32];
    an all-zero block gets scale 0."""
    w = w.detach().float()
    padded = F.pad(w, (0, -w.shape[1] % BLOCK)).view(w.shape[0], -1, BLOCK)
    scales = padded.abs().amax(dim=2) / 127
    divisor = scales.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    codes = torch.round(padded / divisor).clamp_(-127, 127).view(w.shape[0], -1)[:, :w.shape[1]]
    return codes.to(torch.int8).contiguous(), scales.contiguous()


def rebuild(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """codes · their block's scale, in fp32 (out, in), into `out` where given."""
    out = torch.empty(codes.shape, device=codes.device) if out is None else out
    rows, width = codes.shape
    if width % BLOCK:
        return torch.mul(codes, scales.repeat_interleave(BLOCK, dim=1)[:, :width], out=out)
    blocks = out.view(rows, -1, BLOCK)
    return blocks.copy_(codes.view(rows, -1, BLOCK)).mul_(scales[..., None]).view(rows, width)


def dequantized_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x · Wᵀ + bias in bf16 GEMMs, W rebuilt CHUNK_ROWS output rows at a time into reused buffers."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = min(CHUNK_ROWS, codes.shape[0])
    scratch = torch.empty(rows, codes.shape[1], device=x.device)
    buffer = torch.empty(rows, codes.shape[1], dtype=x.dtype, device=x.device)
    parts = [F.linear(x2, buffer[:len(c)].copy_(rebuild(c, s, scratch[:len(c)])))
             for c, s in zip(codes.split(CHUNK_ROWS), scales.split(CHUNK_ROWS))]
    y = torch.cat(parts, dim=-1)
    if bias is not None:
        y = y.add_(bias.to(y.dtype))
    return y.view(*x.shape[:-1], -1)


class Int8Base(FrozenBase):
    """A frozen (out, in) weight as int8 codes and fp32 block scales (buffers), computing in bf16."""

    kind = "int8"

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__(w.shape, torch.bfloat16)
        codes, scales = quantize_blocks(w)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dense(self) -> torch.Tensor:
        return rebuild(self.codes, self.scales).to(self.dtype)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes, self.scales

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.dtype)
        few = x.device.type == "cpu" and x.numel() <= KERNEL_ROWS * x.shape[-1]
        ext = extension() if few else None
        if ext is not None and ext.skinny_supported():
            return ext.skinny_linear_int8(x, self.codes, self.scales, bias)
        return dequantized_linear(x, self.codes, self.scales, bias)

    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()


def holds_int8(module: nn.Module) -> bool:
    """Whether `module` (a StoredLinear or a LoRA layer) holds its frozen weight as int8 codes."""
    return getattr(getattr(module, "frozen", None), "kind", "") == "int8"


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Store every dense linear of `model` in int8, in place: plain nn.Linear and Conv1D become StoredLinear, LoRA
    layers keep their adapters over an int8 base. Embeddings, norms, adapters and NF4 bases keep their storage;
    layers already int8 are left as they are, so this can run again after an adapter is added."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear or is_conv1d(child):
                w = child.weight.t() if is_conv1d(child) else child.weight
                setattr(parent, name, StoredLinear(Int8Base(w), child.bias))
            elif isinstance(child, LoRALinear) and child.frozen.kind == "dense":
                child.frozen = Int8Base(child.dense_weight())
                base_changed(child)
    return model
