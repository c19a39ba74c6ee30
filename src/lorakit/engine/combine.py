"""Adapter arithmetic: one new LoRA adapter from a weighted combination of adapters on the same model.

The methods and their numbers are PEFT's `add_weighted_adapter` (tested equal to it), per adapted module:

linear, ties, dare_linear, dare_ties, magnitude_prune
    combine the A matrices and the B matrices separately (all adapters of one rank). Each adapter's weight w and
    scale s enter as sqrt(|w·s|) on both sides, the sign on A's, so B·A carries w·s. `linear` is the weighted sum;
    `ties` (Yadav et al., 2023) keeps each tensor's `density` largest entries, elects a sign per entry (the sign of
    the sum) and averages the entries that agree with it; `dare_*` (Yu et al., 2023) drop entries at random
    (keeping `density` of them, rescaled by 1/density) before the sum or TIES' election; `magnitude_prune` keeps
    the largest entries and sums. A sum of A's times a sum of B's is not the sum of B·A's: these are fast
    approximations.
cat
    the exact sum of the updates w·s·B·A: A's rows (times w·s) and B's columns stacked, rank the sum of ranks.
svd
    the exact weighted sum of the updates, truncated to rank `svd_rank` (default: the largest rank) by SVD.
The new adapter has alpha = r (scale 1): the weights and scales are in its A and B.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config.choices import COMBINE_METHODS
from .config import LoRAConfig, LoRAError
from .inject import add_lora
from .registry import adapters, lora_layers



def keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its int(density·numel) largest-magnitude entries zeroed."""
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[t.abs().reshape(-1).topk(int(density * t.numel())).indices] = 1
    return t * mask.view(t.shape)


def keep_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` and rescaled by 1/density (the expectation stays)."""
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def elect_and_average(stacked: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """TIES' merge: per entry, the sign of the (unweighted) sum wins; the mean of the weighted entries with it."""
    agree = stacked.sign() == torch.where(stacked.sum(dim=0) >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def combine_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float,
                    generator: torch.Generator) -> torch.Tensor:
    """One tensor from same-shaped `tensors` and their `weights`, by `method` (see the module docstring)."""
    if method in ("ties", "magnitude_prune") and density < 1:
        tensors = [keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties") and density < 1:
        tensors = [keep_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    return elect_and_average(stacked, weighted) if method in ("ties", "dare_ties") else weighted.sum(dim=0)


def combine_adapters(model: nn.Module, names: list[str], weights: list[float], new: str, method: str = "svd",
                     density: float = 1.0, svd_rank: int | None = None, seed: int = 0) -> nn.Module:
    """Add adapter `new` to `model`: adapters `names` combined with `weights` by `method` (PEFT's
    add_weighted_adapter); `new` becomes the active adapter. DARE's drops come from `seed`: the same call gives
    the same adapter."""
    check_combinable(model, names, weights, new, method, density)
    infos = [adapters(model)[n] for n in names]
    ranks = [layer.lora_A[n].shape[0] for _, layer in lora_layers(model) for n in names if n in layer.lora_A]
    rank = {"cat": sum(info.config.r for info in infos), "svd": svd_rank or max(ranks)}.get(method, max(ranks))
    first = infos[0].config
    add_lora(model, LoRAConfig(r=rank, alpha=rank, dropout=first.dropout, targets=list(infos[0].modules)), new,
             targets=list(infos[0].modules))
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):  # model order, A before B, adapters in order: PEFT's order of draws
            if new in layer.lora_A:
                A, B = combined_pair(layer, names, weights, method, density, rank, generator)
                layer.lora_A[new].copy_(A)
                layer.lora_B[new].copy_(B)
    return model


def combined_pair(layer, names: list[str], weights: list[float], method: str, density: float, rank: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A, B) at one LoRA layer."""
    scaled = [w * layer.scaling[n] for n, w in zip(names, weights)]
    As, Bs = [layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names]
    if method == "cat":
        return torch.cat([A * s for A, s in zip(As, scaled)]), torch.cat(Bs, dim=1)
    if method == "svd":
        deltas = torch.stack([layer.delta_weight(n) for n in names])  # in the base weight's layout, as PEFT has it
        delta = (deltas * torch.tensor(weights).view(-1, 1, 1)).sum(dim=0)
        U, S, Vh = torch.linalg.svd(delta.t() if layer.fan_in_fan_out else delta, full_matrices=True)
        return Vh[:rank], U[:, :rank] @ torch.diag(S[:rank])
    w_A = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
    w_B = torch.tensor([math.sqrt(abs(s)) for s in scaled])
    return combine_tensors(As, w_A, method, density, generator), combine_tensors(Bs, w_B, method, density, generator)


def check_combinable(model: nn.Module, names: list[str], weights: list[float], new: str, method: str,
                     density: float) -> None:
    """A LoRAError for a combination that cannot be made, saying why."""
    reg = adapters(model)
    if method not in COMBINE_METHODS:
        raise LoRAError(f"method {method!r}: choose from {', '.join(COMBINE_METHODS)}")
    missing = [n for n in names if n not in reg]
    if missing or not names:
        raise LoRAError(f"no adapter named {', '.join(missing) or '(none given)'}; this model has: {sorted(reg)}")
    if len(weights) != len(names):
        raise LoRAError(f"{len(names)} adapters but {len(weights)} weights: give one weight per adapter")
    if new in reg:
        raise LoRAError(f"adapter {new!r} already exists; pick a new name")
    if not 0 < density <= 1:
        raise LoRAError(f"density must be in (0, 1] (the fraction of entries kept), got {density}")
    trained = [n for n in names if reg[n].trainable]
    if trained:
        raise LoRAError(f"adapters {', '.join(trained)} train modules in full ({', '.join(reg[trained[0]].trainable)}), "
                        "which are not low-rank updates and cannot be combined")
    modules = {n: sorted(reg[n].modules) for n in names}
    other = [n for n in names if modules[n] != modules[names[0]]]
    if other:
        raise LoRAError(f"adapters {names[0]} and {other[0]} adapt different modules "
                        f"({len(modules[names[0]])} vs {len(modules[other[0]])}); only adapters on the same "
                        "targets can be combined")
    ranks = {reg[n].config.r for n in names}
    if method not in ("cat", "svd") and len(ranks) > 1:
        raise LoRAError(f"method {method} combines A and B matrices entry by entry and needs one rank; these have "
                        f"r = {sorted(ranks)}: use cat or svd")
