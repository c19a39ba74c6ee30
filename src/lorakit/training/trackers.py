"""The experiment trackers a run can report to, each local and offline, each optional (`report_to`).

tensorboard  event files in RUN/tensorboard (`tensorboard --logdir RUN`)          pip install 'lorakit[tensorboard]'
mlflow       MLflow's local file store in RUN/mlruns (`mlflow ui --backend-store-uri RUN/mlruns`)
                                                                                 pip install 'lorakit[mlflow]'
trackio      Trackio's local database (~/.cache/huggingface/trackio, or $TRACKIO_DIR; `trackio show`)
                                                                                 pip install 'lorakit[trackio]'
Metric names are transformers' and TRL's: train/loss, train/learning_rate, train/grad_norm, train/epoch,
eval/loss, eval/accuracy. A tracker that is not installed is one UserError naming its extra, before any work.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from ..errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio"}  # report_to -> module to import


def check_installed(names: list[str]) -> None:
    """A UserError for the first tracker in `names` whose package is missing, naming the extra that brings it."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"report_to {name} needs the {PACKAGES[name]} package: pip install 'lorakit[{name}]' "
                            "(or leave it out of report_to)")


class TensorBoard:
    def __init__(self, out: Path, config: dict, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        folder = out / "tensorboard"
        if resume_step is None:
            shutil.rmtree(folder, ignore_errors=True)  # a new run in this directory: not the old one's curves
        # on resume, events after the checkpoint's step (written before the interruption) are dropped
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per lorakit run; its id is kept in RUN/trackers.json so that --resume continues it."""

    def __init__(self, out: Path, config: dict, resume_step: int | None) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, which MLflow 3 discourages
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        ids = _tracker_ids(out)
        if resume_step is not None and ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name("lorakit")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("lorakit")
        self.run_id = self.client.create_run(experiment_id, run_name=config.get("name") or out.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in config.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        _save_tracker_id(out, "mlflow", self.run_id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Trackio:
    def __init__(self, out: Path, config: dict, resume_step: int | None) -> None:
        import trackio
        self.trackio = trackio
        trackio.init(project="lorakit", name=config.get("name") or out.name, config=config, embed=False,
                     resume="allow" if resume_step is not None else "never", auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(dict(metrics), step=step)

    def close(self, status: str) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "trackio": Trackio}


def open_trackers(names: list[str], out: Path, config: dict, resume_step: int | None) -> list:
    """The trackers `names` asks for, opened for the run in `out` (continuing its earlier run on resume)."""
    check_installed(names)
    return [TRACKERS[name](out, config, resume_step) for name in names]


def _tracker_ids(out: Path) -> dict:
    f = out / "trackers.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_tracker_id(out: Path, name: str, run_id: str) -> None:
    (out / "trackers.json").write_text(json.dumps(_tracker_ids(out) | {name: run_id}, indent=2) + "\n")
