"""LoRA's starting point (init: kaiming, gaussian, pissa, olora) against PEFT's init_lora_weights, and PiSSA/OLoRA
adapters saved so that they apply to the original, untouched base."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, model_inputs, lm_train_steps
from lorakit import LoRAConfig, LoRAError, add_lora, load_adapter, save_adapter
from lorakit.engine.registry import lora_layers

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


@pytest.mark.parametrize("kind,init", [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_pissa_and_olora_start_where_peft_starts(kind, init):
    from peft import LoraConfig, get_peft_model
    ours = add_lora(TINY[kind](), LoRAConfig(r=4, alpha=8, targets=TARGETS[kind], init=init))
    theirs = get_peft_model(TINY[kind](), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind],
                                                     init_lora_weights=init, fan_in_fan_out=kind == "gpt2"))
    inputs = model_inputs(kind)
    with torch.no_grad():  # the layer's output is unchanged: W_res + s·B₀·A₀ = W
        torch.testing.assert_close(ours(**inputs).logits, TINY[kind]()(**inputs).logits, atol=1e-4, rtol=0)
    for name, layer in lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A["default"], peft_layer.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B["default"], peft_layer.lora_B["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_adapter_applies_to_the_original_base(init, tmp_path):
    from peft import PeftModel
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, alpha=8, targets=TARGETS["llama"], init=init))
    lm_train_steps(model, 3, lr=1e-2)
    model.eval()
    inputs = model_inputs("llama")
    with torch.no_grad():
        trained = model(**inputs).logits
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    with torch.no_grad():
        ours = load_adapter(TINY["llama"](), tmp_path).eval()  # the untouched base
        torch.testing.assert_close(ours(**inputs).logits, trained, atol=1e-5, rtol=0)
        theirs = PeftModel.from_pretrained(TINY["llama"](), str(tmp_path)).eval()
        torch.testing.assert_close(theirs(**inputs).logits, trained, atol=1e-5, rtol=0)
    assert (trained - TINY["llama"]()(**inputs).logits).abs().max() > 1e-3  # training moved it


def test_gaussian_init_and_bad_inits():
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, targets="all-linear", init="gaussian"))
    A = torch.cat([layer.lora_A["default"].flatten() for _, layer in lora_layers(model)])
    assert A.std().item() == pytest.approx(1 / 4, rel=0.05) and A.mean().abs() < 0.01
    assert all(not layer.lora_B["default"].any() for _, layer in lora_layers(model))
    with pytest.raises(LoRAError, match="init 'svd' is not one of kaiming, gaussian, pissa, olora"):
        LoRAConfig(init="svd")
    with pytest.raises(LoRAError, match="init pissa rewrites the base weights .* not quantize=nf4"):
        LoRAConfig(init="pissa", quantize="nf4")
