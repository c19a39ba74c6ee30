"""A lean decode loop for GPT-2 and Llama-family models: a static KV cache, one pass over the model's own modules
per token, and continuous batching (a row that ends is refilled from the queue instead of idling).

Why not transformers' `generate`: each of its decode steps grows a DynamicCache by concatenation (every cached key
and value copied, every step), builds a 4-D mask and runs the logits processors and stopping criteria over the whole
batch; and a fixed batch waits for its longest row while the rows that ended compute padding. Here a step writes
one key/value per row into a preallocated cache, attends over a strided view of it, and calls the model's own
norm, projection and MLP modules, so LoRA layers work as they are: unmerged, merged, or mixed by row. For the
Llama family compiled_step runs the same pass in C++ where it can (in fp32 the same operations, the same bits; in
bf16 its own kernels, within bf16 rounding).

The arithmetic is the model's: the same modules, the same rotary embedding, the same SDPA call transformers makes
for one query token. With the same rows in a batch, greedy tokens equal `generate`'s (tested at batch 1 and at
batch 8 with left padding). A GEMM's rounding depends on how many rows it has, so a batch that refills rows is
exact to that rounding, not token for token against any fixed batch.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..engine.frozen_base import PACKED_ROWS
from .compiled_step import LLAMA_FAMILY, compiled_model, extension, fused_layer_ops
from .kv_cache import KVCache, Slots
from .precision import pack_for_batches
from .sampling import Choice

PREFILL_BATCH = 4  # prompts worth a prefill of their own while the batch is busy (a server's, decode's refills)
DEFER_STEPS = 8  # decode steps a waiting prompt waits at most for others to prefill beside it


def supports(model, length: int = 0) -> bool:
    """Whether this loop can drive `model` (GPT-2 or the Llama family, as transformers builds them) for sequences
    of up to `length` tokens (a sliding attention window shorter than that, or GPT-2's position table, would not
    hold them)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if not hasattr(model, "lm_head") or getattr(config, "is_encoder_decoder", False):
        return False
    if kind == "gpt2":
        return hasattr(model, "transformer") and length <= config.n_positions
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if kind not in LLAMA_FAMILY or (window and window < length):
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    return bool(layers) and all(hasattr(layers[0], m) for m in ("self_attn", "mlp", "input_layernorm",
                                                                "post_attention_layernorm"))


@torch.no_grad()
def prefill(model, cache: KVCache, first: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run left-padded prompts (rows of `ids`) through the model as `generate` does, their keys and values going
    to slots first.. (padding kept, as `generate` keeps it), and return the logits of each row's last token."""
    logits = _last_logits(model, ids, mask, cache.prefill_cache(first, len(ids)))
    cache.filled(first, (mask == 0).sum(1), ids.shape[1])
    return logits


@torch.no_grad()
def prefill_unpadded(model, cache: KVCache, slots: list[int], ids: torch.Tensor, mask: torch.Tensor,
                     known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Prefill left-padded prompts together into any free `slots`, each row's keys and values stored without its
    padding (a server's requests, batched by length; each then steps as if prefilled alone); the last logits.
    `known`: the keys and values of a prefix of the same length that every row's `ids` follow (KVCache's
    unpadded_cache), computed before; the rows' positions count on from it."""
    pads = (mask == 0).sum(1)
    if known is not None:
        mask = torch.cat([mask.new_ones(len(ids), known[0].shape[-2]), mask], dim=1)
    logits = _last_logits(model, ids, mask, cache.unpadded_cache(slots, pads.tolist(), known))
    cache.filled_unpadded(slots, mask.shape[1] - pads)
    return logits


def _last_logits(model, ids: torch.Tensor, mask: torch.Tensor, past) -> torch.Tensor:
    """The model over left-padded `ids` with positions counted as `generate` counts them, keys and values going to
    `past`; each row's last-token logits in fp32. `mask` may be longer than `ids`: it then covers the tokens in
    `past` first."""
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -ids.shape[1]:]
    # The last position as an index tensor hands the LM head a contiguous input where a slice does not; a bf16 head
    # needs that (torch's matmul would run a strided one as a batched product over a transposed copy of the whole
    # weight). fp32 keeps generate's slice, so its logits stay generate's bit for bit.
    keep = 1 if _float_like(model).dtype == torch.float32 else torch.tensor([ids.shape[1] - 1], device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep,
                past_key_values=past)
    return out.logits[:, -1].float()


@torch.no_grad()
def step(model, cache: KVCache, tokens: torch.Tensor, compiled=None) -> torch.Tensor:
    """One token per slot through every layer; returns the next-token logits [rows, vocab]. Each token's position
    is its count of real tokens before it, as left-padded `generate` counts. `compiled` (compiled_step's view of
    a Llama-family model) runs the layers in C++: in fp32 the same operations, the same bits (bf16: its own kernels)."""
    positions = (cache.end - cache.start)[:, None]
    slots = cache.advance()
    if model.config.model_type == "gpt2":
        core = model.transformer
        hidden = core.wte(tokens[:, None]) + core.wpe(positions)
        for i, layer in enumerate(core.h):
            hidden = _gpt2_layer(layer, hidden, cache, i, slots)
        return model.lm_head(core.ln_f(hidden))[:, -1].float()
    core = model.model
    hidden = core.embed_tokens(tokens[:, None])
    rotation = core.rotary_emb(hidden, position_ids=positions)
    if compiled is not None:
        return compiled.step(hidden, *rotation, cache.keys, cache.values, extension().Slots(*slots))
    for i, layer in enumerate(core.layers):
        hidden = llama_layer(layer, hidden, rotation, functools.partial(_attend, cache, i, slots))
    return model.lm_head(core.norm(hidden))[:, -1].float()


Attend = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def llama_layer(layer, hidden: torch.Tensor, rotation, attend: Attend) -> torch.Tensor:
    """x + Attn(RMSNorm(x)), then + MLP(RMSNorm(x)), as transformers' Llama layer, for hidden [rows, tokens, d];
    q and k rotated (RoPE), then attend(attention module, q, k, v) ([rows, heads, tokens, head_dim] each) gives
    [rows, tokens, heads * head_dim]: the step's one token a row over the cache, or a packed prefill's prompts."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn, fused = layer.self_attn, fused_layer_ops(layer, hidden)
    x = _normed(layer.input_layernorm, hidden, fused)
    head = (*x.shape[:2], -1, attn.head_dim)
    q, k, v = attn.q_proj(x).view(head), attn.k_proj(x).view(head), attn.v_proj(x).view(head)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *rotation)
    attended, norm = attn.o_proj(attend(attn, q, k, v.transpose(1, 2))), layer.post_attention_layernorm
    if fused is not None and fused.fused_ops_apply(attended):  # the sum and the norm after it in one pass
        hidden, y = fused.add_rms_norm(hidden, attended, norm.weight, norm.variance_epsilon)
    else:
        hidden = hidden + attended
        y = norm(hidden)
    return hidden + _mlp(layer.mlp, y, fused)


def _normed(norm: torch.nn.Module, x: torch.Tensor, fused) -> torch.Tensor:
    """RMSNorm `norm` of x: the fused pass where `fused` (compiled_step.fused_layer_ops) is given, else the module."""
    return norm(x) if fused is None else fused.rms_norm(x, norm.weight, norm.variance_epsilon)


def _mlp(mlp: torch.nn.Module, y: torch.Tensor, fused) -> torch.Tensor:
    """The layer's MLP on y: silu(gate)·up in one pass where `fused` is given (a SwiGLU MLP), else the module."""
    if fused is None:
        return mlp(y)
    gate, up = mlp.gate_proj(y), mlp.up_proj(y)
    both = fused.fused_ops_apply(gate) and fused.fused_ops_apply(up)
    return mlp.down_proj(fused.silu_mul(gate, up) if both else mlp.act_fn(gate) * up)


def _gpt2_layer(layer, hidden, cache: KVCache, i: int, slots: Slots) -> torch.Tensor:
    """x + Attn(LayerNorm(x)), then + MLP(LayerNorm(x)), as transformers' GPT-2 block; q, k, v from one Conv1D."""
    attn = layer.attn
    head = (hidden.shape[0], 1, -1, attn.head_dim)
    q, k, v = (t.view(head).transpose(1, 2) for t in attn.c_attn(layer.ln_1(hidden)).split(attn.split_size, dim=2))
    hidden = attn.c_proj(_attend(cache, i, slots, attn, q, k, v)) + hidden
    return hidden + layer.mlp(layer.ln_2(hidden))


def _attend(cache: KVCache, i: int, slots: Slots, attn: torch.nn.Module, q, k, v) -> torch.Tensor:
    """Store the new k, v ([rows, kv_heads, 1, head_dim]) of layer i at each slot's column and attend the one
    query per row over the slot's positions: SDPA as transformers calls it for one query token."""
    rows, heads, _, head_dim = q.shape
    scaling = attn.scaling
    cache.keys[i][slots.rows, :, slots.column] = k[:, :, 0]
    cache.values[i][slots.rows, :, slots.column] = v[:, :, 0]
    keys, values = cache.keys[i, :, :, :slots.width], cache.values[i, :, :, :slots.width]
    if slots.mask is None:
        out = F.scaled_dot_product_attention(q, keys, values, scale=scaling, enable_gqa=heads != keys.shape[1])
    else:  # the heads grouped by the key/value head they share: no copy of the keys
        grouped = q.reshape(rows, keys.shape[1], -1, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=slots.mask, scale=scaling)
    return out.reshape(rows, heads, 1, head_dim).transpose(1, 2).reshape(rows, 1, -1)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def compiled_view(model, dtype: torch.dtype):
    """The C++ step's view of `model` as it computes now (compiled_step.py); None where it cannot describe it."""
    return compiled_model(model, dtype) if model.config.model_type in LLAMA_FAMILY else None


def _float_like(model) -> torch.Tensor:
    """A tensor of the dtype and device the cache takes: the first parameter's (fp32 where it is quantised)."""
    like = next(model.parameters())
    return like if like.is_floating_point() else torch.empty(0, dtype=torch.float32, device=like.device)


def decode(model, prompts: list[list[int]], choose: Choice, eos_ids: set[int], pad_id: int, slots: int = 16,
           on_prefill: Callable[[list[int]], None] | None = None, compiled: bool = True,
           refill_rows: int | None = None) -> Iterator[tuple[int, int]]:
    """Generate for token-id `prompts` in `slots` rows at once; yields (prompt index, token) as each is made.

    The first `slots` prompts are prefilled together (left-padded, as `generate` batches them). A row that ends (an
    EOS or max_new_tokens) waits, computing padding, until `refill_rows` rows have ended (default a quarter of the
    slots, at most PREFILL_BATCH; fewer where fewer prompts are queued), or for DEFER_STEPS steps at most, or until
    no row is left generating; then the next queued prompts are prefilled together into the waiting slots, each
    stored without its padding: one prefill of several prompts costs much less than one each, and stalls the other
    rows once. The batch keeps its row count (and rounding). Llama-family steps run in C++ where compiled_step can
    (`compiled`; False: the Python step). A bf16 model decoding PACKED_ROWS rows or more runs on packed copies of
    its weights for the call (precision.py's pack_for_batches; the copies are dropped after)."""
    if not prompts or choose.sampling.max_new_tokens <= 0:
        return
    rows = min(slots, len(prompts))
    packed = pack_for_batches(model) if rows >= PACKED_ROWS else []
    try:
        yield from _decode(model, prompts, choose, eos_ids, pad_id, rows, on_prefill, compiled,
                           min(PREFILL_BATCH, max(1, rows // 4)) if refill_rows is None else max(1, refill_rows))
    finally:
        for base in packed:
            base.unpack()


def _decode(model, prompts: list[list[int]], choose: Choice, eos_ids: set[int], pad_id: int, rows: int,
            on_prefill: Callable[[list[int]], None] | None, compiled: bool, refill_rows: int
            ) -> Iterator[tuple[int, int]]:
    max_new_tokens = choose.sampling.max_new_tokens
    like = _float_like(model)
    device, config = like.device, model.config
    cache = KVCache.for_model(config, rows, max(len(p) for p in prompts) + max_new_tokens, like)
    native = compiled_view(model, like.dtype) if compiled else None
    seen = (torch.zeros(rows, config.vocab_size, dtype=torch.bool, device=device)
            if choose.sampling.repetition_penalty != 1.0 else None)  # tokens each row holds, for the penalty
    slot_prompt, made = list(range(rows)), [0] * rows  # each slot's prompt (-1: ended or waiting), its tokens
    queued, held = rows, 0  # the next prompt to prefill; steps the oldest waiting slot has waited
    waiting: list[int] = []  # slots whose prompt ended, to be refilled together

    def start(at: list[int], indices: list[int], padded: bool = False) -> torch.Tensor:
        """Prefill prompts `indices` into slots `at`, stored without their padding (`padded`: slots 0.. with it, as
        `generate` batches them); their first tokens."""
        if on_prefill is not None:
            on_prefill(list(indices))
        ids, mask = _left_padded([prompts[j] for j in indices], pad_id, device)
        if seen is not None:
            seen[at] = False
            for s, j in zip(at, indices):
                seen[s, torch.tensor(prompts[j], device=device)] = True
        logits = prefill(model, cache, 0, ids, mask) if padded else prefill_unpadded(model, cache, at, ids, mask)
        return choose(logits, None if seen is None else seen[at])

    def took(s: int, token: int) -> bool:
        """Count slot s's new token; True when its prompt has ended."""
        made[s] += 1
        if seen is not None:
            seen[s, token] = True
        return token in eos_ids or made[s] >= max_new_tokens

    def emit(at: list[int], tokens: list[int]) -> Iterator[tuple[int, int]]:
        """Yield the slots' new tokens; the slots whose prompt ended wait for a refill."""
        for s, token in zip(at, tokens):
            if slot_prompt[s] >= 0:
                yield slot_prompt[s], token
                if took(s, token):
                    slot_prompt[s] = -1
                    waiting.append(s)

    tokens = start(list(range(rows)), list(range(rows)), padded=True)
    yield from emit(list(range(rows)), tokens.tolist())
    while True:
        # a prompt may end on its first token: then its slot waits again
        while count := _refills_due(len(waiting), len(prompts) - queued, refill_rows, held, slot_prompt):
            at, indices = sorted(waiting[:count]), list(range(queued, queued + count))
            del waiting[:count]
            queued, held = queued + count, 0
            for s, j in zip(at, indices):
                slot_prompt[s], made[s] = j, 0
            tokens[at] = first = start(at, indices)
            yield from emit(at, first.tolist())
        if all(j < 0 for j in slot_prompt):
            return
        tokens = choose(step(model, cache, tokens, native), seen)
        held += bool(waiting)
        yield from emit(list(range(rows)), tokens.tolist())


def _refills_due(waiting: int, queued: int, refill_rows: int, held: int, slot_prompt: list[int]) -> int:
    """How many waiting slots to refill now: all that can be once `refill_rows` wait (or the queue's rest fits), the
    oldest has been held DEFER_STEPS steps, or no row is left generating; 0 before."""
    if not waiting or not queued:
        return 0
    due = waiting >= min(refill_rows, queued) or held >= DEFER_STEPS or all(j < 0 for j in slot_prompt)
    return min(waiting, queued) if due else 0
