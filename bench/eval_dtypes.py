"""`lorakit eval --dtype D` on trained runs, for each D: the test metrics (with the base, majority-class and head-only
rows a classification run reports) and the wall time, so a generation dtype's cost in quality sits beside fp32's
on the same run. Each evaluation runs on a copy of the run directory (eval writes eval.json into it) without its
cached head-only baseline, so every one computes the same work; one at a time.

    python bench/eval_dtypes.py runs/spam-fp32 runs/spam-bf16 --dtypes fp32,bf16,int8 \
        --out bench/results/dtype-spam.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lorakit.evaluation.classify import BASELINE  # noqa: E402
from lorakit.evaluation.runs import machine  # noqa: E402


def evaluate(run: Path, dtype: str) -> dict:
    """eval.json's dtype and metrics (accuracy rows for classification) and the command's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint*", "eval*", BASELINE))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lorakit", "eval", str(copy), "--dtype", dtype], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        result = json.loads((copy / "eval.json").read_text())
    metrics = result["metrics"]
    accuracy = {row: m["accuracy"] for row, m in metrics.items() if isinstance(m, dict) and "accuracy" in m}
    return {"dtype": result["dtype"], "seconds": seconds, "accuracy": accuracy} if accuracy else \
        {"dtype": result["dtype"], "seconds": seconds, "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = {}
    for run in map(Path, args.runs):
        for dtype in args.dtypes.split(","):
            results[f"{run.name} --dtype {dtype}"] = row = evaluate(run, dtype)
            print(f"{run.name} --dtype {dtype}: {row}", flush=True)
    what = (f"lorakit eval --dtype {' / '.join(args.dtypes.split(','))} on the same runs "
            f"({', '.join(Path(r).name for r in args.runs)}): the run's test split")
    Path(args.out).write_text(json.dumps({"what": what, "machine": machine(), "results": results}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
