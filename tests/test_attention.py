"""lorakit's training attention (models/attention.py, csrc/causal_attention.cpp) against float64 SDPA on the same
values, and in models against transformers' SDPA: outputs and gradients, masks, grouped queries, the fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit import LoRAConfig, add_lora
from lorakit.models import attention
from lorakit.models.attention import CausalAttention, bool_mask, use_attention_kernel

needs_kernel = pytest.mark.skipif(attention.kernel() is None or not attention.kernel().attention_applies(
    torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), None),
    reason="the kernel needs AVX-512 with BF16 and a C++ compiler")


def qkv(batch: int, heads: int, kv_heads: int, T: int, D: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v as transformers hands them over: views of [B, T, heads, D] transposed to [B, heads, T, D]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, T, heads, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, T, kv_heads, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(batch, T, kv_heads, D, generator=g).to(dtype).transpose(1, 2)
    return [t.requires_grad_() for t in (q, k, v)]


def attend(fn, q, k, v, grad):
    """fn's output and the gradients of (output · grad) for q, k, v, as float64."""
    q, k, v = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return [t.double() for t in (out, q.grad, k.grad, v.grad)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def allowed(T: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    seen = torch.ones(T, T, dtype=torch.bool)
    seen = seen.tril() if causal else seen
    return seen if mask is None else mask & seen


MASKS = {
    "none": lambda B, T: None,
    "padding": lambda B, T: torch.arange(T).expand(B, 1, T, T) >= torch.tensor([0, 5])[:B].view(B, 1, 1, 1),
    "packed": lambda B, T: (torch.arange(T) < 17).view(T, 1).eq((torch.arange(T) < 17).view(1, T)).expand(1, 1, T, T),
    "prefix": lambda B, T: prefix_mask(T),
}


def prefix_mask(T: int) -> torch.Tensor:
    """Packed rows with a shared preamble (data/collate.py): each example sees its own block and the first 3 tokens."""
    segment = torch.tensor([-2] * 3 + [0] * 9 + [1] * (T - 12))[:T]
    q, k = segment.view(T, 1), segment.view(1, T)
    return ((q == k) | ((k == -2) & (q >= 0))).expand(1, 1, T, T)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,T,D", [(9, 3, 37, 64), (4, 4, 70, 128), (6, 2, 33, 32), (2, 1, 5, 16),
                                             (3, 1, 29, 48), (4, 2, 19, 80)])
@pytest.mark.parametrize("mask_kind,causal", [("none", True), ("none", False), ("padding", True), ("padding", False),
                                             ("packed", True), ("prefix", True)])
def test_kernel_against_float64_attention(dtype, heads, kv_heads, T, D, mask_kind, causal):
    """Each output and gradient within what torch's own SDPA in the same dtype keeps of float64 (x1.5), and within
    an absolute bound (fp32: 1e-5; bf16: a few roundings); a row that may see nothing gives zeros and no gradient."""
    q, k, v = qkv(2, heads, kv_heads, T, D, dtype)
    mask = MASKS[mask_kind](2, T)
    grad = torch.randn(2, heads, T, D, generator=torch.Generator().manual_seed(1))
    seen = allowed(T, causal, mask)
    full = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=True))
    ours = attend(lambda q, k, v: CausalAttention.apply(q, k, v, mask, causal, D ** -0.5).transpose(1, 2), q, k, v,
                  grad)
    rows = seen.expand(2, 1, T, T).any(-1, keepdim=True)  # [B, 1, T, 1]: rows that see something
    exact = attend(full, *(t.double() for t in (q, k, v)), grad.double())
    exact[0] = exact[0].where(rows, 0.0)
    theirs = attend(full, q, k, v, grad)
    theirs[0] = theirs[0].where(rows, 0.0)
    bound = 1e-5 if dtype == torch.float32 else 6e-3
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert torch.isfinite(a).all(), name
        assert relative(a, c) <= max(1.5 * relative(b.nan_to_num(), c), 1e-6), name
        assert relative(a, c) <= bound, name
    assert (ours[0].where(~rows, 0.0) == 0).all() and (ours[1].where(~rows, 0.0) == 0).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,T,S,D", [(9, 3, 37, 60, 64), (4, 2, 5, 40, 16), (6, 2, 33, 34, 32)])
def test_the_forward_over_more_keys_than_queries(dtype, heads, kv_heads, T, S, D):
    """A prompt's prefill after cached positions (S keys, T queries, a mask: each row sees the cached ones but for
    a row's padding, and the new ones causally; one row nothing): the output within what SDPA in the same dtype keeps
    of float64 (x1.5); such a call without a mask is not taken (its causality would be ambiguous), nor its
    backward."""
    g = torch.Generator().manual_seed(T + S)
    q = torch.randn(2, heads, T, D, generator=g).to(dtype)
    k, v = (torch.randn(2, kv_heads, S, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(2, 1, T, S, dtype=torch.bool).tril(S - T)
    mask[1, :, :, :3] = False  # row 1's first keys: padding
    mask[1, :, 0] = False  # a query that sees nothing
    seen = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
    rows = mask.any(-1, keepdim=True)
    ours = CausalAttention.apply(q, k, v, mask, False, D ** -0.5).transpose(1, 2).double()
    exact = seen(q.double(), k.double(), v.double()).where(rows, 0.0)
    theirs = seen(q, k, v).double().nan_to_num().where(rows, 0.0)
    assert relative(ours, exact) <= max(1.5 * relative(theirs, exact), 1e-6)
    assert (ours.where(~rows, 0.0) == 0).all()
    ext = attention.kernel()
    assert ext.attention_applies(q, k, v, mask) and not ext.attention_applies(q, k, v, None)
    out, lse = ext.attention_forward(q, k, v, mask, False, D ** -0.5)
    with pytest.raises(RuntimeError, match="the same positions"):
        ext.attention_backward(out.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, mask, False, D ** -0.5)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention written out (torch's flash kernel itself gives NaN for such scores)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    return torch.softmax(scores, dim=-1) @ v


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_scores_and_a_row_that_sees_only_itself(dtype):
    """Scores in the hundreds, either sign (a softmax's exp would under- or overflow without its max taken right),
    and causal rows whose few visible scores are all far below zero: float64's answer."""
    q, k, v = qkv(1, 4, 2, 21, 32, dtype, seed=5)
    grad = torch.randn(1, 4, 21, 32, generator=torch.Generator().manual_seed(6))
    q2, _, v2 = qkv(1, 2, 2, 21, 32, dtype, seed=7)
    k2 = (-q2).detach().requires_grad_()  # each row's score for itself -8·|q|² (about -256): row 0 sees only that
    for q, k, v, scaling in ((q, k, v, 8.0), (q, k, v, -8.0), (q2, k2, v2, 8.0)):
        grad = grad[:, :q.shape[1]]
        ours = attend(lambda q, k, v: CausalAttention.apply(q, k, v, None, True, scaling).transpose(1, 2), q, k, v,
                      grad)
        exact = attend(lambda q, k, v: softmax_attention(q, k, v, scaling), *(t.double() for t in (q, k, v)),
                       grad.double())
        for name, a, c in zip(("out", "dq", "dk", "dv"), ours, exact):
            assert torch.isfinite(a).all(), name
            assert relative(a, c) <= (1e-4 if dtype == torch.float32 else 3e-2), name


def base_llama(head_dim: int = 16):
    """A two-layer Llama with grouped queries (4 heads over 2) of `head_dim`, random weights."""
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      head_dim=head_dim, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    for name, p in model.named_parameters():  # norms start as ones: drawn, so that a norm's weight shows
        if "norm" in name:
            p.data = 1 + 0.3 * torch.randn(p.shape)
    return model


def llama(head_dim: int = 16):
    """base_llama with LoRA r=4 on every linear, B random."""
    model = base_llama(head_dim)
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_trains_on_the_kernel_as_on_sdpa(dtype):
    """A Llama's loss and LoRA gradients with the kernel are SDPA's (fp32: to float rounding; a bf16 base: within
    bf16's), with right padding (a mask) and without (plain causal rows); the kernel did take the calls."""
    from lorakit.engine import store_frozen
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (3, 40), generator=g)
    for mask in (torch.ones_like(ids), (torch.arange(40) < torch.tensor([[40], [31], [12]])).long()):
        sdpa, ours = llama(), llama()
        store_frozen(sdpa, dtype)
        store_frozen(ours, dtype)
        assert use_attention_kernel(ours) and ours.config._attn_implementation == "lorakit"
        loss, grads, calls = loss_grads_and_calls(ours, ids, mask, CausalAttention)
        assert calls == 2
        assert_trains_alike((loss, grads), loss_and_grads(sdpa, ids, mask), dtype)


def loss_grads_and_calls(model, ids: torch.Tensor, mask: torch.Tensor, function) -> tuple[float, list, int]:
    """loss_and_grads, and how many times the autograd Function `function` was applied on the way."""
    calls = []
    original = function.apply
    function.apply = lambda *a: calls.append(1) or original(*a)
    try:
        return (*loss_and_grads(model, ids, mask), len(calls))
    finally:
        function.apply = original


def assert_trains_alike(ours: tuple, theirs: tuple, dtype: torch.dtype) -> None:
    """Two (loss, gradients) the same to float rounding (fp32) or within bf16's."""
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ours[0] == pytest.approx(theirs[0], rel=tolerance / 10)
    for a, b in zip(ours[1], theirs[1]):
        assert relative(a.double(), b.double()) <= tolerance


def test_calls_the_kernel_does_not_take_go_to_sdpa():
    """head_dim 8 (not a multiple of 16), attention dropout while training, a KV cache: transformers' SDPA, the same
    numbers as a model left on SDPA; and generation with a cache gives SDPA's tokens."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 20), generator=g)
    for head_dim, dropout in ((8, 0.0), (16, 0.1)):
        sdpa, ours = llama(head_dim), llama(head_dim)
        assert use_attention_kernel(ours)  # routed, then given attention dropout: each call goes to SDPA
        for m in (sdpa, ours):
            m.config.attention_dropout = dropout
            for layer in m.model.layers:
                layer.self_attn.attention_dropout = dropout
        calls = []
        original = CausalAttention.apply
        CausalAttention.apply = lambda *a: calls.append(1) or original(*a)
        try:
            torch.manual_seed(0)
            loss, grads = loss_and_grads(ours.train(), ids, torch.ones_like(ids))
        finally:
            CausalAttention.apply = original
        torch.manual_seed(0)
        want, expected = loss_and_grads(sdpa.train(), ids, torch.ones_like(ids))
        assert calls == [] and loss == want
        assert all(torch.equal(a, b) for a, b in zip(grads, expected))
    sdpa, ours = llama(), llama()
    use_attention_kernel(ours)
    args = dict(input_ids=ids[:, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.eval().generate(**args), sdpa.eval().generate(**args))


@needs_kernel
@torch.no_grad()
def test_a_bf16_model_for_generation_prefills_on_the_kernel():
    """`--dtype bf16` routes a model's attention to the kernel: a prompt's prefill after a cached prefix (more keys
    than queries, left padding) takes it, and its logits are SDPA's within bf16 rounding."""
    from lorakit.inference.precision import cast_for_inference
    from transformers import DynamicCache
    ours, sdpa = llama(), llama()
    for m in (ours, sdpa):
        cast_for_inference(m.eval(), "bf16")
    sdpa.set_attn_implementation("sdpa")
    assert ours.config._attn_implementation == "lorakit"
    g = torch.Generator().manual_seed(4)
    prefix, ids = torch.randint(0, 128, (2, 9), generator=g), torch.randint(0, 128, (2, 20), generator=g)
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[1, 9:13] = 0  # row 1's prompt is shorter: left padding after the prefix
    logits, calls = [], []
    original = CausalAttention.apply
    CausalAttention.apply = lambda q, k, *a: calls.append(k.shape[2] > q.shape[2]) or original(q, k, *a)
    try:
        for m in (ours, sdpa):
            past = DynamicCache(config=m.config)
            m(input_ids=prefix, past_key_values=past, use_cache=True)
            logits.append(m(input_ids=ids, attention_mask=mask, past_key_values=past).logits.float())
    finally:
        CausalAttention.apply = original
    assert calls == [False, False, True, True]  # each layer's call of both passes; the second's over more keys
    q, k = torch.zeros(1, 4, 20, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 29, 16, dtype=torch.bfloat16)
    more = torch.ones(1, 1, 20, 29, dtype=torch.bool)
    assert attention.takes(q, k, k, more, 0.0, {})
    assert not attention.takes(q[:, :, :15], k, k, more[:, :, :15], 0.0, {})  # a few queries: SDPA's
    with torch.enable_grad():  # a gradient through a longer cache: SDPA's (the kernel's backward takes T = S only)
        assert not attention.takes(q.requires_grad_(), k, k, more, 0.0, {})
    kept = mask[:, 9:].bool()
    assert relative(logits[0][kept], logits[1][kept]) <= 2e-2


def test_float_masks_that_only_block_are_read_as_bools():
    """lorakit's packed rows carry an additive mask (0, or the dtype's lowest): read as the bools it means; one that
    biases scores is not the kernel's to take."""
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for dtype in (torch.float32, torch.bfloat16):
        additive = torch.zeros(2, 1, 6, 6, dtype=dtype).masked_fill_(~causal, torch.finfo(dtype).min)
        assert torch.equal(bool_mask(additive), causal.expand(2, 1, 6, 6))
        biased = additive.clone()
        biased[1, 0, 4, 2] = -0.5
        assert bool_mask(biased) is False
    assert bool_mask(None) is None and bool_mask(causal) is causal
    additive = torch.zeros(1, 1, 6, 6).masked_fill_(~causal, torch.finfo(torch.float32).min)
    assert torch.equal(bool_mask(additive), causal.expand(1, 1, 6, 6))
    additive[0, 0, 5, 0] = torch.finfo(torch.float32).min  # changed in place: read again, not taken from before
    assert not bool_mask(additive)[0, 0, 5, 0] and bool_mask(additive)[0, 0, 5, 1]
    expanded = causal.expand(3, 1, 6, 6)  # transformers' masks may be broadcast views: the kernel reads them whole
    assert bool_mask(expanded).is_contiguous() and torch.equal(bool_mask(expanded), expanded)
    with torch.inference_mode():
        frozen = torch.zeros(1, 1, 6, 6).masked_fill_(~causal, torch.finfo(torch.float32).min)
        assert torch.equal(bool_mask(frozen), causal.expand(1, 1, 6, 6))


def test_only_a_model_on_sdpa_is_routed_and_only_where_the_cpu_runs_the_kernel(monkeypatch):
    """A model on eager attention (it asked for the weights) keeps it; a model with attention dropout, or on a CPU
    without AVX-512 BF16, is not routed and the kernel is not even built."""
    from lorakit.models import native
    model = llama()
    model.set_attn_implementation("eager")
    assert use_attention_kernel(model) is False and model.config._attn_implementation == "eager"
    monkeypatch.setattr(native, "extension", lambda *a: pytest.fail("built where it cannot run"))
    dropping = llama()  # every training call would go to SDPA: not routed (BERT's, GPT-2's defaults)
    dropping.config.attention_dropout = 0.1
    assert use_attention_kernel(dropping) is False and dropping.config._attn_implementation == "sdpa"
    monkeypatch.setattr(native, "cpu_runs_kernels", lambda: False)
    model = llama()
    assert use_attention_kernel(model) is False and model.config._attn_implementation == "sdpa"


@needs_kernel
def test_lorakit_train_attends_with_the_kernel(tmp_path, monkeypatch):
    """`lorakit train` on a CPU routes a Llama's attention and norms to lorakit's kernels (run.json says so), packed
    rows included, and reaches, to float rounding, the adapter of the same run left on transformers' SDPA and
    RMSNorm."""
    import json

    from safetensors.torch import load_file

    import lorakit.training.setup as setup
    from conftest import word_tokenizer
    from lorakit.cli import main
    from test_train import recipe, write_instruct
    base_llama().save_pretrained(tmp_path / "llama")
    word_tokenizer().save_pretrained(tmp_path / "llama")
    data = write_instruct(tmp_path / "a.jsonl", n=16)
    r = recipe(tmp_path, model=str(tmp_path / "llama"), task="instruct", data=str(data), max_steps=3, dropout=0.0,
               precision="fp32", split=[1.0, 0.0, 0.0], pack=True)
    assert main(["train", r, "--out", str(tmp_path / "ours")]) == 0
    monkeypatch.setattr(setup, "use_attention_kernel", lambda model: False)
    monkeypatch.setattr(setup, "use_norm_kernel", lambda model: 0)
    assert main(["train", r, "--out", str(tmp_path / "sdpa")]) == 0
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("ours", "sdpa")]
    assert [run["attention"] for run in runs] == ["lorakit", "sdpa"]
    assert [run["rms_norm"] for run in runs] == ["lorakit", "transformers"]
    ours, theirs = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("ours", "sdpa"))
    assert ours.keys() == theirs.keys() and all(ours[k].abs().max() > 0 for k in ours if "lora_B" in k)  # trained
    for key in ours:
        assert relative(ours[key].double(), theirs[key].double()) <= 1e-4, key
