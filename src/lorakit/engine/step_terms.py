"""What the compiled decode step (inference/compiled_step.py) reads of a LoRA layer: the stored base weight, bias and
at most one LoRA term (or the adapters of a batch mixed by row), where the layer's no-grad forward is exactly that
arithmetic; None where it is not (an NF4 base, DoRA, dropout in training, another dtype), and the Python step runs."""
from __future__ import annotations

import torch
from torch import nn

from .mixed_rows import side_by_side


def inference_terms(layer: nn.Module, dtype: torch.dtype) -> tuple | None:
    """(W, bias, A, B, scaling, row mask, scales, packed) for a LoRALinear on inputs of `dtype`: x·Wᵀ + bias plus at
    most one term s·(x·Aᵀ)·Bᵀ computed as `lora_linear` does (A, B None: no term), W as stored (FrozenBase.stored: a
    dense weight with scales None, or int8 codes with their scales) and its packed copy or None (FrozenBase.packed);
    with adapters mixed by row, `mixed_terms`."""
    if layer.row_adapters is not None and not layer.disabled:
        return mixed_terms(layer, dtype)
    name = layer.active
    stored = layer.frozen.stored()
    if stored is None:
        return None
    if layer.disabled or name is None or name == layer.merged:
        return stored[0], layer.bias, None, None, 0.0, None, stored[1], layer.frozen.packed()
    A, B = layer.lora_A[name], layer.lora_B[name]
    scaled_bf16 = stored[1] is not None and A.dtype == dtype == torch.bfloat16  # int8 codes computing in bf16
    if (name in layer.lora_magnitude or (layer.training and layer.dropout[name] > 0) or A.dtype != dtype
            or not (scaled_bf16 or layer._fusable(dtype, A))):
        return None
    return stored[0], layer.bias, A, B, layer.scaling[name], None, stored[1], layer.frozen.packed()


def mixed_terms(layer: nn.Module, dtype: torch.dtype) -> tuple | None:
    """(W, bias, A, B, 1.0, mask, scales, packed): what mixed_forward computes, for the compiled decode step (A, B and mask
    None where no row's adapter is here; W and scales as the base stores them, see FrozenBase.stored); None where it
    does not fit: DoRA rows, an NF4 base, another dtype."""
    stored = layer.frozen.stored()
    if stored is None or (layer.weight is not None and layer.weight.dtype != dtype):
        return None
    if layer._row_weights is None:
        layer._row_weights = side_by_side(layer, layer.row_adapters)
    if not layer._row_weights:
        return stored[0], layer.bias, None, None, 0.0, None, stored[1], layer.frozen.packed()
    A, B, mask, scale = layer._row_weights
    if scale is not None or A.dtype != dtype:
        return None
    return stored[0], layer.bias, A, B, 1.0, mask, stored[1], layer.frozen.packed()
