"""Adapters on disk: our round trip, and both directions with the real `peft` package."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, model_inputs, randomize_lora
from lorakit import LoRAConfig, LoRAError, add_lora, load_adapter, parameter_report, save_adapter
from lorakit.engine.peft_format import CONFIG_NAME, WEIGHTS_NAME


def _logits(model, name):
    with torch.no_grad():
        return model(**model_inputs(name)).logits


@pytest.mark.parametrize("name", sorted(TINY))
def test_save_load_round_trip(name, tmp_path):
    model = add_lora(TINY[name](), LoRAConfig(r=4, alpha=8, dropout=0.1))
    randomize_lora(model)
    expected = _logits(model, name)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.1
    assert cfg["fan_in_fan_out"] is (name == "gpt2") and cfg["bias"] == "none" and cfg["use_rslora"] is False
    assert cfg["base_model_name_or_path"] == "tiny"
    assert cfg["task_type"] == ("SEQ_2_SEQ_LM" if name == "t5" else "CAUSAL_LM")
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    a_keys = [k for k in tensors if k.endswith(".lora_A.weight")]
    assert a_keys and all(k.startswith("base_model.model.") for k in tensors)
    for k in a_keys:
        b = tensors[k.replace("lora_A", "lora_B")]
        assert tensors[k].shape[0] == 4 and b.shape[1] == 4
    fresh = load_adapter(TINY[name](), tmp_path)
    assert torch.equal(_logits(fresh, name), expected)


def _peft_model(name, base, path=None, seed=0):
    from peft import LoraConfig, PeftModel, get_peft_model
    if path is not None:
        return PeftModel.from_pretrained(base, str(path)).eval()
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "t5": ["q", "v", "wo"]}[name]
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=targets, fan_in_fan_out=name == "gpt2",
                     task_type="SEQ_2_SEQ_LM" if name == "t5" else "CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", sorted(TINY))
def test_peft_loads_our_adapter(name, tmp_path):
    model = add_lora(TINY[name](), LoRAConfig(r=4, alpha=8))
    randomize_lora(model)
    ours = _logits(model, name)
    save_adapter(model, tmp_path)
    theirs = _logits(_peft_model(name, TINY[name](), tmp_path), name)
    assert (ours - _logits(TINY[name](), name)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_we_load_peft_adapter(name, tmp_path):
    peft_model = _peft_model(name, TINY[name]())
    theirs = _logits(peft_model, name)
    peft_model.save_pretrained(str(tmp_path))
    ours = load_adapter(TINY[name](), tmp_path)
    torch.testing.assert_close(_logits(ours, name), theirs, atol=1e-5, rtol=0)
    assert (theirs - _logits(TINY[name](), name)).abs().max() > 1e-3


def _tiny_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def test_classification_head_saved_and_restored_both_ways(tmp_path):
    model = add_lora(_tiny_classifier(), LoRAConfig(r=4, trainable=["score"]))
    randomize_lora(model)
    with torch.no_grad():
        model.score.weight.normal_()
    ids = {"input_ids": torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        expected = model(**ids).logits
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] == ["score"] and cfg["task_type"] == "SEQ_CLS"
    assert "base_model.model.score.weight" in load_file(tmp_path / WEIGHTS_NAME)
    fresh = load_adapter(_tiny_classifier(), tmp_path)
    assert parameter_report(fresh).trainable == parameter_report(model).trainable
    with torch.no_grad():
        assert torch.equal(fresh(**ids).logits, expected)
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(_tiny_classifier(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits, expected, atol=1e-5, rtol=0)


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    save_adapter(add_lora(TINY["llama"](), LoRAConfig(r=4)), tmp_path)
    cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(LoRAError, match=r"does not fit the model at 'model\.layers\.0\.self_attn\.q_proj': "
                                        r"lora_A \(4, 32\), lora_B \(32, 4\), but the model's layer is in=48, out=48"):
        load_adapter(LlamaForCausalLM(cfg), tmp_path)


def test_adapter_for_other_architecture_lists_closest_names(tmp_path):
    save_adapter(add_lora(TINY["llama"](), LoRAConfig(r=4)), tmp_path)
    with pytest.raises(LoRAError, match=r"adapter module 'model\.layers\.0\.mlp\.down_proj' is not in this model; closest: c_proj"):
        load_adapter(TINY["gpt2"](), tmp_path)


def test_bad_adapter_directories(tmp_path):
    model = TINY["llama"]()
    with pytest.raises(LoRAError, match="not an adapter directory"):
        load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(LoRAError, match="not valid JSON"):
        load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoRAError, match="never loads pickle"):
        load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LoRAError, match="LORA adapters only"):
        load_adapter(model, tmp_path)


def test_rank_and_alpha_pattern_from_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"v_proj": 2}, task_type="CAUSAL_LM")
    peft_model = get_peft_model(TINY["llama"](), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    peft_model.eval()
    theirs = _logits(peft_model, "llama")
    peft_model.save_pretrained(str(tmp_path))
    ours = load_adapter(TINY["llama"](), tmp_path)
    v = ours.get_submodule("model.layers.0.self_attn.v_proj")
    assert v.lora_A["default"].shape == (2, 32) and v.scaling["default"] == 1.0
    torch.testing.assert_close(_logits(ours, "llama"), theirs, atol=1e-5, rtol=0)


def test_tensor_file_is_plain_safetensors(tmp_path):
    """No pickle anywhere: the file is readable with safetensors alone and re-saving it keeps it loadable."""
    model = add_lora(TINY["llama"](), LoRAConfig(r=2))
    randomize_lora(model)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    assert torch.equal(_logits(load_adapter(TINY["llama"](), tmp_path), "llama"), _logits(model, "llama"))


def _bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()


@pytest.mark.parametrize("build", [_tiny_classifier, _bert_classifier], ids=["llama", "bert"])
def test_each_adapter_has_its_own_trained_head_and_the_base_keeps_its_own(build, tmp_path):
    """Two adapters that each train the head (modules_to_save): each adapter's output is that adapter alone, the
    base's is the untouched model's, a mixed-row batch is each row's own, and PEFT's two-adapter model agrees."""
    from peft import PeftModel

    from lorakit import adapters_by_row, delete_adapter, disable_adapters, merge_and_unload, set_adapter
    from lorakit.models.loading import head_name
    head = head_name(build())
    ids = {"input_ids": torch.randint(1, 128, (4, 9), generator=torch.Generator().manual_seed(3))}
    logits = lambda m: m(**ids).logits.detach()  # noqa: E731
    base = logits(build())
    for i, name in enumerate(("a", "b")):  # two adapters trained apart: heads and LoRA of their own
        alone = add_lora(build(), LoRAConfig(r=4, trainable=[head]))
        randomize_lora(alone, seed=i)
        with torch.no_grad():
            getattr(alone, head).weight.normal_(generator=torch.Generator().manual_seed(10 + i))
        save_adapter(alone, tmp_path / name)
    refs = {name: logits(load_adapter(build(), tmp_path / name)) for name in ("a", "b")}
    assert (refs["a"] - refs["b"]).abs().max() > 0.1 and (refs["a"] - base).abs().max() > 0.1

    model = load_adapter(build(), tmp_path / "a", adapter="a")
    load_adapter(model, tmp_path / "b", adapter="b")
    for name in ("a", "b", "a"):
        set_adapter(model, name)
        torch.testing.assert_close(logits(model), refs[name], atol=1e-6, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
    rows = ["a", "b", None, "b"]
    with adapters_by_row(model, rows):
        mixed = logits(model)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], (refs[name] if name else base)[i], atol=1e-6, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(f"{head}.copies.a.")}

    peft_model = PeftModel.from_pretrained(build(), str(tmp_path / "a"), adapter_name="a").eval()
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    for name in ("a", "b"):
        peft_model.set_adapter(name)
        torch.testing.assert_close(logits(peft_model), refs[name], atol=1e-5, rtol=0)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model), base, atol=1e-5, rtol=0)

    save_adapter(model, tmp_path / "b-again", adapter="b")  # saved from the shared model: b's own head
    torch.testing.assert_close(logits(load_adapter(build(), tmp_path / "b-again")), refs["b"], atol=1e-6, rtol=0)
    delete_adapter(model, "a")
    set_adapter(model, "b")
    torch.testing.assert_close(logits(model), refs["b"], atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert type(getattr(plain, head)).__name__ == "Linear"
    torch.testing.assert_close(logits(plain), refs["b"], atol=1e-5, rtol=0)


def test_deleting_the_last_adapter_that_trains_a_module_puts_the_original_back():
    from lorakit import delete_adapter
    model = add_lora(_tiny_classifier(), LoRAConfig(r=4, trainable=["score"]))
    original = model.score.original
    delete_adapter(model, "default")
    assert model.score is original


def test_an_embedded_alias_names_the_same_base_as_its_hub_id():
    """An adapter whose config says "smollm2" loaded onto the embedded SmolLM2 (whose name is the hub id) is on its own
    base: no warning; another name is another base."""
    from lorakit.engine.peft_format import same_base
    from lorakit.models import same_model
    assert same_base("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct") and same_model("minilm", "minilm")
    assert not same_base("smollm2", "sentence-transformers/all-MiniLM-L6-v2")
