"""Preference tuning: DPO and its kin on a pair batch, TRL's losses and metric names.

A batch holds one packed row per pair (data/preferences.py): the prompt once, then the chosen and the rejected reply,
each attending to the prompt and itself. One forward gives every labelled token's log-probability; `sequence_logps`
adds them up per reply, so a pair costs prompt + chosen + rejected tokens (TRL's DPOTrainer runs the prompt twice).

    sigmoid  -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ)                 DPO (Rafailov et al., 2023); ε > 0: cDPO
    ipo      ((Δc/|c| - Δr/|r|) - 1/(2β))²                  IPO (Azar et al., 2023), length-normalised as TRL does
    hinge    max(0, 1 - βΔ)                                   SLiC (Zhao et al., 2023)
    robust   (-(1-ε)·logσ(βΔ) + ε·logσ(-βΔ)) / (1-2ε)       rDPO (Chowdhury et al., 2024)
    orpo     NLL(chosen) - β·logσ(log odds(chosen) - log odds(rejected))   ORPO (Hong et al., 2024), no reference
    simpo    -(1-ε)·logσ(β(āc - ār) - γ) - ε·logσ(-(β(āc - ār) - γ))       SimPO (Meng et al., 2024), no reference
with Δ = (log πθ(c) - log πref(c)) - (log πθ(r) - log πref(r)) over the replies' tokens (sums), ā the mean
log-probability of a reply's tokens. The reference is the model with the adapter disabled (its base), or with the
frozen adapter the run started from (`init_adapter`), in eval mode (no dropout), without gradients; or the values
precomputed once before the first step (`precompute_reference`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.examples import IGNORE
from ..engine import adapter_in_use, disable_adapters
from .loss import CHUNK_ROWS, label_only_supported

REFERENCE = "reference"  # the adapter name of a preference run's frozen reference (when it starts from an adapter)


def reference_adapter(cfg) -> str | None:
    """The adapter a preference run's reference computes with: the one it started from (`init_adapter`, loaded
    frozen as REFERENCE), or None for the base (the trained adapter switched off)."""
    return REFERENCE if cfg.task == "preference" and cfg.init_adapter else None


class LinearLogProbs(torch.autograd.Function):
    """log softmax(h·Wᵀ + b)[target] for each row, a chunk of rows at a time: the (rows x vocab) logits of one chunk
    exist at once, never all of them. Backward recomputes each chunk's softmax (one more product over the labelled
    rows) instead of keeping it: d log p(t)/d logits = onehot(t) - softmax."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                chunk: int) -> torch.Tensor:
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            logits = F.linear(h[i:i + chunk], weight, bias).float()
            out[i:i + chunk] = logits.gather(1, target[i:i + chunk, None]).squeeze(1) - logits.logsumexp(1)
        ctx.save_for_backward(h, weight, bias, target)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, bias, target = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for i in range(0, h.shape[0], ctx.chunk):
            hc, tc, gc = h[i:i + ctx.chunk], target[i:i + ctx.chunk], grad[i:i + ctx.chunk].float()
            g = F.linear(hc, weight, bias).float().softmax(1).mul_(-gc[:, None])  # -grad·softmax, then + grad at t
            g.scatter_add_(1, tc[:, None], gc[:, None])
            if need_h:
                gh[i:i + ctx.chunk] = (g.to(h.dtype) @ weight).to(h.dtype)
            if need_w:
                gw.addmm_(g.t(), hc.float())
            if need_b:
                gb.add_(g.sum(0))
        return gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype), None, None


def sequence_logps(model: nn.Module, batch: dict, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability summed over each reply's labelled tokens, how many tokens) as (pairs, 2) tensors, column 0
    the chosen reply and 1 the rejected, for a pair batch. The LM head runs on the labelled positions only, in
    chunks, for the models whose loss label_only_supported knows; the model's full logits otherwise."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = labels[:, 1:]
    keep = target != IGNORE
    sequence = (torch.arange(len(labels), device=labels.device)[:, None] * 2 + segments[:, 1:])[keep]
    if label_only_supported(model):
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]
        head = model.get_output_embeddings()
        token_logps = LinearLogProbs.apply(hidden, head.weight, head.bias, target[keep], CHUNK_ROWS)
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep].float()
        token_logps = logits.log_softmax(-1).gather(1, target[keep][:, None]).squeeze(1)
    sums = token_logps.new_zeros(2 * len(labels)).index_add(0, sequence, token_logps)
    counts = torch.zeros(2 * len(labels), device=labels.device).index_add_(0, sequence, torch.ones_like(token_logps))
    return sums.view(-1, 2), counts.view(-1, 2)


@contextlib.contextmanager
def as_reference(model: nn.Module, reference_adapter: str | None):
    """The model computing as the reference: the adapter disabled (the base), or the frozen adapter the run started
    from; in eval mode (no dropout) and without gradients."""
    was_training = model.training
    model.eval()
    switch = disable_adapters(model) if reference_adapter is None else adapter_in_use(model, reference_adapter)
    try:
        with torch.no_grad(), switch:
            yield model
    finally:
        model.train(was_training)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurately at both ends (as TRL's ORPO computes it)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor) -> dict[str, float]:
    """TRL's metrics from per-pair rewards and the policy's log-probabilities (pairs, 2)."""
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "logps/chosen": logps[:, 0].mean().item(), "logps/rejected": logps[:, 1].mean().item()}


def smoothed_logsigmoid_loss(x: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-(1-ε)·logσ(x) - ε·logσ(-x): the logistic loss of x with a share ε of the pairs' labels taken as flipped
    (cDPO's and SimPO's label smoothing; ε = 0 is the plain loss)."""
    return -(1 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x)


def dpo_family_loss(kind: str, policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
                    smoothing: float) -> tuple[torch.Tensor, dict]:
    """sigmoid, ipo, hinge or robust on summed log-probabilities (pairs, 2); the mean loss and the metrics."""
    ratios = policy - reference
    delta = ratios[:, 0] - ratios[:, 1]
    if kind == "sigmoid":
        losses = smoothed_logsigmoid_loss(beta * delta, smoothing)
    elif kind == "ipo":
        per_token = ratios / counts.clamp(min=1)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "robust":
        losses = (-(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)) / (
            1 - 2 * smoothing)
    else:
        raise ValueError(f"not a reference-based preference loss: {kind}")
    rewards = beta * ratios.detach()
    return losses.mean(), reward_metrics(rewards[:, 0], rewards[:, 1], policy.detach())


def orpo_loss(policy: torch.Tensor, counts: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """ORPO: the chosen replies' NLL (a token mean over the batch) minus β times the mean log-sigmoid of the
    log-odds ratio of the replies' mean token log-probabilities."""
    mean = policy / counts.clamp(min=1)
    log_odds = (mean[:, 0] - mean[:, 1]) - (log1mexp(mean[:, 0]) - log1mexp(mean[:, 1]))
    ratio = F.logsigmoid(log_odds)
    nll = -policy[:, 0].sum() / counts[:, 0].sum().clamp(min=1)
    loss = nll - beta * ratio.mean()
    rewards = beta * mean.detach()
    return loss, reward_metrics(rewards[:, 0], rewards[:, 1], mean.detach()) | {
        "nll_loss": nll.item(), "log_odds_ratio": ratio.mean().item(), "log_odds_chosen": log_odds.mean().item()}


def simpo_loss(policy: torch.Tensor, counts: torch.Tensor, beta: float, gamma: float,
               smoothing: float) -> tuple[torch.Tensor, dict]:
    """SimPO: the margin of the replies' mean token log-probabilities, scaled by β, less γ (TRL's CPO trainer with
    loss_type simpo and cpo_alpha 0)."""
    mean = policy / counts.clamp(min=1)
    logits = mean[:, 0] - mean[:, 1] - gamma / beta
    losses = smoothed_logsigmoid_loss(beta * logits, smoothing)
    rewards = beta * mean.detach()
    return losses.mean(), reward_metrics(rewards[:, 0], rewards[:, 1], mean.detach())


def preference_objective(cfg, reference_adapter: str | None) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]:
    """The training objective of a preference run: (model, pair batch) -> (loss, metrics). The reference pass runs
    on the same batch unless the batch carries precomputed reference log-probabilities."""

    def objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        batch = dict(batch)
        segments, reference = batch.pop("segments"), batch.pop("reference", None)
        policy, counts = sequence_logps(model, batch, segments)
        if cfg.loss == "orpo":
            return orpo_loss(policy, counts, cfg.beta)
        if cfg.loss == "simpo":
            return simpo_loss(policy, counts, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
        if reference is None:
            with as_reference(unwrapped(model), reference_adapter):
                reference, _ = sequence_logps(model, batch, segments)
        return dpo_family_loss(cfg.loss, policy, reference.to(policy.dtype), counts, cfg.beta, cfg.label_smoothing)

    return objective


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (whose LoRA layers a reference switch reaches), or the model itself."""
    return getattr(model, "module", model)


@torch.no_grad()
def pair_logps(model: nn.Module, pairs: list, collate, batch_size: int, device,
               progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities, token counts) of every pair's replies under the model as it is, each (pairs, 2),
    in `pairs`' order; batches of similar length (less padding), a progress bar when `progress` names it."""
    from tqdm.auto import tqdm
    sums, counts = torch.empty(len(pairs), 2, dtype=torch.float64), torch.empty(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    for i in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, mininterval=1.0,
                  leave=False):
        rows = order[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate([pairs[j] for j in rows]).items() if k != "reference"}
        segments = batch.pop("segments")
        s, n = sequence_logps(model, batch, segments)
        sums[rows], counts[rows] = s.double().cpu(), n.cpu()
    return sums, counts


def reference_logps(model: nn.Module, pairs: list, collate, batch_size: int, reference_adapter: str | None,
                    device, progress: str | None = None) -> torch.Tensor:
    """The reference's summed log-probabilities of every pair's replies, (pairs, 2), in `pairs`' order."""
    with as_reference(model, reference_adapter):
        return pair_logps(model, pairs, collate, batch_size, device, progress)[0]
