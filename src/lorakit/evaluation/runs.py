"""Running lorakit in child processes and reading what they wrote: what `compare` and `sweep` share. Each training
run gets its own process, so its peak memory is its own; its run.json and eval.json are the record."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ..config import load_recipe
from ..files import write_text_atomic

# a few hundred records; classification is cheap to score, so it gets a test split big enough to tell methods apart
QUICK = {"classify": {"max_records": 500, "max_eval_records": 400, "epochs": 2.0},
         "generate": {"max_records": 300, "max_eval_records": 60, "epochs": 1.0}}
BASE_ROW = {"classify": "base (untrained head)", "summarize": "base", "instruct": "base", "chat": "base", "preference": "base"}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quick_overrides(recipe: str, overrides: dict | None) -> dict:
    """`overrides` plus the --quick sizes (a few hundred records), where the recipe does not ask for fewer."""
    overrides = dict(overrides or {})
    cfg = load_recipe(recipe, overrides)
    for k, v in QUICK["classify" if cfg.task == "classify" else "generate"].items():
        current = getattr(cfg, k)
        overrides.setdefault(k, min(current, v) if current else v)
    return overrides


def set_flags(overrides: dict) -> list[str]:
    """Recipe overrides as `lorakit train` flags."""
    return [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]


def run_row(run: Path) -> tuple[dict, dict]:
    """What a trained and evaluated run measured (parameters, memory, time, size, its metrics) from run.json and
    eval.json, and the other rows of its evaluation (the base's, where it was scored)."""
    info = json.loads((run / "run.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    method = info["config"]["method"]
    timings = info["timings"]
    measured = {"trainable": info["parameters"]["trainable"], "total": info["parameters"]["total"],
                "peak_memory_gb": timings.get("peak_memory_gb"), "memory_kind": timings.get("memory_kind"),
                "lr": info["config"]["lr"], "train_s": timings["train_s"], "tokens_per_s": timings["tokens_per_s"],
                "saved_bytes": dir_size(run / ("model" if method == "full" else "adapter")),
                "metrics": ev["metrics"][method]}
    return measured, {name: m for name, m in ev["metrics"].items() if name != method}


def run_lorakit(cmd: list[str], log: Path) -> str | None:
    """Run a lorakit command in a child process, output to `log` and the terminal; the error line on failure."""
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = []
        for line in proc.stdout:
            f.write(line)
            sys.stdout.write(line)
            lines.append(line.rstrip())
        if proc.wait() == 0:
            return None
    errors = [ln for ln in lines if ln.startswith("lorakit: error:") or "Error" in ln]
    return (errors or lines or [f"exit code {proc.returncode}"])[-1].removeprefix("lorakit: error: ")[:300]


def write_outputs(out: Path, stem: str, result: dict, to_markdown, to_plot) -> None:
    """STEM.json, STEM.md and STEM.png in `out`, and the table on the terminal."""
    write_text_atomic(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / f"{stem}.md", to_markdown(result))
    to_plot(result, out / f"{stem}.png")
    print("\n" + to_markdown(result))
    print(f"lorakit: {stem}.md, {stem}.json, {stem}.png in {out}")


def primary_metric(task: str) -> tuple[str, bool]:
    return {"classify": ("accuracy", False), "summarize": ("rouge1", False), "instruct": ("loss", True),
            "chat": ("loss", True), "preference": ("pair_accuracy", False)}[task]


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it ('' where /proc/cpuinfo does not say): figures move with it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def machine() -> dict:
    """The device, CPU model, torch version, date and platform a result was measured on."""
    import datetime
    import platform
    cpu = f"{cpu_model() or 'CPU'}, {os.cpu_count()} cores"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return {"device": dev, "cpu": cpu, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "platform": platform.platform()}
