"""Adapter arithmetic: combine_adapters against PEFT's add_weighted_adapter on the same two adapters, and
`lorakit combine` from run directories."""
from __future__ import annotations


import pytest
import torch

from conftest import TINY, model_inputs, randomize_lora, save_tiny
from lorakit import LoRAConfig, LoRAError, add_lora, load_adapter, save_adapter
from lorakit.cli import main
from lorakit.engine.combine import combine_adapters
from lorakit.config.choices import COMBINE_METHODS as METHODS
from lorakit.engine.registry import lora_layers


def _two_adapters(kind: str, tmp_path, ranks=(4, 4)):
    for i, (name, r) in enumerate(zip("ab", ranks)):
        model = add_lora(TINY[kind](), LoRAConfig(r=r, alpha=2 * r + i, targets="all-linear"))
        randomize_lora(model, seed=i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_A["default"].normal_(generator=torch.Generator().manual_seed(100 + i))
        save_adapter(model, tmp_path / name)
    ours = load_adapter(TINY[kind](), tmp_path / "a", adapter="a")
    load_adapter(ours, tmp_path / "b", adapter="b")
    return ours


def _peft(kind: str, tmp_path):
    from peft import PeftModel
    theirs = PeftModel.from_pretrained(TINY[kind](), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    return theirs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_combined_weights_equal_peft_add_weighted_adapter(kind, method, tmp_path, monkeypatch):
    ours, theirs = _two_adapters(kind, tmp_path), _peft(kind, tmp_path)
    density = 0.5 if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else 1.0
    weights = [0.7, -0.4]
    # DARE's random drops: both draw from one stream seeded alike (PEFT draws from the global RNG after its new
    # layers' initialisation has used it; lorakit from a generator of its own), so equal drops need equal order
    bernoulli, stream = torch.bernoulli, {}
    monkeypatch.setattr(torch, "bernoulli", lambda p, generator=None: bernoulli(p, generator=stream["g"]))
    stream["g"] = torch.Generator().manual_seed(5)
    combine_adapters(ours, ["a", "b"], weights, "ab", method=method, density=density)
    stream["g"] = torch.Generator().manual_seed(5)
    theirs.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=method,
                                density=density if density < 1 else None)
    n = 0
    for name, layer in lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A["ab"], peft_layer.lora_A["ab"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B["ab"], peft_layer.lora_B["ab"].weight, atol=1e-5, rtol=0)
        assert layer.scaling["ab"] == pytest.approx(peft_layer.scaling["ab"])
        n += 1
    assert n >= 4
    theirs.set_adapter("ab")
    inputs = model_inputs(kind)
    with torch.no_grad():  # and so the outputs
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-4, rtol=0)


def test_dare_is_reproducible_from_its_seed(tmp_path):
    ours = _two_adapters("llama", tmp_path)
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        combine_adapters(ours, ["a", "b"], [0.5, 0.5], name, method="dare_ties", density=0.5, seed=seed)
    layer = next(layer for _, layer in lora_layers(ours))
    assert torch.equal(layer.lora_A["x"], layer.lora_A["y"]) and not torch.equal(layer.lora_A["x"], layer.lora_A["z"])


def test_cat_and_svd_are_the_weighted_sum_of_the_updates(tmp_path):
    ours = _two_adapters("llama", tmp_path, ranks=(4, 2))
    combine_adapters(ours, ["a", "b"], [0.5, 2.0], "cat", method="cat")
    combine_adapters(ours, ["a", "b"], [0.5, 2.0], "svd", method="svd", svd_rank=6)
    for _, layer in lora_layers(ours):
        want = 0.5 * layer.delta_weight("a") + 2.0 * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("cat"), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.delta_weight("svd"), want, atol=1e-4, rtol=0)  # rank 6 holds it exactly
        assert layer.lora_A["cat"].shape[0] == 6


def test_combinations_that_cannot_be_made_say_why(tmp_path):
    ours = _two_adapters("llama", tmp_path, ranks=(4, 2))
    for kwargs, words in (({"method": "ties", "density": 0.5}, "needs one rank"),
                          ({"method": "blend"}, "choose from linear, cat"),
                          ({"method": "dare_ties", "density": 0}, "density must be in (0, 1]")):
        with pytest.raises(LoRAError, match=words.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
            combine_adapters(ours, ["a", "b"], [0.5, 0.5], "x", **kwargs)
    with pytest.raises(LoRAError, match="2 adapters but 1 weights"):
        combine_adapters(ours, ["a", "b"], [1.0], "x")
    add_lora(ours, LoRAConfig(r=4, targets=["q_proj"]), "q")
    with pytest.raises(LoRAError, match="adapt different modules"):
        combine_adapters(ours, ["a", "q"], [0.5, 0.5], "x", method="cat")


def test_lorakit_combine_writes_an_adapter_equal_to_the_api_result(tmp_path, capsys):
    from test_train import recipe, write_instruct
    llama = save_tiny("llama", tmp_path / "llama")
    data = write_instruct(tmp_path / "a.jsonl", n=16)
    runs = []
    for seed in (1, 2):
        r = recipe(tmp_path, model=str(llama), task="instruct", data=str(data), max_steps=2, seed=seed, lr=0.05)
        assert main(["train", r, "--out", str(tmp_path / f"run{seed}")]) == 0
        runs.append(tmp_path / f"run{seed}")
    out = tmp_path / "combined"
    args = ["combine", *map(str, runs), "--weights", "0.6,0.4", "--method", "ties", "--density", "0.5", "--out", str(out)]
    assert main(args) == 0
    assert "ties of 2 adapters (weights 0.6, 0.4)" in capsys.readouterr().out
    from lorakit.models.trained import load_adapted
    written, _, meta = load_adapted(out)
    assert meta["task"] == "instruct" and meta["combined"]["method"] == "ties"
    api = load_adapter(load_adapted(runs[0] / "adapter", adapter="a0")[0], runs[1] / "adapter", adapter="a1")
    combine_adapters(api, ["a0", "a1"], [0.6, 0.4], "c", method="ties", density=0.5)
    for (_, got), (_, want) in zip(lora_layers(written), lora_layers(api)):
        assert torch.equal(got.lora_A["default"], want.lora_A["c"]) and torch.equal(got.lora_B["default"], want.lora_B["c"])
    assert main(args) == 2  # OUT is not empty now
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    other = save_tiny("gpt2", tmp_path / "gpt2")
    r = recipe(tmp_path, model=str(other), task="instruct", data=str(data), max_steps=1)
    assert main(["train", r, "--out", str(tmp_path / "gpt2run")]) == 0
    capsys.readouterr()
    assert main(["combine", str(runs[0]), str(tmp_path / "gpt2run"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "is for base" in err and "only adapters of one base can be combined" in err and "Traceback" not in err
