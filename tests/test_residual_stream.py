"""A bf16 or int8 Llama-family model's residual stream in fp32 (inference/residual_stream.py) against transformers'
own forward with the same roundings made by hooks, the C++ step's fused norms on fp32 rows against the module, and
what it gains over a stream rounded to bf16 where the stream's entries are large."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_lora, tiny_gpt2, tiny_llama_family
from lorakit import LoRAConfig, add_lora, set_adapter
from lorakit.engine.precision import cast_params
from lorakit.inference.compiled_step import compiled_model, extension
from lorakit.inference.logits import keep_fp32_logits
from lorakit.inference.precision import cast_for_inference
from lorakit.inference.residual_stream import (keep_fp32_stream, keeps_fp32_stream, rounded_norm, rounded_tables,
                                               widened_rows)

IDS = torch.tensor([[5, 9, 3, 7, 11, 2, 8, 4, 6, 10, 12, 1], [3, 3, 14, 20, 21, 22, 23, 24, 0, 1, 2, 3]])
READ_THE_STREAM = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")


def adapted(kind: str):
    model = tiny_llama_family(kind)
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), "a")
    randomize_lora(model, seed=1)
    set_adapter(model, "a")
    return model


def hooked_fp32_stream(model):
    """The oracle: a copy cast to bf16 with fp32 logits, its stream made fp32 by hooks on transformers' modules
    alone (the embeddings' output widened, each product reading the stream given its input rounded to bf16, the
    rotary tables rounded), transformers' norms computing in fp32 on the fp32 rows."""
    out = copy.deepcopy(model)
    cast_params(out, torch.bfloat16, frozen_only=False)
    keep_fp32_logits(out)
    out.model.embed_tokens.register_forward_hook(lambda _, args, y: y.float())
    out.model.rotary_emb.register_forward_hook(lambda _, args, y: tuple(t.bfloat16() for t in y))
    for name, module in out.named_modules():
        if name.rsplit(".", 1)[-1] in READ_THE_STREAM:
            module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16(), *args[1:]))
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@torch.no_grad()
def test_the_stream_is_transformers_forward_with_an_fp32_stream(kind):
    """`--dtype bf16` on a Llama-family model with an unmerged adapter: every hidden state between layers fp32 and
    the logits the same bits as the hooked oracle's."""
    model = adapted(kind)
    want = hooked_fp32_stream(model)(IDS).logits
    assert cast_for_inference(model, "bf16") == "bf16" and keeps_fp32_stream(model)
    out = model(IDS, output_hidden_states=True)
    assert all(h.dtype == torch.float32 for h in out.hidden_states[:-1])  # the last is the final norm's, bf16
    assert next(model.parameters()).dtype == torch.bfloat16  # the weights stay bf16
    assert torch.equal(out.logits, want)
    keep_fp32_stream(model)  # again (an adapter loaded later): the same model
    assert torch.equal(model(IDS).logits, want)


def large_stream_llama():
    """A deeper Llama (8 layers) whose stream entries are large against what a layer adds: the embeddings' rows
    scaled 16x, the layers' output projections 10x."""
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                      head_dim=8, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(16)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(10)
            layer.mlp.down_proj.weight.mul_(10)
    return model


def stream_undone(model):
    """A copy of a model cast for inference with its stream back in bf16, as before residual_stream.py."""
    rounded = copy.deepcopy(model)
    for module in rounded.modules():
        if getattr(vars(module).get("forward"), "__func__", None) in (widened_rows, rounded_norm, rounded_tables):
            del module.forward
    assert keeps_fp32_stream(model) and not keeps_fp32_stream(rounded)
    return rounded


@torch.no_grad()
def test_the_fp32_stream_keeps_what_a_bf16_stream_loses():
    """With large stream entries, rounding the stream to bf16 at each sum loses part of every update; with the fp32
    stream the logits' error against fp32 is about half (the products, attention and norms' outputs still bf16 in
    both)."""
    model = large_stream_llama()
    fp32 = model(IDS).logits
    cast_for_inference(model, "bf16")
    error = {name: (m(IDS).logits - fp32).abs().mean() for name, m in (("fp32", model),
                                                                       ("bf16", stream_undone(model)))}
    assert error["fp32"] < 0.7 * error["bf16"]


def test_other_models_keep_their_dtype_throughout():
    """GPT-2, an fp32 model and a Llama whose norm is not LlamaRMSNorm's formula are left as they are."""
    gpt2 = tiny_gpt2()
    cast_for_inference(gpt2, "bf16")
    assert not keep_fp32_stream(gpt2) and "forward" not in vars(gpt2.transformer.wte)
    assert gpt2(IDS, output_hidden_states=True).hidden_states[1].dtype == torch.bfloat16
    assert not keep_fp32_stream(tiny_llama_family("llama"))  # fp32: nothing to keep

    class OtherNorm(type(tiny_llama_family("llama").model.norm)):
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 1.0

    model = tiny_llama_family("llama")
    model.model.norm.__class__ = OtherNorm
    cast_for_inference(model, "bf16")
    assert not keeps_fp32_stream(model) and "forward" not in vars(model.model.embed_tokens)


@pytest.mark.parametrize("rows,width", [(16, 576), (1, 100), (5, 1536)])
def test_fused_norms_on_fp32_rows_against_the_module(rows, width):
    """The C++ step's norms (fused_ops.cpp) on the fp32 stream: the sum of the stream and a bf16 update is the fp32
    sum, bit for bit, and the norm of fp32 rows is transformers' fp32 module rounded once to bf16 (within one
    rounding for the order of the sum of squares; nearly all the same bits)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    ext = extension()
    if ext is None or not ext.skinny_supported():
        pytest.skip("no AVX-512 BF16 on this CPU: the step keeps ATen's operations")
    g = torch.Generator().manual_seed(width)
    stream = torch.randn(rows, 1, width, generator=g) * 40
    update = (torch.randn(rows, 1, width, generator=g) * 3).bfloat16()
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = torch.randn(width, generator=g).bfloat16()
    assert ext.fused_norm_applies(stream) and not ext.fused_norm_applies(stream.double())

    def one_rounding(got, x):
        want = rounded_norm(norm, x)
        assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
        assert bool(((got.float() - want.float()).abs() <= 2 ** -8 * want.float().abs() + 1e-30).all())
        assert (got == want).float().mean() > 0.97

    one_rounding(ext.rms_norm(stream, norm.weight, 1e-5), stream)
    total, normed = ext.add_rms_norm(stream, update, norm.weight, 1e-5)
    assert total.dtype == torch.float32 and torch.equal(total, stream + update)
    one_rounding(normed, stream + update)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_the_compiled_step_takes_the_fp32_stream(dtype):
    """The C++ step describes a model with the fp32 stream (its replaced forwards are ones it reproduces), and a
    step's logits stay within bf16 rounding of the Python step's."""
    from test_compiled_step import PROMPTS, steps
    if extension() is None:
        pytest.skip("the C++ decode step could not be built here")
    model = adapted("qwen3")
    cast_for_inference(model, dtype)
    view = compiled_model(model, torch.bfloat16)
    assert view is not None
    native, _ = steps(model, view, PROMPTS, refill=True, forced=True)
    python, _ = steps(model, None, PROMPTS, refill=True, forced=True)
    assert (native - python).abs().max() <= 0.02 * python.abs().max()


def test_the_compiled_step_carries_the_stream_in_fp32():
    """On a model whose stream the bf16 rounding moves (large_stream_llama), the C++ step's logits are far closer to
    the Python step's with the fp32 stream than the Python step with a bf16 stream is: it does not round the stream."""
    from test_compiled_step import PROMPTS, steps
    if extension() is None:
        pytest.skip("the C++ decode step could not be built here")
    model = large_stream_llama()
    cast_for_inference(model, "bf16")
    native, _ = steps(model, compiled_model(model, torch.bfloat16), PROMPTS, refill=True, forced=True)
    python, _ = steps(model, None, PROMPTS, refill=True, forced=True)
    rounded, _ = steps(stream_undone(model), None, PROMPTS, refill=True, forced=True)
    assert (native - python).abs().max() < 0.5 * (rounded - python).abs().max()
