"""Batches from encoded examples: right-padding, and packing several short examples into one row.

A packed row restarts position ids at every example and carries a 4D block-diagonal causal mask, so attention
never crosses an example boundary and each example's loss is what it would be alone. With `share_prefix`, the
examples of a row that start with the same prompt tokens (the instruction template's preamble: 24 of Alpaca's ~115
tokens per record) keep that prefix once, at the row's start, and each example's own block attends to it: the
prefix's hidden states depend on the prefix alone (causal attention), so every example sees exactly what it would
see alone, and the gradients through the shared copy are the sum of what the copies would get. Same loss and
gradients (with LoRA dropout: one dropout draw for the shared prefix instead of one per copy), fewer tokens.
"""
from __future__ import annotations

import torch

from .examples import IGNORE, EncodedExample, TextExample


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


PACK_WINDOW = 64  # packing looks for room in the last this-many rows: linear time on large data sets


def first_label(e: EncodedExample) -> int:
    """Index of the example's first labelled token (its length when none is labelled)."""
    return next((i for i, lab in enumerate(e.labels) if lab != IGNORE), len(e.labels))


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most limit (binary search on slice equality: C-speed compares)."""
    lo, hi = 0, min(limit, len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def prefix_room(e: EncodedExample) -> int:
    """The most of e's leading tokens a shared prefix may take: it must end before e's first labelled token (that
    token's loss is predicted from the token before it, which must lie in e's own block) and before e's end."""
    return max(min(first_label(e), len(e.input_ids)) - 1, 0)


def shared_prefix(row: list[EncodedExample]) -> int:
    """How many leading tokens a row's examples share, at most each one's `prefix_room`; 0 for a single example."""
    if len(row) < 2:
        return 0
    n = min(prefix_room(e) for e in row)
    for e in row[1:]:
        n = common_prefix(row[0].input_ids, e.input_ids, n)
    return n


def row_length(row: list[EncodedExample], share_prefix: bool = False) -> int:
    """Tokens a packed row takes: the examples' lengths, less the shared prefix's copies."""
    k = shared_prefix(row) if share_prefix else 0
    return sum(len(e.input_ids) for e in row) - k * (len(row) - 1)


def pack(examples: list[EncodedExample], max_length: int, share_prefix: bool = False) -> list[list[EncodedExample]]:
    """Group examples into rows of at most max_length tokens, in order, reproducibly: each example goes to the row
    (among the last PACK_WINDOW) where it adds the fewest tokens -- without prefix sharing, the first it fits in;
    with it, preferably a row whose examples share its prompt's preamble -- else to a new row."""
    rows: list[list[EncodedExample]] = []
    tokens: list[int] = []  # per row: the sum of its examples' lengths
    shared: list[int] = []  # per row: the prefix its examples would share (the whole room of a lone example)
    for e in examples:
        n, room = len(e.input_ids), prefix_room(e) if share_prefix else 0
        if n > max_length:
            raise ValueError(f"example of {n} tokens is longer than the packed row ({max_length}); encode with max_length")
        # e adds at least n - room tokens to any row (room is 0 without sharing, and so is every row's `shared`)
        best, added, best_shared = None, n + 1, 0
        for i in range(max(0, len(rows) - PACK_WINDOW), len(rows)):
            c = len(rows[i])
            size = tokens[i] - shared[i] * (c - 1)
            if size + n - room > max_length:
                continue  # no room, even if e shared all it may
            k = common_prefix(rows[i][0].input_ids, e.input_ids, min(shared[i], room))
            grown = tokens[i] + n - k * c
            if grown <= max_length and grown - size < added:
                best, added, best_shared = i, grown - size, k
                if added == n - room:
                    break  # no row takes e for less: the first such row (first fit without sharing)
        if best is None:
            rows.append([e])
            tokens.append(n)
            shared.append(room)
        else:
            rows[best].append(e)
            tokens[best] += n
            shared[best] = best_shared
    return rows


def packed_batch(rows: list[list[EncodedExample]], pad_id: int, dtype: torch.dtype = torch.float32,
                 share_prefix: bool = False, segments: bool = False) -> dict:
    """A batch of packed rows: position ids restart per example, a 4D additive mask keeps examples apart (and, with
    share_prefix, lets each attend to the row's shared prefix, which comes first and counts no loss).

    The first label of each example's block is IGNORE: in a packed row it would be predicted from the previous one.
    With `segments`, the batch also holds which example of its row each position belongs to (-2: the shared
    prefix, -1: padding): for losses that add up each example's own tokens (preference pairs).
    """
    shared = [shared_prefix(row) if share_prefix else 0 for row in rows]
    n = max(row_length(row, share_prefix) for row in rows)
    b = len(rows)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    pos = torch.zeros((b, n), dtype=torch.long)
    seg = torch.full((b, n), -1, dtype=torch.long)  # -1: padding, -2: the shared prefix
    for i, (row, k) in enumerate(zip(rows, shared)):
        ids[i, :k] = torch.tensor(row[0].input_ids[:k], dtype=torch.long)
        pos[i, :k] = torch.arange(k)
        seg[i, :k] = -2
        at = k
        for j, e in enumerate(row):
            m = len(e.input_ids) - k
            ids[i, at:at + m] = torch.tensor(e.input_ids[k:])
            labels[i, at:at + m] = torch.tensor(e.labels[k:])
            labels[i, at] = IGNORE
            pos[i, at:at + m] = torch.arange(k, k + m)
            seg[i, at:at + m] = j
            at += m
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    q, kv = seg[:, :, None], seg[:, None, :]
    allowed = ((q == kv) & (q != -1) | (kv == -2) & (q >= 0)) & causal
    allowed |= torch.eye(n, dtype=torch.bool)  # padding rows attend to themselves: no all-masked softmax rows
    mask = torch.zeros((b, 1, n, n), dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}
    return batch | {"segments": seg} if segments else batch


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
