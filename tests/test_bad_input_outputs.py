"""Bad input, third round: the newer commands (export, combine, sweep, eval --data, serve, chat data) and the outputs
of every command. Each case: the exit code, the key words of the one error line, no traceback, and the files that
must stay as they were; outputs are checked before any work starts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from lorakit.cli import main
from lorakit.files import UMASK
from test_bad_input import CHAT_ROW, SMS, _damaged_run, _file

NORMAL_FILE_MODE = 0o666 & ~UMASK


def _lines(n: int) -> bytes:
    return b"".join(SMS.splitlines(keepends=True)[:n])


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder that refuses writes, for root too (the immutable attribute), or skip where neither works."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o500)
    immutable = False
    try:
        (d / "probe").touch()
    except OSError:
        yield d
        d.chmod(0o700)
        return
    (d / "probe").unlink()
    immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0 if shutil.which(
        "chattr") else False
    if not immutable:
        pytest.skip("no way to make a read-only folder here (root without chattr)")
    yield d
    subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o700)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return next(ln for ln in err.splitlines() if ln.startswith("lorakit: error:"))


def _refused(args: list[str], capsys, *words: str, code: int = 2) -> str:
    assert main(args) == code
    line = _error_line(capsys)
    for word in words:
        assert word in line, (word, line)
    return line


def _no_training(monkeypatch) -> None:
    """Fail the test if a model is set up: the outputs must be checked before."""
    def forbidden(*a, **k):
        raise AssertionError("training started before its outputs were checked")
    monkeypatch.setattr("lorakit.training.loop.set_up", forbidden)


# ------------------------------------------------------------------------------------------------- outputs


def test_train_out_an_existing_file_is_refused_before_the_first_step(world, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    _refused(["train", str(world / "instruct.yaml"), "--out", str(existing)], capsys, "--out", "is a file")
    _refused(["train", str(world / "instruct.yaml"), "--out", str(existing / "run")], capsys, "notes.txt is a file")
    assert existing.read_text() == "mine"


def test_outputs_in_a_read_only_folder_are_refused_before_any_work(world, read_only_dir, monkeypatch, capsys):
    _no_training(monkeypatch)
    monkeypatch.setattr("lorakit.export.run.load_trained", lambda *a, **k: pytest.fail("export merged first"))
    _refused(["train", str(world / "instruct.yaml"), "--out", str(read_only_dir / "run")], capsys,
             "--out", "cannot write in", str(read_only_dir))
    for fmt, out in (("gguf", "m.gguf"), ("gguf-lora", "a.gguf"), ("ollama", "ollama")):
        _refused(["export", str(world / "run"), "--format", fmt, "--out", str(read_only_dir / out)], capsys,
                 "--out", "cannot write in")
    _refused(["merge", str(world / "run" / "adapter"), str(read_only_dir / "merged")], capsys, "OUT", "cannot write")
    _refused(["combine", str(world / "run"), str(world / "run"), "--out", str(read_only_dir / "c")], capsys,
             "--out", "cannot write")
    _refused(["sweep", str(world / "spam.yaml"), "--grid", "r=4,8", "--out", str(read_only_dir / "s")], capsys,
             "--out", "cannot write")
    assert sorted(os.listdir(read_only_dir)) == []


def test_export_into_a_folder_that_does_not_exist_creates_it(world, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "adapter.gguf"
    assert main(["export", str(world / "run"), "--format", "gguf-lora", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and out.stat().st_mode & 0o777 == NORMAL_FILE_MODE


def test_export_of_a_truncated_adapter_names_the_file(world, tmp_path, capsys):
    _refused(["export", _damaged_run(world), "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf")], capsys,
             "adapter_model.safetensors", "damaged or truncated")
    assert not (tmp_path / "a.gguf").exists() and os.listdir(tmp_path) == []


def test_saved_files_have_the_mode_an_ordinary_write_gives(world, tmp_path, capsys):
    """Adapter, checkpoint and run files are readable by others, as any file the user writes (umask 022: 0644)."""
    run = tmp_path / "shared-run"
    assert main(["train", str(world / "instruct.yaml"), "--out", str(run), "--checkpoint-every", "1"]) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files) and len(files) >= 5
    for p in files:
        assert p.stat().st_mode & 0o777 == NORMAL_FILE_MODE, (p, oct(p.stat().st_mode))
    for p in [run, *[p for p in run.rglob("*") if p.is_dir()]]:
        assert p.stat().st_mode & 0o777 == 0o777 & ~UMASK, p


# -------------------------------------------------------------------------------------- flags and values


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_lr_is_one_line(world, value, capsys):
    _refused(["train", str(world / "instruct.yaml"), "--lr", value], capsys, "lr", "not a finite number")


@pytest.mark.parametrize("args, words", [
    (["--set", "r=0"], ["r must be in [1, ∞)", "got 0"]),
    (["--set", "dropout=1"], ["dropout must be in [0, 1)"]),
    (["--set", "warmup=1.5"], ["warmup must be in [0, 1]"]),
    (["--set", "weight_decay=-0.1"], ["weight_decay must be in [0, ∞)"]),
    (["--alpha", "-16"], ["alpha must be in (0, ∞)", "-16"]),
])
def test_a_value_out_of_its_range_names_the_key(world, args, words, capsys):
    _refused(["train", str(world / "instruct.yaml"), *args], capsys, *words)


@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_serve_port_out_of_range_is_argparse_s_one_line(port, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--port", port])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --port" in err and "Traceback" not in err


def test_max_length_below_the_special_tokens_is_refused(tmp_path, capsys):
    """MiniLM's tokenizer adds [CLS] and [SEP]: max_length 2 keeps no text, and below that truncation is skipped."""
    (tmp_path / "sms.tsv").write_bytes(SMS)
    for n in ("1", "2"):
        _refused(["data", "spam", "--data", str(tmp_path / "sms.tsv"), "--max-length", n], capsys,
                 f"max_length {n} leaves no room for text", "2 special tokens")


# ------------------------------------------------------------------------------------------------- combine


def test_combine_takes_negative_weights(world, tmp_path, capsys):
    out = tmp_path / "diff"
    assert main(["combine", str(world / "run"), str(world / "run"), "--weights", "-1,2", "--method", "linear",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "lorakit.json").read_text())
    assert meta["combined"]["weights"] == [-1.0, 2.0]


@pytest.mark.parametrize("flags, words", [
    (["--weights", "0,0"], ["--weights 0,0", "every weight is 0"]),
    (["--weights", "1"], ["give 2 finite numbers"]),
    (["--weights", "nan,1"], ["finite numbers"]),
    (["--svd-rank", "-3"], ["--svd-rank -3", "whole number >= 1"]),
    (["--svd-rank", "4", "--method", "linear"], ["--svd-rank", "--method svd only"]),
    (["--density", "0.5"], ["--density 0.5", "applies to --method ties"]),
    (["--density", "1.5", "--method", "ties"], ["--density 1.5", "(0, 1]"]),
    (["--seed", "3", "--method", "ties"], ["--seed", "dare_linear or dare_ties"]),
])
def test_combine_flags_are_checked_before_loading(world, tmp_path, flags, words, monkeypatch, capsys):
    monkeypatch.setattr("lorakit.models.load_adapted", lambda *a, **k: pytest.fail("loaded before the flags"))
    _refused(["combine", str(world / "run"), str(world / "run"), *flags, "--out", str(tmp_path / "c")], capsys, *words)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------------- sweep


def test_sweep_refuses_a_bad_grid_value_before_the_first_cell(world, tmp_path, capsys):
    out = tmp_path / "sweep"
    _refused(["sweep", str(world / "spam.yaml"), "--grid", "r=8,0", "--out", str(out)], capsys,
             "--grid cell r=0", "r must be in [1, ∞)")
    assert not any(out.glob("r=*"))


def test_a_sweep_whose_cell_failed_exits_non_zero(world, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(world / "instruct.yaml"), "--grid", "targets=no_such_module", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 of 1 cells failed" in err and "Traceback" not in err
    assert json.loads((out / "sweep.json").read_text())["rows"][0]["failed"]


# ---------------------------------------------------------------------------------------------- eval --data


def _copied_run(world, tmp_path, run: str) -> Path:
    """The run as on another machine: its data file is not where run.json says."""
    copy = tmp_path / f"copy-of-{run}"
    shutil.copytree(world / run, copy)
    info = json.loads((copy / "run.json").read_text())
    info["config"] |= {"data": "data/elsewhere.jsonl", "recipe_path": "/nowhere/recipe.yaml"}
    (copy / "run.json").write_text(json.dumps(info))
    return copy


def test_eval_data_on_a_copied_run_needs_no_training_data(world, tmp_path, monkeypatch, capsys):
    copy = _copied_run(world, tmp_path, "run")
    monkeypatch.chdir(tmp_path)
    data = _file(world, "held-out.jsonl", b'{"instruction": "w5 w6", "input": "w8", "output": "w9 w10"}\n' * 3)
    assert main(["eval", str(copy), "--data", data, "--no-base"]) == 0
    assert json.loads((copy / "eval-held-out" / "eval.json").read_text())["test_examples"] == 3
    _refused(["eval", str(copy)], capsys, "cut from the data it was trained on", "data/elsewhere.jsonl",
             "--data FILE")


def test_eval_data_takes_skip_invalid_as_its_hint_says(world, tmp_path, capsys):
    bad = _file(world, "held-out-bad.jsonl", b'{"instruction": "w5", "output": "w9"}\n{"instruction": 3}\n' * 2)
    line = _refused(["eval", str(world / "run"), "--data", bad, "--no-base", "--out", str(tmp_path / "e")], capsys,
                    "held-out-bad.jsonl, line 2", "--skip-invalid")
    assert "--skip-invalid" in line
    assert main(["eval", str(world / "run"), "--data", bad, "--no-base", "--skip-invalid", "--out",
                 str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["test_examples"] == 2
    _refused(["eval", str(world / "run"), "--skip-invalid"], capsys, "--skip-invalid", "--data FILE")


@pytest.fixture(scope="module")
def classifier(world):
    run = world / "spam-run"
    if not run.exists():
        assert main(["train", str(world / "spam.yaml"), "--out", str(run)]) == 0
    return run


def test_eval_data_on_a_classifier_keeps_the_head_only_baseline(world, classifier, tmp_path, monkeypatch, capsys):
    from lorakit.evaluation import classify
    assert main(["eval", str(classifier)]) == 0
    kept = classifier / classify.BASELINE
    first = json.loads((classifier / "eval.json").read_text())["metrics"]
    with safe_open(str(kept), framework="pt") as f:
        assert int(f.metadata()["majority"]) in (0, 1) and f.get_tensor("weight").shape[0] == 2
    monkeypatch.setattr(classify, "train_head", lambda *a, **k: pytest.fail("the head-only baseline was retrained"))
    assert main(["eval", str(classifier)]) == 0  # the same training split: the kept head
    assert json.loads((classifier / "eval.json").read_text())["metrics"]["head only"] == first["head only"]
    copy = _copied_run(world, tmp_path, "spam-run")
    sms = _file(world, "more-sms.tsv", _lines(12))
    assert main(["eval", str(copy), "--data", sms]) == 0
    rows = json.loads((copy / "eval-more-sms" / "eval.json").read_text())["metrics"]
    assert {"base (untrained head)", "majority class", "head only", "lora"} <= set(rows)


def test_eval_data_on_a_copied_classifier_without_a_kept_baseline_says_what_is_left_out(world, classifier, tmp_path,
                                                                                        capsys):
    copy = _copied_run(world, tmp_path, "spam-run")
    (copy / "head_only_baseline.safetensors").unlink(missing_ok=True)
    assert main(["eval", str(copy), "--data", _file(world, "more-sms.tsv", _lines(12))]) == 0
    assert "head-only baselines are left out" in capsys.readouterr().out
    rows = json.loads((copy / "eval-more-sms" / "eval.json").read_text())["metrics"]
    assert set(rows) == {"base (untrained head)", "lora"}


def test_a_classifier_s_test_data_file_is_its_test_split(world, tmp_path, capsys):
    test = _file(world, "test-sms.tsv", _lines(10))
    run = tmp_path / "with-test"
    assert main(["train", str(world / "spam.yaml"), "--set", f"test_data={test}", "--out", str(run)]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["test_data"]["kept"] == 10
    other = _file(world, "test-unknown.tsv", b"eggs\tw10 w11\n" + _lines(6))
    _refused(["train", str(world / "spam.yaml"), "--set", f"test_data={other}", "--out", str(tmp_path / "x")],
             capsys, "test-unknown.tsv", "eggs")


# ----------------------------------------------------------------------------------------------- chat data


@pytest.mark.parametrize("suffix", ["csv", "tsv"])
def test_a_csv_or_tsv_as_chat_data_names_the_formats(world, suffix, capsys):
    data = _file(world, f"chat.{suffix}", b"role,content\nuser,hello\nassistant,hi\n")
    _refused(["train", str(world / "instruct.yaml"), "--set", "task=chat", "--data", data], capsys,
             f"a {suffix.upper()} file", "JSON array, JSONL", "Parquet")


def test_an_image_part_is_named(world, capsys):
    image = (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "w5"}, {"type": "image_url", '
             b'"image_url": {"url": "x.png"}}]}, {"role": "assistant", "content": "w9"}]}\n')
    data = _file(world, "image.jsonl", CHAT_ROW * 3 + image)
    _refused(["train", str(world / "instruct.yaml"), "--set", "task=chat", "--data", data], capsys,
             "image.jsonl, line 4", "part 1 is of type 'image_url'", "text")


# ------------------------------------------------------------------------------------------------- serving


@pytest.mark.parametrize("api", [False, True])
def test_serving_to_the_network_needs_a_key_or_insecure(api, capsys):
    _refused(["serve", "--host", "0.0.0.0", *(["--api"] if api else [])], capsys, "--host 0.0.0.0",
             "the API" if api else "the page", "--api-key", "--insecure")


@pytest.mark.parametrize("flags, words", [
    (["--slots", "4"], ["--slots", "for the API server", "--api"]),
    (["--api", "--slots", "0"], ["--slots 0", ">= 1"]),
    (["--api", "--max-queue", "0"], ["--max-queue 0", ">= 1"]),
    (["--api", "--task", "chat"], ["--task", "page"]),
])
def test_serve_flags_are_never_silently_ignored(flags, words, capsys):
    _refused(["serve", *flags], capsys, *words)


# ------------------------------------------------------------------------------------------ generate, export


@pytest.mark.parametrize("flags, words", [
    (["--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"]),
    (["--temperature", "-1"], ["--temperature -1", ">= 0"]),
    (["--temperature", "nan"], ["--temperature nan"]),
    (["--top-p", "1.5"], ["--top-p 1.5", "(0, 1]"]),
    (["--top-k", "-2"], ["--top-k -2"]),
    (["--repetition-penalty", "0"], ["--repetition-penalty 0", "> 0"]),
    (["--base", "--merge"], ["--base", "--merge", "give one"]),
])
def test_generate_settings_out_of_range(world, flags, words, capsys):
    _refused(["generate", "--adapter", str(world / "run" / "adapter"), "--prompt", "w5", "--no-stream", *flags],
             capsys, *words)


def test_generate_on_a_classifier_refuses_prompt_template_flags(world, classifier, capsys):
    _refused(["generate", "--adapter", str(classifier / "adapter"), "--prompt", "w10", "--input", "w11"], capsys,
             "--input", "classifier")


def test_export_quant_on_a_lora_gguf_is_refused(world, tmp_path, capsys):
    _refused(["export", str(world / "run"), "--format", "gguf-lora", "--quant", "q4_0", "--out",
              str(tmp_path / "a.gguf")], capsys, "--quant q4_0", "--format gguf and ollama")


def test_eval_out_an_existing_file_is_refused_before_scoring(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lorakit.evaluation.evaluate.load_trained", lambda *a, **k: pytest.fail("scored first"))
    existing = tmp_path / "report.txt"
    existing.write_text("mine")
    data = _file(world, "held-out.jsonl", b'{"instruction": "w5 w6", "input": "w8", "output": "w9 w10"}\n' * 3)
    _refused(["eval", str(world / "run"), "--data", data, "--out", str(existing)], capsys, "--out", "is a file")
    assert existing.read_text() == "mine"


def test_data_show_below_zero_is_refused(world, capsys):
    _refused(["data", str(world / "instruct.yaml"), "--show", "-1"], capsys, "--show -1")
