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
from dataclasses import replace
from pathlib import Path

from ..config import RunConfig, data_file, validate
from ..data import Splits, load_splits, read_file
from ..data.pipeline import examples_of
from ..engine import read_metadata
from ..inference.precision import cast_for_inference
from ..errors import UserError
from ..config.paths import check_writable
from ..models import load_model, load_trained
from .classify import BASELINE, eval_classify
from .generative import eval_instruct, eval_summarize
from .preference import eval_preference
from .report import print_table, write_report


def run_config(run_dir: Path) -> RunConfig:
    """The exact config a run was trained with, from its run.json."""
    f = Path(run_dir) / "run.json"
    if not f.is_file():
        raise UserError(f"{run_dir}: no run.json; pass a run directory written by `lorakit train`")
    return validate(RunConfig(**json.loads(f.read_text())["config"]), str(f))


def evaluate_run(run_dir: str | Path, max_records: int = 0, with_base: bool = True, data: str | None = None,
                 out: str | Path | None = None, skip_invalid: bool = False, dtype: str | None = None
                 ) -> tuple[dict, Path]:
    """Evaluate a trained run on its test split, or on `data` (any file in the run's task format); writes eval.json,
    report.html and samples into run_dir (with `data`: into `out`, default RUN/eval-<file name>). Returns the
    result and the directory written. `skip_invalid`: skip (and count) invalid records of `data`; `dtype`: the
    weights' dtype (auto, fp32, bf16; default the run's infer_dtype)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if max_records:
        cfg.max_eval_records = max_records
    if dtype:
        cfg.infer_dtype = dtype
    t0 = time.perf_counter()
    out_dir, flag = run_dir, "the run directory"
    if data:
        out_dir, flag = (Path(out), "--out") if out else (run_dir / f"eval-{Path(data).stem}", flag)
    check_writable(out_dir, flag, directory=True)  # before minutes of work, not after
    if data:
        splits = test_file_splits(cfg, run_dir, data, out_dir, max_records, skip_invalid)
    else:
        splits = run_splits(cfg, run_dir)
    for stats in splits.loaded.values():
        print(f"data: {stats}")
    full = cfg.method == "full"
    model, tok, _ = load_trained(run_dir / ("model" if full else "adapter"), model=cfg.model)
    used = cast_for_inference(model, cfg.infer_dtype)
    print(f"lorakit: evaluating in {used} (--dtype {cfg.infer_dtype})")
    if cfg.task == "classify":
        result = eval_classify(model, tok, splits, cfg, cfg.method, with_base, cache=run_dir / BASELINE)
    elif cfg.task == "preference":
        result = eval_preference(model, tok, splits, cfg, cfg.method, with_base)
    else:
        base = load_model(cfg.model, cfg.task)[0] if full and with_base else None  # a full fine-tune has no "off"
        if base is not None:
            cast_for_inference(base, used)
        fn = eval_summarize if cfg.task == "summarize" else eval_instruct
        result = fn(model, tok, splits, cfg, cfg.method, with_base, base)
    samples = result.pop("samples")
    result.update(task=cfg.task, run=cfg.name, model=cfg.model, method=cfg.method, tuned=cfg.method, dtype=used,
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


def missing_data(cfg: RunConfig) -> list[str]:
    """The run's data files (data, val_data, test_data, resolved as training resolved them) that are not there."""
    def there(key: str) -> bool:
        try:
            return cfg.data_file(getattr(cfg, key), key).is_file()
        except UserError:
            return False
    return [f"{key} {getattr(cfg, key)}" for key in ("data", "val_data", "test_data") if getattr(cfg, key)
            and not there(key)]


def run_splits(cfg: RunConfig, run_dir: Path) -> Splits:
    """The run's own splits, read again from its data files (the same seed gives the same test split)."""
    missing = missing_data(cfg)
    if missing:
        raise UserError(f"{run_dir}: its test split is cut from the data it was trained on ({'; '.join(missing)}: not "
                        "found from here); run eval where that data is, or evaluate on a file with --data FILE")
    return load_splits(cfg)


def test_file_splits(cfg: RunConfig, run_dir: Path, data: str, out_dir: Path, max_records: int = 0,
                     skip_invalid: bool = False) -> Splits:
    """`data` (read in the run's task format and labels; all of it, or its first max_records) as the test split,
    the training split only where the head-only baseline needs it and the run has none kept. An evaluation of
    another file already in out_dir is a UserError: it is never overwritten."""
    previous = out_dir / "eval.json"
    path = data_file(data)  # the user's file: relative to where the command runs
    if previous.is_file() and json.loads(previous.read_text()).get("test_data") != str(path):
        raise UserError(f"{out_dir} holds the evaluation of another file; pass --out NEW_DIR")
    needs_train = cfg.task == "classify" and not (run_dir / BASELINE).is_file()
    train = load_splits(cfg).train if needs_train and not missing_data(cfg) else []  # else eval_classify says why
    labels = None
    if cfg.task == "classify":  # the run's label ids, as saved with it; a label it was not trained on is an error
        labels = list(cfg.labels) or read_metadata(run_dir / ("model" if cfg.method == "full" else "adapter"))["labels"]
    extra = read_file(replace(cfg, skip_invalid=skip_invalid, labels=labels or []), path)
    return Splits(train=train, val=[], test=examples_of(extra)[: max_records or None], labels=labels,
                  loaded={"eval_data": extra.stats})
