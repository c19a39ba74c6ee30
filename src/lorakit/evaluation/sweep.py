"""`lorakit sweep RECIPE --grid KEY=V1,V2 ...`: every combination of the grid on the same data, seed and evaluation.

Each cell trains and is evaluated in its own process (the ordinary `lorakit train` and `lorakit eval`, as compare
does, so its peak memory is its own), in OUT/<its values>. Running the sweep again keeps every cell that finished with
these settings and resumes one that was interrupted. The base is scored once per distinct setting of the grid keys
that change what the base sees (data, seed, evaluation); LoRA and training keys do not. Writes sweep.md, sweep.json
and sweep.png (the task's metric against trainable parameters) and names the best cell.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import fields
from pathlib import Path

from ..config import FIELDS, ConfigError, RunConfig, did_you_mean, load_recipe
from ..errors import UserError
from ..training.checkpoint import CHECKPOINT
from .runs import (BASE_ROW, machine, primary_metric, quick_overrides, run_lorakit, run_row, set_flags,
                   write_outputs)

MAX_CELLS = 32  # more needs --yes: a grid grows as a product, and each cell is a training run
# Keys that change only what is trained, not the base's scores (so cells differing in them share one base row).
TRAINING_KEYS = {"method", "r", "alpha", "dropout", "targets", "exclude", "rslora", "dora", "init", "quantize",
                 "quantize_all", "quant_backend", "epochs", "max_steps", "batch_size", "grad_accum", "lr",
                 "optimizer", "head_lr", "loraplus_lr_ratio", "full_lr", "weight_decay", "warmup", "schedule",
                 "max_grad_norm", "precision", "mixed_precision", "gradient_checkpointing", "fuse_swiglu",
                 "label_only_loss", "compile", "eval_every", "early_stopping", "checkpoint_every", "strategy", "pack",
                 "share_prefix", "group_by_length"}
LIST_KEYS = {f.name for f in fields(RunConfig) if str(f.type).startswith(("list", "str | list"))}
NOT_COMPARED = ("out", "recipe_path", "name")  # differ between a cell's run.json and the recipe by design


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """--grid KEY=V1,V2 flags as {key: [values]}; a list value (targets) joins its names with '+'."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--grid {item!r}: use KEY=V1,V2,..., e.g. --grid r=4,8,16")
        if key not in FIELDS:
            raise UserError(f"--grid {key!r}: not a recipe key{did_you_mean(key)}")
        if key in grid:
            raise UserError(f"--grid {key!r} is given twice; put all its values in one flag: --grid {key}=V1,V2")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals or len(set(vals)) < len(vals):
            raise UserError(f"--grid {item!r}: give distinct values separated by commas")
        grid[key] = vals
    if not grid:
        raise UserError("give at least one --grid KEY=V1,V2 (e.g. --grid r=4,8,16)")
    return grid


def grid_cells(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination, the last key varying fastest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def cell_name(cell: dict[str, str]) -> str:
    """The cell's directory name: its values, e.g. r=8_targets=attention."""
    return "_".join(f"{k}={re.sub(r'[^A-Za-z0-9._+=-]', '-', v)}" for k, v in cell.items())


def cell_overrides(cell: dict[str, str]) -> dict[str, str]:
    """The cell as recipe overrides: 'q_proj+v_proj' a list of names, 're:<regex>' a regex (as --targets takes)."""
    def value(key: str, v: str) -> str:
        if key == "targets" and v.startswith("re:"):
            return v.removeprefix("re:")
        return v.replace("+", ",") if key in LIST_KEYS else v
    return {k: value(k, v) for k, v in cell.items()}


def cell_config(recipe: str, overrides: dict, cell: dict[str, str]) -> RunConfig:
    """The cell's full config, checked now, before any cell runs; a bad value names its cell."""
    try:
        return load_recipe(recipe, overrides | cell_overrides(cell))
    except ConfigError as e:
        raise UserError(f"--grid cell {cell_name(cell)}: {e}") from None


def stale_settings(run: Path, cfg: RunConfig) -> list[str]:
    """The settings in which the run in `run` differs from `cfg` (empty: the same run). A key the run's run.json
    lacks (written before the key existed) counts as its default, which is what that run used."""
    trained = RunConfig().to_dict() | json.loads((run / "run.json").read_text())["config"]
    wanted = cfg.to_dict()
    return [f"{k} {trained.get(k)!r} there, {wanted[k]!r} now" for k in wanted
            if k not in NOT_COMPARED and trained.get(k) != wanted[k]]


def base_key(cell: dict[str, str]) -> tuple:
    return tuple((k, v) for k, v in cell.items() if k not in TRAINING_KEYS)


def train_cell(recipe: str, run: Path, cfg: RunConfig, flags: list[str], overwrite: bool, log: Path) -> str | None:
    """Train one cell unless it finished with these settings; None, or why it could not be trained."""
    if (run / "run.json").is_file():
        stale = stale_settings(run, cfg)
        if not stale:
            return None
        if not overwrite:
            raise UserError(f"{run} was trained with other settings ({'; '.join(stale[:3])}); pass --overwrite to "
                            "train the sweep's cells again, or --out NEW_DIR")
    resume = (run / CHECKPOINT).is_dir() and not (run / "run.json").is_file() and not overwrite
    (run / "eval.json").unlink(missing_ok=True)  # a retrained cell is evaluated again
    return run_lorakit(["train", recipe, "--out", str(run), "--resume" if resume else "--overwrite", *flags], log)


def sweep(recipe: str, grid: dict[str, list[str]], out: str | Path, quick: bool = False, overrides: dict | None = None,
          yes: bool = False, overwrite: bool = False) -> dict:
    """Train and evaluate every cell of `grid` on `recipe`; returns what sweep.json holds."""
    cells = grid_cells(grid)
    if len(cells) > MAX_CELLS and not yes:
        raise UserError(f"the grid has {len(cells)} cells (over {MAX_CELLS}), each a training run; pass --yes to run "
                        "them all, or give fewer values")
    overrides = quick_overrides(recipe, overrides) if quick else dict(overrides or {})
    configs = [cell_config(recipe, overrides, cell) for cell in cells]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sweep.log"
    rows, bases = [], {}
    for i, (cell, cfg) in enumerate(zip(cells, configs), 1):
        run = out / cell_name(cell)
        print(f"lorakit: sweep: cell {i}/{len(cells)} {cell_name(cell)}", flush=True)
        row = {"cell": cell, "run": str(run)}
        reason = train_cell(recipe, run, cfg, set_flags(overrides | cell_overrides(cell)), overwrite, log)
        if reason is None and not (run / "eval.json").is_file():
            with_base = base_key(cell) not in bases
            reason = run_lorakit(["eval", str(run), *([] if with_base else ["--no-base"])], log)
        elif reason is None:
            print(f"lorakit: sweep: {cell_name(cell)} finished earlier with these settings: kept", flush=True)
        if reason is not None:
            print(f"lorakit: sweep: {cell_name(cell)} failed: {reason}", flush=True)
            rows.append(row | {"failed": reason})
            continue
        measured, others = run_row(run)
        if others:
            bases.setdefault(base_key(cell), others)
        rows.append(row | measured)
    result = summarise(recipe, configs[0], grid, quick, rows, bases)
    write_outputs(out, "sweep", result, markdown, plot)
    return result


def summarise(recipe: str, cfg: RunConfig, grid: dict, quick: bool, rows: list[dict], bases: dict) -> dict:
    """sweep.json: the rows with their gain over their own base, the base rows, and the best cell."""
    primary, lower = primary_metric(cfg.task)
    base_row = BASE_ROW[cfg.task]
    for r in rows:
        base = bases.get(base_key(r["cell"]), {}).get(base_row)
        if "metrics" in r and base is not None:
            r["gain"] = (base[primary] - r["metrics"][primary]) if lower else (r["metrics"][primary] - base[primary])
    ran = [r for r in rows if "gain" in r]
    best = max(ran, key=lambda r: r["gain"]) if ran else None
    return {"recipe": recipe, "name": cfg.name, "model": cfg.model, "task": cfg.task, "quick": quick, "grid": grid,
            "primary": primary, "lower_is_better": lower, "base_row": base_row,
            "bases": [{"cell": dict(key), "metrics": b} for key, b in bases.items()], "rows": rows,
            "best": cell_name(best["cell"]) if best else None, "machine": machine()}


def markdown(result: dict) -> str:
    """The sweep as a Markdown table: the base row(s), one row per cell, and the best cell named."""
    keys = list(result["grid"])
    rows = [r for r in result["rows"] if "metrics" in r]
    metrics = [k for k, v in rows[0]["metrics"].items() if isinstance(v, (int, float))] if rows else [result["primary"]]
    m = result["machine"]
    lines = [f"## sweep {result['name']}: {result['model']}, task {result['task']}{' (quick)' if result['quick'] else ''}",
             "", f"{m['device']}, torch {m['torch']}, {m['date']}. Every cell on the same data, seed and test split; "
             f"gain = {result['primary']} over the base{' (lower is better)' if result['lower_is_better'] else ''}.", "",
             "| " + " | ".join(keys + ["trainable", "peak memory GB", "train s", "tokens/s", "saved MB", *metrics,
                                       "gain"]) + " |",
             "|" + "---|" * len(keys) + "---:|" * (6 + len(metrics))]
    for b in result["bases"]:
        values = b["metrics"].get(result["base_row"], {})
        label = ", ".join(f"{k}={v}" for k, v in b["cell"].items())
        lines.append("| " + " | ".join([f"base{' (' + label + ')' if label else ''}"] + [""] * (len(keys) - 1)
                                       + ["0", "", "", "", ""] + [_number(values.get(k)) for k in metrics] + [""]) + " |")
    for r in result["rows"]:
        cells = [r["cell"][k] for k in keys]
        if "failed" in r:
            lines.append("| " + " | ".join(cells + [f"failed: {r['failed']}"] + [""] * (5 + len(metrics))) + " |")
            continue
        mem = f"{r['peak_memory_gb']:.2f} ({r['memory_kind']})" if r.get("peak_memory_gb") else ""
        lines.append("| " + " | ".join(cells + [f"{r['trainable']:,}", mem, f"{r['train_s']:.0f}", f"{r['tokens_per_s']:.0f}",
                                        f"{r['saved_bytes'] / 1e6:.1f}"] + [_number(r["metrics"].get(k)) for k in metrics]
                                       + [f"{r['gain']:+.4f}" if "gain" in r else ""]) + " |")
    if result["best"]:
        lines += ["", f"Best cell: **{result['best']}** (largest gain in {result['primary']})."]
    return "\n".join(lines) + "\n"


def _number(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else ""


def plot(result: dict, path: Path) -> None:
    """The primary metric against trainable parameters (log scale): one line per setting of the grid's other keys,
    through the values of the first; the base as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys, primary = list(result["grid"]), result["primary"]
    rows = [r for r in result["rows"] if "metrics" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, group in itertools.groupby(sorted(rows, key=lambda r: [r["cell"][k] for k in keys[1:]]),
                                          key=lambda r: ", ".join(f"{k}={r['cell'][k]}" for k in keys[1:])):
        group = sorted(group, key=lambda r: r["trainable"])
        ax.plot([r["trainable"] for r in group], [r["metrics"][primary] for r in group], "o-", label=label or None)
        for r in group:
            ax.annotate(f"{keys[0]}={r['cell'][keys[0]]}", (r["trainable"], r["metrics"][primary]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    for b in result["bases"]:
        if result["base_row"] in b["metrics"]:
            ax.axhline(b["metrics"][result["base_row"]][primary], color="gray", ls="--", lw=1, label="base")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(primary + (" (lower is better)" if result["lower_is_better"] else ""))
    ax.set_title(f"sweep {result['name']}: {result['model']}, {result['task']}", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
