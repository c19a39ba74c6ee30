"""The LoRA layer's math as one function and one autograd Function (see `LoRAFunction` for what it saves)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import dropout_drops, dropout_scale, zero_at, zeroed


def lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, p: float = 0.0, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x @ W.T + b + scaling · B · A · dropout(x) for x of shape (tokens, in) (W None: the LoRA term alone; `out`:
    x @ W.T + b already computed, the term added into it), with what a backward needs: the rank-r activations
    h = A · dropout(x) and dropout's drops (flat indices). LoRAFunction wraps it for training; inference calls it
    bare, without autograd's per-call cost, which shows when decoding one token at a time (three ops then, the LoRA
    term added into the base output in place)."""
    A, B = A.to(x.dtype), B.to(x.dtype)  # fp32 adapters on a bf16 base compute in bf16 (no-ops otherwise)
    drops = dropout_drops(x.numel(), p, x.device) if p > 0 else None
    h = F.linear(x, A) if drops is None else F.linear(zero_at(x, drops), A).mul_(dropout_scale(p))
    if out is None:
        if weight is None:
            return torch.mm(h, (B * scaling).t()), h, drops
        out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return out.addmm_(h, B.t(), alpha=scaling), h, drops


class LoRAFunction(torch.autograd.Function):
    """`lora_linear` as one autograd Function, on (tokens, in) inputs. The base weight and bias must be frozen.

    What plain autograd would do and this does not: keep a full-size copy of dropout(x) per adapted layer (q, k and
    v each their own) -- this keeps x, shared by the layers that read it, and the indices of the drops; write the
    LoRA term to a (tokens, out) temporary and add it -- here it is accumulated into the base output in place
    (addmm_); return the input gradients of base and branch as two (tokens, in) tensors to be summed -- here the
    base's is accumulated into the branch's. Dropout's 1/(1-p) rescale is applied on the rank-r side, and gradients
    nobody asks for are not computed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        out, h, drops = lora_linear(x, weight, bias, A, B, scaling, p)
        ctx.save_for_backward(x, weight, A, B, h, drops)
        ctx.scaling, ctx.rescale = scaling, dropout_scale(p)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, A, B, h, drops = ctx.saved_tensors
        # The products run in x's dtype: bf16 for fp32 adapters on a bf16 base, whose gradients go back to fp32;
        # under autocast (a GPU) grad may be half precision while x, A and B are fp32. No-ops otherwise.
        dt = x.dtype
        grad, A_, B_ = grad.to(dt), A.to(dt), B.to(dt)
        # The skinny products are written in the operand layouts MKL runs fastest: grad·B with B transposed in
        # memory, B's gradient as (hᵀ·grad)ᵀ rather than gradᵀ·h (docs/engine.md has the figures).
        gh = F.linear(grad, B_.t().contiguous()).mul_(ctx.scaling * (ctx.rescale if drops is not None else 1.0))
        gx = gA = gB = None
        if ctx.needs_input_grad[4]:
            gB = (h.to(dt).t() @ grad).mul_(ctx.scaling).t().to(B.dtype)
        if ctx.needs_input_grad[3]:
            gA = (gh.t() @ (x if drops is None else zero_at(x, drops))).to(A.dtype)
        if ctx.needs_input_grad[0]:
            # the branch's input gradient, zero where x was dropped; then the base's is added in place
            shape = (len(gh), A.shape[1])
            gx = gh @ A_ if drops is None else zeroed(shape, A_, drops, lambda out: torch.mm(gh, A_, out=out))
            gx = gx if weight is None else gx.addmm_(grad, weight)
        return gx, None, None, gA, gB, None, None
