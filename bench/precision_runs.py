"""Two runs of one recipe, trained with --precision fp32 and bf16, side by side: the training loss at every logged
step after warm-up (relative difference, and its largest), the validation losses, wall time and peak RSS from
run.json, and each eval JSON given (metric by metric). Writes a JSON for bench/results.

    lorakit train alpaca --out runs/alpaca-fp32 --precision fp32
    lorakit train alpaca --out runs/alpaca-bf16 --precision bf16
    python bench/precision_runs.py runs/alpaca-fp32 runs/alpaca-bf16 --out bench/results/precision-alpaca.json \\
        [--eval fp32.json bf16.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lorakit.evaluation.runs import machine  # noqa: E402


def losses(run: Path) -> dict[int, float]:
    """step -> training loss, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def metrics(path: Path) -> dict[str, float]:
    """method/metric -> value from an eval.json (numbers only)."""
    rows = json.loads(path.read_text())["metrics"]
    return {f"{method}/{k}": v for method, row in rows.items() for k, v in row.items() if isinstance(v, (int, float))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32")
    ap.add_argument("bf16")
    ap.add_argument("--eval", nargs=2, metavar=("FP32_JSON", "BF16_JSON"))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = {"fp32": Path(a.fp32), "bf16": Path(a.bf16)}
    curves = {k: losses(p) for k, p in runs.items()}
    record = {k: json.loads((p / "run.json").read_text()) for k, p in runs.items()}
    warmup = max(1, round(record["fp32"]["config"]["warmup"] * max(curves["fp32"])))
    steps = [s for s in curves["fp32"] if s in curves["bf16"] and s > warmup]
    diff = {s: (curves["bf16"][s] - curves["fp32"][s]) / curves["fp32"][s] for s in steps}
    worst = max(diff, key=lambda s: abs(diff[s]))
    out = {"what": " ".join(__doc__.split("\n\n")[0].split()), "recipe": record["fp32"]["config"]["name"],
           "machine": machine(),
           "steps_after_warmup": len(steps), "warmup_steps": warmup,
           "largest_relative_difference": {"step": worst, "value": diff[worst]},
           "mean_abs_relative_difference": sum(abs(v) for v in diff.values()) / len(diff),
           "curves": {k: [[s, curves[k][s]] for s in steps] for k in curves},
           "runs": {k: {"precision": r.get("precision"), "timings": r.get("timings"),
                        "val_history": r.get("metrics", {}).get("val_history")} for k, r in record.items()}}
    if a.eval:
        evals = {k: metrics(Path(p)) for k, p in zip(("fp32", "bf16"), a.eval)}
        out["eval"] = {m: {"fp32": evals["fp32"][m], "bf16": evals["bf16"][m],
                           "difference": evals["bf16"][m] - evals["fp32"][m]} for m in evals["fp32"] if m in evals["bf16"]}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{out['recipe']}: {len(steps)} logged steps after warm-up; training loss bf16 vs fp32: largest relative "
          f"difference {diff[worst]:+.2%} (step {worst}), mean |difference| {out['mean_abs_relative_difference']:.2%}")
    for m, v in out.get("eval", {}).items():
        print(f"  {m}: fp32 {v['fp32']:.4f}  bf16 {v['bf16']:.4f}  ({v['difference']:+.4f})")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
