"""A batch whose rows use different adapters (`adapters_by_row`): the base matmul over all rows plus one product of
rank r1 + r2 + ... over the adapters in the batch, their A's and B's side by side, each row's share masked to its
own adapter. Each adapter's weights are read once a step however many rows use it (stacking them per row would read
them once per row), and the step costs three operations a layer whatever the number of adapters, so serving three
adapters costs about what serving one does."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .config import LoRAError
from .dora import dora_scale, dora_scale_


@torch.no_grad()
def side_by_side(layer: nn.Module, rows: list[str | None]) -> tuple[torch.Tensor, ...]:
    """The adapters of `rows` that this layer has, side by side: A (R, in), scaled B (out, R), the mask (rows, 1, R)
    that keeps row i's share of the rank-R product to its own adapter, and the DoRA scale per row (rows, 1, out;
    ones for other rows) or None. Empty when no row's adapter is here (those rows get the base alone). A server's
    rows change with every request it admits, so what does not depend on them is kept: A and B side by side per
    layer (until an adapter's weights change), the mask per pattern of rows (shared by the layers)."""
    names = tuple(n for n in dict.fromkeys(rows) if n is not None and n in layer.lora_A)
    if not names:
        return ()
    As, Bs = [layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names]
    A, B = stacked(layer, names, As, Bs)
    mask = row_mask(tuple(rows), tuple((n, a.shape[0]) for n, a in zip(names, As)), A.dtype, A.device)
    if not any(n in layer.lora_magnitude for n in names):
        return A, B, mask, None
    scale = A.new_ones(len(rows), 1, layer.out_features)
    for n in names:
        if n in layer.lora_magnitude:
            scale[[i for i, row in enumerate(rows) if row == n], 0] = dora_scale(layer, n)  # m/‖W + s·B·A‖
    return A, B, mask, scale


def stacked(layer: nn.Module, names: tuple[str, ...], As: list[torch.Tensor], Bs: list[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The A's of adapters `names` (As, Bs: theirs) stacked (R, in) and their scaled B's side by side (out, R), built
    again only when one of them has changed (its weights, in place or replaced, or its scaling)."""
    key = (names, *((layer.scaling[n], a.data_ptr(), b.data_ptr(), a._version, b._version)
                    for n, a, b in zip(names, As, Bs)))
    kept = layer.__dict__.get("_stacked")
    if kept is None or kept[0] != key:
        A = torch.cat(As)
        B = torch.cat([b * layer.scaling[n] for n, b in zip(names, Bs)], dim=1)
        kept = layer.__dict__["_stacked"] = (key, A, B)
    return kept[1], kept[2]


@functools.lru_cache(maxsize=64)
def row_mask(rows: tuple[str | None, ...], ranks: tuple[tuple[str, int], ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """(rows, 1, R): 1 where row i's adapter owns rank column j of adapters `ranks` (name, rank) side by side."""
    owner = [n for n, rank in ranks for _ in range(rank)]
    return torch.tensor([[[float(row == n) for n in owner]] for row in rows], dtype=dtype, device=device)


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
