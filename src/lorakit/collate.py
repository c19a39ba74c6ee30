"""Batches from encoded examples: right-padding, and packing several short examples into one row.

A packed row restarts position ids at every example and carries a 4D block-diagonal causal mask, so attention
never crosses an example boundary and each example's loss is what it would be alone.
"""
from __future__ import annotations

import torch

from .data import IGNORE, EncodedExample, TextExample


def pad_batch(examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, right-padded to the longest example (labels padded with IGNORE)."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: list[EncodedExample], max_length: int) -> list[list[EncodedExample]]:
    """Group examples into rows of at most max_length tokens (first fit, in order, so it is reproducible)."""
    rows: list[list[EncodedExample]] = []
    room: list[int] = []
    for e in examples:
        n = len(e.input_ids)
        if n > max_length:
            raise ValueError(f"example of {n} tokens is longer than the packed row ({max_length}); encode with max_length")
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(e)
                room[i] -= n
                break
        else:
            rows.append([e])
            room.append(max_length - n)
    return rows


def packed_batch(rows: list[list[EncodedExample]], pad_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """A batch of packed rows: position ids restart per example, a 4D additive mask keeps examples apart.

    The first label of each example is IGNORE: in a packed row it would be predicted from the previous example.
    """
    n = max(sum(len(e.input_ids) for e in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    pos = torch.zeros((b, n), dtype=torch.long)
    seg = torch.full((b, n), -1, dtype=torch.long)  # -1: padding
    for i, row in enumerate(rows):
        at = 0
        for j, e in enumerate(row):
            k = len(e.input_ids)
            ids[i, at:at + k] = torch.tensor(e.input_ids)
            labels[i, at:at + k] = torch.tensor(e.labels)
            labels[i, at] = IGNORE
            pos[i, at:at + k] = torch.arange(k)
            seg[i, at:at + k] = j
            at += k
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, :, None] >= 0)
    allowed |= torch.eye(n, dtype=torch.bool)  # padding rows attend to themselves: no all-masked softmax rows
    mask = torch.zeros((b, 1, n, n), dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}


def classification_batch(examples: list[TextExample], tokenizer, max_length: int = 256) -> dict[str, torch.Tensor]:
    """Tokenised texts (padded, truncated to max_length) and their label ids."""
    enc = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    enc["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return dict(enc)


def seq2seq_batch(examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder inputs padded with pad_id, decoder labels padded with IGNORE (the model shifts them itself)."""
    n_src = max(len(e.input_ids) for e in examples)
    n_tgt = max(len(e.labels) for e in examples)
    ids = torch.full((len(examples), n_src), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n_src), dtype=torch.long)
    labels = torch.full((len(examples), n_tgt), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, :len(e.input_ids)] = 1
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
