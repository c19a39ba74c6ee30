"""A run's history as it happens: metrics.jsonl in the run directory, one object per optimizer step (step, epoch,
loss, learning_rate, grad_norm, tokens_per_second, and eval_* at the steps that validated), appended and flushed
as it goes, so a crashed or interrupted run keeps its history; the same numbers to the trackers of `report_to`.
On --resume the file is cut back to the checkpoint's step and continued, so no step appears twice."""
from __future__ import annotations

import json
from pathlib import Path

from ..files import write_text_atomic
from .trackers import open_trackers

FILE = "metrics.jsonl"
# metrics.jsonl's keys (transformers' log_history names) -> the trackers' names (transformers' and TRL's)
TRACKER_NAMES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
                 "epoch": "train/epoch", "tokens_per_second": "train/tokens_per_second"}


def read_metrics(out: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a last line cut short by a crash is left out)."""
    f = Path(out) / FILE
    records = []
    for line in (f.read_text().splitlines() if f.is_file() else []):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class MetricsLog:
    """metrics.jsonl plus the trackers, for the main process of a run in `out`."""

    def __init__(self, out: Path, report_to: list[str], config: dict, resume_step: int | None) -> None:
        self.path = out / FILE
        out.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:  # what was logged after the checkpoint is logged again by the resumed run
            kept = [r for r in read_metrics(out) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", buffering=1)
        self.trackers = open_trackers(report_to, out, config, resume_step)

    def log(self, record: dict) -> None:
        """One step's record: to the file (flushed) and, under the trackers' names, to each tracker."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        named = {TRACKER_NAMES.get(k, k.replace("eval_", "eval/", 1)): v for k, v in record.items()
                 if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(record["step"], named)

    def close(self, status: str = "FINISHED") -> None:
        """Close the file and end each tracker's run (status FINISHED, or KILLED for a run that stopped early)."""
        self.file.close()
        for tracker in self.trackers:
            tracker.close(status)


class NoMetricsLog:
    """What processes other than the main one log: nothing."""

    def log(self, record: dict) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass
