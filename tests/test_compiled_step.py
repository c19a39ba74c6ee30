"""The C++ decode step against decode.py's Python step: the same logits and the same cache, bit for bit, for the
Llama family (Llama, Mistral, Qwen2, Qwen3) with and without LoRA, at one row and at rows of different lengths
(the masked path a refill makes); what it does not describe keeps the Python step; a failed build says why."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from conftest import randomize_lora, tiny_llama_family
from lorakit import LoRAConfig, adapters_by_row, add_lora, disable_adapters, set_adapter
from lorakit.inference.compiled_step import compiled_model, extension
from lorakit.inference.sampling import Choice
from lorakit.inference.kv_cache import KVCache
from lorakit.inference.decode import _left_padded, decode, prefill, step
from lorakit.inference.generation import merged


@pytest.fixture(scope="module", autouse=True)
def built():
    if extension() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build the C++ decode step (a C++ compiler and ninja)")
        pytest.skip("the C++ decode step could not be built here (see the line above)")


def with_lora(model):
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), "a")
    randomize_lora(model, seed=1)
    set_adapter(model, "a")
    return model


@torch.no_grad()
def steps(model, compiled, prompts: list[list[int]], refill: bool, count: int = 6, forced: bool = False):
    """Logits of `count` steps after prefilling `prompts` (together; or the last one apart, as a refill is, so
    the rows hold different spans and the step takes its masked path), and the cache at the end. Each step feeds
    the argmax of the last logits, or with `forced` fixed tokens (so two dtypes see the same inputs)."""
    config = model.config
    cache = KVCache(config.num_hidden_layers, len(prompts), config.num_key_value_heads, 40, config.head_dim,
                    next(model.parameters()))
    groups = [list(range(len(prompts) - 1)), [len(prompts) - 1]] if refill else [list(range(len(prompts)))]
    logits = torch.empty(len(prompts), config.vocab_size)
    for slots in groups:
        ids, mask = _left_padded([prompts[s] for s in slots], 0, "cpu")
        logits[slots] = prefill(model, cache, slots[0], ids, mask)
    out = []
    for i in range(count):
        tokens = torch.full((len(prompts),), 7 + i) if forced else logits.argmax(-1)
        logits = step(model, cache, tokens, compiled)
        out.append(logits)
    return torch.stack(out), cache


PROMPTS = [[5, 9, 3, 7], [11, 2, 8, 4, 6, 10, 12], [3, 3, 14], [20, 21, 22, 23, 24]]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("adapter", [None, "unmerged", "merged", "disabled"])
def test_compiled_step_equals_python_step_bit_for_bit(name, adapter):
    model = tiny_llama_family(name) if adapter is None else with_lora(tiny_llama_family(name))
    state = {"merged": lambda: merged(model), "disabled": lambda: disable_adapters(model)}.get(adapter)
    with state() if state else torch.no_grad():
        compiled = compiled_model(model, torch.float32)
        assert compiled is not None
        for prompts, refill in ((PROMPTS[:1], False), (PROMPTS, False), (PROMPTS, True)):
            python_logits, python_cache = steps(model, None, prompts, refill)
            compiled_logits, compiled_cache = steps(model, compiled, prompts, refill)
            assert torch.equal(compiled_logits, python_logits)
            assert torch.equal(compiled_cache.keys, python_cache.keys)
            assert torch.equal(compiled_cache.values, python_cache.values)
    if adapter == "unmerged":  # the adapter really is in the compiled step's sums
        with disable_adapters(model):
            base_logits, _ = steps(model, compiled_model(model, torch.float32), PROMPTS, True)
        assert (base_logits - compiled_logits).abs().max() > 1e-3


@torch.no_grad()
def mixed_steps(model, compiled: bool, rows: list, count: int = 6):
    """Each prompt prefilled alone with its row's adapter (as the serving engine admits requests), then `count`
    steps of all rows at once, each with its own adapter (adapters_by_row), in C++ or Python."""
    from lorakit.engine import adapter_in_use
    config = model.config
    cache = KVCache(config.num_hidden_layers, len(rows), config.num_key_value_heads, 40, config.head_dim,
                    next(model.parameters()))
    logits = torch.empty(len(rows), config.vocab_size)
    for s, (prompt, name) in enumerate(zip(PROMPTS, rows)):
        ids, mask = _left_padded([prompt], 0, "cpu")
        with adapter_in_use(model, name) if name else disable_adapters(model):
            logits[s] = prefill(model, cache, s, ids, mask)[0]
    out = []
    with adapters_by_row(model, rows):
        view = compiled_model(model, torch.float32) if compiled else None
        assert view is not None or not compiled
        for _ in range(count):
            logits = step(model, cache, logits.argmax(-1), view)
            out.append(logits)
    return torch.stack(out), cache


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rows_of_different_adapters_compiled_equal_the_python_step_bit_for_bit(name):
    """adapters_by_row through the C++ step: the same logits and cache as the Python step, and each row really
    computes with its own adapter (a row of the base gets the base's logits)."""
    model = with_lora(tiny_llama_family(name))
    add_lora(model, LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), "b")
    randomize_lora(model, seed=2)
    rows = ["a", None, "b", "a"]
    python_logits, python_cache = mixed_steps(model, False, rows)
    compiled_logits, compiled_cache = mixed_steps(model, True, rows)
    assert torch.equal(compiled_logits, python_logits)
    assert torch.equal(compiled_cache.keys, python_cache.keys)
    assert torch.equal(compiled_cache.values, python_cache.values)
    base_logits, _ = mixed_steps(model, True, [None] * 4)
    assert torch.allclose(compiled_logits[:, 1], base_logits[:, 1], atol=1e-5)
    assert (compiled_logits[:, 0] - base_logits[:, 0]).abs().max() > 1e-3
    assert (compiled_logits[:, 2] - base_logits[:, 2]).abs().max() > 1e-3


def test_what_the_compiled_step_does_not_describe_keeps_the_python_step():
    model = with_lora(tiny_llama_family("llama"))
    assert compiled_model(model, torch.float32) is not None
    assert compiled_model(model, torch.float64) is None  # hidden states of another dtype than the weights
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert compiled_model(model, torch.float32) is None
    handle.remove()
    mlp = model.model.layers[1].mlp  # a forward replaced by a partial, as accelerate's offloading replaces it
    mlp.forward = functools.partial(type(mlp).forward, mlp)
    assert compiled_model(model, torch.float32) is None
    del mlp.forward
    assert compiled_model(model, torch.float32) is not None
    model.train()  # LoRA dropout is random in training: not the compiled step's
    add_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.1, targets="attention"), "dropped")
    set_adapter(model, "dropped")
    assert compiled_model(model, torch.float32) is None
    dora = tiny_llama_family("qwen2")
    add_lora(dora, LoRAConfig(r=2, alpha=4, dora=True, targets="attention"), "d")
    set_adapter(dora, "d")
    assert compiled_model(dora, torch.float32) is None
    with adapters_by_row(dora, ["d", None]):  # DoRA rows in a mixed batch
        assert compiled_model(dora, torch.float32) is None
    qlora = tiny_llama_family("mistral")
    add_lora(qlora, LoRAConfig(r=2, alpha=4, quantize="nf4", quant_backend="torch"), "q")
    set_adapter(qlora, "q")
    assert compiled_model(qlora, torch.float32) is None


def test_a_failed_build_says_why_and_decodes_with_the_python_step(monkeypatch, capsys):
    from torch.utils import cpp_extension

    from lorakit.models import native
    model = tiny_llama_family("qwen3")
    expected = [t for _, t in decode(model, PROMPTS, Choice.greedy(5), set(), 0, slots=2)]

    def no_ninja(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    native.extension.cache_clear()
    try:
        assert extension() is None
        err = capsys.readouterr().err
        assert "the C++ decode step could not be built (Ninja is required to load C++ extensions)" in err
        assert [t for _, t in decode(model, PROMPTS, Choice.greedy(5), set(), 0, slots=2)] == expected
        monkeypatch.setenv("LORAKIT_COMPILED_STEP", "0")
        native.extension.cache_clear()
        assert extension() is None and "could not be built" not in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        native.extension.cache_clear()
    assert extension() is not None


@pytest.mark.parametrize("m", [1, 3, 12, 16, 32, 40])
@pytest.mark.parametrize("n,k", [(64, 96), (70, 100), (5, 31)])
def test_skinny_kernels_against_fp32_on_the_same_values(m, n, k):
    """The decode step's own products (skinny_gemm.cpp): bf16 weights, and int8 weights with a scale per output
    channel or per block of 32 along a row, each output within one bf16 rounding of the fp32 product of the same
    values (past the kernel's rows, at::linear's bf16 GEMMs: within the rounding of their sums too); on a CPU without
    AVX-512 BF16 the bf16 product is at::linear's."""
    ext = extension()
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w, b = (torch.randn(*shape, generator=g).bfloat16() for shape in ((m, k), (n, k), (n,)))
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    got = ext.skinny_linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    if not ext.skinny_supported():
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), atol=0, rtol=0)
    tolerance = 2 ** -8 * want.abs() + 2 ** -8 * (x.float().abs() @ w.float().abs().t()) * 2 ** -8
    assert bool(((got.float() - want).abs() <= tolerance + 1e-6).all())
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) / 64
    want8 = torch.nn.functional.linear(x.float(), codes.float() * scales[:, None], b.float())
    got8 = ext.skinny_linear_int8(x, codes, scales, b)
    gemm = m > 32  # past the kernel's rows: bf16 GEMMs on rebuilt weights, their sums rounded too
    spread = (x.float().abs() @ (codes.float() * scales[:, None]).abs().t()) * 2 ** -8 * gemm
    assert bool(((got8.float() - want8).abs() <= 2 ** -8 * want8.abs() + spread + 1e-3).all())
    blocks = torch.rand(n, (k + 31) // 32, generator=g) / 64  # a scale per 32 weights of a row
    want_blocks = torch.nn.functional.linear(x.float(), codes.float() * blocks.repeat_interleave(32, 1)[:, :k],
                                             b.float())
    got_blocks = ext.skinny_linear_int8(x, codes, blocks, b)
    spread = (x.float().abs() @ (codes.float() * blocks.repeat_interleave(32, 1)[:, :k]).abs().t()) * 2 ** -8 * gemm
    assert bool(((got_blocks.float() - want_blocks).abs() <= 2 ** -8 * want_blocks.abs() + spread + 1e-3).all())


BOTH_PRODUCT_FORMS = """
import torch
from lorakit.inference.compiled_step import extension
ext = extension()
top = ext.skinny_max_rows()
g = torch.Generator().manual_seed(top)
w = torch.randn(98, 200, generator=g).bfloat16()  # 98 rows: the kernel's last two W rows one at a time
close, invariant = True, True
for rows in (1, 5, top - 1, top, top + 1):  # chunks of 6 and fewer; past the kernel's rows, at::linear
    x = torch.randn(rows, 200, generator=g).bfloat16()
    want = torch.nn.functional.linear(x.float(), w.float())
    sums = x.float().abs() @ w.float().abs().t()
    for got in (ext.skinny_linear(x, w), ext.skinny_linear(x.float(), w), ext.skinny_logits(x, w)):
        bf16 = got.dtype == torch.bfloat16  # rounded once to bf16 (the logits stay fp32)
        gemm = bf16 and rows > top  # at::linear past the kernel's rows: oneDNN's sums round in bf16 too
        bound = 2 ** -8 * want.abs() * bf16 + 2 ** -16 * sums * (1 + gemm) + 1e-6
        close &= bool(((got.float() - want).abs() <= bound).all())
    if rows <= top:
        alone = torch.cat([ext.skinny_linear(x[i:i + 1], w) for i in range(rows)])
        invariant &= torch.equal(ext.skinny_linear(x, w), alone)
print(ext.skinny_dot_rows(), top, close, invariant, ext.packed_rows())
"""


@pytest.mark.parametrize("dot", [False, True])
def test_both_forms_of_the_bf16_products_for_several_rows(dot):
    """The kernel's two forms of a bf16 product for several rows, each as LORAKIT_SKINNY_DOT picks it in a fresh
    process (by default dot products on AMD, FMAs on Intel): dot products up to 24 rows, FMAs up to 12, from one
    row to one past the kernel's, bf16 and fp32 x, bf16 outputs and fp32 logits, each within one bf16 rounding of
    fp32 (the logits: within fp32 sums); with dot products a row's outputs are the same bits in a batch as alone
    (one row always takes them); the C++ step's packed copies take over past the kernel's rows without AMX."""
    if not extension().skinny_supported():
        pytest.skip("no AVX-512 BF16 on this CPU")
    env = dict(os.environ, LORAKIT_SKINNY_DOT="1" if dot else "0")
    done = subprocess.run([sys.executable, "-c", BOTH_PRODUCT_FORMS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    said, top, close, batch_invariant, packed_rows = done.stdout.split()
    assert (said, int(top), close) == (str(dot), 24 if dot else 12, "True")
    assert batch_invariant == "True" or not dot
    assert int(packed_rows) == (8 if extension().amx_supported() else int(top) + 1)


def test_a_product_form_neither_0_nor_1_says_so_and_keeps_the_default():
    """LORAKIT_SKINNY_DOT other than 0 or 1 is not taken silently: one line names it, and the CPU's default stays."""
    if not extension().skinny_supported():
        pytest.skip("no AVX-512 BF16 on this CPU")
    script = "from lorakit.inference.compiled_step import extension; print(extension().skinny_dot_rows())"
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_SKINNY_DOT"}
    default = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    done = subprocess.run([sys.executable, "-c", script], env=env | {"LORAKIT_SKINNY_DOT": "yes"},
                          capture_output=True, text=True, check=True)
    assert done.stdout == default.stdout
    assert "LORAKIT_SKINNY_DOT=yes is neither 0 nor 1; the CPU's default form is used" in done.stderr
    assert "LORAKIT_SKINNY_DOT" not in default.stderr


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
@pytest.mark.parametrize("adapter", [None, "unmerged", "mixed"])
def test_bf16_compiled_step_against_the_python_step_and_fp32(adapter, dtype):
    """With the model cast to bf16 or int8 (--dtype) the C++ step runs the bf16 or int8 kernel: its logits are the
    Python step's (F.linear in bf16; the same int8 kernel) to bf16 rounding, and both are fp32's to a few bf16
    roundings (and int8's) through two layers."""
    import contextlib

    from lorakit.inference.precision import cast_for_inference
    model = tiny_llama_family("llama") if adapter is None else with_lora(tiny_llama_family("llama"))
    if adapter == "mixed":
        add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), "b")
        randomize_lora(model, seed=2)
    rows = (lambda: adapters_by_row(model, ["a", "b", None, "a"])) if adapter == "mixed" else contextlib.nullcontext
    with rows():
        fp32_logits, _ = steps(model, None, PROMPTS, refill=adapter != "mixed", forced=True)
    cast_for_inference(model, dtype)
    with rows():
        view = compiled_model(model, torch.bfloat16)
        assert view is not None  # the bf16 or int8 model is one the C++ step describes
        native, _ = steps(model, view, PROMPTS, refill=adapter != "mixed", forced=True)
        python, _ = steps(model, None, PROMPTS, refill=adapter != "mixed", forced=True)
    scale = fp32_logits.abs().max()
    assert (native - python).abs().max() <= 0.02 * scale
    assert (native - fp32_logits).abs().max() <= 0.05 * scale


def attention_in_float64(q, keys, values, start, end, scaling):
    """Softmax attention of each row's one query over its positions [start, end), query head h on kv head
    h // (heads / kv_heads), in float64 on the same values."""
    rows, heads, _, head_dim = q.shape
    group = heads // keys.shape[1]
    out = torch.zeros(rows, heads, head_dim, dtype=torch.float64)
    for b in range(rows):
        for h in range(heads):
            k = keys[b, h // group, start[b]:end[b]].double()
            weights = torch.softmax(scaling * (k @ q[b, h, 0].double()), 0)
            out[b, h] = weights @ values[b, h // group, start[b]:end[b]].double()
    return out.reshape(rows, 1, heads * head_dim)


@pytest.mark.parametrize("rows,width", [(16, 576), (1, 100), (5, 1536), (300, 576)])  # 300: rows split over threads
def test_fused_bf16_ops_against_transformers_and_aten(rows, width):
    """The bf16 step's fused passes (fused_ops.cpp) against what they replace on the same bf16 values: transformers'
    LlamaRMSNorm and apply_rotary_pos_emb, ATen's add and silu · up. The rotation and the sum are the same bits; the
    norm (its sum of squares in another order) and SiLU (another exp) within one bf16 rounding."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
    ext = extension()
    if not ext.skinny_supported():
        pytest.skip("no AVX-512 BF16 on this CPU: the step keeps ATen's operations")
    g = torch.Generator().manual_seed(width)
    a, b, up = (torch.randn(rows, 1, width, generator=g).bfloat16() * 3 for _ in range(3))
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = torch.randn(width, generator=g).bfloat16()

    def within_one_rounding(got, want):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert bool(((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs()).all())
        assert (got == want).float().mean() > 0.95

    within_one_rounding(ext.rms_norm(a, norm.weight, 1e-5), norm(a))
    total, normed = ext.add_rms_norm(a, b, norm.weight, 1e-5)
    assert torch.equal(total, a + b)
    within_one_rounding(normed, norm(a + b))
    within_one_rounding(ext.silu_mul(a, up), torch.nn.functional.silu(a) * up)
    heads, kv_heads, head_dim, length = 9, 3, 64, 40
    q = torch.randn(rows, 1, heads * head_dim, generator=g).bfloat16()
    k, v = (torch.randn(rows, 1, kv_heads * head_dim, generator=g).bfloat16() for _ in range(2))
    angles = torch.rand(rows, 1, head_dim // 2, generator=g) * 30
    cos, sin = (f(torch.cat([angles, angles], -1)).bfloat16() for f in (torch.cos, torch.sin))
    keys, values = (torch.zeros(rows + 1, kv_heads, length, head_dim, dtype=torch.bfloat16) for _ in range(2))
    column = torch.randint(0, length, (rows,), generator=g)
    rotated = ext.rotary_store(q, k, v, cos, sin, keys[:rows], values[:rows], column)
    shape = (rows, 1, -1, head_dim)
    want_q, want_k = apply_rotary_pos_emb(q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), cos, sin)
    assert torch.equal(rotated, want_q)
    for row in range(rows):
        assert torch.equal(keys[row, :, column[row]], want_k[row, :, 0])
        assert torch.equal(values[row, :, column[row]], v.view(shape)[row, 0])
    assert int((keys != 0).sum()) == int((want_k != 0).sum()) and int((values != 0).sum()) == int((v != 0).sum())
    with pytest.raises(RuntimeError, match="a column outside the cache"):
        ext.rotary_store(q, k, v, cos, sin, keys[:rows], values[:rows], column + length)


def test_a_mixed_view_takes_other_rows_of_the_same_adapters():
    """The engine's view for rows mixed by adapter is kept while the rows use the same adapters: given the new rows'
    masks (Model.set_row_masks) its logits are those of a view built for them; other adapters get a view of their
    own, and masks that do not fit the view are refused."""
    from lorakit.inference.batch_adapters import BatchAdapters
    from lorakit.inference.precision import cast_for_inference
    model = with_lora(tiny_llama_family("llama"))
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), "b")
    randomize_lora(model, seed=2)
    cast_for_inference(model, "bf16")
    adapters = BatchAdapters(model, torch.bfloat16)
    adapters.mix(["a", "b", None, "a"])
    first = adapters.mixed_view()
    adapters.mix(["b", None, "a", "b"])
    assert adapters.mixed_view() is first
    got, _ = steps(model, first, PROMPTS, refill=False, forced=True)
    want, _ = steps(model, compiled_model(model, torch.bfloat16), PROMPTS, refill=False, forced=True)
    assert torch.equal(got, want)
    adapters.mix(["a", "a", None, "a"])
    assert adapters.mixed_view() is not first
    with pytest.raises(RuntimeError, match="a view of their own"):
        first.set_row_masks([None] * (len(model.model.layers) * 7 + 1))
    adapters.mix(None)


@pytest.mark.parametrize("rows,k,n,ranks", [(16, 576, 1536, (3, 8, 5)), (5, 40, 100, (3, 8, 5)),
                                             (1, 1536, 576, (3, 8, 5)), (7, 64, 192, (3, 8, 5)),
                                             (40, 576, 576, (3, 8, 4))])  # an odd total rank; 10 rows an adapter
def test_mixed_lora_term_against_float64_on_the_same_values(rows, k, n, ranks):
    """mixed_lora_add (rows mixed by adapter, the bf16 C++ step's LoRA term) against what mixed_forward computes, in
    float64 on the same bf16 values: each row's x·Aᵀ over its own adapter's columns (ranks 3, 8 and 5 or 4, so runs
    start at odd columns, and an odd total) rounded to bf16, then out + h·Bᵀ rounded once; rows on the base untouched;
    a mask that is not one run a row is refused."""
    ext = extension()
    if not ext.skinny_supported():
        pytest.skip("no AVX-512 BF16 on this CPU: the step keeps ATen's operations")
    g = torch.Generator().manual_seed(rows * k)
    R = sum(ranks)
    x = torch.randn(rows, 1, k, generator=g).bfloat16()
    A, B = torch.randn(R, k, generator=g).bfloat16(), (torch.randn(n, R, generator=g) / 4).bfloat16()
    out = torch.randn(rows, 1, n, generator=g).bfloat16()
    owner = [i % 4 for i in range(rows)]  # adapter 0, 1, 2 or 3: the base
    mask = torch.zeros(rows, 1, R, dtype=torch.bfloat16)
    for row, a in enumerate(owner):
        if a < 3:
            mask[row, 0, sum(ranks[:a]):sum(ranks[:a + 1])] = 1
    h = (x.double() @ A.double().T).bfloat16().double() * mask.double()
    want = (out.double() + h @ B.double().T).bfloat16()
    got = out.clone()
    assert ext.mixed_lora_applies(got, x, A, mask)
    ext.mixed_lora_add(got, x, A, ext.mixed_lora_pairs(B), mask)
    assert bool(((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-3).all())
    assert (got == want).float().mean() > 0.9
    base_rows = [row for row, a in enumerate(owner) if a == 3]
    assert torch.equal(got[base_rows], out[base_rows])
    mask[0, 0, R - 1] = 1  # row 0 now owns two runs
    assert not ext.mixed_lora_applies(got, x, A, mask)


@pytest.mark.parametrize("rows,heads,kv_heads,head_dim,length", [(16, 9, 3, 64, 300), (1, 4, 2, 32, 17),
                                                                 (3, 8, 1, 128, 70), (2, 6, 6, 96, 33)])
def test_decode_attention_against_float64_on_the_same_values(rows, heads, kv_heads, head_dim, length):
    """The bf16 step's attention (decode_attention.cpp): one query per row over that row's own [start, end) of a
    strided view of the cache, grouped-query heads; each output within a bf16 rounding of float64 attention on the
    same bf16 values, as SDPA's is."""
    ext = extension()
    if not ext.skinny_supported():
        pytest.skip("no AVX-512 BF16 on this CPU: the step keeps SDPA")
    g = torch.Generator().manual_seed(rows + head_dim)
    q = torch.randn(rows, heads, 1, head_dim, generator=g).bfloat16()
    cache_k, cache_v = (torch.randn(rows + 2, kv_heads, length + 8, head_dim, generator=g).bfloat16() * scale
                        for scale in (3, 1))
    keys, values = cache_k[:rows, :, :length], cache_v[:rows, :, :length]  # strided views, as a narrowed cache's
    start = torch.randint(0, length // 2, (rows,), generator=g)
    end = torch.randint(length // 2 + 1, length + 1, (rows,), generator=g)
    assert ext.decode_attention_applies(q, keys)
    got = ext.decode_attention(q, keys, values, start, end, head_dim ** -0.5)
    want = attention_in_float64(q, keys, values, start, end, head_dim ** -0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1, heads * head_dim)
    assert bool(((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-4).all())
    positions = torch.arange(length)
    mask = ((positions >= start[:, None]) & (positions < end[:, None]))[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(rows, kv_heads, -1, head_dim), keys, values, attn_mask=mask, scale=head_dim ** -0.5)
    assert (got.double() - want).abs().max() <= (sdpa.reshape(rows, 1, -1).double() - want).abs().max() + 1e-3
    assert not ext.decode_attention_applies(q.float(), keys.float())  # fp32 keeps SDPA (generate's bits)


def tiny_llama_head_dim_32():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_step_with_the_attention_kernel_and_packed_weights_against_the_python_step(packed):
    """In bf16 (head_dim 32) the C++ step attends with decode_attention over each row's own span and, from
    `packed_rows()` (8 with AMX, past the skinny kernel's rows without), multiplies by the weights' packed copies
    (precision.pack_for_batches), here at that many rows: its logits stay within bf16 rounding of the Python step's
    (SDPA, F.linear) with adapters mixed by row over rows of different lengths, and packing moves no logit beyond
    that rounding."""
    from lorakit.engine.frozen_base import packed_linear
    from lorakit.inference.precision import cast_for_inference, pack_for_batches
    ext = extension()
    if not ext.skinny_supported():
        pytest.skip("no AVX-512 BF16 on this CPU")
    model = with_lora(tiny_llama_head_dim_32())
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"), "b")
    randomize_lora(model, seed=2)
    assert ext.packed_rows() == (8 if ext.amx_supported() else ext.skinny_max_rows() + 1)
    copies = -(-ext.packed_rows() // len(PROMPTS))  # rows: the packed products' side of packed_rows()
    prompts, names = PROMPTS * copies, ["a", "b", None, "a"] * copies
    with adapters_by_row(model, names):
        fp32_logits, _ = steps(model, None, prompts, refill=False, forced=True)
    cast_for_inference(model, "bf16")
    q, keys = torch.zeros(1, 4, 1, 32, dtype=torch.bfloat16), torch.zeros(1, 2, 9, 32, dtype=torch.bfloat16)
    assert ext.decode_attention_applies(q, keys)  # this model's shapes take the kernel
    with adapters_by_row(model, names):
        plain = steps(model, compiled_model(model, torch.bfloat16), prompts, refill=False, forced=True)[0]
        if packed:
            assert pack_for_batches(model)  # the head's copy is AMX's layout: none on a CPU without AMX
            assert (packed_linear(model.lm_head) is not None) == ext.amx_supported()
        native = steps(model, compiled_model(model, torch.bfloat16), prompts, refill=False, forced=True)[0]
        python = steps(model, None, prompts, refill=False, forced=True)[0]
    scale = fp32_logits.abs().max()
    assert (native - python).abs().max() <= 0.02 * scale and (native - plain).abs().max() <= 0.02 * scale
    assert (native - fp32_logits).abs().max() <= 0.05 * scale
