"""The label-only chunked LM loss equals transformers' `model(...).loss`, with the same gradients (fp32, 1e-5)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, randomize_lora
from lorakit import LoRAConfig, add_lora
from lorakit.data.collate import packed_batch
from lorakit.data.examples import IGNORE, EncodedExample
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
