"""Two processes over gloo on CPU (torchrun): DDP and FSDP match one process; resume works under two."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, save_tiny
from test_train import recipe, write_sms


def torchrun(args: list[str], procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "lorakit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def single(args: list[str]) -> None:
    from lorakit.cli import main
    assert main(args) == 0


def adapters_equal(a, b, atol=1e-5):
    ta, tb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture
def setup(tmp_path):
    model = str(save_tiny("llama", tmp_path / "llama"))
    data = str(write_sms(tmp_path / "sms.tsv", n=80))
    base = dict(model=model, task="classify", data=data, labels=["ham", "spam"], dropout=0.0, lr=1e-2,
                max_steps=4, eval_every=2, warmup=0.0, schedule="constant")
    return tmp_path, base


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(setup, strategy):
    tmp, base = setup
    one, two = tmp / "one", tmp / f"two-{strategy}"
    single(["train", recipe(tmp, **base, batch_size=8), "--out", str(one)])
    done = torchrun(["train", recipe(tmp, **base, batch_size=4), "--out", str(two), "--strategy", strategy])
    adapters_equal(one, two)
    assert done.stdout.count("lorakit: trainable") == 1  # only rank 0 logs
    assert f"global batch 8 = 4 per device x 2 processes ({strategy}) x 1 accumulation step" in done.stdout
    r1, r2 = (json.loads((d / "run.json").read_text()) for d in (one, two))
    assert r2["distributed"] == {"processes": 2, "strategy": strategy, "global_batch": 8}
    assert [v["loss"] for v in r1["metrics"]["val_history"]] == pytest.approx(
        [v["loss"] for v in r2["metrics"]["val_history"]], abs=1e-5)  # validation sharded, then summed


def test_resume_under_two_processes(setup):
    tmp, base = setup
    cfg = base | {"dropout": 0.1, "batch_size": 4, "checkpoint_every": 3, "grad_accum": 2}
    straight, resumed = tmp / "straight", tmp / "resumed"
    torchrun(["train", recipe(tmp, **cfg), "--out", str(straight), "--max-steps", "6"])
    torchrun(["train", recipe(tmp, **cfg), "--out", str(resumed), "--max-steps", "3"])
    assert sorted(p.name for p in (resumed / "checkpoint").glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    torchrun(["train", recipe(tmp, **cfg), "--out", str(resumed), "--max-steps", "6", "--resume"])
    adapters_equal(straight, resumed, atol=1e-6)  # dropout masks replayed per rank from the checkpoint
