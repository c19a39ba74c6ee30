"""`lorakit compare RECIPE`: full fine-tuning vs LoRA vs QLoRA on one recipe, same data and seed, one table.

Each method trains in its own process (so its peak memory is its own) through the ordinary `lorakit train`, then
`lorakit eval` scores it on the test split; the base model is scored once, with the first method that runs. A method
that cannot run here is listed with the reason and the others go on. Writes compare.md, compare.json, compare.png.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import METHODS, RunConfig, load_recipe
from .runs import BASE_ROW, machine, primary_metric, quick_overrides, run_lorakit, run_row, set_flags, write_outputs

FULL_LR_FACTOR = 0.1  # without a recipe full_lr: LoRA's lr is typically ~10x what a full fine-tune of the model takes


def available_memory() -> tuple[float, str]:
    """Bytes free for training and where: the GPU's free memory, or MemAvailable from /proc/meminfo."""
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0]), "GPU"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0, "RAM"
    except OSError:
        pass
    return float("inf"), "RAM"


def why_not(method: str, n_params: int, backend: str = "auto") -> str | None:
    """The reason `method` cannot run on this machine, or None."""
    if method == "qlora" and backend == "bitsandbytes":  # lorakit's own NF4 ("torch", "auto") runs anywhere
        from ..engine.quant import bitsandbytes_available
        if not bitsandbytes_available():
            return "quant_backend bitsandbytes is not installed (pip install bitsandbytes), and the recipe asks for it"
    if method == "full":
        need = 16 * n_params  # fp32 weights + gradients + AdamW's two moments, before any activation
        free, where = available_memory()
        if need > 0.9 * free:
            return (f"a full fine-tune needs at least {need / 1e9:.1f} GB (weights, gradients, AdamW state) and "
                    f"{where} has {free / 1e9:.1f} GB free")
    return None


def _count_params(cfg: RunConfig) -> int:
    from ..engine import parameter_report
    from ..models import load_model
    n_labels = max(len(cfg.labels), 2) if cfg.task == "classify" else None
    model, _ = load_model(cfg.model, cfg.task, num_labels=n_labels)
    return parameter_report(model).total


def compare(recipe: str, out: str | Path, quick: bool = False, methods: tuple[str, ...] = METHODS,
            overrides: dict | None = None) -> dict:
    """Train and evaluate every method of `methods` on `recipe`; returns what compare.json holds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = quick_overrides(recipe, overrides) if quick else dict(overrides or {})
    cfg = load_recipe(recipe, overrides)
    flags = set_flags(overrides)
    n_params = _count_params(cfg)
    full_lr = cfg.full_lr or cfg.lr * FULL_LR_FACTOR
    rows, base = [], None
    for method in methods:
        run = out / method
        row = {"method": method, "run": str(run)}
        reason = why_not(method, n_params, cfg.quant_backend)
        if reason is None:
            own = {"qlora": ["--set", "quantize=nf4"], "lora": ["--set", "quantize="],
                   "full": ["--set", "quantize=", "--set", f"full_lr={full_lr:g}"]}[method]
            reason = run_lorakit(["train", recipe, "--out", str(run), "--overwrite", "--method", method, *own, *flags], out / "compare.log")
        if reason is None:
            reason = run_lorakit(["eval", str(run), *([] if base is None else ["--no-base"])], out / "compare.log")
        if reason is not None:
            print(f"lorakit: compare: {method} skipped: {reason}", flush=True)
            rows.append(row | {"skipped": reason})
            continue
        measured, others = run_row(run)
        if base is None:
            base = others
        rows.append(row | measured)
    primary, lower = primary_metric(cfg.task)
    base_row = (base or {}).get(BASE_ROW[cfg.task])
    for r in rows:
        if "metrics" in r and base_row is not None:
            gain = r["metrics"][primary] - base_row[primary]
            r["gain"] = -gain if lower else gain
    result = {"recipe": recipe, "name": cfg.name, "model": cfg.model, "task": cfg.task, "quick": quick,
              "primary": primary, "lower_is_better": lower, "base": base, "base_row": BASE_ROW[cfg.task],
              "n_params": n_params, "rows": rows, "machine": machine()}
    write_outputs(out, "compare", result, markdown, plot)
    return result


def markdown(result: dict) -> str:
    """The comparison as a Markdown table: one row for the base, one per method (or the reason it did not run)."""
    p = result["primary"]
    m = result["machine"]
    lines = [f"## {result['name']}: {result['model']}, task {result['task']}{' (quick)' if result['quick'] else ''}",
             "", f"{m['device']}, torch {m['torch']}, {m['date']}. Metric: {p} on the test split"
             f"{' (lower is better)' if result['lower_is_better'] else ''}; gain = improvement over the base. Full "
             f"fine-tuning takes the recipe's full_lr, or lr/10.", "",
             "| method | trainable | total | lr | peak memory GB | train s | tokens/s | saved MB | " + p + " | gain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total = next((r["total"] for r in result["rows"] if "total" in r), result["n_params"])
    for name, values in (result["base"] or {}).items():
        lines.append(f"| {name} | 0 | {total:,} | | | | | | {values[p]:.4f} | |")
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['method']} | not run: {r['skipped']} | | | | | | | | |")
            continue
        mem = f"{r['peak_memory_gb']:.2f} ({r['memory_kind']})" if r.get("peak_memory_gb") else ""
        gain = f"{r['gain']:+.4f}" if "gain" in r else ""
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['total']:,} | {r['lr']:g} | {mem} | {r['train_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {r['saved_bytes'] / 1e6:.1f} | {r['metrics'][p]:.4f} | {gain} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bars: the metric, peak memory, training time and saved size of each method next to each other."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ran = [r for r in result["rows"] if "metrics" in r]
    p = result["primary"]
    panels = [(p, [r["metrics"][p] for r in ran], result["base"].get(result["base_row"], {}).get(p) if result["base"] else None),
              ("peak memory GB", [r.get("peak_memory_gb") or 0 for r in ran], None),
              ("train s", [r["train_s"] for r in ran], None),
              ("saved MB", [r["saved_bytes"] / 1e6 for r in ran], None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    names = [r["method"] for r in ran]
    for ax, (title, values, ref) in zip(axes[0], panels):
        bars = ax.bar(names, values, color=["#d62", "#258", "#5a5"][: len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        if ref is not None:
            ax.axhline(ref, color="gray", ls="--", lw=1, label="base")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{result['name']}: {result['model']}, {result['task']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
