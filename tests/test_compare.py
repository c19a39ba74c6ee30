"""Full fine-tuning vs LoRA vs QLoRA: `--method` and `lorakit compare` on a tiny model and a few dozen records."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import save_tiny
from lorakit.cli import main
from test_train import recipe, write_instruct, write_sms


@pytest.fixture()
def llama_dir(tmp_path):
    return save_tiny("llama", tmp_path / "tiny-llama")


def test_method_full_trains_every_parameter_and_saves_a_model(tmp_path, llama_dir):
    from lorakit.models.loading import load_model
    from lorakit.models.trained import load_trained
    r = recipe(tmp_path, model=str(llama_dir), task="instruct", data=str(write_instruct(tmp_path / "a.jsonl")),
               split=[0.6, 0.2, 0.2], max_length=64, lr=3e-3)
    run = tmp_path / "full"
    assert main(["train", r, "--out", str(run), "--method", "full", "--eval"]) == 0
    info = json.loads((run / "run.json").read_text())
    base, _ = load_model(str(llama_dir))
    n = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    assert info["parameters"]["trainable"] == info["parameters"]["total"] == n
    assert not (run / "adapter").exists() and (run / "model" / "model.safetensors").is_file()
    tuned, _, meta = load_trained(run / "model")
    assert meta["method"] == "full"
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.norm.weight" in changed  # not just LoRA targets
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["metrics"]) == {"base", "full"} and ev["metrics"]["full"]["loss"] < ev["metrics"]["base"]["loss"]
    # base is a separately loaded model, not the tuned one with something switched off
    assert ev["metrics"]["base"]["loss"] != pytest.approx(ev["metrics"]["full"]["loss"], abs=1e-3)


def test_method_flag_and_recipe_key_agree(tmp_path):
    from lorakit.config.run_config import ConfigError
    from lorakit.config.recipes import load_recipe
    r = recipe(tmp_path, model="x", data="d.jsonl", method="qlora")
    assert load_recipe(r).quantize == "nf4"
    assert load_recipe(r, {"method": "lora", "quantize": ""}).method == "lora"
    with pytest.raises(ConfigError, match="method full .* cannot use quantize"):
        load_recipe(r, {"method": "full", "quantize": "nf4"})
    assert load_recipe(r, {"method": "full", "quantize": "", "full_lr": 1e-5}).lr == 1e-5
    assert load_recipe(r, {"method": "lora", "full_lr": 1e-5}).lr == load_recipe(r).lr  # full_lr is for full only
    with pytest.raises(ConfigError, match="method 'half'"):
        load_recipe(r, {"method": "half"})


def test_compare_produces_every_row_and_matches_each_runs_eval(tmp_path, llama_dir):
    from lorakit.engine.report import parameter_report
    data = write_sms(tmp_path / "sms.tsv", n=48)
    r = recipe(tmp_path, model=str(llama_dir), task="classify", data=str(data), epochs=1, batch_size=8, name="tiny")
    out = tmp_path / "cmp"
    assert main(["compare", r, "--out", str(out), "--quick"]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert [row["method"] for row in res["rows"]] == ["full", "lora", "qlora"]
    assert all("skipped" not in row for row in res["rows"])
    assert (out / "compare.png").stat().st_size > 1000
    md = (out / "compare.md").read_text()
    rows = {row["method"]: row for row in res["rows"]}
    # full: every parameter; LoRA: what the parameter report of the same LoRA model says
    from lorakit.models.loading import load_model
    model, _ = load_model(str(llama_dir), "classify", num_labels=2)
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert rows["full"]["trainable"] == rows["full"]["total"] == n
    lora_run = json.loads((out / "lora" / "run.json").read_text())
    assert rows["lora"]["trainable"] == lora_run["parameters"]["trainable"]
    from lorakit import LoRAConfig, add_lora
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear", trainable=("score",)))
    assert rows["lora"]["trainable"] == parameter_report(model).trainable
    assert rows["qlora"]["trainable"] == rows["lora"]["trainable"]
    lr = json.loads((out / "lora" / "run.json").read_text())["config"]["lr"]
    assert rows["full"]["lr"] == pytest.approx(lr / 10) and rows["lora"]["lr"] == rows["qlora"]["lr"] == lr
    for method, row in rows.items():  # the table's numbers are each run's own eval.json
        ev = json.loads((out / method / "eval.json").read_text())
        assert row["metrics"] == ev["metrics"][method]
        assert f"| {method} | {row['trainable']:,} |" in md and f"{ev['metrics'][method]['accuracy']:.4f}" in md
        assert row["saved_bytes"] > 0 and row["peak_memory_gb"] > 0 and row["tokens_per_s"] > 0
    # what is on disk holds at least the fp32 weights each method trained
    assert rows["full"]["saved_bytes"] >= 4 * n > rows["lora"]["saved_bytes"] >= 4 * rows["lora"]["trainable"]
    first = json.loads((out / "full" / "eval.json").read_text())
    assert res["base"]["base (untrained head)"] == first["metrics"]["base (untrained head)"]
    assert "base (untrained head)" not in json.loads((out / "lora" / "eval.json").read_text())["metrics"]


def test_compare_lists_a_method_that_cannot_run_and_runs_the_others(tmp_path, llama_dir, monkeypatch):
    import lorakit.evaluation.compare as cmp
    monkeypatch.setattr(cmp, "available_memory", lambda: (1e3, "RAM"))  # a machine where nothing full fits
    data = write_sms(tmp_path / "sms.tsv", n=48)
    r = recipe(tmp_path, model=str(llama_dir), task="classify", data=str(data), epochs=1, batch_size=8)
    res = cmp.compare(r, tmp_path / "cmp", methods=("full", "lora"))
    assert "needs at least" in res["rows"][0]["skipped"] and "RAM has" in res["rows"][0]["skipped"]
    assert "metrics" in res["rows"][1] and res["base"]
    assert "| full | not run: a full fine-tune needs" in (tmp_path / "cmp" / "compare.md").read_text()
