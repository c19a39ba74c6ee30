"""Training attention alone: lorakit's kernel (models/attention.py) against torch's SDPA (its CPU flash kernel, what
transformers runs) and transformers' eager attention, forward and backward, taking turns.

SmolLM2-135M's shape (9 query heads over 3 kv heads, head_dim 64), causal, batch x length from 4 x 256 to 1 x 2048,
bf16 and fp32; the inputs as transformers hands them over (views of [B, T, heads, D]). Median of --rounds rounds,
each case timed in turn within a round. Writes bench/results/attention.json.

    python bench/attention.py [--rounds 7] [--shapes 4x256,2x512,1x1024,1x2048]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from step import machine  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def cases():
    """{name: attention(q, k, v) -> out [B, H, T, D]}, each as a training step computes it."""
    import torch
    import torch.nn.functional as F

    from lorakit.models.attention import CausalAttention

    def eager(q, k, v):  # transformers' eager_attention_forward: repeat_kv, scores, fp32 softmax, weighted values
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) * HEAD_DIM ** -0.5
        T = q.shape[2]
        scores = scores + torch.full((T, T), float("-inf"), dtype=q.dtype).triu(1)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    return {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "eager": eager,
            "lorakit": lambda q, k, v: CausalAttention.apply(q, k, v, None, True, HEAD_DIM ** -0.5).transpose(1, 2)}


def inputs(batch: int, T: int, dtype):
    import torch
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, T, HEADS, HEAD_DIM, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(batch, T, KV_HEADS, HEAD_DIM, generator=g).to(dtype).transpose(1, 2).requires_grad_()
            for _ in range(2))
    return q, k, v, torch.randn(batch, HEADS, T, HEAD_DIM, generator=g).to(dtype)


def timed(fn, q, k, v, grad) -> tuple[float, float]:
    """(forward seconds, backward seconds) of one call."""
    start = time.perf_counter()
    out = fn(q, k, v)
    mid = time.perf_counter()
    out.backward(grad)
    return mid - start, time.perf_counter() - mid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="4x256,2x512,1x1024,1x2048")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "attention.json"))
    a = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for shape in a.shapes.split(","):
            batch, T = map(int, shape.split("x"))
            q, k, v, grad = inputs(batch, T, dtype)
            times = {name: [] for name in cases()}
            for i in range(a.rounds + 1):
                for name, fn in cases().items():
                    q.grad = k.grad = v.grad = None
                    if i:  # the first round warms up
                        times[name].append(timed(fn, q, k, v, grad))
                    else:
                        timed(fn, q, k, v, grad)
            row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "length": T}
            for name, t in times.items():
                row[name] = {"forward_ms": 1e3 * statistics.median(f for f, _ in t),
                             "backward_ms": 1e3 * statistics.median(b for _, b in t)}
            results.append(row)
            timings = [f"{n} {r['forward_ms']:.1f} + {r['backward_ms']:.1f} ms"
                       for n, r in row.items() if isinstance(r, dict)]
            print(f"{row['dtype']:>8} {batch} x {T:>4}: " + "; ".join(timings), flush=True)
    machine("attention", a, results)


if __name__ == "__main__":
    main()
