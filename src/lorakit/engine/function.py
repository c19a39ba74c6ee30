"""The LoRA layer's math as one function and one autograd Function (see `LoRAFunction` for what it saves)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import dropout_drops, dropout_scale, zero_at, zeroed


def lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, p: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x @ W.T + b + scaling · B · A · dropout(x) for x of shape (tokens, in) (W None: the LoRA term alone), with
    what a backward needs: the rank-r activations h = A · dropout(x) and dropout's drops (flat indices). LoRAFunction
    wraps it for training; inference calls it bare, without autograd's per-call cost, which shows when decoding one
    token at a time (three ops then, the LoRA term added into the base output in place)."""
    drops = dropout_drops(x.numel(), p, x.device) if p > 0 else None
    h = F.linear(x, A) if drops is None else F.linear(zero_at(x, drops), A).mul_(dropout_scale(p))
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
        # Under autocast (bf16 on a GPU) the output, h and grad are half precision while A and B stay fp32: the
        # adapter's gradients are computed in its own dtype. No-ops otherwise.
        dt = A.dtype
        grad = grad.to(dt)
        # The skinny products are written in the operand layouts MKL runs fastest: grad·B with B transposed in
        # memory, B's gradient as (hᵀ·grad)ᵀ rather than gradᵀ·h (docs/engine.md has the figures).
        gh = F.linear(grad, B.t().contiguous()).mul_(ctx.scaling * (ctx.rescale if drops is not None else 1.0))
        gx = gA = gB = None
        if ctx.needs_input_grad[4]:
            gB = (h.to(dt).t() @ grad).mul_(ctx.scaling).t()
        if ctx.needs_input_grad[3]:
            xd = x.to(dt)  # a no-op: forward callers pass x in the adapter's dtype
            gA = gh.t() @ (xd if drops is None else zero_at(xd, drops))
        if ctx.needs_input_grad[0]:
            # the branch's input gradient, zero where x was dropped; then the base's is added in place
            shape = (len(gh), A.shape[1])
            gx = gh @ A if drops is None else zeroed(shape, A, drops, lambda out: torch.mm(gh, A, out=out))
            gx = (gx if weight is None else gx.addmm_(grad, weight)).to(x.dtype)
        return gx, None, None, gA, gB, None, None


