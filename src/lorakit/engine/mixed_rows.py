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
from .function import lora_linear

Span = tuple[str | None, int, int]  # tokens start:stop of a packed row through adapter name (None: the base alone)


@torch.no_grad()
def side_by_side(layer: nn.Module, rows: list[str | None]) -> tuple[torch.Tensor, ...]:
    """The adapters of `rows` that this layer has, side by side: A (R, in), scaled B (out, R), the mask (rows, 1, R)
    that keeps row i's share of the rank-R product to its own adapter, and the DoRA scale per row (rows, 1, out;
    ones for other rows) or None. Empty when no row's adapter is here (those rows get the base alone). A server's
    rows change with every request it admits, so what does not depend on them is kept: A and B side by side per
    layer (until an adapter's weights change), the mask per pattern of rows (shared by the layers)."""
    names = adapters_here(layer, rows)
    if not names:
        return ()
    As, Bs = [layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names]
    A, B = stacked(layer, names, As, Bs)
    mask = rows_mask(layer, rows)
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


def adapters_here(layer: nn.Module, rows: list[str | None]) -> tuple[str, ...]:
    """The adapters of `rows` that `layer` has, in the layer's order: the same stack for any rows of them."""
    present = set(rows)
    return tuple(n for n in layer.lora_A if n in present)


def rows_mask(layer: nn.Module, rows: list[str | None]) -> torch.Tensor | None:
    """The mask side_by_side gives `layer` for `rows` (None where no row's adapter is here): a C++ step's view built
    for rows of the same adapters takes it for these rows (compiled_step.row_masks)."""
    names = adapters_here(layer, rows)
    if not names:
        return None
    A = layer.lora_A[names[0]]
    return row_mask(tuple(rows), tuple((n, layer.lora_A[n].shape[0]) for n in names), A.dtype, A.device)


@functools.lru_cache(maxsize=64)
def row_mask(rows: tuple[str | None, ...], ranks: tuple[tuple[str, int], ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """(rows, 1, R): 1 where row i's adapter owns rank column j of adapters `ranks` (name, rank) side by side."""
    owner = [n for n, rank in ranks for _ in range(rank)]
    return torch.tensor([[[float(row == n) for n in owner]] for row in rows], dtype=dtype, device=device)


def mixed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x through the adapters the layer's `token_spans` (spans_forward) or else its `row_adapters` give: row i of x
    through adapter row_adapters[i] (None: the base alone). What side_by_side builds is built at the first call and
    reused while `row_adapters` stays set: for inference."""
    if layer.token_spans is not None:
        return spans_forward(layer, x, layer.token_spans)
    rows = layer.row_adapters
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


def spans_forward(layer: nn.Module, x: torch.Tensor, spans: tuple[Span, ...]) -> torch.Tensor:
    """x's tokens (its rows laid end to end) start:stop through adapter name, for each (name, start, stop) of
    `spans`: the base product over every token, then each adapter's term over its own tokens, added in place as
    `lora_forward` adds one adapter's. For inference; DoRA adapters are refused (adapters_by_span)."""
    tokens = x.reshape(-1, x.shape[-1])
    if spans and spans[-1][2] != tokens.shape[0]:
        raise LoRAError(f"the adapters' spans cover {spans[-1][2]} tokens but the batch has {tokens.shape[0]}")
    out = layer.base_forward(x)
    sums = out.view(-1, out.shape[-1])
    for name, start, stop in spans:
        if name in layer.lora_A and stop > start:
            A, B = layer.lora_A[name], layer.lora_B[name]
            lora_linear(tokens[start:stop].to(sums.dtype), None, None, A, B, layer.scaling[name], out=sums[start:stop])
    return out
