"""Native memory a long-running process keeps (inference/native_memory.py): oneDNN's caches bounded, measured in a
fresh process with and without the bound; the heap's free pages given back (RSS before and after); the engine
giving them back when it falls idle; the command line setting the bound before any work, never over the user's."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import tiny_llama, word_tokenizer

# a fresh process: packed bf16 products at 160 row counts (as prompts of 160 lengths), RSS growth in MB printed
SHAPES = textwrap.dedent("""
    import sys
    import torch  # imported first, as by `lorakit serve`: the caches read their capacity at their first use
    from lorakit.inference.native_memory import bound_onednn_caches
    if sys.argv[1] == "bounded":
        bound_onednn_caches(16)
    weights = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, 256).bfloat16(), 16) for n in (256, 768)]
    def rss():
        return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("RssAnon"))) / 1024
    torch.ops.mkldnn._linear_pointwise(torch.randn(9, 256).bfloat16(), weights[0], None, "none", [], "")
    before = rss()
    for rows in range(40, 40 + 160 * 7, 7):
        for w in weights:
            torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 256).bfloat16(), w, None, "none", [], "")
    print(rss() - before)
""")


def rss_mb() -> float:
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("RssAnon"))) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bounded_onednn_caches_stop_growing_with_new_shapes():
    from lorakit.engine.frozen_base import packing_supported
    from lorakit.inference.native_memory import CACHE_VARIABLES
    if not packing_supported():
        pytest.skip("no oneDNN bf16 on this CPU")
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    grew = {case: float(subprocess.run([sys.executable, "-c", SHAPES, case], env=env, capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for case in ("bounded", "default")}
    assert grew["bounded"] < 60 and grew["default"] > 3 * grew["bounded"] + 30, grew


def unset_cache_variables(monkeypatch) -> None:
    """Both variables absent for the test, and as they were after it (delenv alone restores nothing it did not find
    set)."""
    from lorakit.inference.native_memory import CACHE_VARIABLES
    for name in CACHE_VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_bound_respects_what_the_user_set(monkeypatch):
    from lorakit.inference.native_memory import bound_onednn_caches
    unset_cache_variables(monkeypatch)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "2048")
    assert bound_onednn_caches(64) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "2048"}


def test_lorakit_serve_bounds_the_caches(monkeypatch, capsys):
    from lorakit.cli import main
    from lorakit.inference.native_memory import ONEDNN_CACHE_ENTRIES
    unset_cache_variables(monkeypatch)
    assert main(["serve", "--api", "--host", "0.0.0.0"]) == 2  # refused (no key), the bound set first
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == os.environ["LRU_CACHE_CAPACITY"] == str(
        ONEDNN_CACHE_ENTRIES)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, RSS from /proc")
def test_free_heap_pages_go_back_to_the_system():
    """Small blocks freed below a live one stay in glibc's heap (RSS) until trimmed."""
    from lorakit.inference.native_memory import release_free_memory
    release_free_memory()
    blocks = [bytearray(48 * 1024) for _ in range(4096)]  # 192 MB of heap blocks (under glibc's mmap threshold)
    keep = blocks[-1]
    del blocks
    before = rss_mb()
    assert release_free_memory() is True
    assert before - rss_mb() > 100, (before, rss_mb())
    assert len(keep) == 48 * 1024


def test_the_engine_gives_memory_back_once_idle(monkeypatch):
    """Half a second idle after work, once, never while a request waits or runs; not before any work."""
    import time

    from lorakit.inference import Sampling
    from lorakit.inference import engine as engine_module
    from lorakit.inference.engine import Engine, collect
    idle = []
    monkeypatch.setattr(engine_module, "release_free_memory",
                        lambda: idle.append((len(running.waiting), any(running.running))) or True)
    model = tiny_llama().double().eval()
    running = Engine(model, word_tokenizer(), slots=2, max_len=64).start()
    try:
        ids = word_tokenizer()("w5 w6")["input_ids"]
        time.sleep(1.2)
        assert idle == []  # nothing worked yet
        for _ in range(3):  # back to back: no idle half second between them
            collect(running, ids, None, Sampling(max_new_tokens=4))
        assert idle == []
        time.sleep(1.6)
        assert idle == [(0, False)]  # once, for three idle waits
    finally:
        running.close()
