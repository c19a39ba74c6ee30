"""The decode loop's static KV cache: one preallocated tensor per layer, a slot per row, written in place."""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer


class Slots(NamedTuple):
    """One step's view of the cache: row b's new key/value goes to column[b]; attention spans [0, width), masked to
    each row's [start[b], column[b]] (mask None: every row spans it all)."""

    rows: torch.Tensor
    column: torch.Tensor
    width: int
    mask: torch.Tensor | None
    start: torch.Tensor | None = None


class KVCache:
    """Keys and values of every layer for `rows` slots of up to `length` positions. Slot b holds its tokens at
    positions [start[b], end[b]); a new token goes to end[b]. Prefilled batches keep transformers' left-padded layout
    (start = padding), so their attention sees exactly the positions `generate` would."""

    def __init__(self, layers: int, rows: int, kv_heads: int, length: int, head_dim: int, like: torch.Tensor):
        shape = (layers, rows, kv_heads, length, head_dim)
        self.keys = like.new_zeros(shape)
        self.values = like.new_zeros(shape)
        self.start = torch.zeros(rows, dtype=torch.long, device=like.device)
        self.end = torch.zeros(rows, dtype=torch.long, device=like.device)
        self.length = length

    @classmethod
    def for_model(cls, config, rows: int, length: int, like: torch.Tensor) -> KVCache:
        """A cache for a transformers model `config`'s layers and key/value heads."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        return cls(config.num_hidden_layers, rows, kv_heads, length, head_dim, like)

    def advance(self) -> Slots:
        """Where each slot's next token goes, and what it attends to; moves end past it. A slot whose prompt ended,
        with nothing queued, computes padding like `generate`'s ended rows: it stops at the last column."""
        column = self.end.clamp(max=self.length - 1)
        self.end.copy_(column + 1)  # in place: a narrowed view's step moves its parent's slots too
        width = int(self.end.max())
        return Slots(torch.arange(len(column), device=column.device), column, width, self.attention_mask(width),
                     self.start)

    def narrow(self, rows: int) -> KVCache:
        """The first `rows` slots as a cache of their own, sharing this one's tensors: a step computes only the
        rows in use (a server with one request runs at batch 1, not at its number of slots)."""
        view = object.__new__(KVCache)
        view.keys, view.values = self.keys[:, :rows], self.values[:, :rows]
        view.start, view.end, view.length = self.start[:rows], self.end[:rows], self.length
        return view

    def prefill_cache(self, first: int, rows: int) -> Cache:
        """A transformers Cache for the model's forward over a prefill of slots first..first+rows-1: its layers
        write the keys and values straight into this cache (a DynamicCache would concatenate them into new
        tensors, to be copied here after)."""
        span = slice(first, first + rows)
        return Cache(layers=[_SlotLayer(keys[span], values[span]) for keys, values in zip(self.keys, self.values)])

    def filled(self, first: int, pads: torch.Tensor, length: int) -> None:
        """Slots first.. now hold a prefill of `length` positions, the first pads[b] of row b padding."""
        self.start[first:first + len(pads)] = pads
        self.end[first:first + len(pads)] = length

    def unpadded_cache(self, slots: list[int], pads: list[int],
                       known: tuple[torch.Tensor, torch.Tensor] | None = None) -> Cache:
        """A transformers Cache for a prefill of left-padded rows into any free `slots`: row b's keys and values
        go to slots[b] without its pads[b] padding columns, from column 0 (so a short prompt batched with long
        ones takes no more of its slot than alone). `known`: keys and values of a prefix every row has already
        computed ([layers, rows, kv_heads, length, head_dim] each; prefix_cache.py), which the rows' tokens
        follow (after their padding) and which go first into their slots."""
        known_layers = zip(*known) if known is not None else [None] * len(self.keys)
        return Cache(layers=[_UnpaddedLayer(keys, values, slots, pads, layer_known)
                             for keys, values, layer_known in zip(self.keys, self.values, known_layers)])

    def filled_unpadded(self, slots: list[int], lengths: torch.Tensor) -> None:
        """`slots` now hold prompts of `lengths` tokens each, from column 0."""
        index = torch.tensor(slots, device=self.start.device)
        self.start[index] = 0
        self.end[index] = lengths.to(self.end.device)

    def attention_mask(self, width: int) -> torch.Tensor | None:
        """[rows, 1, 1, width] True where a slot holds a token; None when every slot fills [0, width) (as
        transformers passes no mask then, and SDPA runs its grouped-query path)."""
        if bool((self.start == 0).all()) and bool((self.end == width).all()):
            return None
        positions = torch.arange(width, device=self.start.device)
        return ((positions >= self.start[:, None]) & (positions < self.end[:, None]))[:, None, None, :]


class _SlotLayer(DynamicLayer):
    """One layer of a prefill's cache: keys and values written into `keys`/`values` (views of the static cache's
    slots), which attention then reads, as it reads a DynamicLayer's."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.storage = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        length = key_states.shape[-2]
        self.keys = self.storage[0][:, :, :length].copy_(key_states)
        self.values = self.storage[1][:, :, :length].copy_(value_states)
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        return self.keys, self.values


class _UnpaddedLayer(DynamicLayer):
    """One layer of an unpadded prefill's cache: attention reads the batch's own keys and values (padding masked as
    transformers masks it), after those of a prefix already known, if any; each row's real ones are copied into its
    slot of the static cache."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: list[int], pads: list[int],
                 known: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.storage, self.slots, self.pads, self.known = (keys, values), slots, pads, 0
        if known is not None:  # the cache then reports the prefix's length, as transformers counts past tokens
            self.keys, self.values = known
            self.known = known[0].shape[-2]
            self.dtype, self.device, self.is_initialized = self.keys.dtype, self.keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.known:
            key_states = torch.cat([self.keys, key_states], dim=-2)
            value_states = torch.cat([self.values, value_states], dim=-2)
        length, known = key_states.shape[-2], self.known
        for row, (slot, pad) in enumerate(zip(self.slots, self.pads)):
            for stored, states in zip(self.storage, (key_states, value_states)):
                if known:
                    stored[slot, :, :known].copy_(states[row, :, :known])
                stored[slot, :, known:length - pad].copy_(states[row, :, known + pad:])
        self.keys, self.values = key_states, value_states
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        return self.keys, self.values
