"""LoRA on embeddings (PEFT's lora_embedding_A/B) and on an explicitly named LM head, tied or not."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import TINY, model_inputs
from lorakit import LoRAConfig, LoRAError, add_lora, load_adapter, merge, merge_and_unload, save_adapter, unmerge
from lorakit.errors import LorakitWarning
from lorakit.engine.registry import lora_layers
from lorakit.engine.report import parameter_report


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                for p in d.values():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_embedding_lora_is_a_per_token_low_rank_shift_and_peft_agrees_both_ways(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    _randomize(model)
    layer = model.model.embed_tokens
    ids = torch.tensor([[3, 7, 7, 100]])
    with torch.no_grad():  # by hand: E[t] + s·B·A[:, t]
        want = layer.weight[ids[0]] + (layer.lora_B["default"] @ layer.lora_A["default"][:, ids[0]]).t() * 2.0
        torch.testing.assert_close(layer(ids)[0], want, atol=1e-6, rtol=0)
    inputs = model_inputs("llama")
    with torch.no_grad():
        ours = model(**inputs).logits
    report = parameter_report(model)
    assert any(r["kind"] == "LoRA(Embedding)" and r["trainable"] == 4 * 128 + 32 * 4 for r in report.rows)
    save_adapter(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(TINY["llama"](), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours, atol=1e-5, rtol=0)
    peft_model = get_peft_model(TINY["llama"](), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]))
    _g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=_g) * 0.1)
        peft_model.eval()
        want = peft_model(**inputs).logits
        peft_model.save_pretrained(str(tmp_path / "theirs"))
        loaded = load_adapter(TINY["llama"](), tmp_path / "theirs").eval()
        torch.testing.assert_close(loaded(**inputs).logits, want, atol=1e-5, rtol=0)


def test_tied_embeddings_adapting_one_side_leaves_the_other(tmp_path):
    inputs = model_inputs("llama")
    base = tied_llama()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = add_lora(tied_llama(), LoRAConfig(r=4, targets=["embed_tokens"]))
    _randomize(model)
    head_weight = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        adapted = model(**inputs).logits
        assert (adapted - base_logits).abs().max() > 1e-3
        merge(model)  # a tied layer stays unmerged: merging would change the LM head too
        assert model.model.embed_tokens.merged is None and torch.equal(model.lm_head.weight, head_weight)
        torch.testing.assert_close(model(**inputs).logits, adapted, atol=1e-6, rtol=0)
        unmerge(model)
    with pytest.warns(LorakitWarning, match="tied to another module's"):
        plain = merge_and_unload(model)
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight and torch.equal(plain.lm_head.weight, head_weight)
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, adapted, atol=1e-5, rtol=0)


def test_the_lm_head_when_named_and_never_by_all_linear():
    model = add_lora(tied_llama(), LoRAConfig(r=4, targets="all-linear"))
    assert "lm_head" not in {n for n, _ in lora_layers(model)}
    model = add_lora(tied_llama(), LoRAConfig(r=4, targets=["lm_head"]))
    _randomize(model)
    emb = model.model.embed_tokens.weight.detach().clone()
    inputs = model_inputs("llama")
    with torch.no_grad():
        adapted = model(**inputs).logits
    with warnings.catch_warnings(record=True):
        plain = merge_and_unload(model)
    assert torch.equal(plain.model.embed_tokens.weight, emb)  # the input side kept its own values
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, adapted, atol=1e-5, rtol=0)


def test_what_an_embedding_cannot_have():
    with pytest.raises(LoRAError, match="DoRA is for Linear and Conv1D layers, not an Embedding"):
        add_lora(TINY["llama"](), LoRAConfig(r=4, targets=["embed_tokens"], dora=True))
    with pytest.raises(LoRAError, match="init pissa is for Linear and Conv1D layers"):
        add_lora(TINY["llama"](), LoRAConfig(r=4, targets=["embed_tokens"], init="pissa"))
    with pytest.raises(LoRAError, match="target 'embed_tokens' matches no module"):
        add_lora(TINY["gpt2"](), LoRAConfig(r=4, targets=["embed_tokens"]))
