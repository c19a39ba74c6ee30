"""int8 weights for generation (inference/int8.py, `--dtype int8`): the quantisation against its definition, both
product paths (the C++ kernel for a decode step's few rows, bf16 GEMMs on converted chunks for a prompt's many)
against fp32 on the same int8 values, and models quantised with and without adapters (Llama, GPT-2's Conv1D,
DoRA, an adapter added after quantising) against the same models in fp32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import model_inputs, randomize_lora, tiny_gpt2, tiny_llama, word_tokenizer

from lorakit import LoRAConfig, add_lora, disable_adapters, merge_and_unload
from lorakit.engine import LoRALinear
from lorakit.engine.frozen_base import StoredLinear
from lorakit.inference import int8
from lorakit.inference.int8 import Int8Base, dequantized_linear, quantize_blocks, rebuild
from lorakit.inference.precision import cast_for_inference, dtype_of


def test_quantize_blocks_is_symmetric_per_block_of_32_to_half_a_step():
    """fp32 scales, one per 32 weights of a row (the last block of a row shorter); each block's largest weight the
    largest code; every weight within half a step; an all-zero block zero."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 72, generator=g) * torch.tensor([1, 10, 0.01, 3, 1])[:, None]
    w[4, 32:64] = 0
    codes, scales = quantize_blocks(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (5, 3)
    blocks = [w[:, 0:32], w[:, 32:64], w[:, 64:72]]
    want = torch.stack([b.abs().amax(1) / 127 for b in blocks], dim=1)
    torch.testing.assert_close(scales, want)
    assert scales[4, 1] == 0 and bool((codes[4, 32:64] == 0).all())
    largest = [codes[:, 0:32], codes[:, 32:64], codes[:, 64:72]]
    assert all(int(c[n].abs().max()) == 127 for c in largest for n in range(4))
    step = scales.repeat_interleave(32, dim=1)[:, :72]
    assert bool(((rebuild(codes, scales) - w).abs() <= step / 2 + 1e-7).all())
    torch.testing.assert_close(rebuild(codes[:, :64], scales[:, :2]), codes[:, :64].float() * step[:, :64])


@pytest.mark.parametrize("rows", [1, 5, 32, 33, 300])
def test_both_product_paths_against_fp32_on_the_same_int8_values(rows, monkeypatch):
    """Up to 32 rows the kernel, past that bf16 GEMMs on chunks (here several: CHUNK_ROWS made small); each output
    within a few bf16 roundings of the fp32 product of the same bf16 inputs and int8 values (K = 100: a short last
    block)."""
    monkeypatch.setattr(int8, "CHUNK_ROWS", 24)
    g = torch.Generator().manual_seed(rows)
    base = Int8Base(torch.randn(70, 100, generator=g))
    x, bias = torch.randn(rows, 100, generator=g).bfloat16(), torch.randn(70, generator=g).bfloat16()
    got = base.matmul(x, bias)
    want = F.linear(x.float(), rebuild(base.codes, base.scales), bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 70)
    spread = (x.float().abs() @ base.dense().float().abs().t()) * 2 ** -8  # the sum's own rounding in bf16
    assert bool(((got.float() - want).abs() <= 2 ** -7 * want.abs() + spread + 1e-3).all())
    chunked = dequantized_linear(x, base.codes, base.scales, bias)
    assert bool(((chunked.float() - want).abs() <= 2 ** -7 * want.abs() + spread + 1e-3).all())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("lora", [None, {}, {"dora": True}], ids=["base", "lora", "dora"])
@torch.no_grad()
def test_an_int8_model_is_the_fp32_model_to_int8_rounding(make, lora):
    """Every dense linear int8 (LoRA layers keep their adapters, unmerged, in bf16 beside it), embeddings bf16; the
    logits within 3% of fp32's, and the adapter's share of them (adapted minus disabled) still there."""
    model = make()
    if lora is not None:
        add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear", **lora))
        randomize_lora(model, seed=3)
    model.eval()
    inputs = model_inputs("llama" if make is tiny_llama else "gpt2")
    want = model(**inputs).logits
    with disable_adapters(model):
        want_base = model(**inputs).logits
    assert cast_for_inference(model, "int8") == "int8" and dtype_of(model) == "int8"
    linears = [m for m in model.modules() if isinstance(m, (StoredLinear, LoRALinear))]
    assert linears and all(m.frozen.kind == "int8" for m in linears)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    got = model(**inputs).logits
    assert relative_error(got, want) < 0.03
    if lora is not None:
        with disable_adapters(model):
            got_base = model(**inputs).logits
        assert relative_error(got - got_base, want - want_base) < 0.1


@torch.no_grad()
def test_an_adapter_added_after_quantising_wraps_the_int8_storage():
    """LoRA injected into an int8 model (as the server does for an adapter loaded at run time) keeps each layer's
    codes and computes what the same adapter added before quantising computes; merge_and_unload gives the
    StoredLinear back."""
    first, later = tiny_llama(), tiny_llama()
    later.load_state_dict(first.state_dict())
    add_lora(first, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_lora(first, seed=5)
    cast_for_inference(first, "int8")
    cast_for_inference(later, "int8")
    codes = later.model.layers[0].self_attn.q_proj.frozen.codes
    add_lora(later, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    later.load_state_dict(first.state_dict())
    cast_for_inference(later, "int8")  # the new adapter to bf16; the int8 layers stay as they are
    q = later.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.frozen.codes is codes and q.lora_A["default"].dtype == torch.bfloat16
    inputs = model_inputs("llama")
    torch.testing.assert_close(later(**inputs).logits, first(**inputs).logits, atol=0, rtol=0)
    unloaded = merge_and_unload(later)
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, (StoredLinear, torch.nn.Linear))


@torch.no_grad()
def test_without_the_kernel_int8_runs_on_the_python_path(monkeypatch):
    """A CPU without AVX-512 BF16 (or no compiler): products through the bf16 GEMMs on rebuilt weights, and the C++
    step declines an int8 model, so the Python step decodes it; the same numbers to bf16 rounding."""
    from lorakit.inference.compiled_step import compiled_model, extension
    model = tiny_llama().eval()
    cast_for_inference(model, "int8")
    inputs = model_inputs("llama")
    want = model(**inputs).logits
    ext = extension()
    if ext is not None:
        assert compiled_model(model, torch.bfloat16) is not None
        monkeypatch.setattr(ext, "skinny_supported", lambda: False)
        assert compiled_model(model, torch.bfloat16) is None
    monkeypatch.setattr(int8, "extension", lambda: None)
    assert relative_error(model(**inputs).logits, want.float()) < 0.01


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_base_and_adapted_generation_leaves_a_low_precision_base_as_it_was(dtype):
    """An evaluation generates adapted then base; in fp32 it merges the adapter for speed and takes it out again. A
    bf16 or int8 base is not merged (in and out would round it, and an int8 one would come out bf16): afterwards
    every frozen weight is the same bits and still int8, and the adapted replies are the adapter's."""
    from lorakit.inference import Sampling, generate, generate_base_and_adapted
    model = tiny_llama()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_lora(model, seed=7)
    cast_for_inference(model.eval(), dtype)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    tok, prompts = word_tokenizer(), ["w5 w6 w7", "w9 w10"]
    sampling = Sampling(max_new_tokens=6)
    base, adapted = generate_base_and_adapted(model, tok, prompts, sampling)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dtype_of(model) == dtype
    assert adapted == generate(model, tok, prompts, sampling)
    with disable_adapters(model):
        assert base == generate(model, tok, prompts, sampling)


def test_an_adapter_training_a_quantised_module_in_full_is_refused_with_why(tmp_path):
    """An adapter that trains the LM head in full cannot go onto an int8 model, whose head is int8 codes: one
    LoRAError that says so and what to do, the model as it was."""
    from lorakit import LoRAError, load_adapter, save_adapter
    trained = tiny_llama()
    add_lora(trained, LoRAConfig(r=4, alpha=8, targets="all-linear", trainable=("lm_head",)))
    save_adapter(trained, tmp_path / "adapter")
    model = tiny_llama()
    cast_for_inference(model, "int8")
    with pytest.raises(LoRAError, match="trains 'lm_head' in full.*int8 codes.*fp32 or bf16"):
        load_adapter(model, tmp_path / "adapter")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
