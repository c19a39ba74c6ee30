"""Fused kernels for the models lorakit trains: the SwiGLU product (one activation fewer kept per MLP) and regional
torch.compile.

Written here rather than taken from a library because they are the product: each is exact (the tests compare loss
and gradients with the model's own code to 1e-5) and small enough to read.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .native import training_kernels


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each repeated block of `model` (the classes its `_no_split_modules` names: one decoder layer
    each), in place; returns how many. Regional compilation: the blocks share one compiled graph, so it compiles
    once instead of once per layer, and the fused elementwise kernels (norms, rotary, SiLU·up, residuals) take most
    of what is not a matmul off a training step. A model without such blocks is compiled whole."""
    kinds = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    for block in blocks or [model]:
        block.compile()
    return len(blocks) or 1


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward. Autograd on `act(gate) * up` also keeps silu(gate)
    for the product's backward: one more (tokens x intermediate) tensor per layer; here backward recomputes it from
    gate (one sigmoid). On a CPU with AVX-512 BF16 both passes are lorakit's kernel (csrc/swiglu.cpp: one pass where
    torch makes seven), else torch's operations (under torch.compile too, which traces them, and for a backward that
    is itself differentiated)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ext = training_kernels() if gate.device.type == "cpu" and not torch.compiler.is_compiling() else None
        ctx.kernel = ext if ext is not None and ext.swiglu_applies(gate, up) else None
        if ctx.kernel is not None:
            return ctx.kernel.swiglu_forward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if ctx.kernel is not None and not torch.is_grad_enabled():  # a graph of the backward: torch's operations
            return ctx.kernel.swiglu_backward(grad, gate, up)
        sig = torch.sigmoid(gate)
        g_up = (grad * gate).mul_(sig) if ctx.needs_input_grad[1] else None
        g_gate = None
        if ctx.needs_input_grad[0]:  # silu'(x) = sig(x) * (1 + x * (1 - sig(x))), as torch's silu_backward
            g_gate = (grad * up).mul_((1 - sig).mul_(gate).add_(1).mul_(sig))
        return g_gate, g_up


def swiglu_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated-SiLU MLP's forward (Llama, Mistral, Qwen): down(silu(gate(x)) * up(x)), the product by SwiGLU."""
    return mlp.down_proj(SwiGLU.apply(mlp.gate_proj(x), mlp.up_proj(x)))


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (checked against their source)
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def is_swiglu(m: nn.Module) -> bool:
    """Whether `m` is one of SWIGLU_MLPS with a SiLU act_fn: its forward is down(silu(gate(x)) * up(x))."""
    act = getattr(m, "act_fn", None)
    return type(m).__name__ in SWIGLU_MLPS and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")


def fuse_swiglu(model: nn.Module) -> int:
    """Give each SwiGLU MLP of `model` (SWIGLU_MLPS, with a SiLU act_fn) the SwiGLU product, in place: the same
    outputs and gradients, one activation fewer kept per layer. Returns how many MLPs."""
    n = 0
    for m in model.modules():
        if is_swiglu(m):
            m.forward = types.MethodType(swiglu_forward, m)
            n += 1
    return n
