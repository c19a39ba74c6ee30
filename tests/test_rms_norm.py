"""lorakit's training RMSNorm (models/rms_norm.py, csrc/rms_norm.cpp) against float64 on the same values and, in a
model, against transformers' module: outputs and gradients, what it routes, the fallbacks."""
from __future__ import annotations

import pytest
import torch

from lorakit.models import rms_norm
from lorakit.models.rms_norm import RMSNorm, llama_formula, use_norm_kernel, uses_norm_kernel
from test_attention import assert_trains_alike, llama, loss_and_grads, loss_grads_and_calls, relative

needs_kernel = pytest.mark.skipif(
    rms_norm.kernel() is None,
    reason="the kernel needs AVX-512 with BF16 and a C++ compiler")


def llama_norm(width: int, dtype: torch.dtype, seed: int = 0):
    """transformers' LlamaRMSNorm of `width` with a random frozen weight in `dtype`."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    norm.weight.data = (1 + 0.3 * torch.randn(width, generator=g)).to(dtype)
    return norm.requires_grad_(False)


def exact(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, eps: float = 1e-5):
    """The norm's output and x's gradient in float64."""
    x = x.detach().double().requires_grad_()
    y = weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y.backward(grad.double())
    return y.detach(), x.grad


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [576, 64, 17, 1000])
def test_the_kernel_is_as_close_to_float64_as_the_module(dtype, width):
    """Output and x's gradient within what transformers' module keeps in the same dtype (and near float64 in
    absolute terms); in bf16 the output is the module's, rounding where it rounds. Widths with a tail of a vector."""
    g = torch.Generator().manual_seed(width)
    norm = llama_norm(width, dtype)
    x = (3 * torch.randn(3, 37, width, generator=g)).to(dtype).requires_grad_()
    grad = torch.randn(3, 37, width, generator=g).to(dtype)
    module_y = norm(x)
    module_dx, = torch.autograd.grad(module_y, x, grad)
    ours_y = RMSNorm.apply(x, norm.weight, 1e-5)
    ours_dx, = torch.autograd.grad(ours_y, x, grad)
    want_y, want_dx = exact(x, norm.weight, grad)
    assert ours_y.dtype == dtype and ours_dx.dtype == dtype and ours_y.shape == x.shape
    for ours, module, want in ((ours_y, module_y, want_y), (ours_dx, module_dx, want_dx)):
        assert relative(ours.double(), want) <= 1.5 * relative(module.double(), want) + 1e-7
        assert relative(ours.double(), want) <= (1e-6 if dtype == torch.float32 else 4e-3)
    if dtype == torch.bfloat16:  # round(w · round(x · r)): the module's bits but where r's last bit differs
        assert (ours_y == module_y).float().mean() >= 0.999


@needs_kernel
def test_rows_of_zeros_and_large_values():
    """A row of zeros (r = 1 / sqrt(eps)) gives zeros and a finite gradient; values in the thousands do not
    overflow the sum of squares in fp32."""
    norm = llama_norm(64, torch.float32)
    x = torch.zeros(2, 64)
    x[1] = 3000 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    y = RMSNorm.apply(x.requires_grad_(), norm.weight, 1e-5)
    dx, = torch.autograd.grad(y, x, grad)
    want_y, want_dx = exact(x, norm.weight, grad)
    assert torch.equal(y[0], torch.zeros(64)) and torch.isfinite(dx).all()
    assert relative(y.double(), want_y) <= 1e-6 and relative(dx[1].double(), want_dx[1]) <= 1e-5


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_trains_on_the_kernel_as_on_transformers_norms(dtype):
    """A Llama's loss and LoRA gradients with every norm on the kernel are those of transformers' norms (fp32: to
    float rounding; a bf16 base: within bf16's); the kernel took every norm's calls."""
    from lorakit.engine import store_frozen
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(40) < torch.tensor([[40], [31], [12]])).long()
    theirs, ours = llama(), llama()  # its norms' weights drawn
    store_frozen(theirs, dtype)
    store_frozen(ours, dtype)
    assert use_norm_kernel(ours) == 5 and uses_norm_kernel(ours) and not uses_norm_kernel(theirs)  # 2 a layer, 1
    loss, grads, calls = loss_grads_and_calls(ours, ids, mask, RMSNorm)
    assert calls == 5
    assert_trains_alike((loss, grads), loss_and_grads(theirs, ids, mask), dtype)


@needs_kernel
def test_calls_the_kernel_does_not_take_run_the_module():
    """A norm whose weight trains, an fp16 input, a weight of another dtype, a strided input: the module's own
    forward, the same numbers and gradients (the weight's included)."""
    calls = []
    original = RMSNorm.apply
    RMSNorm.apply = lambda *a: calls.append(1) or original(*a)
    try:
        for dtype, weight_dtype, trains, strided in ((torch.float32, torch.float32, True, False),
                                                     (torch.float16, torch.float16, False, False),
                                                     (torch.bfloat16, torch.float32, False, False),
                                                     (torch.float32, torch.float32, False, True)):
            theirs, ours = (llama_norm(32, weight_dtype).requires_grad_(trains) for _ in range(2))
            use_norm_kernel(ours)
            x = torch.randn(4, 64 if strided else 32).to(dtype)
            x = (x[:, ::2] if strided else x).requires_grad_()
            grad = torch.randn(4, 32).to(ours(x).dtype)
            for norm in (ours, theirs):
                out = norm(x)
                out.backward(grad)
            assert torch.equal(ours(x), theirs(x))
            assert not trains or torch.equal(ours.weight.grad, theirs.weight.grad)
    finally:
        RMSNorm.apply = original
    assert calls == []


def test_only_llama_formula_norms_are_routed_and_only_where_the_cpu_runs_the_kernel(monkeypatch):
    """Qwen's and Mistral's norms are LlamaRMSNorm's formula, Gemma's (1 + weight) and T5's are not: those keep
    their forward; on a CPU without AVX-512 BF16 nothing is routed and the kernel is not even built."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    assert llama_formula(Qwen2RMSNorm) and llama_formula(MistralRMSNorm)
    assert not llama_formula(GemmaRMSNorm) and not llama_formula(T5LayerNorm)
    gemma = torch.nn.Sequential(GemmaRMSNorm(16), T5LayerNorm(16))
    assert use_norm_kernel(gemma) == 0 and not uses_norm_kernel(gemma)
    full = llama().requires_grad_(True)  # a full fine-tune trains the norms: none is routed, run.json says so
    assert use_norm_kernel(full) == 0 and not uses_norm_kernel(full)
    from lorakit.models import native
    monkeypatch.setattr(native, "cpu_runs_kernels", lambda: False)
    monkeypatch.setattr(native, "extension", lambda *a: pytest.fail("built where it cannot run"))
    model = llama()
    assert use_norm_kernel(model) == 0 and not uses_norm_kernel(model)
