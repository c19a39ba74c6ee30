"""A bf16 or int8 Llama-family model's residual stream kept in fp32, as llama.cpp keeps it.

Cast whole to bf16, a model rounds its hidden state at each of its 2 x layers residual sums: the stream's entries
grow far larger than what a layer adds to them, and bf16's 8 bits of precision drop part of every update. With fp32
logits (logits.py) that rounding was about half of bf16's teacher-forced top-1 disagreement with fp32 left on SmolLM2
(docs/precision.md). Here the products, the attention and the cache stay bf16, and only the
stream changes: the embeddings' rows are widened to fp32, each layer's sums are fp32 (torch promotes bf16 + fp32),
each RMSNorm computes in fp32 and rounds its output once to bf16 (the fp32 module followed by the rounding the next
product makes), and the rotary tables are given in bf16, the dtype of q and k. The C++ decode step takes the same
fp32 rows (models/csrc/llama_step.cpp's RMSNorm, fused_ops' norms).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..models.rms_norm import llama_formula
from .compiled_step import KNOWN_FORWARDS, LLAMA_FAMILY


def widened_rows(self: nn.Module, *args, **kwargs) -> torch.Tensor:
    """An embedding's forward, its rows widened to fp32: the stream starts in fp32."""
    return type(self).forward(self, *args, **kwargs).float()


def rounded_norm(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's forward (on fp32 rows: computed in fp32), its output rounded once to the weight's dtype."""
    return type(self).forward(self, hidden_states).to(self.weight.dtype)


def rounded_tables(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotary embedding's cos and sin in the dtype of the q and k they rotate, not the fp32 stream's."""
    return tuple(t.to(vars(self)["tables_dtype"]) for t in type(self).forward(self, x, *args, **kwargs))


KNOWN_FORWARDS.update((widened_rows, rounded_norm, rounded_tables))  # the C++ step takes the stream as they give it


def keep_fp32_stream(model: nn.Module) -> bool:
    """Carry the residual stream of a bf16 or int8 Llama-family `model` (Llama, Mistral, Qwen2, Qwen3: causal LMs and
    classifiers) in fp32; False, and nothing changed, for any other model (GPT-2, T5, encoders keep bf16 throughout),
    an fp32 one, or a norm that is not LlamaRMSNorm's formula. Safe to run again."""
    core = getattr(model, "model", None)
    if getattr(getattr(model, "config", None), "model_type", None) not in LLAMA_FAMILY or core is None:
        return False
    if not all(hasattr(core, m) for m in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    norms = [core.norm] + [n for layer in core.layers for n in (layer.input_layernorm,
                                                                  layer.post_attention_layernorm)]
    dtype = core.norm.weight.dtype
    if dtype == torch.float32 or not all(llama_formula(type(n)) and n.weight.dtype == dtype for n in norms):
        return False
    replaced = [(core.embed_tokens, widened_rows), (core.rotary_emb, rounded_tables)] + [(n, rounded_norm)
                                                                                         for n in norms]
    for module, forward in replaced:
        module.forward = types.MethodType(forward, module)
    vars(core.rotary_emb)["tables_dtype"] = dtype
    return True


def keeps_fp32_stream(model: nn.Module) -> bool:
    """Whether `keep_fp32_stream` gave `model` its fp32 stream."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    return getattr(getattr(embed, "forward", None), "__func__", None) is widened_rows
