"""NF4 (4-bit NormalFloat) weights for QLoRA, in plain PyTorch.

Why our own as well: bitsandbytes is an optional dependency (where installed it is the faster backend and the one we
pick: `resolve_backend`), torchao's NF4Tensor another large one; this is one readable implementation of the QLoRA paper's format (Dettmers et al. 2023)
that runs on any device, needs nothing beyond torch, and that the tests check against the paper's definition.
bench/qlora.py measures it against bitsandbytes' CPU backend.

  weight -> blocks of 64 -> absmax per block -> each value / absmax -> nearest of 16 NF4 levels (4 bits)
  the fp32 absmax constants are themselves quantised ("double quantisation"): minus their mean, blocks of 256,
  int8 with one fp32 scale per block. Cost: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (0.129 of fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config.choices import QUANT_BACKENDS

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (as bitsandbytes ships them).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


@dataclass
class NF4Weight:
    """A weight in NF4: packed 4-bit codes, double-quantised block scales, and what is needed to rebuild it."""

    codes: torch.Tensor        # uint8, two 4-bit codes per byte
    scale_codes: torch.Tensor  # int8, one per block of `block` weights (or fp32 scales without double quant)
    scale_scale: torch.Tensor  # fp32, one per `scale_block` scales (empty without double quant)
    scale_mean: torch.Tensor   # fp32 scalar
    shape: torch.Size
    dtype: torch.dtype
    block: int = 64
    scale_block: int = 256

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale_codes, self.scale_scale,
                                                            self.scale_mean))

    def to(self, device) -> "NF4Weight":
        move = {k: getattr(self, k).to(device) for k in ("codes", "scale_codes", "scale_scale", "scale_mean")}
        return NF4Weight(**move, shape=self.shape, dtype=self.dtype, block=self.block, scale_block=self.scale_block)


def _pad_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (flat) padded with zeros to a multiple of width, viewed as rows of width."""
    return F.pad(x, (0, -x.numel() % width)).view(-1, width)


def quantize_nf4(w: torch.Tensor, block: int = 64, double_quant: bool = True, scale_block: int = 256) -> NF4Weight:
    """Block-wise absmax NF4 quantisation of `w`, optionally with double-quantised scales."""
    blocks = _pad_rows(w.detach().float().reshape(-1), block)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    levels = NF4_LEVELS.to(w.device)
    idx = torch.bucketize(blocks / absmax[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(-1)
    idx = F.pad(idx, (0, idx.numel() % 2))
    codes = (idx[0::2] << 4) | idx[1::2]
    if not double_quant:
        empty = torch.empty(0, device=w.device)
        return NF4Weight(codes, absmax, empty, torch.zeros((), device=w.device), w.shape, w.dtype, block, scale_block)
    mean = absmax.mean()
    centred = _pad_rows(absmax - mean, scale_block)
    scale_scale = (centred.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    scale_codes = torch.round(centred / scale_scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)[:absmax.numel()]
    return NF4Weight(codes, scale_codes, scale_scale, mean, w.shape, w.dtype, block, scale_block)


def block_scales(q: NF4Weight) -> torch.Tensor:
    """The per-block absmax constants (after the round trip through double quantisation, if used)."""
    if q.scale_codes.dtype != torch.int8:
        return q.scale_codes
    n = q.scale_codes.numel()
    rows = _pad_rows(q.scale_codes.float(), q.scale_block) * q.scale_scale[:, None]
    return rows.view(-1)[:n] + q.scale_mean


# Both levels of every byte (high nibble first): one table lookup per byte instead of shifts, masks and a gather
# per nibble.
NF4_PAIRS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=1)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back in `dtype` (default: its original dtype)."""
    n = q.shape.numel()
    values = F.embedding(q.codes.int(), NF4_PAIRS.to(q.codes.device)).view(-1)
    values = values[: _pad_rows(torch.empty(n), q.block).numel()]
    w = values.view(-1, q.block).mul_(block_scales(q)[:, None]).view(-1)[:n]
    return w.view(q.shape).to(dtype or q.dtype)


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str = "auto") -> str:
    """Which NF4 implementation to use: bitsandbytes' Linear4bit wherever it is installed, ours otherwise.

    Chosen by measurement: bench/qlora.py times both (docs/qlora.md); on CUDA bitsandbytes has the fused
    kernels.
    """
    if name not in QUANT_BACKENDS:
        raise ValueError(f"quant backend must be one of {', '.join(QUANT_BACKENDS)}, got {name!r}")
    if name == "auto":
        return "bitsandbytes" if bitsandbytes_available() else "torch"
    if name == "bitsandbytes" and not bitsandbytes_available():
        raise ImportError("quant backend 'bitsandbytes' needs `pip install bitsandbytes`")
    return name


def bnb_linear4bit(w: torch.Tensor):
    """A bitsandbytes Linear4bit (no bias) holding `w` (out, in) in NF4, block 64, double-quantised scales."""
    import bitsandbytes as bnb
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=w.dtype, compress_statistics=True,
                            quant_type="nf4", device="meta")
    lin.weight = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                   compress_statistics=True).to(w.device)
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place into its own CPU layout on the first
    # eval-mode forward. That layout needs rows in multiples of 32 and whole blocks per row, which small layers do
    # not have, and bnb_dequantize / bnb_nbytes / merge read the standard layout: keep the standard one everywhere.
    lin.support_avx512bf16_for_cpu = False
    return lin


def bnb_dequantize(lin) -> torch.Tensor:
    import bitsandbytes.functional as BF
    return BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)


def bnb_nbytes(lin) -> int:
    """Bytes of a Linear4bit's 4-bit weight and its (double-quantised) scales."""
    qs = lin.weight.quant_state
    parts = [lin.weight.data, qs.absmax, qs.code]
    if qs.nested:
        parts += [qs.state2.absmax, qs.state2.code]
    return sum(t.numel() * t.element_size() for t in parts) + (4 if qs.nested else 0)


class NF4Matmul(torch.autograd.Function):
    """x @ dequant(W)^T + b that keeps only the 4-bit codes for backward (never a full-precision weight copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.q = q
        return F.linear(x, dequantize_nf4(q, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx = grad @ dequantize_nf4(ctx.q, grad.dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None
