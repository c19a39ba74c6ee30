"""Prompts prefilled as one packed row: a server's waiting prompts, of any lengths and on any adapters, through the
model in one forward without padding.

Left-padded prompts compute their padding as tokens through every projection and MLP, and rows mixed by adapter
compute every adapter's LoRA term for every row, masked. Here the prompts lie end to end in one row, grouped by
adapter by the caller: the projections and MLPs see exactly the prompts' tokens, each adapter's term only its own
prompts' (engine.adapters_by_span), rotary positions count from each prompt's start, and attention runs prompt by
prompt over its own keys (after its cached prefix, if any), called as transformers calls it for one unpadded row;
each prompt's keys and values go straight to its slot. The layer is decode.py's Llama layer: the Llama family only
(the engine prefills other models left-padded, prefill_unpadded).
"""
from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..engine import spans_apply
from .compiled_step import LLAMA_FAMILY
from .decode import llama_layer
from .kv_cache import KVCache


ATTENTIONS = ("sdpa", "lorakit")  # attention functions taking a bool mask, or none for a causal row (not eager's)
LENGTH_ROPE = ("dynamic", "longrope")  # rotary scalings that depend on the longest position in the forward


def packs(model) -> bool:
    """Whether prefill_packed runs `model`: the Llama family on SDPA or lorakit's kernel, its adapters LoRA linear
    layers below the head (spans_apply), its rotary embedding the same for a prompt alone as beside longer ones."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return (getattr(config, "model_type", None) in LLAMA_FAMILY and getattr(config, "_attn_implementation", None)
            in ATTENTIONS and rope.get("rope_type", rope.get("type")) not in LENGTH_ROPE and spans_apply(model))


@torch.no_grad()
def prefill_packed(model, cache: KVCache, slots: list[int], prompts: list[list[int]],
                   known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Prefill `prompts` (token ids) into `slots` as one packed row, each stored from column 0 as if prefilled alone;
    each prompt's last-token logits (fp32). `known`: the keys and values ([layers, prompts, kv_heads, length,
    head_dim] each, prefix_cache.py) of a prefix each prompt follows, computed before; positions count on from it.
    The adapters are the caller's: adapters_by_span over the same tokens."""
    if not prompts or not all(prompts):
        raise ValueError("prefill_packed: every prompt needs a token")
    device = cache.keys.device
    past = 0 if known is None else known[0].shape[-2]
    lengths = torch.tensor([len(p) for p in prompts])
    ends = lengths.cumsum(0)
    ids = torch.tensor([t for p in prompts for t in p], device=device)[None]
    positions = torch.cat([torch.arange(past, past + n, device=device) for n in lengths.tolist()])[None]
    core = model.model
    hidden = core.embed_tokens(ids)
    rotation = core.rotary_emb(hidden, position_ids=positions)
    attention = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    masks = [None if not past else _after_prefix(n, past, device) for n in lengths.tolist()]  # the same each layer
    spans = list(zip(slots, (ends - lengths).tolist(), ends.tolist(), masks))
    for i, layer in enumerate(core.layers):
        layer_known = None if known is None else (known[0][i], known[1][i])
        hidden = llama_layer(layer, hidden, rotation, lambda attn, q, k, v, i=i, layer_known=layer_known: (
            _attend_by_prompt(attention, cache, i, spans, layer_known, attn, q, k, v)))
    last = hidden[0, (ends - 1).to(device)]  # an index: contiguous rows for the head, as decode's prefill gives it
    cache.filled_unpadded(slots, lengths + past)
    return model.lm_head(core.norm(last[:, None]))[:, -1].float()


def _attend_by_prompt(attention, cache: KVCache, i: int, spans: list[tuple[int, int, int, torch.Tensor | None]],
                      known: tuple[torch.Tensor, torch.Tensor] | None, attn: torch.nn.Module, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Layer i's attention for a packed row ([1, heads, tokens, head_dim] each): each (slot, start, stop, mask) of
    `spans` gets its prompt's keys and values (after `known`'s, [prompts, kv_heads, length, head_dim]) in its slot,
    and its queries attend over them, causally (after a prefix: as `mask` says), through `attention` (transformers'
    interface, as the model calls it); [1, tokens, heads * head_dim]."""
    past = 0 if known is None else known[0].shape[-2]
    outs = []
    for b, (slot, start, stop, mask) in enumerate(spans):
        end = past + stop - start
        keys, values = cache.keys[i, slot:slot + 1, :, :end], cache.values[i, slot:slot + 1, :, :end]
        if known is not None:
            keys[0, :, :past], values[0, :, :past] = known[0][b], known[1][b]
        keys[0, :, past:], values[0, :, past:] = k[0, :, start:stop], v[0, :, start:stop]
        out, _ = attention(attn, q[:, :, start:stop], keys, values, mask, dropout=0.0, scaling=attn.scaling)
        outs.append(out)
    return torch.cat(outs, dim=1).reshape(1, q.shape[2], -1)


def _after_prefix(tokens: int, past: int, device: torch.device) -> torch.Tensor:
    """[1, 1, tokens, past + tokens]: query j sees the prefix and its prompt's tokens up to itself (what
    transformers' causal mask is for one unpadded row after a cache)."""
    seen = torch.arange(past + tokens, device=device)
    return (seen[None, :] <= torch.arange(past, past + tokens, device=device)[:, None])[None, None]
