"""Keys and values of prompt prefixes the server has computed already, kept to skip them in later prompts (vLLM's
automatic prefix caching): a chat template's system prompt, or a conversation's earlier turns, run through the model
once per adapter and are then copied into each later request's slot instead of computed again.

Kept in blocks of BLOCK tokens, each under its adapter's name and every token up to the block's end, so a block is
used only after exactly the same tokens on the same adapter; beyond the capacity, the least recently used blocks go
first (a prefix's first blocks are kept longest: its later ones are useless without them). The engine clears it when
an adapter is loaded or unloaded (a name may come back with other weights).

Rounding: a prefix's keys and values come from the prefill that first computed them, whose batch (rows, padding)
rounds its products its own way, so a request that reuses them can differ from the same request prefilled alone in
the last bits of a float (float32); in float64 it does not (tested).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .kv_cache import KVCache

BLOCK = 16  # tokens a block holds (vLLM's default block size)
PREFIX_CACHE_MB = 64  # memory for it by default: a few thousand tokens of a small model (SmolLM2-135M in bf16: 2,800)


class PrefixCache:
    """Blocks of cached keys and values, [layers, kv_heads, BLOCK, head_dim] each, by (adapter, tokens to its end)."""

    def __init__(self, bytes_per_block: int, capacity: int) -> None:
        self.blocks: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.limit = capacity // bytes_per_block  # blocks kept at most (0: off)

    @classmethod
    def for_cache(cls, cache: KVCache, megabytes: float) -> PrefixCache:
        """A prefix cache of up to `megabytes` for blocks of `cache`'s layers, heads and dtype."""
        layers, _, kv_heads, _, head_dim = cache.keys.shape
        per_block = 2 * layers * kv_heads * BLOCK * head_dim * cache.keys.element_size()
        return cls(per_block, int(megabytes * 2 ** 20))

    def known(self, adapter: str | None, ids: list[int]) -> int:
        """How many of `ids`' first tokens have their keys and values cached for `adapter`: whole blocks, always
        short of the last token (whose logits a prefill computes)."""
        n = 0
        while n + BLOCK < len(ids) and (adapter, tuple(ids[:n + BLOCK])) in self.blocks:
            n += BLOCK
        return n

    def gather(self, rows: list[tuple[str | None, list[int]]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of the first `length` tokens of each (adapter, ids) row (`known` for each at
        least `length`): [layers, rows, kv_heads, length, head_dim] each."""
        keys, values = [], []
        for adapter, ids in rows:
            blocks = [self.blocks[adapter, tuple(ids[:end])] for end in range(BLOCK, length + 1, BLOCK)]
            keys.append(torch.cat([k for k, _ in blocks], dim=2))
            values.append(torch.cat([v for _, v in blocks], dim=2))
            self._used(adapter, ids, length)
        return torch.stack(keys, 1), torch.stack(values, 1)

    def keep(self, adapter: str | None, ids: list[int], cache: KVCache, slot: int) -> None:
        """Keep the whole blocks of `ids`, now in `slot` of `cache` from column 0, for later prompts."""
        if not self.limit:
            return
        length = len(ids) // BLOCK * BLOCK
        for end in range(BLOCK, length + 1, BLOCK):
            key = (adapter, tuple(ids[:end]))
            if key not in self.blocks:
                span = slice(end - BLOCK, end)
                self.blocks[key] = (cache.keys[:, slot, :, span].clone(), cache.values[:, slot, :, span].clone())
        self._used(adapter, ids, length)
        while len(self.blocks) > self.limit:
            self.blocks.popitem(last=False)

    def _used(self, adapter: str | None, ids: list[int], length: int) -> None:
        """Mark the blocks of `ids`' first `length` tokens used now, the first ones last (the most recent)."""
        for end in range(length, 0, -BLOCK):
            key = (adapter, tuple(ids[:end]))
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def clear(self) -> None:
        self.blocks.clear()

    def __len__(self) -> int:
        return len(self.blocks)
