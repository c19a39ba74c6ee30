"""DoRA (Liu et al., 2024), a variant of the LoRA layer: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm per output
feature (a row of the (out, in) weight) and, as in the paper and PEFT, treated as a constant in backward; m is
trained and starts at that norm, so the layer starts as the base.

The norm is never formed from the (out, in) matrix W + s·B·A, which PEFT builds in every forward: per row,
    ‖W + s·B·A‖² = ‖W‖² + 2s·(W·Aᵀ ⊙ B)·1 + s²·(B·(A·Aᵀ) ⊙ B)·1,
with ‖W‖² per row kept (W is frozen) and W·Aᵀ (out, r) one base matmul over the r rows of A: O(out·in·r), on a
dense or NF4 base alike, and no (out, in) temporary. These functions take the layer (layer.py) whose adapter they
compute; the magnitudes are its `lora_magnitude` parameters, the kept norms live in its `__dict__`.
"""
from __future__ import annotations

import torch
from torch import nn


def dora_scale_(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(y - bias)·scale + bias, in place: y·scale + bias·(1 - scale), two passes over y and no temporary."""
    y.mul_(scale)
    return y if bias is None else y.add_(bias * (1 - scale))


def add_magnitude(layer: nn.Module, name: str) -> None:
    """DoRA adapter `name`'s magnitude m = ‖W + s·B·A‖ per output feature: the layer starts as it was."""
    layer.lora_magnitude[name] = nn.Parameter(weight_norm(layer, name))


@torch.no_grad()
def weight_norm(layer: nn.Module, name: str) -> torch.Tensor:
    """‖W + s·B·A‖ per output feature for adapter `name` (no gradient). Kept until A, B or the base change
    (in-place updates bump a tensor's version), so decoding does not recompute it per token."""
    A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    key = (name, A._version, B._version, id(A), id(B), s, layer.__dict__.get("_base_epoch", 0))
    kept = layer.__dict__.setdefault("_norms", {})
    if name in kept and kept[name][0] == key:
        return kept[name][1]
    wa = layer.base_forward(A.to(layer.frozen.dtype))  # (r, out) = A·Wᵀ (+ bias)
    if layer.bias is not None:
        wa = wa - layer.bias
    cross = (wa.t().to(B.dtype) * B).sum(1)
    lora_sq = ((B @ (A @ A.t())) * B).sum(1)
    norm = (row_sq_norm(layer) + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()
    kept[name] = (key, norm)
    return norm


def row_sq_norm(layer: nn.Module) -> torch.Tensor:
    """‖W‖² per output feature of the frozen base, computed once per state of the base (`base_changed`)."""
    if layer.__dict__.get("_w_sq") is None:
        layer.__dict__["_w_sq"] = layer.frozen.dense().float().pow(2).sum(1)
    return layer.__dict__["_w_sq"]


def base_changed(layer: nn.Module) -> None:
    """The base weight changed (merge, quantisation, PiSSA): what DoRA keeps of it, and a packed copy of it
    (frozen_base.DenseBase.pack), are out of date."""
    layer.__dict__["_w_sq"] = None
    if hasattr(layer.frozen, "unpack"):
        layer.frozen.unpack()
    layer.__dict__["_base_epoch"] = layer.__dict__.get("_base_epoch", 0) + 1


def dora_scale(layer: nn.Module, name: str) -> torch.Tensor:
    """m / ‖W + s·B·A‖ per output feature: what multiplies (W + s·B·A)·x."""
    return layer.lora_magnitude[name] / weight_norm(layer, name)


def scale_output(layer: nn.Module, name: str, y: torch.Tensor) -> torch.Tensor:
    """DoRA's output m/‖W + s·B·A‖ ⊙ (W·x + s·B·A·x) + bias from the LoRA output y = W·x + bias + s·B·A·x (in place
    without autograd)."""
    scale = dora_scale(layer, name).to(y.dtype)
    if not torch.is_grad_enabled():
        return dora_scale_(y, scale, layer.bias)
    # autograd keeps y - bias for m's gradient; a hand-written Function that works in place measured no faster
    return y * scale if layer.bias is None else (y - layer.bias) * scale + layer.bias
