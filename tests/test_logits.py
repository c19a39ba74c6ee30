"""fp32 logits for models cast to bf16 or int8 (inference/logits.py): the head's products summed in fp32 and never
rounded to bf16, by the skinny kernel, by the AMX micro-kernel on a packed copy, and by the fp32 GEMMs past both,
each against float64 on the same values; and the models' logits (transformers' forward, the Python step, the C++
step, with and without the packed copy) unrounded."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, tiny_llama_family
from lorakit.inference.compiled_step import compiled_model, extension
from lorakit.inference.decode import _left_padded, prefill, step
from lorakit.inference.int8 import quantize_blocks, rebuild
from lorakit.inference.kv_cache import KVCache
from lorakit.inference.precision import cast_for_inference, pack_for_batches

needs_extension = pytest.mark.skipif(extension() is None, reason="the C++ extension is not built here")


def within_fp32_sums(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """`got` is x·wᵀ of these (bf16-exact) values in fp32: within fp32 rounding of the float64 sums (K roundings of
    at most 2^-24 of the summed magnitudes), far below one bf16 rounding (2^-8)."""
    want = x.double() @ w.double().t()
    bound = x.shape[-1] * 2 ** -24 * (x.double().abs() @ w.double().abs().t()) + 1e-30
    return got.dtype == torch.float32 and bool(((got.double() - want).abs() <= bound).all())


@needs_extension
@pytest.mark.parametrize("m", [1, 5, 8, 16, 40])
@pytest.mark.parametrize("n,k", [(128, 96), (100, 33)])
def test_logits_kernels_against_float64_on_the_same_values(m, n, k):
    ext = extension()
    g = torch.Generator().manual_seed(m * 100 + n)
    x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    got = ext.skinny_logits(x, w)  # the kernel up to 32 rows (where the CPU has AVX-512 BF16), fp32 GEMMs past it
    assert got.shape == (m, n) and within_fp32_sums(got, x, w)
    assert not torch.equal(got, got.bfloat16().float())  # not bf16 values: nothing rounded them
    codes, scales = quantize_blocks(w.float())
    assert within_fp32_sums(ext.skinny_logits(x, codes, scales), x, rebuild(codes, scales))
    if ext.amx_supported():
        got = ext.amx_logits(x, ext.pack_for_amx(w), n)
        assert got.shape == (m, n) and within_fp32_sums(got, x, w)


def steps_logits(model, compiled: bool, rows: int) -> list[torch.Tensor]:
    """The prefill's and three steps' logits for `rows` prompts of different lengths (C++ step or Python step)."""
    prompts = [[5, 9, 3, 7], [11, 2, 8, 4, 6, 10, 12], [3, 3, 14]] * 3
    prompts = prompts[:rows]
    like = next(model.parameters())
    cache = KVCache.for_model(model.config, rows, 16, like)
    view = compiled_model(model, like.dtype) if compiled else None
    assert not compiled or view is not None
    out = [prefill(model, cache, 0, *_left_padded(prompts, 0, "cpu"))]
    for _ in range(3):
        out.append(step(model, cache, out[-1].argmax(-1), view))
    return out


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bf16_and_int8_models_give_unrounded_fp32_logits(name, dtype):
    """A model cast to bf16 or int8 computes its logits in fp32 from the rounded hidden state: transformers' forward
    gives the float64 head product of its last hidden state to fp32 rounding, and every path of the decode loop
    (the Python step, the C++ step at 1 and 8 rows, the latter on the AMX copy pack_for_batches makes) gives logits
    that a bf16 rounding would not (an fp32 head product of bf16 values is a bf16 value only by chance), the C++
    step's within bf16 rounding of the Python step's (their hidden states are computed by other kernels)."""
    model = tiny_llama_family("llama") if name == "llama" else TINY["gpt2"]()
    cast_for_inference(model, dtype)
    ids = torch.tensor([[5, 9, 3, 7, 11]])
    with torch.no_grad():
        logits, hidden = model(input_ids=ids).logits, model.base_model(input_ids=ids).last_hidden_state
    head = model.get_output_embeddings()
    weight = head.weight if dtype == "bf16" else rebuild(*head.frozen.stored())
    assert within_fp32_sums(logits[0], hidden[0].bfloat16(), weight)
    compiled = name == "llama" and extension() is not None
    for rows in (1, 8):
        packed = pack_for_batches(model) if rows == 8 else []
        try:
            if packed and dtype == "bf16" and extension().amx_supported():  # the head's copy is AMX's layout
                copy = vars(head)["packed_base"]
                assert type(copy).__name__ == "LogitsBase" and copy.packed() is not None
            python = steps_logits(model, False, rows)
            native = steps_logits(model, True, rows) if compiled else python
            for p, n in zip(python, native):
                assert p.dtype == n.dtype == torch.float32 and not torch.equal(n, n.bfloat16().float())
                assert (n - p).abs().max() <= 0.02 * p.abs().max()
        finally:
            for base in packed:
                base.unpack()


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_without_the_extension_the_logits_are_the_same_fp32_sums(monkeypatch, dtype):
    """Where the C++ extension is not built (or off the CPU) the head widens its weight to fp32 a chunk at a time:
    the same float64-exact products, summed in fp32."""
    import lorakit.inference.logits as logits
    model = tiny_llama_family("llama")
    cast_for_inference(model, dtype)
    monkeypatch.setattr(logits, "extension", lambda: None)
    head = model.get_output_embeddings()
    weight = head.weight if dtype == "bf16" else rebuild(*head.frozen.stored())
    x = torch.randn(3, 7, weight.shape[1]).bfloat16()
    with torch.no_grad():
        got = head(x)
    assert got.shape == (3, 7, weight.shape[0]) and within_fp32_sums(got.reshape(21, -1), x.reshape(21, -1), weight)


def test_an_adapter_on_the_head_after_packing_takes_the_plain_weight():
    """A LoRA adapter put on a head that pack_for_batches gave AMX's layout wraps the head's weight, not that copy
    (oneDNN's products would read it as their own layout), and the adapted head answers as the head plus its term."""
    from lorakit import LoRAConfig, add_lora
    model = tiny_llama_family("llama")
    cast_for_inference(model, "bf16")
    pack_for_batches(model)
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=["lm_head"]), "h")
    assert type(model.lm_head.frozen).__name__ == "DenseBase"
    x = torch.randn(9, model.lm_head.in_features).bfloat16()  # 9 rows: past PACKED_ROWS
    with torch.no_grad():
        assert torch.equal(model.lm_head(x), torch.nn.functional.linear(x, model.lm_head.frozen.weight))  # B is 0
