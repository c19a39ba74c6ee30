"""How an adapter's A and B start (PEFT's `init_lora_weights`): the variants of initialisation beside the layer.

kaiming   A Kaiming-uniform (as nn.Linear inits its weight), B zero: the layer starts as the base
gaussian  A normal with std 1/r, B zero
pissa     (Meng et al., 2024) A, B from the r principal singular directions of W, W keeping the rest
olora     (Büyükakyüz, 2024) B, A from the first r columns of W's QR decomposition, W keeping the rest
PiSSA and OLoRA change the base weight (W becomes W - s·B₀·A₀, the output unchanged) and keep A₀, B₀, so the saved
adapter can be written for the original W (peft_format.for_the_original_base).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoRAError
from .dora import base_changed

FROM_BASE = ("pissa", "olora")


def init_A(A: torch.Tensor, init: str) -> torch.Tensor:
    """A, in place, for `init` kaiming (also the start of pissa/olora, which overwrite it) or gaussian."""
    if init == "gaussian":
        return nn.init.normal_(A, std=1 / A.shape[0])
    return nn.init.kaiming_uniform_(A, a=math.sqrt(5))


@torch.no_grad()
def init_from_base(layer: nn.Module, name: str, init: str) -> None:
    """PiSSA or OLoRA for adapter `name` of `layer`: A, B from W's SVD or QR, W becomes W_res = W - s·B₀·A₀, and
    (A₀, B₀) are kept (`initial_pair`). PEFT's pissa_init / olora_init, on the (out, in) layout."""
    if layer.quantized:
        raise LoRAError(f"init {init} needs a full-precision base weight, not a quantised ({layer.quant_backend}) one")
    s, r = layer.scaling[name], layer.lora_A[name].shape[0]
    w = layer.dense_weight().float()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.diag(torch.sqrt(S[:r] / s))
        A, B = root @ Vh[:r], U[:, :r] @ root
    else:
        Q, R = torch.linalg.qr(w)
        A, B = R[:r], Q[:, :r]
    layer.lora_A[name].copy_(A)
    layer.lora_B[name].copy_(B)
    layer.dense_weight().copy_((w - s * B @ A).to(layer.weight.dtype))
    base_changed(layer)
    layer.__dict__.setdefault("initial", {})[name] = (A.clone(), B.clone())


def initial_pair(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A₀, B₀) of an adapter initialised from the base (PiSSA, OLoRA), else None."""
    return layer.__dict__.get("initial", {}).get(name)
