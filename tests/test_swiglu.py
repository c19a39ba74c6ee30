"""The SwiGLU product (`fuse_swiglu`, on by default in `lorakit train`): the same outputs and gradients as
transformers' `act_fn(gate) * up`, one (tokens x intermediate) activation fewer kept for backward per MLP."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from conftest import TINY, randomize_lora
from lorakit import LoRAConfig, add_lora
from lorakit.models.kernels import SwiGLU, fuse_swiglu


def test_swiglu_function_matches_autograd():
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(7, 33, generator=g) * 4).requires_grad_()  # large |x| too: sigmoid's tails
    up = torch.randn(7, 33, generator=g).requires_grad_()
    grad = torch.randn(7, 33, generator=g)
    want = F.silu(gate) * up
    want_g = torch.autograd.grad(want, (gate, up), grad)
    got = SwiGLU.apply(gate, up)
    got_g = torch.autograd.grad(got, (gate, up), grad)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    x = (gate.detach().double()[:2, :5].requires_grad_(), up.detach().double()[:2, :5].requires_grad_())
    assert torch.autograd.gradcheck(SwiGLU.apply, x)


def _saved_bytes(model, ids) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return total


def test_fused_mlps_give_the_same_loss_and_gradients_and_keep_less():
    plain = add_lora(TINY["llama"](), LoRAConfig(r=4, dropout=0.0))
    randomize_lora(plain)
    fused = copy.deepcopy(plain)
    assert fuse_swiglu(fused) == 2 and fuse_swiglu(TINY["gpt2"]()) == 0  # GPT-2's MLP is not gated
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    out = []
    for model in (plain, fused):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want_loss, want), (got_loss, got) = out
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)
    assert got.keys() == want.keys() and len(want) == 2 * 7 * 2
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5, msg=n)
    inter = plain.config.intermediate_size
    assert _saved_bytes(plain, ids) - _saved_bytes(fused, ids) == 2 * ids.numel() * inter * 4  # silu(gate), 2 layers
