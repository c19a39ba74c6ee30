"""Attention for training on CPU, and for a bf16 model's prompts: lorakit's kernel (csrc/causal_attention.cpp) in
place of torch's flash attention, through transformers' attention interface under the name "lorakit".

Written here because torch's CPU flash attention spends most of a training sequence's attention outside its
products (for SmolLM2's 256-token rows, in bf16, its backward takes longer than the forward and backward of the
same products done in registers; docs/precision.md has the figures). The kernel computes in fp32 from bf16 or fp32
inputs, rounds each output once and recomputes the softmax in its backward from the forward's log-sum-exp, as flash
attention does, so nothing of size T x T is kept between the passes. Where a call is one it does not take (dropout,
a mask that biases rather than blocks, a KV cache longer than the queries without a mask saying what each sees, a
GPU, a CPU without AVX-512 BF16) transformers' SDPA runs it. A bf16 or int8 Llama-family model for generation
(inference/precision.py) runs its prompts' attention here too: the forward alone, over a cached prefix's keys too.
"""
from __future__ import annotations

import weakref
from types import ModuleType

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import native

NAME = "lorakit"
PROMPT_ROWS = 16  # queries from which a call over more keys (a cached prefix) is worth the kernel's set-up; SDPA below


def kernel() -> ModuleType | None:
    """The compiled training kernels, built on first use; None where they cannot be (native.training_kernels)."""
    return native.training_kernels()


class CausalAttention(torch.autograd.Function):
    """softmax(q·kᵀ · scaling, where `mask` and `causal` allow) · v for q [B, H, T, D], k and v [B, KV, T, D], as
    [B, T, H, D] (what transformers' attention functions return); keeps q, k, v, the output and each row's
    log-sum-exp for the backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                scaling: float) -> torch.Tensor:
        out, lse = kernel().attention_forward(q, k, v, mask, causal, scaling)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scaling = causal, scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = kernel().attention_backward(grad.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, mask,
                                                 ctx.causal, ctx.scaling)
        return dq, dk, dv, None, None, None


_last_mask: list = [lambda: None, -1, None]  # the mask last seen (a weak reference), its version, its bool form


def bool_mask(mask: torch.Tensor | None) -> torch.Tensor | bool | None:
    """`mask` as contiguous bools (True: may attend): a bool mask, or an additive float one (lorakit's packed rows,
    0 or the dtype's lowest) where it only allows or blocks; False where it also biases. The same mask reaches every
    layer of a forward, so the last one's bool form is kept."""
    if mask is None or (mask.dtype == torch.bool and mask.is_contiguous()):
        return mask
    cached = not mask.is_inference()  # an inference tensor has no version to check
    if cached and _last_mask[0]() is mask and _last_mask[1] == mask._version:
        return _last_mask[2]
    if mask.dtype == torch.bool:
        allowed = mask.contiguous()
    else:
        allowed = mask == 0
        allowed = allowed if bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()) else False
    if cached:
        _last_mask[:] = [weakref.ref(mask), mask._version, allowed]
    return allowed


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | bool | None,
          dropout: float, extra: dict) -> bool:
    """Whether the kernel computes this call as SDPA would: no dropout, a mask that allows or blocks (bool_mask) or
    none, queries and keys the same positions (or more keys, with a mask, for PROMPT_ROWS queries or more and no
    gradient), none of the interface's extras (a bias, a soft cap, a paged cache)."""
    if dropout > 0 or mask is False or extra.get("output_attentions"):
        return False
    if any(extra.get(k) is not None for k in ("position_bias", "softcap", "cache")):  # a window is in the mask
        return False
    if key.shape[2] != query.shape[2] and (query.shape[2] < PROMPT_ROWS or torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value))):
        return False  # more keys than queries: a prompt after cached ones, forward only
    ext = kernel()
    return ext is not None and ext.attention_applies(query, key, value, mask)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (output [B, T, H, D], None), by the kernel where it takes the call,
    else by transformers' SDPA with the same arguments. As SDPA there, a given mask already holds causality."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    mask = bool_mask(attention_mask) if query.device.type == "cpu" else False
    if not takes(query, key, value, mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return CausalAttention.apply(query, key, value, mask, bool(causal) and mask is None, scale), None


def use_attention_kernel(model: nn.Module) -> bool:
    """Route `model`'s attention (transformers' SDPA now, no attention dropout) through the kernel, on a CPU with
    AVX-512 BF16 where it builds; it falls back to SDPA call by call. True if routed (what run.json's `attention`
    then records). The masks stay SDPA's (bool, or none for plain causal rows)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or attention_dropout(config) > 0:
        return False
    if kernel() is None:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return config._attn_implementation == NAME


def attention_dropout(config) -> float:
    """The dropout a model applies to its attention weights while training (Llama's attention_dropout, BERT's
    attention_probs_dropout_prob, GPT-2's attn_pdrop): where it is not 0 every training call would go to SDPA."""
    names = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")
    return max(float(getattr(config, name, 0) or 0) for name in names)

