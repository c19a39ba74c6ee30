"""A batch whose rows use different adapters (`adapters_by_row`): the base matmul over all rows plus one product of
rank r1 + r2 + ... over the adapters in the batch, their A's and B's side by side, each row's share masked to its
own adapter. Each adapter's weights are read once a step however many rows use it (stacking them per row would read
them once per row), and the step costs three operations a layer whatever the number of adapters, so serving three
adapters costs about what serving one does."""
from __future__ import annotations

import torch
from torch import nn

from .config import LoRAError
from .dora import dora_scale, dora_scale_


@torch.no_grad()
def side_by_side(layer: nn.Module, rows: list[str | None]) -> tuple[torch.Tensor, ...]:
    """The adapters of `rows` that this layer has, side by side: A (R, in), scaled B (out, R), the mask (rows, 1, R)
    that keeps row i's share of the rank-R product to its own adapter, and the DoRA scale per row (rows, 1, out;
    ones for other rows) or None. Empty when no row's adapter is here (those rows get the base alone)."""
    names = [n for n in dict.fromkeys(rows) if n is not None and n in layer.lora_A]
    if not names:
        return ()
    A = torch.cat([layer.lora_A[n] for n in names])
    B = torch.cat([layer.lora_B[n] * layer.scaling[n] for n in names], dim=1)
    mask = A.new_zeros(len(rows), 1, A.shape[0])
    dora = any(n in layer.lora_magnitude for n in names)
    scale = A.new_ones(len(rows), 1, layer.out_features) if dora else None
    start = 0
    for n in names:
        span, start = slice(start, start + layer.lora_A[n].shape[0]), start + layer.lora_A[n].shape[0]
        members = [i for i, row in enumerate(rows) if row == n]
        mask[members, :, span] = 1
        if n in layer.lora_magnitude:
            scale[members, 0] = dora_scale(layer, n)  # m/‖W + s·B·A‖
    return A, B, mask, scale


def mixed_forward(layer: nn.Module, x: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """Row i of `x` through adapter rows[i] (None: the base alone). What side_by_side builds is built at the first
    call and reused while the layer's `row_adapters` stays set: for inference."""
    if len(rows) != x.shape[0]:
        raise LoRAError(f"the batch has {x.shape[0]} rows but {len(rows)} adapter names were given")
    out = layer.base_forward(x)
    if layer._row_weights is None:
        layer._row_weights = side_by_side(layer, rows)
    if not layer._row_weights:
        return out
    A, B, mask, scale = layer._row_weights
    h = (x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype) @ A.T).mul_(mask)  # (rows, tokens, R)
    flat = out.view(-1, out.shape[-1])
    flat.addmm_(h.view(-1, h.shape[-1]).to(out.dtype), B.T.to(out.dtype))
    if scale is None:
        return out
    return dora_scale_(out.view(x.shape[0], -1, out.shape[-1]), scale.to(out.dtype), layer.bias).view(out.shape)
