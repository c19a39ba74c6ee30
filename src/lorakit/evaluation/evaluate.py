"""Evaluation, always base versus adapted on the same test examples.

classify   accuracy, macro-F1, confusion matrix: base (its new head is untrained: chance), a head-only baseline
           (the head trained on frozen base features), and the adapted model
summarize  ROUGE-1/2/L/Lsum (rouge-score, stemmed, best over all references) and BERTScore F1 (bertscore.py),
           absolute and relative gains
instruct   mean loss and perplexity on held-out responses, plus sample generations with their BERTScore F1
chat       the same on held-out conversations: loss on their assistant turns, and replies to each one's last user
           turn (the history before it as context) scored against the conversation's own reply
Writes eval.json, report.html (see report.py) and the generations as JSONL into the run directory. The trained
row is named by the run's method (lora, qlora or full); for a full fine-tune the base is a separately loaded copy.
with_base=False leaves the base rows out (`lorakit compare` computes them once for all methods).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import RunConfig, data_file, validate
from ..data import Splits, load_splits, read_file
from ..data.pipeline import examples_of
from ..errors import UserError
from ..models import load_model, load_trained
from .classify import eval_classify
from .generative import eval_instruct, eval_summarize
from .report import print_table, write_report


def run_config(run_dir: Path) -> RunConfig:
    """The exact config a run was trained with, from its run.json."""
    f = Path(run_dir) / "run.json"
    if not f.is_file():
        raise UserError(f"{run_dir}: no run.json; pass a run directory written by `lorakit train`")
    return validate(RunConfig(**json.loads(f.read_text())["config"]), str(f))


def evaluate_run(run_dir: str | Path, max_records: int = 0, with_base: bool = True, data: str | None = None,
                 out: str | Path | None = None) -> tuple[dict, Path]:
    """Evaluate a trained run on its test split, or on `data` (any file in the run's task format); writes eval.json,
    report.html and samples into run_dir (with `data`: into `out`, default RUN/eval-<file name>). Returns the
    result and the directory written."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if max_records:
        cfg.max_eval_records = max_records
    t0 = time.perf_counter()
    splits = load_splits(cfg)
    out_dir = run_dir
    if data:
        out_dir = Path(out) if out else run_dir / f"eval-{Path(data).stem}"
        splits = with_test_file(cfg, splits, data, out_dir, max_records)
    for stats in splits.loaded.values():
        print(f"data: {stats}")
    full = cfg.method == "full"
    model, tok, _ = load_trained(run_dir / ("model" if full else "adapter"), model=cfg.model)
    if cfg.task == "classify":
        result = eval_classify(model, tok, splits, cfg, cfg.method, with_base)
    else:
        base = load_model(cfg.model, cfg.task)[0] if full and with_base else None  # a full fine-tune has no "off"
        fn = eval_summarize if cfg.task == "summarize" else eval_instruct
        result = fn(model, tok, splits, cfg, cfg.method, with_base, base)
    samples = result.pop("samples")
    result.update(task=cfg.task, run=cfg.name, model=cfg.model, method=cfg.method, tuned=cfg.method,
                  test_examples=len(splits.test), seconds=time.perf_counter() - t0,
                  test_data=splits.loaded["eval_data"].path if data else "the run's test split")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out_dir / "eval_samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    write_report(run_dir, result, samples, out_dir=out_dir)
    print_table(result)
    return result, out_dir


def with_test_file(cfg: RunConfig, splits: Splits, data: str, out_dir: Path, max_records: int = 0) -> Splits:
    """The run's splits with `data` (read in the run's task format and labels; all of it, or its first
    max_records) as the test split. An evaluation of another file already in out_dir is a UserError: it is never
    overwritten."""
    previous = out_dir / "eval.json"
    path = data_file(data)  # the user's file: relative to where the command runs
    if previous.is_file() and json.loads(previous.read_text()).get("test_data") != str(path):
        raise UserError(f"{out_dir} holds the evaluation of another file; pass --out NEW_DIR")
    if cfg.task == "classify":
        cfg.labels = list(splits.labels)  # the run's label ids; a label it was not trained on is an error
    extra = read_file(cfg, path)
    splits.test = examples_of(extra)[: max_records or None]
    splits.loaded = {"eval_data": extra.stats}
    return splits
