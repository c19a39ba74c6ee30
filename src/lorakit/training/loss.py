"""The causal-LM loss computed only where labels exist, a chunk of rows at a time: the full logits never exist.

transformers computes logits for every position (batch x seq x vocab, and autograd keeps several copies), then
ignores the prompt's and the padding's. Here the backbone's last hidden
states are gathered at the labelled positions, and `LinearCrossEntropy` runs the LM head and the softmax cross-entropy
over a few hundred rows at a time, computing the gradients of those rows in the same pass. Same loss, same
gradients (tested against `model(...).loss` to 1e-5), less work on prompt tokens and far less memory.

`heldout_loss_sum` is the one held-out loss that validation (validation.py) and evaluation share: summed
over every trained token, so its mean does not depend on how the examples are batched.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ..data.examples import IGNORE
from ..models import native

# Decoder-only models whose logits are exactly lm_head(last hidden state) and whose loss is the plain shifted
# cross-entropy (no logit scaling or soft-capping, unlike Gemma 2 or Cohere): the label-only loss is exact for them.
SUPPORTED = ("LlamaForCausalLM", "GPT2LMHeadModel", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
CHUNK_ROWS = 512


def label_only_supported(model: nn.Module) -> bool:
    """Whether `causal_lm_loss` computes exactly what `model(**batch).loss` does for this model."""
    return type(model).__name__ in SUPPORTED and getattr(model, "get_output_embeddings", None) is not None


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(h @ W.T + b, target), chunk by chunk; the gradients of each chunk are
    computed with its logits and kept (rows x hidden), never the logits themselves (rows x vocab).

    On a CPU with AVX-512 BF16 lorakit's kernel takes each chunk's softmax in one pass, over fp32 logits or over the
    bf16 ones as the GEMM returns them; elsewhere one fp32 logits buffer serves every chunk and the softmax runs in it
    in place (max, exp, sum, divide): no second vocab-wide copy, no fresh allocation (and page faults) per chunk. With p = softmax - onehot(target),
    d(loss)/dh = p @ W = softmax @ W - W[target], so the one-hot never touches a vocab-wide tensor.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        kernel = softmax_kernel(h)
        fp32_logits = h.dtype == torch.float32 or kernel is None  # else the kernel reads bf16 logits as they are
        buf = torch.empty(min(chunk, h.shape[0]), weight.shape[0], dtype=torch.float32, device=h.device) \
            if fp32_logits else None
        wanted = need_h or need_w or need_b
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i:i + chunk], target[i:i + chunk]
            if h.dtype == torch.float32:
                logits = buf[:len(hc)]
                torch.mm(hc, weight.t(), out=logits) if bias is None else torch.addmm(bias, hc, weight.t(), out=logits)
            else:
                logits = F.linear(hc, weight, bias)
                logits = buf[:len(hc)].copy_(logits) if fp32_logits else logits
            loss, p = chunk_softmax(logits, tc, kernel, wanted)
            total += loss
            if wanted:  # p is the softmax; d(loss)/d(logits) is p minus the one-hot of tc
                p = p.to(h.dtype)
                if need_h:
                    torch.sub(p @ weight, weight[tc], out=gh[i:i + chunk])
                if need_w:
                    gw.addmm_(p.t(), hc).index_add_(0, tc, hc, alpha=-1)
                if need_b:
                    gb.add_(p.sum(0)).index_add_(0, tc, torch.ones_like(tc, dtype=gb.dtype), alpha=-1)
        ctx.save_for_backward(gh, gw, gb)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gh, gw, gb = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad.to(g.dtype)  # noqa: E731
        return scale(gh), scale(gw), scale(gb), None, None


def chunk_softmax(logits: torch.Tensor, target: torch.Tensor, kernel: ModuleType | None,
                  wanted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's summed cross-entropy and, where `wanted`, its softmax, written over `logits` (by the kernel, or
    torch's operations in the fp32 logits)."""
    if kernel is not None:
        return kernel.cross_entropy(logits, target, wanted).sum(), logits if wanted else None
    top = logits.amax(1, keepdim=True)
    picked = logits.gather(1, target[:, None])
    sums = logits.sub_(top).exp_().sum(1, keepdim=True)
    return (top + sums.log() - picked).sum(), logits.div_(sums) if wanted else None


def softmax_kernel(h: torch.Tensor) -> ModuleType | None:
    """lorakit's softmax cross-entropy (models/csrc/softmax_cross_entropy.cpp: each row's softmax in one pass through
    the cache, where torch takes six over the whole chunk) for an LM head's rows `h` on a CPU with AVX-512 BF16;
    None elsewhere (torch's operations run)."""
    if h.device.type != "cpu" or h.dtype not in (torch.float32, torch.bfloat16):
        return None
    return native.training_kernels()


def causal_lm_loss(model: nn.Module, batch: dict, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of `batch`: `model(**batch).loss`, computed
    from the labelled rows only. The model must pass `label_only_supported`."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    rows = hidden[:, :-1][keep]  # (labelled tokens, hidden): the only positions that need logits
    head = model.get_output_embeddings()
    n = keep.sum()
    total = LinearCrossEntropy.apply(rows, head.weight, head.bias, target[keep], chunk)
    return total / n.clamp(min=1)


def supervised_objective(label_only: bool):
    """The LM (or classification) loss of a batch as a training objective: (model, batch) -> (loss, no metrics);
    label-only and chunked (`causal_lm_loss`) where it is exact and the model is not wrapped."""

    def objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return (causal_lm_loss(model, batch) if label_only else model(**batch).loss), {}

    return objective


def loss_targets(batch: dict, seq2seq: bool) -> int:
    """How many targets `model(**batch).loss` is the mean of: one per row for a classifier, else the labelled
    tokens (a causal LM predicts token t+1 from t, so its labels are shifted by one; a seq2seq model's are not)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int(((labels if seq2seq else labels[:, 1:]) != IGNORE).sum())


@torch.no_grad()
def heldout_loss_sum(model: nn.Module, batch: dict, seq2seq: bool = False) -> tuple[float, int, torch.Tensor]:
    """(summed loss, number of targets, logits) of one held-out batch; divide summed losses by summed targets for
    the token-weighted mean over a whole split."""
    out = model(**batch)
    n = loss_targets(batch, seq2seq)
    return (out.loss.float().item() * n if n else 0.0), n, out.logits  # no targets: the mean is NaN, the sum 0
