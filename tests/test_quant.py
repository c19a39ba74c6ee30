"""NF4 against the QLoRA paper's definition, computed independently here."""
from __future__ import annotations

import pytest
import torch

from lorakit.engine.quant import NF4_LEVELS, NF4Matmul, block_scales, dequantize_nf4, quantize_nf4


def reference_levels(offset: float = 0.9677083) -> torch.Tensor:
    """QLoRA's NF4: 8 positive and 7 negative N(0,1) quantiles, an exact zero, normalised to [-1, 1]."""
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.abs().max()


def test_levels_are_normal_quantiles():
    torch.testing.assert_close(NF4_LEVELS.double(), reference_levels(), atol=1e-6, rtol=0)


def test_codes_are_the_nearest_level_of_each_block_absmax_scaled_value():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)  # 1,920 values: 30 blocks of 64
    q = quantize_nf4(w, double_quant=False)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    torch.testing.assert_close(block_scales(q), absmax)
    nearest = (blocks[..., None] / absmax[:, None, None] - reference_levels().float()).abs().argmin(-1)
    expected = (reference_levels().float()[nearest] * absmax[:, None]).view(48, 40)
    torch.testing.assert_close(dequantize_nf4(q), expected, atol=1e-6, rtol=0)
    err = (dequantize_nf4(q) - w).abs() / absmax.repeat_interleave(64).view(48, 40)
    assert err.max() <= (NF4_LEVELS.diff().max() / 2) + 1e-6  # never more than half the widest level gap


@pytest.mark.parametrize("shape", [(128, 576), (37, 53), (3,)])
def test_double_quantisation_round_trip_and_size(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    q = quantize_nf4(w)
    single = quantize_nf4(w, double_quant=False)
    exact = block_scales(single)
    # 8-bit scales: each absmax off by at most half an int8 step of its 256-block
    step = (exact - exact.mean()).abs().max() / 127
    assert (block_scales(q) - exact).abs().max() <= step / 2 + 1e-9
    back = dequantize_nf4(q)
    assert back.shape == w.shape and back.dtype == w.dtype
    rel = (back - w).norm() / w.norm()
    assert rel < 0.12  # NF4 on normal weights: about 0.09 relative error
    if w.numel() >= 64 * 256:
        assert q.nbytes() / (w.numel() * 4) <= 0.16


def test_nf4_matmul_matches_dequantised_linear_and_keeps_no_weight():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    q = quantize_nf4(w)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    y = NF4Matmul.apply(x, q, b)
    assert y.grad_fn.saved_tensors == ()  # only the packed codes, held by reference: no full-size weight
    ref_x = x.detach().clone().requires_grad_(True)
    ref = ref_x @ dequantize_nf4(q).T + b
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    up = torch.randn(5, 24, generator=g)
    (gx,) = torch.autograd.grad(y, x, up)
    (gref,) = torch.autograd.grad(ref, ref_x, up)
    torch.testing.assert_close(gx, gref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ QLoRA layers

from conftest import TINY, lm_train_steps, model_inputs, randomize_lora  # noqa: E402
from lorakit import LoRAConfig, add_lora, load_adapter, merge, merge_and_unload, parameter_report, save_adapter  # noqa: E402
from lorakit.engine.registry import lora_layers  # noqa: E402


def _logits(model, name="llama"):
    with torch.no_grad():
        return model(**model_inputs(name)).logits


def _round_trip(w: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "bitsandbytes":
        from lorakit.engine.quant import bnb_dequantize, bnb_linear4bit
        return bnb_dequantize(bnb_linear4bit(w))
    return dequantize_nf4(quantize_nf4(w))


BACKENDS = ["torch", pytest.param("bitsandbytes", marks=pytest.mark.skipif(
    not __import__("lorakit.engine.quant").engine.quant.bitsandbytes_available(), reason="bitsandbytes not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_qlora_at_init_equals_the_dequantised_base(name, backend):
    ref = TINY[name]()
    with torch.no_grad():  # the reference: every adapted weight replaced by its NF4 round trip, in plain layers
        for t in add_lora(TINY[name](), LoRAConfig()).lorakit_adapters["default"].modules:
            w = ref.get_submodule(t).weight
            back = _round_trip(w.t() if name == "gpt2" else w, backend)
            w.copy_(back.t() if name == "gpt2" else back)
    model = add_lora(TINY[name](), LoRAConfig(quantize="nf4", quant_backend=backend))
    assert all(layer.quantized and layer.weight is None and layer.quant_backend == backend
               for _, layer in lora_layers(model))
    torch.testing.assert_close(_logits(model, name), _logits(ref, name), atol=1e-5, rtol=0)
    assert parameter_report(model).total == parameter_report(add_lora(TINY[name](), LoRAConfig())).total


def test_qlora_training_lowers_the_loss_and_keeps_the_codes():
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, dropout=0.05, quantize="nf4", quant_backend="torch"))
    codes = {n: b.clone() for n, b in model.named_buffers() if "nf4" in n}
    losses = lm_train_steps(model, 6)
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if "nf4" in n)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_qlora_merge_and_peft_interop(tmp_path):
    from peft import PeftModel
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, quantize="nf4"))
    randomize_lora(model)
    adapted = _logits(model)
    save_adapter(model, tmp_path)
    merge(model)  # dequantise, then merge: full precision
    assert all(not layer.quantized and layer.weight.dtype == torch.float32 for _, layer in lora_layers(model))
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=0)
    plain = merge_and_unload(model)
    assert type(plain.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    torch.testing.assert_close(_logits(plain), adapted, atol=1e-5, rtol=0)
    # the adapter is an ordinary PEFT adapter: PEFT puts it on a full-precision base ...
    theirs = _logits(PeftModel.from_pretrained(TINY["llama"](), str(tmp_path)).eval())
    ours_fp = _logits(load_adapter(TINY["llama"](), tmp_path))
    torch.testing.assert_close(theirs, ours_fp, atol=1e-5, rtol=0)
    # ... and loading it back with quantize="nf4" re-quantises the base: the QLoRA model's output again
    torch.testing.assert_close(_logits(load_adapter(TINY["llama"](), tmp_path, quantize="nf4")), adapted,
                               atol=1e-5, rtol=0)


def test_requantised_merge_warns_and_rounds():
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, quantize="nf4"))
    randomize_lora(model)
    adapted = _logits(model)
    with pytest.warns(UserWarning, match="rounds"):
        merge(model, requantize=True)
    assert all(layer.quantized for _, layer in lora_layers(model))
    diff = (_logits(model) - adapted).abs().max()
    assert diff > 0
    # the oracle: merge in full precision, then round each merged weight through NF4 on its own
    reference = add_lora(TINY["llama"](), LoRAConfig(r=4, quantize="nf4"))
    randomize_lora(reference)
    backend = next(layer for _, layer in lora_layers(reference)).quant_backend
    merge(reference)
    with torch.no_grad():
        for _, layer in lora_layers(reference):
            layer.weight.copy_(_round_trip(layer.weight, backend))
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=0)


def test_qlora_run_end_to_end_and_eval_requantises(tmp_path):
    import json

    from conftest import save_tiny
    from lorakit.cli import main
    from lorakit.models.trained import load_adapted
    from test_train import recipe, write_instruct
    data = write_instruct(tmp_path / "a.jsonl")
    run = tmp_path / "run"
    r = recipe(tmp_path, model=str(save_tiny("llama", tmp_path / "m")), task="instruct", data=str(data),
               split=[0.6, 0.2, 0.2], max_length=128)
    assert main(["train", r, "--out", str(run), "--quantize", "nf4", "--eval"]) == 0
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["quantize"] == "nf4"
    model, _, _ = load_adapted(run / "adapter")
    assert all(layer.quantized for _, layer in lora_layers(model))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["metrics"]["qlora"]["loss"] < ev["metrics"]["base"]["loss"]
    assert main(["train", r, "--out", str(tmp_path / "x"), "--optimizer", "paged_adamw_8bit"]) == 2 \
        or torch.cuda.is_available()


def test_quantize_all_puts_every_other_linear_in_nf4_but_not_the_head():
    model = add_lora(TINY["llama"](), LoRAConfig(r=2, targets=["q_proj", "v_proj"], quantize="nf4", quantize_all=True))
    layers = dict(lora_layers(model))
    assert all(layer.quantized for layer in layers.values())
    assert layers["model.layers.0.mlp.up_proj"].active is None and not layers["model.layers.0.mlp.up_proj"].lora_A
    assert layers["model.layers.0.self_attn.q_proj"].active == "default"
    assert "lm_head" not in layers
    rep = parameter_report(model)
    assert rep.trainable == 2 * (2 * (32 + 32) + 2 * (32 + 16))  # 2 layers x (q: r(in+out), v: r(in+out))
    assert rep.total == parameter_report(add_lora(TINY["llama"](), LoRAConfig(r=2, targets=["q_proj", "v_proj"]))).total
    plain = merge_and_unload(model)  # every layer back to nn.Linear with dequantised weights
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith("proj"))


@pytest.mark.skipif(not __import__("lorakit.engine.quant").engine.quant.bitsandbytes_available(), reason="bitsandbytes not installed")
def test_bitsandbytes_backend_trains_merges_and_matches_ours():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(3)) * 0.02
    # the same format: both round trips land on the same NF4 levels, up to the 8-bit scale rounding
    assert (_round_trip(w, "bitsandbytes") - _round_trip(w, "torch")).abs().max() < 2e-3 * w.abs().max() / 0.02
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, dropout=0.05, quantize="nf4", quant_backend="bitsandbytes"))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer.frozen.linear).__name__ == "Linear4bit"
    from lorakit.engine.quant import bnb_linear4bit, bnb_nbytes
    assert 0.125 < bnb_nbytes(bnb_linear4bit(torch.randn(1536, 576))) / (4 * 1536 * 576) < 0.135  # ~4.13 bits/weight
    losses = lm_train_steps(model, 6)
    assert losses[-1] < losses[0]
    adapted = _logits(model.eval())
    merge(model)
    assert all(not layer.quantized for _, layer in lora_layers(model))
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=0)


@pytest.mark.skipif(not __import__("lorakit.engine.quant").engine.quant.bitsandbytes_available(), reason="bitsandbytes not installed")
def test_bitsandbytes_layers_keep_the_standard_layout_in_eval_mode():
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on an eval-mode forward; that fails on
    layers narrower than its blocks and changes the layout dequantise and merge read. Our layers opt out."""
    from lorakit.engine.quant import bnb_dequantize
    model = add_lora(TINY["llama"](), LoRAConfig(r=4, quantize="nf4", quant_backend="bitsandbytes"))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    before = bnb_dequantize(layer.frozen.linear).clone()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        evaluated = model.eval()(ids).logits  # the path bitsandbytes repacks on
    trained = model.train()(ids).logits.detach()
    torch.testing.assert_close(evaluated, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(bnb_dequantize(layer.frozen.linear), before, atol=0, rtol=0)
