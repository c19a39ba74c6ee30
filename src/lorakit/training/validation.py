"""Held-out loss during training, token-weighted over the trained tokens as `lorakit eval` computes it."""
from __future__ import annotations

import math

import torch

from ..models import is_seq2seq
from .distributed import all_sum
from .loss import heldout_loss_sum


@torch.no_grad()
def validate(model, examples: list, collate, batch_size: int, device, autocast, accelerator=None) -> dict:
    """Held-out loss, token-weighted over the trained tokens (as `lorakit eval` computes it); accuracy too for
    classifiers (one target per example).

    On several processes each rank takes every world-th example, all run the same number of batches (FSDP needs
    every rank in every forward; a rank out of examples repeats one with weight 0) and the sums are added up.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    seq2seq = is_seq2seq(accelerator.unwrap_model(model) if accelerator else model)
    mine = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    was_training = model.training
    model.eval()
    loss_sum, targets, correct, examples_seen, classifier = 0.0, 0, 0, 0, False
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1 if chunk else 0
        batch = {k: v.to(device) for k, v in collate(chunk or examples[:1]).items()}
        with autocast():
            summed, n, logits = heldout_loss_sum(model, batch, seq2seq)
        loss_sum, targets = loss_sum + summed * weight, targets + n * weight
        classifier = logits.dim() == 2  # (batch, labels): a sequence classifier
        if classifier:
            correct += int((logits.argmax(-1) == batch["labels"]).sum()) * weight
            examples_seen += len(chunk)
    model.train(was_training)
    if accelerator is not None:
        loss_sum, targets, correct, examples_seen = all_sum([loss_sum, targets, correct, examples_seen], accelerator)
    result = {"loss": loss_sum / max(targets, 1)}
    if classifier:
        result["accuracy"] = correct / max(examples_seen, 1)
    return result


@torch.no_grad()
def validate_pairs(model, pairs: list, collate, batch_size: int, device, autocast, objective) -> dict:
    """A preference run's held-out loss, reward accuracy and margin: the objective's, averaged over the pairs."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        with autocast():
            loss, metrics = objective(model, batch)
        for k, v in {"loss": loss.item(), **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v * len(chunk)
    model.train(was_training)
    keep = ("loss", "rewards/accuracies", "rewards/margins")
    return {k: totals[k] / max(len(pairs), 1) for k in keep if k in totals}
