"""Bad input through the CLI: each case one clear line (exit code, the message's key words), never a traceback, never
a silent result or lost work. Tiny models built locally; each training run is a step or two."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from test_train import recipe

SMS = b"".join(b"%s\tw10 w11 w%d\n" % (b"spam" if i % 3 == 0 else b"ham", 20 + i) for i in range(30))
ALPACA_ROW = b'{"instruction": "w5 w6", "input": "w8", "output": "w9 w10"}'
CHAT_ROW = b'{"messages": [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w9 w10"}]}\n'


def _file(root, name: str, content: bytes) -> str:
    path = root / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return str(path)


def _damaged_run(root) -> str:
    run = root / "damaged"
    if not run.exists():
        shutil.copytree(root / "run", run)
        os.truncate(run / "adapter" / "adapter_model.safetensors", 100)
    return str(run)


def _one_file_dir(root) -> str:
    d = root / "inputs" / "folder"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sms.tsv").write_bytes(SMS)
    return str(d)


# name: (arguments given the fixture's folder, exit code, words the one error line must hold)
CASES = {
    "data is a directory": (lambda r: ["train", str(r / "spam.yaml"), "--data", _one_file_dir(r)], 2,
                            ["is a directory", "--data", "sms.tsv"]),
    "NUL byte in a TSV": (lambda r: ["train", str(r / "spam.yaml"), "--data",
                                     _file(r, "nul.tsv", SMS + b"ham\thel\x00lo\n")], 2, ["line 31", "NUL byte"]),
    "control character in JSON": (lambda r: ["train", str(r / "instruct.yaml"), "--data", _file(
        r, "ctl.json", b'[' + ALPACA_ROW + b',\n {"instruction": "a\tb", "output": "c"}]')], 2,
        ["line 2", "Invalid control character", "escaped"]),
    "a single class": (lambda r: ["train", str(r / "spam.yaml"), "--set", "labels=ham,spam", "--data",
                                  _file(r, "one.tsv", b"ham\tw10 w11\n" * 20)], 2,
                       ["same label", "ham 20", "spam 0"]),
    "--epochs 0": (lambda r: ["train", str(r / "spam.yaml"), "--epochs", "0"], 2, ["epochs must be > 0"]),
    "--max-steps 0": (lambda r: ["train", str(r / "spam.yaml"), "--max-steps", "0"], 2,
                      ["max_steps must be >= 1", "leave --max-steps out"]),
    "bad regex in train": (lambda r: ["train", str(r / "spam.yaml"), "--targets", "re:["], 2,
                           ["targets '['", "not a valid regular expression"]),
    "bad regex in inspect": (lambda r: ["inspect", "--model", str(r / "llama"), "--targets", "re:["], 2,
                             ["not a valid regular expression"]),
    "truncated adapter in eval": (lambda r: ["eval", _damaged_run(r)], 2, ["adapter_model.safetensors",
                                                                           "damaged or truncated"]),
    "truncated adapter in generate": (lambda r: ["generate", "--adapter", _damaged_run(r) + "/adapter", "--prompt",
                                                 "w5", "--max-new-tokens", "2"], 2, ["damaged or truncated"]),
    "truncated adapter in merge": (lambda r: ["merge", _damaged_run(r) + "/adapter", str(r / "merged-x")], 2,
                                   ["damaged or truncated"]),
    "merge into a non-empty directory": (lambda r: ["merge", str(r / "run" / "adapter"), str(r / "run")], 2,
                                         ["not empty", "--force"]),
    "a JSON object instead of an array": (lambda r: ["train", str(r / "instruct.yaml"), "--data", _file(
        r, "obj.json", b'{"data": [' + ALPACA_ROW + b']}')], 2, ["expected a JSON array", "under 'data'"]),
    "a pretty-printed JSON object": (lambda r: ["train", str(r / "instruct.yaml"), "--data", _file(
        r, "pretty.json", b'{\n  "instruction": "a",\n  "output": "b"\n}\n')], 2, ["expected a JSON array"]),
    "training over a finished run": (lambda r: ["train", str(r / "instruct.yaml"), "--out", str(r / "run")], 2,
                                     ["already holds a finished run", "--out NEW_DIR", "--overwrite"]),
    "sweep over an unknown key": (lambda r: ["sweep", str(r / "spam.yaml"), "--grid", "rank=4,8"], 2,
                                  ["--grid 'rank'", "not a recipe key", "did you mean"]),
    "sweep value that fails validation": (lambda r: ["sweep", str(r / "spam.yaml"), "--grid", "r=4,x"], 2,
                                          ["--grid cell r=x", "r"]),
    "sweep over 32 cells": (lambda r: ["sweep", str(r / "spam.yaml"), "--grid", "r=" + ",".join(map(str, range(1, 12))),
                                       "--grid", "lr=1e-3,1e-4,1e-5"], 2, ["33 cells", "--yes"]),
    "sweep key given twice": (lambda r: ["sweep", str(r / "spam.yaml"), "--grid", "r=4", "--grid", "r=8"], 2,
                              ["given twice"]),
    "sweep without a grid": (lambda r: ["sweep", str(r / "spam.yaml")], 2, ["--grid KEY=V1,V2"]),
    "targets preset in a bad regex's place": (lambda r: ["train", str(r / "spam.yaml"), "--set", "targets=(mlp"], 2,
                                              ["not a valid regular expression", "all-linear, attention or mlp"]),
    "an unknown init": (lambda r: ["train", str(r / "spam.yaml"), "--set", "init=svd"], 2,
                        ["init 'svd'", "kaiming, gaussian, pissa or olora"]),
    "pissa on a quantised base": (lambda r: ["train", str(r / "instruct.yaml"), "--init", "pissa", "--quantize",
                                             "nf4"], 2, ["init pissa", "full-precision base", "quantize=nf4"]),
    "LoRA+ ratio below zero": (lambda r: ["train", str(r / "instruct.yaml"), "--set", "loraplus_lr_ratio=-1"], 2,
                               ["loraplus_lr_ratio -1", "must be > 0"]),
    "DoRA on an embedding": (lambda r: ["train", str(r / "instruct.yaml"), "--dora", "--targets",
                                        "embed_tokens,q_proj"], 2, ["DoRA is for Linear and Conv1D", "Embedding"]),
    "an embedding the model does not have": (lambda r: ["train", str(r / "instruct.yaml"), "--targets", "wte"], 2,
                                             ["target 'wte' matches no module", "closest names"]),
    "an unknown role in a conversation": (lambda r: ["train", str(r / "instruct.yaml"), "--set", "task=chat", "--data",
                                                  _file(r, "roles.jsonl", CHAT_ROW + b'{"messages": [{"role": "user", '
                                                        b'"content": "a"}, {"role": "tool", "content": "b"}]}\n')], 2,
                                          ["roles.jsonl, line 2, messages[1]: field 'role': unknown role 'tool'",
                                           "--skip-invalid"]),
    "a conversation with nothing to train on": (lambda r: ["train", str(r / "instruct.yaml"), "--set", "task=chat",
                                                           "--data", _file(r, "none.jsonl", CHAT_ROW * 3 + b'{"conver'
                                                                           b'sations": [{"from": "human", "value": "a"}]}'
                                                                           b'\n')], 2,
                                                ["none.jsonl, line 4: no assistant turn to train on"]),
    "a chat run in the Alpaca template": (lambda r: ["train", str(r / "instruct.yaml"), "--set", "task=chat",
                                                     "--template", "alpaca"], 2, ["task chat", "template chat"]),
    "resume without a checkpoint": (lambda r: ["train", str(r / "instruct.yaml"), "--out", str(r / "none"),
                                               "--resume"], 2, ["no checkpoint"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_clear_line(case, world, capsys):
    args, code, words = CASES[case]
    assert main(args(world)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("lorakit: error:"))
    for word in words:
        assert word in line, (word, line)


def test_accepted_with_care(world, capsys):
    """A byte-order mark is read past; --skip-invalid counts a bad JSONL line; an empty split is noted; merge
    --force and train --overwrite do what they say."""
    bom = _file(world, "bom.tsv", b"\xef\xbb\xbf" + SMS)
    assert main(["train", str(world / "spam.yaml"), "--data", bom, "--out", str(world / "bom")]) == 0
    assert json.loads((world / "bom" / "run.json").read_text())["data"]["data"]["kept"] == 30
    bad_line = _file(world, "bad.jsonl", b"\n".join([ALPACA_ROW] * 12 + [b'{"instruction": "a", "out']))
    assert main(["train", str(world / "instruct.yaml"), "--data", bad_line, "--skip-invalid", "--out",
                 str(world / "skip")]) == 0
    assert json.loads((world / "skip" / "run.json").read_text())["data"]["data"]["skipped"] == {"invalid JSON": 1}
    tiny = _file(world, "tiny.tsv", b"ham\tw10\nspam\tw11\n")
    assert main(["train", str(world / "spam.yaml"), "--data", tiny, "--out", str(world / "tiny")]) == 0
    assert "no validation or test records" in capsys.readouterr().out
    assert main(["merge", str(world / "run" / "adapter"), str(world / "bom"), "--force"]) == 0
    assert (world / "bom" / "config.json").is_file() and not (world / "bom" / "run.json").exists()
    assert main(["train", str(world / "instruct.yaml"), "--out", str(world / "skip"), "--overwrite"]) == 0


def test_an_adapter_for_another_base_warns(world, capsys):
    other = world / "other-llama"
    if not other.exists():
        shutil.copytree(world / "llama", other)
    assert main(["generate", "--adapter", str(world / "run" / "adapter"), "--model", str(other), "--prompt", "w5",
                 "--max-new-tokens", "2", "--no-stream"]) == 0
    err = capsys.readouterr().err
    assert f"lorakit: warning: {world / 'run' / 'adapter'}: the adapter was trained on" in err
    assert str(other) in err and "Traceback" not in err
    assert main(["generate", "--adapter", str(world / "run" / "adapter"), "--prompt", "w5", "--max-new-tokens", "2",
                 "--no-stream"]) == 0
    assert "warning" not in capsys.readouterr().err  # its own base: no warning


def test_serve_on_a_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is not free" in err and "--port" in err and "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_and_resume_reaches_the_same_adapter_bit_for_bit(tmp_path, world, monkeypatch, capsys, sig):
    import lorakit.training.loop as train_mod
    r = recipe(tmp_path, model=str(world / "llama"), task="instruct", data=str(world / "a.jsonl"), epochs=2,
               eval_every=2, split=[0.8, 0.2, 0.0])
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(["train", r, "--out", str(straight)]) == 0
    real, steps = train_mod.train_step, []

    def signalled_at_step_3(*args):
        out = real(*args)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), sig)  # arrives mid-run, as Ctrl-C or a scheduler's SIGTERM would
        return out

    monkeypatch.setattr(train_mod, "train_step", signalled_at_step_3)
    assert main(["train", r, "--out", str(broken)]) == 128 + sig
    err = capsys.readouterr().err
    assert f"interrupted ({sig.name}) after step 3" in err and f"--out {broken} --resume" in err
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["step"] == 3
    assert not (broken / "run.json").exists()
    monkeypatch.setattr(train_mod, "train_step", real)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers were put back
    assert main(["train", r, "--out", str(broken), "--resume"]) == 0
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_keeps_the_last_good_adapter_and_a_checkpoint(tmp_path, world, monkeypatch, capsys):
    import lorakit.training.loss as train_mod
    r = recipe(tmp_path, model=str(world / "llama"), task="instruct", data=str(world / "a.jsonl"), epochs=3,
               eval_every=100, split=[1.0, 0.0, 0.0], dropout=0.0)
    real, calls = train_mod.causal_lm_loss, []

    def nan_on_step_4(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(train_mod, "causal_lm_loss", nan_on_step_4)
    out = tmp_path / "run"
    assert main(["train", r, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "step 4: the training loss is not finite" in err and "learning rate" in err and "Traceback" not in err
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    info = json.loads((out / "run.json").read_text())
    assert info["metrics"]["stopped_by"] == "loss" and info["timings"]["steps"] == 3
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    ck = load_file(out / "checkpoint" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], ck[k]) for k in saved)  # the adapter is the weights of step 3


def test_saving_that_fails_halfway_leaves_the_previous_adapter(tmp_path, monkeypatch):
    import lorakit.engine.peft_format as adapters_mod
    from conftest import TINY, randomize_lora
    from lorakit import LoRAConfig, add_lora, save_adapter
    model = add_lora(TINY["llama"](), LoRAConfig(r=4))
    save_adapter(model, tmp_path / "a")
    before = {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()}
    randomize_lora(model)
    real = adapters_mod.save_file

    def disk_full_halfway(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters_mod, "save_file", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, tmp_path / "a")
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == before  # no temporary left either
