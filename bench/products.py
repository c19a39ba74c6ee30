"""The bf16 products of one decode step at a few rows: lorakit's skinny kernel in each of its forms against oneDNN.

A step of SmolLM2-135M multiplies its rows by 210 weight matrices (30 layers: q, k, v, o, gate, up, down); this
times all 210 at each row count, bf16 weights of those shapes (random values: the time does not depend on them), for
- `skinny_linear` with dot products for several rows (AVX-512 BF16's vdpbf16ps; LORAKIT_SKINNY_DOT=1), and with fp32
  FMAs (LORAKIT_SKINNY_DOT=0): past its rows (24 and 12) skinny_linear hands the product to at::linear;
- oneDNN's GEMM on the weights packed once in its blocked layout (what the C++ step uses from `packed_rows()`);
- at::linear on the plain weights.
The two forms are chosen once a process, so each round runs one worker process per form, taking turns; each case is
the best of 3 passes in its worker, the table the median over rounds. Writes bench/results/products.json.

    python bench/products.py [--rows 1,8,16,24,32] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# SmolLM2-135M: hidden 576, 3 key/value heads of 64, MLP 1536, 30 layers; (out, in) of each product in a layer
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30
FORMS = {"dot products": "1", "FMAs": "0"}


def worker(rows: list[int]) -> dict:
    """{case: {rows: ms}} for the 210 products, in this process's kernel form (best of 3 passes each)."""
    import torch

    from lorakit.inference.compiled_step import extension
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ext = extension()
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).div(k ** 0.5).bfloat16() for n, k in LAYER_SHAPES * LAYERS]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    cases = {
        "skinny_linear": lambda x, i: ext.skinny_linear(x, weights[i], None),
        "oneDNN packed": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
        "at::linear": lambda x, i: torch.nn.functional.linear(x, weights[i]),
    }
    times: dict[str, dict[int, float]] = {case: {} for case in cases}
    for m in rows:
        xs = {k: torch.randn(m, k, generator=g).bfloat16() for k in {k for _, k in LAYER_SHAPES}}
        for case, product in cases.items():
            passes = []
            for _ in range(4):  # the first warms up (oneDNN's kernels for these shapes)
                start = time.perf_counter()
                for i, w in enumerate(weights):
                    product(xs[w.shape[1]], i)
                passes.append((time.perf_counter() - start) * 1e3)
            times[case][m] = min(passes[1:])
    return {"dot_rows": ext.skinny_dot_rows(), "max_rows": ext.skinny_max_rows(), "packed_rows": ext.packed_rows(),
            "times": times}


def run_worker(form: str, rows: list[int]) -> dict:
    env = dict(os.environ, LORAKIT_SKINNY_DOT=FORMS[form])
    done = subprocess.run([sys.executable, __file__, "--worker", "--rows", ",".join(map(str, rows))], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def table(rows: list[int], results: dict[str, dict[int, float]]) -> str:
    lines = ["| case | " + " | ".join(f"{m} rows (ms)" for m in rows) + " |", "|---|" + "---:|" * len(rows)]
    for case, by_rows in results.items():
        lines.append(f"| {case} | " + " | ".join(f"{by_rows[m]:.1f}" for m in rows) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16,24,32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "products.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    if a.worker:
        print(json.dumps(worker(rows)))
        return
    os.environ.pop("LORAKIT_SKINNY_DOT", None)  # this process's form: the CPU's default (workers set theirs)
    from lorakit.evaluation.runs import machine
    from lorakit.inference.compiled_step import extension
    runs: dict[str, list[dict]] = {form: [] for form in FORMS}
    for r in range(a.rounds):
        for form in FORMS:
            runs[form].append(run_worker(form, rows))
            print(f"round {r + 1} {form}: {runs[form][-1]['times']['skinny_linear']}", flush=True)
    median = {}
    for form, got in runs.items():
        median[f"skinny_linear, {form} (kernel to {got[0]['max_rows']} rows)"] = {
            m: statistics.median(run["times"]["skinny_linear"][str(m)] for run in got) for m in rows}
    for case in ("oneDNN packed", "at::linear"):
        every = [run for got in runs.values() for run in got]
        median[case] = {m: statistics.median(run["times"][case][str(m)] for run in every) for m in rows}
    out = {"machine": machine(), "rounds": a.rounds, "products": len(LAYER_SHAPES) * LAYERS,
           "default_form": "dot products" if extension().skinny_dot_rows() else "FMAs",
           "packed_rows": runs["FMAs"][0]["packed_rows"], "ms": median, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table(rows, median))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
