"""The label-only chunked LM loss equals transformers' `model(...).loss`, with the same gradients (fp32, 1e-5)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, randomize_lora
from lorakit import LoRAConfig, add_lora
from lorakit.data.collate import packed_batch
from lorakit.data.examples import IGNORE, EncodedExample
from lorakit.training import loss as loss_mod
from lorakit.training.loss import LinearCrossEntropy, causal_lm_loss, label_only_supported


def batch(seed: int = 0) -> dict:
    """Right-padded rows whose first tokens (the prompt) and padding carry no label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (3, 14), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for i, (prompt, length) in enumerate([(5, 14), (9, 11), (2, 7)]):
        labels[i, :prompt] = IGNORE
        labels[i, length:] = IGNORE
        mask[i, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def both(model, b: dict, chunk: int) -> tuple[tuple, tuple]:
    """(loss, gradients) from transformers' loss and from ours, on the same model and batch."""
    out = []
    for fn in (lambda: model(**b).loss, lambda: causal_lm_loss(model, b, chunk=chunk)):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        out.append((loss.item(), grads(model)))
    return out[0], out[1]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_label_only_loss_and_gradients_match_transformers(kind, method):
    model = TINY[kind]()
    assert label_only_supported(model)
    if method == "lora":
        add_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
        randomize_lora(model)
    else:
        model.requires_grad_(True)
    model.eval()  # no dropout: the two passes must see the same network
    (ref_loss, ref_grads), (loss, got) = both(model, batch(), chunk=5)  # chunks of 5 rows: several per batch
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert set(got) == set(ref_grads) and len(got) > 4
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)
    if method == "full":  # the tied embedding / LM head gets its gradient through both of its uses
        head = model.get_output_embeddings().weight
        assert head.grad is not None and head.grad.abs().sum() > 0


def test_label_only_loss_on_packed_rows():
    model = TINY["llama"]()
    add_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora(model)
    model.eval()
    g = torch.Generator().manual_seed(3)
    rows = [[EncodedExample(ids.tolist(), [IGNORE] * 3 + ids[3:].tolist()) for ids in
             (torch.randint(4, 128, (n,), generator=g) for n in lengths)] for lengths in ([6, 5, 4], [9, 3])]
    b = packed_batch(rows, pad_id=0)
    (ref_loss, ref_grads), (loss, got) = both(model, b, chunk=512)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    for name, gr in ref_grads.items():
        torch.testing.assert_close(got[name], gr, atol=1e-5, rtol=1e-4, msg=name)


def test_linear_cross_entropy_against_autograd_with_bias():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    b = torch.randn(30, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (11,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.t() + b, t, reduction="sum") * 0.5
    ref_g = torch.autograd.grad(ref, (h, w, b))
    got = LinearCrossEntropy.apply(h, w, b, t, 4) * 0.5
    got_g = torch.autograd.grad(got, (h, w, b))
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    for x, y in zip(got_g, ref_g):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # evaluation: the loss alone
        assert LinearCrossEntropy.apply(h, w, b, t, 4).item() == pytest.approx(ref.item() / 0.5, abs=1e-5)


def test_unsupported_models_are_not_claimed():
    assert not label_only_supported(TINY["t5"]())
    assert not label_only_supported(torch.nn.Linear(2, 2))


needs_softmax_kernel = pytest.mark.skipif(loss_mod.softmax_kernel(torch.zeros(1)) is None,
                                          reason="the kernel needs AVX-512 with BF16 and a C++ compiler")


def exact_cross_entropy(logits: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss and the softmax, in float64."""
    z = logits.double()
    return torch.logsumexp(z, 1) - z.gather(1, t[:, None])[:, 0], torch.softmax(z, 1)


@needs_softmax_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49152, 1000, 17])
def test_the_softmax_kernel_is_as_close_to_float64_as_torch(dtype, vocab):
    """Each row's loss and the softmax written over the logits: within what torch's operations keep in fp32 from the
    same logits (then rounded to their dtype), and near float64; rows of large and spread logits, tails of a vector."""
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=g) * torch.tensor([1., 5., 30., 100., 0.1, 8.])[:, None]).to(dtype)
    t = torch.randint(0, vocab, (6,), generator=g)
    want_loss, want_p = exact_cross_entropy(logits, t)
    ours = logits.clone()
    loss = loss_mod.softmax_kernel(ours).cross_entropy(ours, t, True)
    z = logits.float()
    torch_loss = torch.logsumexp(z, 1) - z.gather(1, t[:, None])[:, 0]
    torch_p = torch.softmax(z, 1).to(dtype)
    assert loss.dtype == torch.float32 and ours.dtype == dtype
    assert relative(loss.double(), want_loss) <= 1.5 * relative(torch_loss.double(), want_loss) + 1e-7
    assert relative(ours.double(), want_p) <= 1.5 * relative(torch_p.double(), want_p) + 1e-7
    assert relative(ours.double(), want_p) <= (1e-6 if dtype == torch.float32 else 4e-3)
    kept = logits.clone()
    assert torch.equal(loss_mod.softmax_kernel(kept).cross_entropy(kept, t, False), loss) and torch.equal(kept, logits)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@needs_softmax_kernel
@pytest.mark.parametrize("vocab", [17, 1000, 49152])
def test_rows_of_only_very_negative_logits(vocab):
    """Every logit of a row far below zero (an untrained head can give them): the loss and softmax float64's, however
    the row's length ends within a vector (the lanes past it must not count as logits)."""
    g = torch.Generator().manual_seed(vocab)
    logits = -200 + torch.randn(3, vocab, generator=g) * torch.tensor([0.1, 1.0, 10.0])[:, None]
    t = torch.randint(0, vocab, (3,), generator=g)
    want_loss, want_p = exact_cross_entropy(logits, t)
    ours = logits.clone()
    loss = loss_mod.softmax_kernel(ours).cross_entropy(ours, t, True)
    assert torch.isfinite(loss).all() and torch.isfinite(ours).all()
    assert relative(loss.double(), want_loss) <= 1e-6 and relative(ours.double(), want_p) <= 1e-5


@needs_softmax_kernel
def test_a_row_with_nan_or_infinity_gives_a_nan_loss():
    """As torch's operations: a diverged run's loss shows it (the kernel's exp clamps, so it checks)."""
    logits = torch.randn(4, 40)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    logits[3] = float("-inf")
    loss = loss_mod.softmax_kernel(logits).cross_entropy(logits, torch.tensor([0, 1, 2, 3]), True)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.isnan(logits[1:]).all() and torch.isfinite(logits[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loss_with_the_kernel_is_the_loss_without(dtype, monkeypatch):
    """LinearCrossEntropy's loss and gradients on the softmax kernel and on torch's operations (the path on other
    CPUs): the same to float rounding."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(300, 16, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 300, (37,), generator=g)
    results = []
    for kernel in (loss_mod.softmax_kernel, lambda h: None):
        monkeypatch.setattr(loss_mod, "softmax_kernel", kernel)
        loss = LinearCrossEntropy.apply(h, w, None, t, 16)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(*results):
        assert relative(a.double(), b.double()) <= tolerance
