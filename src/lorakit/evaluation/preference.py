"""Evaluating a preference run: held-out pair accuracy, base against adapted, with its standard error and the mean
margin, and both models' replies to held-out prompts side by side.

A pair counts as ranked right when the model scores its chosen reply above its rejected one. The adapted model of a
DPO-family loss scores a reply by its implicit reward β·(log πθ - log πref) (summed over the reply's tokens, the
reference the run's own); the base, and the reference-free losses (ORPO, SimPO), by the reply's mean token
log-probability, which does not favour short replies. The adapted model's mean-log-probability accuracy is reported
too (`logp_accuracy`), the number to put beside the base's.
"""
from __future__ import annotations

import math

import torch

from ..config import REFERENCE_FREE
from ..data import encode_examples
from ..data.conversations import reply_prompt
from ..data.pipeline import batcher
from ..engine import adapter_in_use, disable_adapters, load_adapter, set_adapter
from ..inference import Sampling, generate_base_and_adapted
from ..models import adapter_dir
from ..training.preference import REFERENCE, pair_logps


def ranking(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Pair accuracy (the share of pairs with chosen scored above rejected), its standard error, the mean margin."""
    right = (chosen > rejected).double()
    p, n = right.mean().item(), len(right)
    return {"pair_accuracy": p, "pair_accuracy_se": math.sqrt(p * (1 - p) / max(n, 1)),
            "margin": (chosen - rejected).mean().item()}


def scores(model, pairs, collate, cfg, reference: str | None, tuned: str) -> dict[str, dict[str, float]]:
    """The metric rows: the base's and the adapted model's rankings of `pairs`."""
    device = next(model.parameters()).device
    step = cfg.batch_size * 2
    with disable_adapters(model):
        base_sums, counts = pair_logps(model, pairs, collate, step, device, progress="log-probs (base)")
    sums, _ = pair_logps(model, pairs, collate, step, device, progress=f"log-probs ({tuned})")
    base_mean, mean = base_sums / counts.clamp(min=1), sums / counts.clamp(min=1)
    base = ranking(base_mean[:, 0], base_mean[:, 1])
    adapted = ranking(mean[:, 0], mean[:, 1])
    logp_accuracy = adapted["pair_accuracy"]
    if cfg.loss not in REFERENCE_FREE:  # the implicit reward against the run's reference
        if reference is None:
            ref_sums = base_sums
        else:
            with adapter_in_use(model, reference):
                ref_sums, _ = pair_logps(model, pairs, collate, step, device, progress="log-probs (reference)")
        rewards = cfg.beta * (sums - ref_sums)
        adapted = ranking(rewards[:, 0], rewards[:, 1])
    return {"base": base | {"logp_accuracy": base["pair_accuracy"]}, tuned: adapted | {"logp_accuracy": logp_accuracy}}


def eval_preference(model, tok, splits, cfg, tuned: str = "lora", with_base: bool = True) -> dict:
    """Pair accuracy base vs adapted on the test pairs, and both models' replies to the first `num_samples`
    prompts."""
    encoded = encode_examples(cfg, splits.test, tok, False)
    reference = None
    if cfg.init_adapter and cfg.loss not in REFERENCE_FREE:  # the run's reference is the adapter it started from
        load_adapter(model, adapter_dir(cfg.init_adapter), REFERENCE, quantize=cfg.quantize or None)
        set_adapter(model, "default")
        reference = REFERENCE
    rows = scores(model, encoded, batcher(cfg, tok, False), cfg, reference, tuned)
    if not with_base:
        rows.pop("base")
    held = splits.test[: cfg.num_samples]
    prompts = [reply_prompt(tok, pair.history(), cfg.template) for pair in held]
    base, adapted = generate_base_and_adapted(model, tok, prompts, Sampling(max_new_tokens=cfg.max_new_tokens),
                                              cfg.template)
    samples = [{"prompt": pair.prompt[-1].content, "chosen": pair.chosen, "rejected": pair.rejected, "base": b,
                tuned: a} for pair, b, a in zip(held, base, adapted)]
    return {"metrics": rows, "primary": "pair_accuracy", "samples": samples,
            "heldout": {"pairs": len(encoded), "loss": cfg.loss, "beta": cfg.beta}}
