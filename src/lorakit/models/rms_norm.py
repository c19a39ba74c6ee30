"""RMSNorm for training on CPU: lorakit's kernel (csrc/rms_norm.cpp) in place of transformers' module forward, for
every norm whose forward is LlamaRMSNorm's formula and whose weight is frozen.

Written here because transformers' RMSNorm runs as eight ATen operations each way, with fp32 copies of the rows
between them: in SmolLM2's bf16 training step its 61 norms took 7% of the time. The kernel reads a row once, sums in
fp32 and rounds where the module rounds (the normalised row to x's dtype, then the product with the weight); its
backward computes in fp32 and rounds once, keeping x and one fp32 factor a row where autograd keeps fp32 copies.
A norm whose weight trains, a GPU or a CPU without AVX-512 BF16 runs the module's own forward.
"""
from __future__ import annotations

import functools
import inspect
import types
from types import ModuleType

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import native


def kernel() -> ModuleType | None:
    """The compiled training kernels, built on first use; None where they cannot be (native.training_kernels)."""
    return native.training_kernels()


class RMSNorm(torch.autograd.Function):
    """weight · (x / sqrt(mean(x²) + eps)) over x's last dimension, the weight frozen; keeps x and each row's
    1 / sqrt(mean(x²) + eps) for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = kernel().rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        return kernel().rms_norm_backward(grad, x, weight, rstd), None, None


def rms_norm_forward(norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A Llama-formula RMSNorm's forward: by the kernel where it takes the call (frozen weight of the input's dtype,
    bf16 or fp32, on a CPU), else by the module's own forward."""
    weight = norm.weight
    ext = kernel()
    if weight.requires_grad or ext is None or not ext.rms_norm_applies(hidden_states, weight):
        return type(norm).forward(norm, hidden_states)
    return RMSNorm.apply(hidden_states, weight, float(norm.variance_epsilon))


@functools.cache
def llama_formula(cls: type) -> bool:
    """Whether `cls.forward` is LlamaRMSNorm's, line for line (138 of transformers' RMSNorm classes are: Qwen,
    Mistral, Granite...; Gemma's `1 + weight` and others differ)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    try:
        return inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward)
    except (OSError, TypeError):  # no source to compare (a compiled or generated class)
        return False


def use_norm_kernel(model: nn.Module) -> int:
    """Give each Llama-formula RMSNorm of `model` with a frozen weight (a full fine-tune's train: none) the kernel's
    forward, on a CPU with AVX-512 BF16 where it builds; it falls back to the module's forward call by call. Returns
    how many norms (0: none routed)."""
    norms = [m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
             and not m.weight.requires_grad and hasattr(m, "variance_epsilon") and llama_formula(type(m))]
    if not norms or kernel() is None:
        return 0
    for norm in norms:
        norm.forward = types.MethodType(rms_norm_forward, norm)
    return len(norms)


def uses_norm_kernel(model: nn.Module) -> bool:
    """Whether `use_norm_kernel` routed any of `model`'s norms (what run.json's `rms_norm` records)."""
    return any(getattr(m.forward, "__func__", None) is rms_norm_forward for m in model.modules())
