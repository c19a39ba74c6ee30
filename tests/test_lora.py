"""The LoRA engine: counts, math, equalities, multiple adapters, merge, errors, training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import GPTModel, TINY, lm_train_steps, model_inputs, randomize_lora
from lorakit import LoRAConfig, LoRAError, LoRALinear, add_lora, delete_adapter, disable_adapters, merge, merge_and_unload, parameter_report, set_adapter, unmerge
from lorakit.engine.registry import lora_layers
from lorakit.engine.targets import resolve_targets


def gpt_small_meta() -> GPTModel:
    with torch.device("meta"):  # 164M parameters, counted without allocating them
        return GPTModel()


def test_gpt2_small_counts_match_the_book():
    model = add_lora(gpt_small_meta(), LoRAConfig(r=8))
    rep = parameter_report(model)
    assert rep.trainable == 1_327_104
    assert rep.total == 164_364_288
    assert str(rep) == "trainable 1,327,104 / 164,364,288 (0.81%)"
    assert math.isclose(rep.fraction, 1_327_104 / 164_364_288)
    assert "out_head" not in {r["module"] for r in rep.rows}
    assert len(rep.rows) == 12 * 6
    assert sum(r["trainable"] for r in rep.rows) == rep.trainable


def test_gpt2_small_with_new_classification_head():
    model = gpt_small_meta()
    with torch.device("meta"):
        model.out_head = nn.Linear(768, 2)
    add_lora(model, LoRAConfig(r=8, trainable=["out_head"]))
    rep = parameter_report(model)
    assert rep.trainable == 1_328_642
    assert any(r["module"] == "out_head" and r["trainable"] == 768 * 2 + 2 for r in rep.rows)
    assert "out_head" in rep.table()


def test_all_linear_excludes_heads_and_vocab_sized_layers(tiny):
    name, model = tiny
    targets = resolve_targets(model, LoRAConfig())
    assert "lm_head" not in targets and targets
    kinds = {type(model.get_submodule(t)).__name__ for t in targets}
    assert kinds == ({"Conv1D"} if name == "gpt2" else {"Linear"})


def test_lora_math_against_manual_computation():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    W, b = base.weight, base.bias  # the layer takes these over; the wrapped module lets go of them
    layer = LoRALinear(base)
    assert layer.weight is W and base.weight is None
    layer.add("a", r=4, alpha=8)
    layer.active = "a"
    assert layer.lora_A["a"].shape == (4, 10) and layer.lora_B["a"].shape == (6, 4)
    assert torch.count_nonzero(layer.lora_B["a"]) == 0
    bound = 1 / math.sqrt(10)  # kaiming_uniform(a=sqrt(5)) on fan_in 10
    assert layer.lora_A["a"].abs().max() <= bound and layer.lora_A["a"].std() > bound / 4
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(3, 5, 10)
    expected = x @ W.T + b + (x @ layer.lora_A["a"].T @ layer.lora_B["a"].T) * (8 / 4)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_rslora_scaling():
    layer = LoRALinear(nn.Linear(4, 4))
    layer.add("a", r=16, alpha=8, rslora=True)
    assert layer.scaling["a"] == pytest.approx(8 / 4)
    assert LoRAConfig(r=16, alpha=8, rslora=True).scaling == pytest.approx(2.0)


def test_conv1d_matches_transposed_linear():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # nf=out, nx=in; weight (in, out)
    x = torch.randn(4, 10)
    base_out = conv(x)
    layer = LoRALinear(conv)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (10, 6)
    layer.add("a", r=2, alpha=2)
    layer.active = "a"
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    expected = base_out + x @ layer.lora_A["a"].T @ layer.lora_B["a"].T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_equalities_init_merge_disable(name):
    model = TINY[name]()
    inputs = model_inputs(name)
    with torch.no_grad():
        base = model(**inputs).logits
        add_lora(model, LoRAConfig(r=4, alpha=8))
        torch.testing.assert_close(model(**inputs).logits, base, atol=0, rtol=0)  # B = 0 at init
        randomize_lora(model)
        adapted = model(**inputs).logits
        assert (adapted - base).abs().max() > 1e-3
        with disable_adapters(model):
            torch.testing.assert_close(model(**inputs).logits, base, atol=1e-6, rtol=0)
        merge(model)
        assert all(layer.merged == "default" for _, layer in lora_layers(model))
        torch.testing.assert_close(model(**inputs).logits, adapted, atol=1e-5, rtol=0)
        with disable_adapters(model):  # a merged adapter is taken out for the block, then put back
            torch.testing.assert_close(model(**inputs).logits, base, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(**inputs).logits, adapted, atol=1e-5, rtol=0)
        unmerge(model)
        torch.testing.assert_close(model(**inputs).logits, adapted, atol=1e-5, rtol=0)


def test_merge_and_unload_restores_original_classes(tiny):
    name, model = tiny
    classes = {n: type(m) for n, m in model.named_modules()}
    inputs = model_inputs(name)
    add_lora(model, LoRAConfig(r=4))
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(**inputs).logits
        plain = merge_and_unload(model)
        assert {n: type(m) for n, m in plain.named_modules()} == classes
        assert not any(p.requires_grad is False and "lora" in n for n, p in plain.named_parameters())
        assert all("lora" not in k for k in plain.state_dict())
        torch.testing.assert_close(plain(**inputs).logits, adapted, atol=1e-5, rtol=0)


def test_named_adapters_switch_and_delete():
    model = TINY["llama"]()
    inputs = model_inputs("llama")
    with torch.no_grad():
        base = model(**inputs).logits
        add_lora(model, LoRAConfig(r=4), adapter="one")
        randomize_lora(model, seed=1)
        out_one = model(**inputs).logits
        add_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"]), adapter="two")
        layers = dict(lora_layers(model))
        q = layers["model.layers.0.self_attn.q_proj"]
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if "two" in layer.lora_B:
                    layer.lora_B["two"].normal_()
        out_two = model(**inputs).logits  # the newest adapter is active
        assert q.active == "two" and layers["model.layers.0.mlp.up_proj"].active is None
        assert (out_two - out_one).abs().max() > 1e-3
        # only the active adapter trains
        assert q.lora_A["two"].requires_grad and not q.lora_A["one"].requires_grad
        set_adapter(model, "one")
        torch.testing.assert_close(model(**inputs).logits, out_one, atol=1e-6, rtol=0)
        assert q.lora_A["one"].requires_grad and not q.lora_A["two"].requires_grad
        delete_adapter(model, "one")
        torch.testing.assert_close(model(**inputs).logits, base, atol=1e-6, rtol=0)  # nothing active now
        assert "one" not in q.lora_A
        assert not isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), LoRALinear)  # restored
        set_adapter(model, "two")
        torch.testing.assert_close(model(**inputs).logits, out_two, atol=1e-6, rtol=0)
    with pytest.raises(LoRAError, match="already exists"):
        add_lora(model, LoRAConfig(), adapter="two")
    with pytest.raises(LoRAError, match="no adapter named 'nope'"):
        set_adapter(model, "nope")


def test_target_name_suffix_and_regex_rules():
    model = TINY["llama"]()
    names = resolve_targets(model, LoRAConfig(targets=["q_proj", "model.layers.1.mlp.down_proj"]))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj"]
    names = resolve_targets(model, LoRAConfig(targets=r"model\.layers\.0\.self_attn\.[kv]_proj"))
    assert names == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    # a regex must match the whole name: 'q_proj' alone as a regex matches nothing
    with pytest.raises(LoRAError, match="select no linear layer"):
        resolve_targets(model, LoRAConfig(targets="q_proj"))
    names = resolve_targets(model, LoRAConfig(exclude=["mlp.down_proj", "mlp.up_proj", "mlp.gate_proj"]))
    assert all("mlp" not in n for n in names) and len(names) == 8


def test_config_errors_say_what_is_wrong():
    with pytest.raises(LoRAError, match="r must be a positive integer"):
        LoRAConfig(r=0)
    with pytest.raises(LoRAError, match="alpha must be > 0"):
        LoRAConfig(alpha=0)
    with pytest.raises(LoRAError, match=r"dropout must be in \[0, 1\)"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(LoRAError, match=r"dropout must be in \[0, 1\)"):
        LoRAConfig(dropout=-0.1)
    model = TINY["llama"]()
    with pytest.raises(LoRAError, match=r"target 'q_prj' matches no module; closest names: .*q_proj"):
        add_lora(model, LoRAConfig(targets=["q_prj"]))
    with pytest.raises(LoRAError, match="is a LlamaAttention; LoRA wraps nn.Linear, Conv1D and nn.Embedding"):
        add_lora(model, LoRAConfig(targets=["self_attn"]))
    with pytest.raises(LoRAError, match=r"trainable module 'scores' not found; closest names: .*"):
        add_lora(model, LoRAConfig(trainable=["scores"]))


def test_custom_wrapper_module():
    """Any nn.Module containing linears works, e.g. a wrapper that adds its own layers around a HF model."""
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TINY["llama"]()
            self.proj = nn.Linear(128, 3)

        def forward(self, input_ids):
            return self.proj(self.inner(input_ids=input_ids).logits)

    model = Wrapper()
    add_lora(model, LoRAConfig(r=2, targets=["q_proj"], trainable=["proj"]))
    rep = parameter_report(model)
    assert rep.trainable == 2 * (2 * 32 + 32 * 2) + 128 * 3 + 3  # two q_proj (A 2x32, B 32x2) + head
    assert [r["module"] for r in rep.rows][-1] == "proj"


def test_training_changes_only_lora_and_trainable_parameters():
    torch.manual_seed(0)
    model = TINY["llama"]()
    model.lm_head = nn.Linear(32, 128, bias=False)  # untie: a head trained in full
    add_lora(model, LoRAConfig(r=4, dropout=0.1, trainable=["lm_head"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if "lora_" in n} | {"lm_head.copies.default.weight"}
    assert "lm_head.original.weight" in before  # the base's own head stays, frozen
    losses = lm_train_steps(model, 5)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # bit-identical base


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("base", ["none", "weight", "weight+bias"])
def test_lora_function_matches_plain_autograd(p, base):
    """The fused, memory-light Function gives the plain implementation's output and gradients, mask for mask:
    base matmul + LoRA term in one (the dense path), or the LoRA term alone (the quantised-base path)."""
    from lorakit.engine.dropout import dropout_drops
    from lorakit.engine.function import LoRAFunction
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 24, generator=g, requires_grad=True)
    A = torch.randn(4, 24, generator=g, requires_grad=True)
    B = torch.randn(10, 4, generator=g, requires_grad=True)
    W = torch.randn(10, 24, generator=g) if base != "none" else None
    bias = torch.randn(10, generator=g) if base == "weight+bias" else None
    upstream = torch.randn(3, 7, 10, generator=g)
    torch.manual_seed(5)
    out = LoRAFunction.apply(x.reshape(-1, 24), W, bias, A, B, 2.0, p).view(3, 7, 10)
    grads = torch.autograd.grad(out, (x, A, B), upstream)
    torch.manual_seed(5)
    keep = torch.ones(x.numel() + 1)  # the last slot: where the padding entries of the drops go
    if p > 0:
        keep[dropout_drops(x.numel(), p)] = 0
    keep = keep[:-1].view(x.shape) / (1 - p)
    ref = ((x * keep) @ A.T @ B.T) * 2.0
    if W is not None:
        ref = ref + x @ W.T + (bias if bias is not None else 0)
    ref_grads = torch.autograd.grad(ref, (x, A, B), upstream)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_under_bf16_autocast_matches_fp32():
    """Mixed precision (accelerate's bf16 autocast, the GPU default): the LoRA term's matmuls run in bf16 while A and
    B stay fp32; training works and the adapter's gradients are fp32 and close to the fp32 ones."""
    grads = []
    for autocast in (False, True):
        model = add_lora(TINY["llama"](), LoRAConfig(r=4, dropout=0.0))
        randomize_lora(model)
        model.train()
        ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[1].items():
        assert g.dtype == torch.float32, n
        assert (g - grads[0][n]).norm() <= 0.05 * grads[0][n].norm(), n


def test_dropout_drops_are_iid_bernoulli_and_reproducible():
    """The drops, drawn as geometric gaps, behave like an elementwise Bernoulli(p) mask: the rate, no run
    structure (a pair of neighbours both dropped at p^2), no drift along the tensor, every position dropped as
    often; padded with n at the end, never short of it; same seed, same drops."""
    from lorakit.engine.dropout import dropout_drops, zero_at
    n, p = 2_000_000, 0.05
    torch.manual_seed(0)
    padded = dropout_drops(n, p)
    d = padded[padded < n]
    assert padded.dtype == torch.int64 and bool((d[1:] > d[:-1]).all()) and d[0] >= 0
    assert len(d) < len(padded) and bool((padded[len(d):] == n).all())  # the padding comes last
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(len(d) - n * p) < 6 * sd
    mask = torch.zeros(n, dtype=torch.bool)
    mask[d] = True
    both = (mask[1:] & mask[:-1]).sum().item()
    assert abs(both - (n - 1) * p * p) < 6 * ((n - 1) * p * p) ** 0.5  # independent neighbours
    assert abs(mask[: n // 2].sum().item() - mask[n // 2:].sum().item()) < 6 * sd
    assert mask[-1000:].sum().item() > 20  # drops reach the end (~50 expected)
    torch.manual_seed(0)
    assert torch.equal(dropout_drops(n, p), padded)
    assert bool((dropout_drops(100, 1e-9) == 100).all())
    assert dropout_drops(5, 0.999999)[:5].tolist() == [0, 1, 2, 3, 4]
    counts = torch.zeros(1001)
    for _ in range(200):
        counts += torch.bincount(dropout_drops(1000, 0.3), minlength=1001)
    counts = counts[:-1]  # every position dropped at ~p (60 of 200, sd 6.5)
    assert counts.min() > 20 and counts.max() < 100 and abs(counts.mean().item() - 60) < 2
    x = torch.randn(30, 40)
    drops = dropout_drops(x.numel(), 0.3)
    y = zero_at(x, drops)
    gone = torch.zeros(x.numel() + 1, dtype=torch.bool).index_fill_(0, drops, True)[:-1].view(x.shape)
    assert torch.equal(y, x.masked_fill(gone, 0)) and y.is_contiguous()
