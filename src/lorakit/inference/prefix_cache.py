"""Keys and values of prompt prefixes the server has computed already, kept to skip them in later prompts (vLLM's
automatic prefix caching): a chat template's system prompt, or a conversation's earlier turns, run through the model
once per adapter and are then copied into each later request's slot instead of computed again.

Kept in blocks of BLOCK tokens, each under its adapter's name, the block before it and its own tokens, so a block is
used only after exactly the same tokens on the same adapter (a lookup walks a prompt's blocks in order, each key
naming its parent's number: no hash that two prefixes could share, and no key as long as the prompt); beyond the
capacity, the least recently used blocks go first (a prefix's first blocks are kept longest: its later ones are
useless without them). The engine clears it when an adapter is loaded or unloaded (a name may come back with other
weights).

Rounding: a prefix's keys and values come from the prefill that first computed them, whose batch (rows, padding)
rounds its products its own way, so a request that reuses them can differ from the same request prefilled alone in
the last bits of a float (float32); in float64 it does not (tested).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .kv_cache import KVCache

BLOCK = 16  # tokens a block holds (vLLM's default block size)
PREFIX_CACHE_MB = 64  # MiB for it by default: a few thousand tokens of a small model (SmolLM2-135M in bf16: 2,900)


class PrefixCache:
    """Blocks of cached keys and values in a pool allocated up front (as vLLM's block pool: the memory is the
    server's from the start, and keeping a block allocates nothing), each block [layers, kv_heads, BLOCK, head_dim]
    of the pool's keys and values, found by (adapter, the number of the block before it (0: none), its tokens);
    each block numbered as it is kept."""

    def __init__(self, cache: KVCache, blocks: int) -> None:
        layers, _, kv_heads, _, head_dim = cache.keys.shape
        self.limit = max(0, blocks)  # blocks kept at most (0: off)
        self.keys = cache.keys.new_zeros((self.limit, layers, kv_heads, BLOCK, head_dim))  # zeros: touched now
        self.values = torch.zeros_like(self.keys)
        self.blocks: OrderedDict[tuple, tuple[int, int]] = OrderedDict()  # key -> (its number, its place in the pool)
        self.clear()  # every place in the pool free
        self.numbered = 0  # blocks numbered so far

    @classmethod
    def for_cache(cls, cache: KVCache, megabytes: float) -> PrefixCache:
        """A prefix cache of up to `megabytes` MiB for blocks of `cache`'s layers, heads and dtype."""
        if not 0 <= megabytes < float("inf"):
            raise ValueError(f"prefix cache of {megabytes} MiB: give a size >= 0 (0 turns it off)")
        layers, _, kv_heads, _, head_dim = cache.keys.shape
        per_block = 2 * layers * kv_heads * BLOCK * head_dim * cache.keys.element_size()
        return cls(cache, int(megabytes * 2 ** 20) // per_block)

    def known(self, adapter: str | None, ids: list[int]) -> int:
        """How many of `ids`' first tokens have their keys and values cached for `adapter`: whole blocks, always
        short of the last token (whose logits a prefill computes)."""
        return len(self._chain(adapter, ids, len(ids) - 1)) * BLOCK

    def gather(self, rows: list[tuple[str | None, list[int]]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of the first `length` tokens of each (adapter, ids) row (`known` for each at
        least `length`): [layers, rows, kv_heads, length, head_dim] each."""
        chains = [self._chain(adapter, ids, length) for adapter, ids in rows]
        if min(map(len, chains)) * BLOCK < length:
            raise KeyError(f"{length} tokens asked for, {min(map(len, chains)) * BLOCK} cached")
        for chain in chains:
            self._used(chain)
        places = torch.tensor([[self.blocks[key][1] for key in chain] for chain in chains], device=self.keys.device)
        shape = (self.keys.shape[1], len(rows), self.keys.shape[2], length, self.keys.shape[4])
        # [rows, blocks, layers, kv_heads, BLOCK, head_dim] -> [layers, rows, kv_heads, length, head_dim]: one copy
        keys, values = (pool[places].permute(2, 0, 3, 1, 4, 5).reshape(shape) for pool in (self.keys, self.values))
        return keys, values

    def keep(self, adapter: str | None, ids: list[int], cache: KVCache, slot: int) -> None:
        """Keep the whole blocks of `ids`, now in `slot` of `cache` from column 0, for later prompts."""
        if not self.limit:
            return
        chain = self._chain(adapter, ids, len(ids))
        self._used(chain)  # the blocks found stay: a place is taken from the least recently used others
        for end in range((len(chain) + 1) * BLOCK, len(ids) + 1, BLOCK):  # the blocks not cached yet
            key = self._key(adapter, chain, ids, end)
            if not self.free:
                if next(iter(self.blocks)) in chain:  # every block is this prompt's: it keeps its first ones
                    break
                self.free.append(self.blocks.popitem(last=False)[1][1])
            place, span = self.free.pop(), slice(end - BLOCK, end)
            self.keys[place].copy_(cache.keys[:, slot, :, span])
            self.values[place].copy_(cache.values[:, slot, :, span])
            self.numbered += 1
            self.blocks[key] = (self.numbered, place)
            chain.append(key)
        self._used(chain)

    def _chain(self, adapter: str | None, ids: list[int], length: int) -> list[tuple]:
        """The keys of the cached blocks that begin `ids`, in order, within its first `length` tokens."""
        chain: list[tuple] = []
        for end in range(BLOCK, length + 1, BLOCK):
            key = self._key(adapter, chain, ids, end)
            if key not in self.blocks:
                break
            chain.append(key)
        return chain

    def _key(self, adapter: str | None, chain: list[tuple], ids: list[int], end: int) -> tuple:
        """The key of `ids`' block ending at `end`, after the blocks of `chain` (0 for the parent of the first)."""
        return adapter, (self.blocks[chain[-1]][0] if chain else 0), tuple(ids[end - BLOCK:end])

    def _used(self, chain: list[tuple]) -> None:
        """Mark the blocks of `chain` used now, the first ones last (the most recent)."""
        for key in reversed(chain):
            self.blocks.move_to_end(key)

    def clear(self) -> None:
        self.blocks.clear()
        self.free = list(range(self.limit))[::-1]  # places in the pool no block holds

    def __len__(self) -> int:
        return len(self.blocks)
