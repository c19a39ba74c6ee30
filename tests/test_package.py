"""Installable and observable: recipes inside the package (list, show, copy, data found from the recipe's own
folder, a built-in recipe without its data named in one line), --version and python -m lorakit; metrics.jsonl step by
step (kept whole across an interruption and a resume), the trackers read back with their own readers, and progress
bars on every long phase of an evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny
from lorakit.cli import main
from lorakit.version import __version__
from test_train import recipe, write_instruct, write_sms


def test_version_and_python_m(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"lorakit {__version__}"
    proc = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lorakit {__version__}"


def test_recipes_ship_inside_the_package_and_list_with_a_line_each(capsys):
    import lorakit
    from lorakit.config import RECIPES, builtin_recipes
    assert RECIPES.resolve().parent == Path(lorakit.__file__).resolve().parent  # package data, not the checkout
    names = {p.stem for p in builtin_recipes()}
    assert {"spam", "alpaca", "dialogsum", "chat"} <= names
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names)
    spam = next(line for line in lines if line.startswith("spam "))
    assert "minilm" in spam and "classify" in spam and "SMS spam detection" in spam
    assert main(["recipes", "list"]) == 0 and capsys.readouterr().out.splitlines() == lines
    assert main(["recipes", "show", "spam"]) == 0
    assert capsys.readouterr().out == (RECIPES / "spam.yaml").read_text()


def test_recipes_copy_then_train_the_copy(tmp_path, monkeypatch, capsys):
    """`recipes copy` writes NAME.yaml (or into a directory), never over a file without --force; the copy's data
    paths resolve against its own folder first, then the working directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "spam"]) == 0
    assert (tmp_path / "spam.yaml").read_text().startswith("# SMS spam detection")
    assert "lorakit train spam.yaml" in capsys.readouterr().out
    assert main(["recipes", "copy", "spam"]) == 2 and "exists" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    assert main(["recipes", "copy", "alpaca", "mine"]) == 0 and (tmp_path / "mine" / "alpaca.yaml").is_file()
    assert main(["recipes", "copy", "spam", "--force"]) == 0
    assert main(["recipes", "copy", "nonesuch"]) == 2 and "lorakit recipes" in capsys.readouterr().err
    # data beside the recipe wins over the working directory's file of the same name
    from lorakit.config import load_recipe
    (tmp_path / "mine" / "sms.tsv").write_text("ham\thello\n")
    (tmp_path / "sms.tsv").write_text("ham\tthere\n")
    r = tmp_path / "mine" / "r.yaml"
    r.write_text(yaml.safe_dump({"task": "classify", "data": "sms.tsv"}))
    cfg = load_recipe(r)
    assert cfg.data_file(cfg.data) == tmp_path / "mine" / "sms.tsv"
    (tmp_path / "mine" / "sms.tsv").unlink()
    assert cfg.data_file(cfg.data) == tmp_path / "sms.tsv"


def test_a_builtin_recipe_without_its_data_names_data_flag(tmp_path, monkeypatch, capsys):
    """An installed package has no ../shared/data: one line that says so and names --data; with --data, it runs."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "spam", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "built-in recipe 'spam'" in err and "--data" in err and "Traceback" not in err and len(err.splitlines()) == 1


def run_with_metrics(tmp_path, **extra) -> tuple[str, Path]:
    llama = save_tiny("llama", tmp_path / "llama")
    r = recipe(tmp_path, model=str(llama), task="instruct", data=str(write_instruct(tmp_path / "a.jsonl", n=24)),
               epochs=2, eval_every=2, split=[0.8, 0.2, 0.0], **extra)
    return r, tmp_path / "run"


def test_metrics_jsonl_one_record_per_step_with_validation(tmp_path):
    from lorakit.training.metrics_log import read_metrics
    r, run = run_with_metrics(tmp_path)
    assert main(["train", r, "--out", str(run)]) == 0
    records = read_metrics(run)
    info = json.loads((run / "run.json").read_text())
    steps = info["timings"]["steps"]
    assert [m["step"] for m in records] == list(range(1, steps + 1))
    assert [[m["step"], m["loss"]] for m in records] == info["train_loss"]
    assert {"epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(records[0])
    assert all(m["grad_norm"] > 0 and m["learning_rate"] > 0 for m in records)
    assert records[-1]["epoch"] == pytest.approx(2.0)
    val = {v["step"]: v["loss"] for v in info["metrics"]["val_history"]}
    assert {m["step"]: m["eval_loss"] for m in records if "eval_loss" in m} == val and len(val) >= 2


def test_metrics_jsonl_survives_an_interruption_and_resume_adds_no_duplicate(tmp_path, monkeypatch):
    """A run stopped at step 3 keeps steps 1-3; a line logged after its checkpoint (a crash) is dropped on resume;
    the resumed run's file has every step once, with the losses of an uninterrupted run."""
    import signal

    import lorakit.training.loop as loop
    from lorakit.training.metrics_log import read_metrics
    r, run = run_with_metrics(tmp_path, checkpoint_every=3)
    straight = tmp_path / "straight"
    assert main(["train", r, "--out", str(straight)]) == 0
    real, steps = loop.train_step, []

    def signalled_at_step_4(*args):
        out = real(*args)
        steps.append(1)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", signalled_at_step_4)
    assert main(["train", r, "--out", str(run)]) == 128 + signal.SIGTERM
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    with open(run / "metrics.jsonl", "a") as f:  # what a crash after the checkpoint would have left
        f.write(json.dumps({"step": 5, "loss": 99.0}) + "\n" + '{"step": 6, "lo')
    monkeypatch.setattr(loop, "train_step", real)
    assert main(["train", r, "--out", str(run), "--resume"]) == 0
    resumed, uninterrupted = read_metrics(run), read_metrics(straight)
    assert [m["step"] for m in resumed] == [m["step"] for m in uninterrupted]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in uninterrupted], abs=1e-6)


def test_trackers_written_and_read_back_by_their_own_readers(tmp_path):
    """--report-to tensorboard,mlflow,trackio: each tracker's store, read with the tracker's own reader, holds the
    run's metrics under transformers' names, equal to metrics.jsonl."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    r, run = run_with_metrics(tmp_path, name="tracked")
    env = os.environ | {"TRACKIO_DIR": str(tmp_path / "trackio"), "MLFLOW_ALLOW_FILE_STORE": "true"}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", r, "--out", str(run), "--report-to",
                           "tensorboard,mlflow,trackio"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = {m["step"]: m["loss"] for m in records}
    evals = {m["step"]: m["eval_loss"] for m in records if "eval_loss" in m}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= set(events.Tags()["scalars"])
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(loss)
    assert {e.step: e.value for e in events.Scalars("eval/loss")} == pytest.approx(evals)

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert client.get_run(run_id).info.status == "FINISHED" and client.get_run(run_id).data.params["r"] == "4"
    assert {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")} == pytest.approx(loss)

    reader = subprocess.run([sys.executable, "-c", "import json, trackio.sqlite_storage as s; "
                             "print(json.dumps(s.SQLiteStorage.get_logs('lorakit', 'tracked')))"],
                            capture_output=True, text=True, env=env)
    logs = json.loads(reader.stdout)
    assert {row["step"]: row["train/loss"] for row in logs if "train/loss" in row} == pytest.approx(loss)


def test_a_tracker_not_installed_is_one_line_naming_its_extra(tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    r, run = run_with_metrics(tmp_path)
    assert main(["train", r, "--out", str(run), "--report-to", "mlflow"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lorakit[mlflow]'" in err and "Traceback" not in err and not run.exists()
    assert main(["train", r, "--out", str(run), "--report-to", "wandb"]) == 2
    assert "report_to 'wandb' must be none, tensorboard, mlflow or trackio" in capsys.readouterr().err


def test_classifier_eval_shows_a_bar_for_each_long_phase(tmp_path, capsys):
    llama = save_tiny("llama", tmp_path / "llama")
    r = recipe(tmp_path, model=str(llama), task="classify", data=str(write_sms(tmp_path / "sms.tsv")), max_steps=2)
    run = tmp_path / "run"
    assert main(["train", r, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    err = capsys.readouterr().err
    for phase in ("classify (lora)", "classify (base)", "head-only baseline: train features",
                  "head-only baseline: train the head"):
        assert phase in err, phase
