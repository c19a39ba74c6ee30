"""The SwiGLU product (`fuse_swiglu`, on by default in `lorakit train`): the same outputs and gradients as
transformers' `act_fn(gate) * up`, one (tokens x intermediate) activation fewer kept for backward per MLP."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, randomize_lora
from lorakit import LoRAConfig, add_lora
from lorakit.models import kernels, native
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


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


needs_kernel = pytest.mark.skipif(native.training_kernels() is None,
                                  reason="the kernel needs AVX-512 with BF16 and a C++ compiler")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 256, 1536), (3, 37), (1, 5)])
def test_the_kernel_is_as_close_to_float64_as_torch(dtype, shape):
    """On a CPU with AVX-512 BF16 the product and both gradients are lorakit's kernel: within what torch's
    operations keep in the same dtype (and near float64), gates far into sigmoid's tails; the forward rounds where
    torch rounds (silu, then the product), so in bf16 its bits are torch's but for exp's last bits."""
    g = torch.Generator().manual_seed(shape[-1])
    gate = (torch.randn(shape, generator=g) * 6).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=g).to(dtype)
    calls = []
    ext = native.training_kernels()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "training_kernels", lambda: calls.append(1) or ext)
        ours = SwiGLU.apply(gate, up)
        ours_g = torch.autograd.grad(ours, (gate, up), grad)
    assert calls
    theirs = F.silu(gate) * up
    theirs_g = torch.autograd.grad(theirs, (gate, up), grad)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    exact = F.silu(g64) * u64
    exact_g = torch.autograd.grad(exact, (g64, u64), grad.double())
    for a, b, c in zip((ours, *ours_g), (theirs, *theirs_g), (exact, *exact_g)):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert relative(a.double(), c.detach()) <= 1.5 * relative(b.double(), c.detach()) + 1e-7
        assert relative(a.double(), c.detach()) <= (1e-6 if dtype == torch.float32 else 4e-3)
    if dtype == torch.bfloat16:
        assert (ours == theirs).float().mean() >= 0.999


def test_calls_the_kernel_does_not_take_run_torchs_operations():
    """fp16, a strided input, float64: torch's operations, their exact numbers."""
    g = torch.Generator().manual_seed(3)
    for gate, up in ((torch.randn(4, 32, generator=g).half(), torch.randn(4, 32, generator=g).half()),
                     (torch.randn(4, 64, generator=g)[:, ::2], torch.randn(4, 32, generator=g)),
                     (torch.randn(4, 32, generator=g).double(), torch.randn(4, 32, generator=g).double())):
        gate, up = gate.requires_grad_(), up.requires_grad_()
        ours = SwiGLU.apply(gate, up)
        grad = torch.ones_like(ours)
        ours_g = torch.autograd.grad(ours, (gate, up), grad)
        sig = torch.sigmoid(gate)
        assert torch.equal(ours, F.silu(gate) * up)
        assert torch.equal(ours_g[1], (grad * gate) * sig)


def test_a_differentiated_backward_and_torch_compile_run_torchs_operations():
    """create_graph=True (a gradient of the gradient) and a compiled function: torch's operations, whose backward is
    itself differentiable and which torch.compile traces (the kernel would break its graph)."""
    g = torch.Generator().manual_seed(5)
    gate, up = (torch.randn(4, 32, generator=g).requires_grad_() for _ in range(2))
    g_gate, _ = torch.autograd.grad(SwiGLU.apply(gate, up).sum(), (gate, up), create_graph=True)
    want_gate, _ = torch.autograd.grad((F.silu(gate) * up).sum(), (gate, up), create_graph=True)
    second, = torch.autograd.grad(g_gate.sum(), gate)
    want, = torch.autograd.grad(want_gate.sum(), gate)
    torch.testing.assert_close(second, want, atol=1e-5, rtol=1e-5)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "training_kernels", lambda: calls.append(1) or native.training_kernels())
        torch._dynamo.reset()
        compiled = torch.compile(SwiGLU.apply, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(gate, up), F.silu(gate) * up)
    assert calls == []
