"""A batch whose rows use different adapters (`adapters_by_row`): the base matmul plus one batched rank-r product
(bmm) over all rows, whatever adapter each uses, so serving three adapters costs what serving one does."""
from __future__ import annotations

import torch
from torch import nn

from .config import LoRAError
from .dora import dora_scale, dora_scale_


@torch.no_grad()
def stack_rows(layer: nn.Module, rows: list[str | None]) -> tuple[torch.Tensor, ...]:
    """Per row, its adapter's A (rows, r, in), scaled B (rows, out, r) and DoRA scale (rows, 1, out) or None, ranks
    zero-padded to the largest; zeros for a row without an adapter here. Empty when no row's adapter is here."""
    names = [n for n in dict.fromkeys(rows) if n is not None and n in layer.lora_A]
    if not names:
        return ()
    r, any_A = max(layer.lora_A[n].shape[0] for n in names), layer.lora_A[names[0]]
    A = any_A.new_zeros(len(rows), r, layer.in_features)
    B = any_A.new_zeros(len(rows), layer.out_features, r)
    dora = any(n in layer.lora_magnitude for n in names)
    scale = any_A.new_ones(len(rows), 1, layer.out_features) if dora else None  # DoRA rows: m/‖W + s·B·A‖
    for i, n in enumerate(rows):
        if n in names:
            k = layer.lora_A[n].shape[0]
            A[i, :k] = layer.lora_A[n]
            B[i, :, :k] = layer.lora_B[n] * layer.scaling[n]
            if n in layer.lora_magnitude:
                scale[i, 0] = dora_scale(layer, n)
    return A, B, scale


def mixed_forward(layer: nn.Module, x: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """Row i of `x` through adapter rows[i] (None: the base alone). The stacked adapter weights are built at the
    first call and reused while the layer's `row_adapters` stays set: for inference."""
    if len(rows) != x.shape[0]:
        raise LoRAError(f"the batch has {x.shape[0]} rows but {len(rows)} adapter names were given")
    out = layer.base_forward(x)
    if layer._row_weights is None:
        layer._row_weights = stack_rows(layer, rows)
    if not layer._row_weights:
        return out
    A, B, scale = layer._row_weights
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)  # (rows, tokens, in)
    delta = torch.bmm(torch.bmm(x3, A.transpose(1, 2)), B.transpose(1, 2))
    out = out.add_(delta.view(out.shape).to(out.dtype))
    if scale is None:
        return out
    return dora_scale_(out.view(delta.shape), scale.to(out.dtype), layer.bias).view(out.shape)
