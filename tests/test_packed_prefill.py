"""Prompts prefilled as one packed row (inference/packed_prefill.py) against each prompt prefilled alone through
transformers' own forward with its adapter set (float64): the last logits, the keys and values in each slot, after a
cached prefix too; adapters by span against each adapter alone; what cannot be packed is refused."""
from __future__ import annotations

import pytest
import torch

from conftest import randomize_lora, tiny_llama_family
from lorakit import LoRAConfig, LoRAError, add_lora, disable_adapters, set_adapter
from lorakit.engine import adapters_by_span, spans_apply
from lorakit.inference.kv_cache import KVCache
from lorakit.inference.packed_prefill import packs, prefill_packed

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def adapted(kind: str) -> torch.nn.Module:
    """A float64 tiny decoder of `kind` with adapters a (all linear layers) and b (attention only), random B, its
    attention sharpened so that a key in the wrong place changes the logits."""
    model = tiny_llama_family(kind).double()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), "a")
    add_lora(model, LoRAConfig(r=2, alpha=8, targets=["q_proj", "v_proj"]), "b")
    randomize_lora(model, seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.frozen.weight.mul_(8)  # the frozen base, as LoRALinear stores it
            layer.self_attn.k_proj.frozen.weight.mul_(8)
    return model.eval()


def alone(model, ids: list[int], adapter: str | None):
    """transformers' forward over one prompt with `adapter` set (None: the base): last logits, keys, values."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if adapter is None:
            with disable_adapters(model):
                out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
        else:
            set_adapter(model, adapter)
            out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return out.logits[0, -1].float(), keys, values  # fp32, as the prefills give logits


def spans_of(adapters: list[str | None], lengths: list[int]) -> list[tuple[str | None, int, int]]:
    """(adapter, start, stop) of each prompt laid end to end."""
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return [(name, starts[b], starts[b + 1]) for b, name in enumerate(adapters)]


@pytest.mark.parametrize("kind", FAMILIES)
def test_packed_prompts_equal_each_prompt_alone_with_its_adapter(kind):
    """Five prompts of different lengths over the base and two adapters, packed into one row into slots in another
    order: each slot's keys and values and each last logit equal transformers' forward over that prompt alone."""
    model = adapted(kind)
    assert packs(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 128, (n,), generator=g).tolist() for n in (5, 19, 1, 12, 30)]
    adapters = [None, "a", "a", "b", None]
    cache = KVCache.for_model(model.config, 6, 40, next(model.parameters()))
    slots = [4, 0, 5, 2, 1]
    with adapters_by_span(model, spans_of(adapters, [len(p) for p in prompts])):
        logits = prefill_packed(model, cache, slots, prompts)
    assert cache.end[slots].tolist() == [len(p) for p in prompts] and cache.start[slots].tolist() == [0] * 5
    for b, (ids, adapter, slot) in enumerate(zip(prompts, adapters, slots)):
        last, keys, values = alone(model, ids, adapter)
        torch.testing.assert_close(logits[b], last, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.keys[:, slot, :, :len(ids)], keys, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.values[:, slot, :, :len(ids)], values, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(logits[1], alone(model, prompts[1], "b")[0], rtol=1e-3)  # the adapter shows


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_packed_prompts_after_a_cached_prefix_equal_the_whole_prompts(kind):
    """Prompts whose first 16 tokens' keys and values were computed before (the prefix cache's, per adapter) packed
    after them: logits and slots equal the whole prompts alone; a prefix off by one position changes the logits."""
    model = adapted(kind)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(8, 128, (n,), generator=g).tolist() for n in (20, 33, 17)]
    adapters = ["b", None, "a"]
    whole = [alone(model, ids, adapter) for ids, adapter in zip(prompts, adapters)]
    known = (torch.stack([w[1][:, :, :16] for w in whole], 1), torch.stack([w[2][:, :, :16] for w in whole], 1))
    cache = KVCache.for_model(model.config, 3, 40, next(model.parameters()))
    rest = [p[16:] for p in prompts]
    with adapters_by_span(model, spans_of(adapters, [len(p) for p in rest])):
        logits = prefill_packed(model, cache, [2, 0, 1], rest, known)
        wrong = prefill_packed(model, KVCache.for_model(model.config, 3, 40, next(model.parameters())), [2, 0, 1],
                               rest, (known[0].roll(1, 3), known[1]))
    assert cache.end[[2, 0, 1]].tolist() == [20, 33, 17]
    for b, slot in enumerate([2, 0, 1]):
        n = len(prompts[b])
        torch.testing.assert_close(logits[b], whole[b][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.keys[:, slot, :, :n], whole[b][1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.values[:, slot, :, :n], whole[b][2], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(wrong, logits, rtol=1e-3, atol=1e-3)


def test_adapters_by_span_are_each_adapter_over_its_own_tokens():
    """A layer's output over a packed row with spans equals each adapter alone over its span's tokens."""
    model = adapted("llama")
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 11, layer.in_features, dtype=torch.float64)
    spans = [("a", 0, 4), (None, 4, 6), ("b", 6, 11)]
    with adapters_by_span(model, spans):
        got = layer(x)
    for name, start, stop in spans:
        if name is None:
            with disable_adapters(model):
                expected = layer(x[:, start:stop])
        else:
            set_adapter(model, name)
            expected = layer(x[:, start:stop])
        torch.testing.assert_close(got[:, start:stop], expected, rtol=1e-12, atol=1e-12)
    assert layer.token_spans is None  # put back after the block


def test_what_spans_cannot_split_is_refused():
    """DoRA, LoRA on embeddings and modules trained in full are not split by span: packs() is False and
    adapters_by_span says what to use instead; GPT-2 is not packed either."""
    from conftest import TINY
    for config in (LoRAConfig(r=2, alpha=4, targets="all-linear", dora=True),
                   LoRAConfig(r=2, alpha=4, targets=["q_proj", "embed_tokens"]),
                   LoRAConfig(r=2, alpha=4, targets=["q_proj"], trainable=["lm_head"]),
                   LoRAConfig(r=2, alpha=4, targets=["q_proj", "lm_head"])):  # the head reads a row a prompt
        model = tiny_llama_family("llama")
        add_lora(model, config, "x")
        assert not spans_apply(model) and not packs(model)
        with pytest.raises(LoRAError, match="adapters_by_row"):
            adapters_by_span(model, [("x", 0, 3)])
    assert not packs(TINY["gpt2"]())
    eager = tiny_llama_family("llama")
    eager.config._attn_implementation = "eager"
    assert not packs(eager)
    dynamic = tiny_llama_family("llama")  # rotary scaled by the longest position: a short prompt would change
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not packs(dynamic)


def test_spans_that_do_not_cover_the_batch_are_an_error():
    model = adapted("llama")
    with adapters_by_span(model, [("a", 0, 4)]), pytest.raises(LoRAError, match="cover 4 tokens but the batch has 5"):
        model.model.layers[0].self_attn.q_proj(torch.randn(1, 5, 32, dtype=torch.float64))


def test_a_bf16_model_packed_on_the_fused_passes_is_its_own_forward_to_bf16_rounding():
    """A bf16 model cast for inference (its fp32 residual stream) packs on the decode step's fused passes (norms,
    the residual sum with its norm, SwiGLU's middle): each prompt's last logits within bf16 rounding of transformers'
    forward over the prompt alone with its adapter, the same cast."""
    from lorakit.inference.compiled_step import fused_layer_ops
    from lorakit.inference.precision import cast_for_inference
    model = tiny_llama_family("llama")
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), "a")
    add_lora(model, LoRAConfig(r=2, alpha=8, targets=["q_proj", "v_proj"]), "b")
    randomize_lora(model, seed=1)
    cast_for_inference(model, "bf16")
    if fused_layer_ops(model.model.layers[0], torch.zeros(1, 1, 32)) is None:
        pytest.skip("no fused passes on this CPU (or no C++ step): the packed layer runs the modules")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(8, 128, (n,), generator=g).tolist() for n in (9, 30, 2, 17)]
    adapters = [None, "a", "a", "b"]
    cache = KVCache.for_model(model.config, 4, 40, next(model.parameters()))
    with adapters_by_span(model, spans_of(adapters, [len(p) for p in prompts])):
        logits = prefill_packed(model, cache, [0, 1, 2, 3], prompts)
    alone_logits = torch.stack([alone(model, ids, adapter)[0] for ids, adapter in zip(prompts, adapters)])
    assert (logits - alone_logits).abs().max() <= 0.02 * alone_logits.abs().max()
    assert (logits.argmax(-1) == alone_logits.argmax(-1)).all()


def test_a_bf16_model_packed_after_a_cached_prefix_on_lorakit_attention():
    """A bf16 model whose prompts' attention runs on lorakit's kernel (head_dim 32): prompts of 16 tokens or more
    after their adapter's cached prefix go through the kernel with a mask (a shorter one through SDPA); each last
    logit within bf16 rounding of transformers' forward over the whole prompt alone, the same cast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.inference.precision import cast_for_inference
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                         max_position_embeddings=64)).eval()
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), "a")
    randomize_lora(model, seed=4)
    cast_for_inference(model, "bf16")
    if model.config._attn_implementation != "lorakit":
        pytest.skip("lorakit's attention kernel is not built here: the prompts' attention stays SDPA's")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(8, 128, (n,), generator=g).tolist() for n in (40, 21, 33)]
    adapters = ["a", None, "a"]
    whole = [alone(model, ids, adapter) for ids, adapter in zip(prompts, adapters)]
    known = (torch.stack([w[1][:, :, :12] for w in whole], 1), torch.stack([w[2][:, :, :12] for w in whole], 1))
    rest = [p[12:] for p in prompts]  # 28, 9 and 21 tokens after the prefix
    cache = KVCache.for_model(model.config, 3, 64, next(model.parameters()))
    with adapters_by_span(model, spans_of(adapters, [len(p) for p in rest])):
        logits = prefill_packed(model, cache, [0, 1, 2], rest, known)
    want = torch.stack([w[0] for w in whole])
    assert (logits - want).abs().max() <= 0.03 * want.abs().max()
    assert (logits.argmax(-1) == want.argmax(-1)).all()
