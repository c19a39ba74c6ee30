"""DoRA against PEFT's own DoRA (tuners/lora/dora.py): forward, every gradient, merge, the PEFT files both ways."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, model_inputs
from lorakit import LoRAConfig, add_lora, load_adapter, merge, save_adapter, unmerge
from lorakit.engine.registry import lora_layers

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"], "t5": ["q", "k", "v", "o", "wi", "wo"]}


def _peft_name(name: str, param: str) -> str:
    return f"base_model.model.{name}." + {"A": "lora_A.default.weight", "B": "lora_B.default.weight",
                                          "m": "lora_magnitude_vector.default.weight"}[param]


def _pair(kind: str, seed: int = 0):
    """lorakit's and PEFT's DoRA models on one tiny base, with the same random A, B and magnitudes."""
    from peft import LoraConfig, get_peft_model
    ours = add_lora(TINY[kind](), LoRAConfig(r=4, alpha=8, dropout=0.0, targets=TARGETS[kind], dora=True))
    theirs = get_peft_model(TINY[kind](), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[kind],
                                                     use_dora=True, fan_in_fan_out=kind == "gpt2"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            for param, p in (("A", layer.lora_A["default"]), ("B", layer.lora_B["default"])):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                theirs.get_parameter(_peft_name(name, param)).copy_(p)
            m = layer.lora_magnitude["default"]
            m.mul_(1 + 0.1 * torch.randn(m.shape, generator=g))
            theirs.get_parameter(_peft_name(name, "m")).copy_(m)
    return ours, theirs


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_dora_forward_and_gradients_equal_peft(kind):
    ours, theirs = _pair(kind)
    inputs = model_inputs(kind)
    outs = []
    for model in (ours, theirs):
        model.eval()  # the models' own dropout off; gradients flow all the same
        logits = model(**inputs).logits
        (logits.float().pow(2).mean()).backward()
        outs.append(logits.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    n = 0
    for name, layer in lora_layers(ours):
        for param, p in (("A", layer.lora_A["default"]), ("B", layer.lora_B["default"]),
                         ("m", layer.lora_magnitude["default"])):
            torch.testing.assert_close(p.grad, theirs.get_parameter(_peft_name(name, param)).grad, atol=1e-5, rtol=1e-4)
            n += 1
    assert n >= 12


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_dora_starts_as_the_base_and_merges_exactly(kind):
    base = TINY[kind]().eval()
    model = add_lora(TINY[kind](), LoRAConfig(r=4, targets=TARGETS[kind], dora=True)).eval()
    inputs = model_inputs(kind)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, atol=1e-5, rtol=0)  # m = ‖W‖, B = 0
    ours, _ = _pair(kind)
    ours.eval()
    with torch.no_grad():
        want = ours(**inputs).logits
        merge(ours)
        torch.testing.assert_close(ours(**inputs).logits, want, atol=1e-5, rtol=0)
        unmerge(ours)
        torch.testing.assert_close(ours(**inputs).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_dora_adapters_saved_by_either_load_in_the_other(kind, tmp_path):
    from peft import PeftModel
    ours, theirs = _pair(kind)
    ours.eval(), theirs.eval()
    inputs = model_inputs(kind)
    with torch.no_grad():
        want = ours(**inputs).logits
        save_adapter(ours, tmp_path / "ours")
        cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert cfg["use_dora"] is True
        peft_loaded = PeftModel.from_pretrained(TINY[kind](), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(peft_loaded(**inputs).logits, want, atol=1e-5, rtol=0)
        theirs.save_pretrained(str(tmp_path / "theirs"))
        loaded = load_adapter(TINY[kind](), tmp_path / "theirs").eval()
        torch.testing.assert_close(loaded(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "bitsandbytes"])
def test_dora_on_an_nf4_base_is_dora_on_the_dequantised_weights(backend):
    from lorakit.engine.quant import bitsandbytes_available
    if backend == "bitsandbytes" and not bitsandbytes_available():
        pytest.skip("bitsandbytes is not installed")
    kind = "llama"
    ours = add_lora(TINY[kind](), LoRAConfig(r=4, targets=TARGETS[kind], dora=True, quantize="nf4",
                                             quant_backend=backend)).eval()
    dense = TINY[kind]().eval()
    with torch.no_grad():  # the independent account: dense weights replaced by what the NF4 storage holds
        for name, layer in lora_layers(ours):
            dense.get_submodule(name).weight.copy_(layer.frozen.dense())
    dense = add_lora(dense, LoRAConfig(r=4, targets=TARGETS[kind], dora=True)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, q), (_, d) in zip(lora_layers(ours), lora_layers(dense)):
            torch.testing.assert_close(q.lora_magnitude["default"], d.lora_magnitude["default"], atol=1e-5, rtol=0)
            for p, twin in ((q.lora_A["default"], d.lora_A["default"]), (q.lora_B["default"], d.lora_B["default"])):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                twin.copy_(p)
        inputs = model_inputs(kind)
        want = dense(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, want, atol=1e-4, rtol=0)
        merge(ours)
        torch.testing.assert_close(ours(**inputs).logits, want, atol=1e-4, rtol=0)


def test_mixed_rows_with_dora_and_plain_adapters_equal_each_alone():
    from lorakit import adapters_by_row, disable_adapters, set_adapter
    kind = "llama"
    model = add_lora(TINY[kind](), LoRAConfig(r=4, targets=TARGETS[kind], dora=True), "d")
    add_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"]), "p")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.lora_B:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.2)
            if "d" in layer.lora_magnitude:
                layer.lora_magnitude["d"].mul_(1.2)
    model.eval()
    ids = torch.randint(0, 128, (3, 8), generator=g)
    with torch.no_grad():
        refs = {}
        for name in ("d", "p"):
            set_adapter(model, name)
            refs[name] = model(input_ids=ids).logits
        with disable_adapters(model):
            refs[None] = model(input_ids=ids).logits
        rows = ["d", None, "p"]
        with adapters_by_row(model, rows):
            mixed = model(input_ids=ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], refs[name][i], atol=1e-5, rtol=0)
    assert (refs["d"] - refs[None]).abs().max() > 1e-2


def test_dora_from_the_recipe_and_flag(tmp_path, capsys):
    from conftest import save_tiny
    from lorakit.cli import main
    from test_train import recipe, write_instruct
    llama = save_tiny("llama", tmp_path / "llama")
    r = recipe(tmp_path, model=str(llama), task="instruct", data=str(write_instruct(tmp_path / "a.jsonl", n=12)),
               max_steps=2)
    assert main(["train", r, "--out", str(tmp_path / "run"), "--dora"]) == 0
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and json.loads((tmp_path / "run" / "run.json").read_text())["config"]["dora"]
    capsys.readouterr()
    assert main(["inspect", "--model", str(llama), "--dora", "--targets", "q_proj", "--r", "4"]) == 0
    out = capsys.readouterr().out
    # per q_proj (32 -> 32): A 4x32, B 32x4 and the magnitude's 32 entries
    assert "DoRA(Linear)" in out and f"trainable {2 * (4 * 32 + 32 * 4 + 32):,} /" in out


def test_dora_training_steps_follow_peft():
    """Three AdamW steps on each: the norms are recomputed as A and B change (nothing stale is reused)."""
    ours, theirs = _pair("llama", seed=3)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    for model in (ours, theirs):
        model.eval()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for name, layer in lora_layers(ours):
        for param, p in (("A", layer.lora_A["default"]), ("B", layer.lora_B["default"]),
                         ("m", layer.lora_magnitude["default"])):
            torch.testing.assert_close(p, theirs.get_parameter(_peft_name(name, param)), atol=1e-5, rtol=1e-4)


def test_a_zero_magnitude_row_keeps_finite_gradients():
    """A row whose magnitude is 0 (a dead output feature) still gets PEFT's finite gradients."""
    ours, theirs = _pair("llama", seed=5)
    name, layer = next(iter(lora_layers(ours)))
    with torch.no_grad():
        layer.lora_magnitude["default"][0] = 0.0
        theirs.get_parameter(_peft_name(name, "m"))[0] = 0.0
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(6))
    for model in (ours, theirs):
        model.eval()
        model(input_ids=ids, labels=ids).loss.backward()
    g = layer.lora_magnitude["default"].grad
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, theirs.get_parameter(_peft_name(name, "m")).grad, atol=1e-5, rtol=1e-4)
