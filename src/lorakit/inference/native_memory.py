"""Memory that native libraries keep, bounded for a long-running process (the server).

oneDNN's caches. Every bf16 product shape (rows x in x out) gets a compiled kernel, kept by oneDNN's primitive cache
and by ideep's cache in PyTorch, up to 1,024 each by default, about 0.5 MB a shape between them. A decode step has
few shapes (its row counts), but every prefill has its own row count (the prompts' lengths), so a server's RSS grew
by hundreds of MB over its first thousand prompts. ONEDNN_CACHE_ENTRIES holds the steps' shapes with room to spare
(LRU: a shape used every step is never the oldest); a prefill's shapes are compiled on first use as before (about
0.6 ms a shape). Both caches read their capacity from the environment once, at their first use in the process (or
thread), hence `bound_onednn_caches` before any bf16 work.

glibc's heap. Freed activations of many sizes leave free memory inside glibc's arenas that it does not return to the
system; `release_free_memory` (malloc_trim) returns it, which the engine does once it has been idle half a second.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

ONEDNN_CACHE_ENTRIES = 128  # product shapes each cache keeps; a server's steps use under 40 (docs/api.md)
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's


def bound_onednn_caches(entries: int = ONEDNN_CACHE_ENTRIES) -> dict[str, str]:
    """Set both caches' capacity where the user has not set it; effective only before the process's first oneDNN
    product (`lorakit serve` calls it first thing; a program of your own that serves for long should too). The
    capacities in force, by variable."""
    for name in CACHE_VARIABLES:
        os.environ.setdefault(name, str(entries))
    return {name: os.environ[name] for name in CACHE_VARIABLES}


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim); False where the C library has none."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
