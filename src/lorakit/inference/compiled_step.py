"""The decode loop's step for the Llama family in C++ (models/csrc/llama_step.cpp), and what of a model it can run.

A one-token step is dozens of small operations a layer around its seven matrix products; from Python each costs
microseconds of interpreter and dispatch, which at batch 1 adds up to a large share of the step. The C++ step makes
the same ATen calls in the same order as decode.py's Python step, on the model's own weights, so its logits are the
same bits in fp32 (tested; in bf16 its own kernels, within bf16 rounding), and the same cache. Built once
(models/native.py); where it cannot be built, or a model holds a module it does not describe (an NF4 base, DoRA
rows, hooks, a replaced forward), decode.py runs the Python step.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..engine import LoRALinear
from ..engine.frozen_base import StoredLinear, packed_linear
from ..engine.mixed_rows import rows_mask
from ..engine.step_terms import inference_terms
from ..models import native
from ..models.kernels import is_swiglu, swiglu_forward

SOURCES = ("llama_step.cpp",  # in models/csrc: the step itself, and the bindings
           "skinny_gemm.cpp",  # bf16 / int8 products for a decode step's few rows
           "decode_attention.cpp",  # one query per row over a bf16 cache
           "fused_ops.cpp",  # a bf16 step's norms, rotary embedding and SwiGLU, a pass each
           "mixed_lora.cpp",  # the LoRA term of rows mixed by adapter, a pass over the rows
           "amx_gemm.cpp")  # fp32 logits from a bf16 head on AMX tiles
NAME = "lorakit_llama_step"
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")  # the model types whose decoder the step describes
# replaced forwards the step reproduces (lorakit's SwiGLU MLP; residual_stream.py adds the fp32 stream's)
KNOWN_FORWARDS = {swiglu_forward}
# norm classes whose forward is exactly LlamaRMSNorm's (checked against their source)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class Unsupported(Exception):
    """A module the compiled step does not describe."""


def extension():
    """The compiled module, built on first use; None where it cannot be (one line on stderr says why) or where
    LORAKIT_COMPILED_STEP=0 asks for the Python step."""
    if os.environ.get("LORAKIT_COMPILED_STEP", "1") == "0":
        return None
    return native.extension(NAME, SOURCES, "the C++ decode step", "decoding with the Python step")


def compiled_model(model: nn.Module, dtype: torch.dtype):
    """The C++ step's view of a Llama-family `model` (its weights, not copies) for hidden states of `dtype`, or
    None where the extension is unavailable or a module is not one it describes."""
    ext = extension()
    if ext is None:
        return None
    core = model.model
    try:
        for module in model.modules():
            _check_plain(module)
        return ext.Model([_layer(ext, layer, dtype) for layer in core.layers], _norm(ext, core.norm),
                         _linear(ext, model.lm_head, dtype))
    except Unsupported:
        return None


def fused_layer_ops(layer: nn.Module, hidden: torch.Tensor):
    """The extension, where its fused passes (RMSNorm, the residual sum with the norm after it, SwiGLU's middle; the
    bf16 step's, one pass each) compute this Llama-family layer on `hidden` as its modules do: bf16 norm weights,
    hidden bf16 or the fp32 stream, plain norms and a SwiGLU MLP without hooks; else None (the modules run)."""
    ext = extension()
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if ext is None or not ext.fused_norm_applies(hidden) or not is_swiglu(layer.mlp):
        return None
    try:
        for module in (*norms, layer.mlp):
            _check_plain(module)
    except Unsupported:
        return None
    plain = all(type(n).__name__ in RMS_NORMS and ext.fused_ops_apply(n.weight) for n in norms)
    return ext if plain else None


def _check_plain(module: nn.Module) -> None:
    """No hooks and no replaced forward (accelerate's offloading sets both), except KNOWN_FORWARDS and an LM head
    giving fp32 logits (inference/logits.py)."""
    if module._forward_hooks or module._forward_pre_hooks:
        raise Unsupported
    if "forward" not in vars(module):
        return
    replaced = getattr(vars(module)["forward"], "__func__", None)  # None: not a bound method (a partial, a function)
    if replaced is None or (replaced not in KNOWN_FORWARDS and replaced is not vars(module).get("gives_fp32_logits")):
        raise Unsupported


def _linear(ext, module: nn.Module, dtype: torch.dtype):
    fp32_logits = "gives_fp32_logits" in vars(module)
    if type(module) is nn.Linear:
        return ext.Linear(module.weight, module.bias, None, None, 0.0, None, None, packed_linear(module), fp32_logits)
    if isinstance(module, StoredLinear) and module.frozen.stored() is not None:
        weight, scales = module.frozen.stored()
        terms = (weight, module.bias, None, None, 0.0, None, scales, module.frozen.packed(), fp32_logits)
    else:
        terms = inference_terms(module, dtype) if isinstance(module, LoRALinear) else None
    # int8 weights only where the CPU runs the int8 kernel: elsewhere the Python step's dequantising path is faster
    if terms is None or (terms[6] is not None and not ext.skinny_supported()):
        raise Unsupported
    return ext.Linear(*terms)


def _norm(ext, module: nn.Module):
    if type(module).__name__ not in RMS_NORMS:
        raise Unsupported
    return ext.RMSNorm(module.weight, module.variance_epsilon)


def _layer(ext, layer: nn.Module, dtype: torch.dtype):
    attn, mlp = layer.self_attn, layer.mlp
    if not is_swiglu(mlp):
        raise Unsupported
    qk_norms = (_norm(ext, attn.q_norm), _norm(ext, attn.k_norm)) if hasattr(attn, "q_norm") else (None, None)
    projections = [_linear(ext, m, dtype) for m in _projections(layer)]
    return ext.Layer(_norm(ext, layer.input_layernorm), _norm(ext, layer.post_attention_layernorm), *qk_norms,
                     *projections, attn.head_dim, attn.scaling)


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    """A decoder layer's seven products in the order the C++ Layer holds them."""
    attn, mlp = layer.self_attn, layer.mlp
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj


def row_masks(model: nn.Module, rows: list[str | None]) -> list[torch.Tensor | None]:
    """Every product's row mask for rows mixed by adapter `rows`, in the order Model.set_row_masks takes them (each
    layer's seven, then the LM head): a view built for rows of the same adapters then computes these rows, its
    adapters' weights side by side as they were."""
    modules = [*(m for layer in model.model.layers for m in _projections(layer)), model.lm_head]
    return [rows_mask(m, rows) if isinstance(m, LoRALinear) else None for m in modules]
