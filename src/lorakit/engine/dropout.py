"""Dropout for the LoRA branch as the indices of the dropped elements, not a mask.

A full mask costs one random number and one byte per element, and `x * mask` on CPU converts the mask to x's dtype
in a separate copy first. Drawing the gaps between drops instead gives the same i.i.d. Bernoulli(p) elements from
about p·n random numbers, and a backward keeps p·n indices. function.py applies it; tests compare with a plain mask.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def dropout_drops(n: int, p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Which of n elements dropout with rate p zeroes: flat indices (int64, increasing), padded at the end with n
    (past the last element: `zeroed` sends those to a spare slot).

    Drawn as the gaps between drops, geometric with parameter p: i.i.d. Bernoulli(p) like a full mask, from about
    p·n random numbers instead of n (torch's CPU generator is sequential, so fewer draws take less time), and a
    backward keeps p·n indices instead of an n-byte mask. The number of draws is fixed, p·n plus 10 standard deviations of the Binomial(n, p) count of drops, so the drops run short of position n with
    probability below 1e-20, and no shape depends on the draw: no host sync, no graph break under torch.compile.
    """
    m = int(n * p + 10 * math.sqrt(n * p * (1 - p)) + 32)
    u = torch.rand(m, dtype=torch.float64, device=device)  # [0, 1); float64 holds the positions exactly
    gaps = torch.log1p(-u).div_(math.log1p(-p)).floor_().clamp_(max=n)  # P(gap >= k) = (1-p)^k
    return gaps.add_(1).cumsum_(0).sub_(1).clamp_(max=n).long()


def zeroed(shape: tuple[int, ...], like: torch.Tensor, drops: torch.Tensor,
           fill: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """A fresh contiguous tensor (like's dtype and device) that fill(out) writes -- a copy, a matmul's out= --
    then zeroed at the flat positions `drops`: dropout applied without a mask-sized temporary."""
    flat = like.new_empty(math.prod(shape) + 1)  # the spare last slot takes the padding entries (== numel) of drops
    out = flat[:-1].view(shape)
    fill(out)
    flat.index_fill_(0, drops, 0)
    return out


def zero_at(x: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """dropout(x) before its 1/(1-p) rescale: a copy of x, zero at `drops`."""
    return zeroed(x.shape, x, drops, lambda out: out.copy_(x))


def dropout_scale(p: float) -> float:
    """What dropout multiplies the kept elements by: 1 / (1 - p)."""
    return 1.0 / (1.0 - p)
