"""Commands that measure: eval (base vs adapted), compare (full vs LoRA vs QLoRA), sweep (a grid of settings)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import METHODS
from ..errors import UserError
from .common import add_dtype_flag, recipe_overrides_out


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained run against its base model on the run's test split, or on another file (--data)."""
    from ..evaluation import evaluate_run
    if args.max_records < 0:
        raise UserError(f"--max-records {args.max_records}: give a count >= 1, or leave it out for all records")
    data, out, skip_invalid = (getattr(args, k, None) for k in ("data", "out", "skip_invalid"))
    if (out or skip_invalid) and not data:
        raise UserError(f"{'--out' if out else '--skip-invalid'} applies to an evaluation on a file of yours: give "
                        "--data FILE with it (the run's own test split is evaluated into the run)")
    _, written = evaluate_run(args.run, max_records=args.max_records, with_base=not getattr(args, "no_base", False),
                              data=data, out=out, skip_invalid=bool(skip_invalid), dtype=getattr(args, "dtype", None))
    run = Path(args.run)
    saved = "model    " + str(run / "model") if (run / "model").is_dir() else "adapter  " + str(run / "adapter")
    print(f"\nlorakit: {saved}\nlorakit: report   {written / 'report.html'} (eval.json, "
          f"eval_samples.jsonl)\nlorakit: plots    {run / 'loss.png'}, {written / 'eval.png'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train and evaluate full fine-tuning, LoRA and QLoRA on the same recipe, data and seed; write compare.md,
    compare.json and compare.png (a method that cannot run here is listed with the reason)."""
    from ..evaluation.compare import compare
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: {', '.join(bad) or 'nothing given'}: choose from {', '.join(METHODS)}")
    path, overrides, out = recipe_overrides_out(args, "compare")
    compare(path, out, quick=args.quick, methods=methods, overrides=overrides)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train and evaluate every combination of the --grid values on one recipe (same data, seed and test split),
    each cell in its own process; a finished cell is kept when the sweep runs again. Writes sweep.md, sweep.json
    and sweep.png (the metric against trainable parameters) and names the best cell."""
    from ..evaluation.sweep import parse_grid, sweep
    grid = parse_grid(args.grid or [])
    path, overrides, out = recipe_overrides_out(args, "sweep")
    result = sweep(path, grid, out, quick=args.quick, overrides=overrides, yes=args.yes, overwrite=args.overwrite)
    failed = [r for r in result["rows"] if "failed" in r]
    if failed:
        print(f"lorakit: error: {len(failed)} of {len(result['rows'])} cells failed (see {Path(out) / 'sweep.md'} "
              f"and {Path(out) / 'sweep.log'}); run the sweep again to retry them, the finished cells are kept",
              file=sys.stderr)
        return 1
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run: base vs adapted", description=cmd_eval.__doc__)
    p.add_argument("run", help="run directory written by `lorakit train`")
    p.add_argument("--max-records", type=int, default=0, help="evaluate on the first N test examples")
    p.add_argument("--no-base", action="store_true", help="score only the trained model, not the base")
    add_dtype_flag(p, None)
    p.add_argument("--data", help="evaluate on this file (the run's task format) instead of the run's test split")
    p.add_argument("--out", help="with --data: where eval.json and the report go (default RUN_DIR/eval-<file name>)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="with --data: skip (and count) invalid records of the file instead of failing")
    p.set_defaults(func=cmd_eval)


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="full fine-tuning vs LoRA vs QLoRA on one recipe: one table",
                       description=cmd_compare.__doc__)
    p.add_argument("recipe", help="a recipe file or a built-in recipe name")
    p.add_argument("--out", help="output directory (default runs/NAME-compare)")
    p.add_argument("--quick", action="store_true", help="a few hundred records: minutes on a CPU")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    add_dtype_flag(p, None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_compare)


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="every combination of rank, targets, ... on one recipe: one table and a plot",
                       description=cmd_sweep.__doc__)
    p.add_argument("recipe", help="a recipe file or a built-in recipe name")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a recipe key and its values, e.g. r=4,8,16 or targets=attention,all-linear (a list of "
                        "module names joins them with +: q_proj+v_proj); repeat for more keys")
    p.add_argument("--out", help="output directory (default runs/NAME-sweep)")
    p.add_argument("--quick", action="store_true", help="a few hundred records per cell: minutes each on a CPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key in every cell")
    p.add_argument("--yes", action="store_true", help="run a grid of more than 32 cells")
    add_dtype_flag(p, None)
    p.add_argument("--overwrite", action="store_true", help="train cells again whose settings changed")
    p.set_defaults(func=cmd_sweep)


def add_parsers(sub) -> None:
    for add in (_eval_parser, _compare_parser, _sweep_parser):
        add(sub)
