"""From a run config to data: the same train/val/test split for training and for evaluation, then batches.

`load_splits` reads and splits the files (no tokenizer needed, so a classifier knows its labels before the model
is built); `encode_splits` tokenises them for a given model and says how to collate a batch.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Callable

from .collate import classification_batch, pack, packed_batch, pad_batch, row_length, seq2seq_batch
from .config import RunConfig
from .conversations import ChatData, encode_conversations
from .data import (ClassificationData, DataError, InstructionData, LoadStats, PromptData, SummarizationData,
                   balance, embedded_data, stratified_split)
from .models import is_seq2seq

LOADERS = {"instruct": InstructionData, "summarize": SummarizationData, "chat": ChatData}  # the generative tasks


@dataclass
class Splits:
    """Raw examples per split (TextExample or PromptExample), label names for classify, and what each file read
    gave (`loaded`: "data", "val_data", "test_data"), for the caller to show and record."""

    train: list
    val: list
    test: list
    labels: list[str] | None = None
    loaded: dict[str, LoadStats] = field(default_factory=dict)

    @property
    def stats(self) -> dict:
        """The load statistics as plain dicts, for run.json."""
        return {name: s.to_dict() for name, s in self.loaded.items()}


@dataclass
class Encoded:
    """Tokenised train/val examples (for packing: rows of examples) and the function that batches them."""

    train: list
    val: list
    collate: Callable[[list], dict]
    notes: dict = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)  # tokens per training row, for length-grouped batches


def _limit(items: list, n: int) -> list:
    return items[:n] if n else items


def data_path(cfg: RunConfig, name: str):
    """A recipe's data file: an embedded data set's name (`sharegpt`), or a path (see RunConfig.resolve)."""
    return embedded_data(name) or cfg.resolve(name)


def load_file(cfg: RunConfig, path) -> ClassificationData | PromptData | ChatData:
    """One data file read in the task's format, with the recipe's fields and strictness."""
    strict = not cfg.skip_invalid
    if cfg.task == "classify":
        return ClassificationData.load(path, labels=cfg.labels or None, text_field=cfg.text_field,
                                       label_field=cfg.label_field, strict=strict)
    return LOADERS[cfg.task].load(path, strict=strict)


def load_splits(cfg: RunConfig) -> Splits:
    """Read the recipe's files and split them reproducibly (seed); `max_records` caps train, `max_eval_records`
    test, `max_val_records` (default: max_eval_records) val."""
    loaded = {}
    main = load_file(cfg, data_path(cfg, cfg.data))
    loaded["data"] = main.stats
    labels = None
    if cfg.task == "classify":
        parts = main.split(tuple(cfg.split), cfg.seed)
        labels = main.labels
        if cfg.balance:
            parts["train"] = balance(parts["train"], cfg.seed)
    elif cfg.val_data or cfg.test_data:
        parts = {"train": examples_of(main)}
        rng = random.Random(cfg.seed)
        rng.shuffle(parts["train"])
        for part, path in (("val", cfg.val_data), ("test", cfg.test_data)):
            extra = load_file(cfg, data_path(cfg, path)) if path else None
            parts[part] = examples_of(extra) if extra else []
            if extra:
                loaded[f"{part}_data"] = extra.stats
    else:
        parts = stratified_split(examples_of(main), lambda e: 0, tuple(cfg.split), cfg.seed)
    return Splits(_limit(parts["train"], cfg.max_records),
                  _limit(parts["val"], cfg.max_val_records or cfg.max_eval_records),
                  _limit(parts["test"], cfg.max_eval_records), labels, loaded)


def examples_of(data) -> list:
    """A loaded file's examples: prompt/response pairs, labelled texts or conversations."""
    return data.conversations if isinstance(data, ChatData) else data.examples


def encode_prompts(cfg: RunConfig, examples: list, tokenizer, model, stats=None) -> list:
    """Prompt examples or conversations tokenised for this model: seq2seq (dialogue to the encoder) or causal (loss
    on the response, or on the assistant's turns)."""
    stats = stats if stats is not None else LoadStats("encode")
    if cfg.task == "chat":
        if is_seq2seq(model):
            raise DataError(f"task chat needs a decoder-only model; {cfg.model} is an encoder-decoder")
        return encode_conversations(examples, tokenizer, cfg.max_length, cfg.template, cfg.train_on, stats,
                                    strict=not cfg.skip_invalid)
    data = PromptData(examples, stats)
    if is_seq2seq(model):
        return data.encode_seq2seq(tokenizer, max_source=cfg.max_length, max_target=cfg.max_new_tokens * 2)
    return data.encode(tokenizer, cfg.max_length, cfg.template, cfg.train_on_prompt)


def collate_for(cfg: RunConfig, tokenizer, model, packed: bool = False) -> Callable[[list], dict]:
    """How to batch this task's examples for this model: classification, seq2seq, packed rows or padding."""
    pad = tokenizer.pad_token_id
    if cfg.task == "classify":
        return functools.partial(classification_batch, tokenizer=tokenizer, max_length=cfg.max_length)
    if is_seq2seq(model):
        return functools.partial(seq2seq_batch, pad_id=pad)
    if packed:
        return functools.partial(packed_batch, pad_id=pad, share_prefix=cfg.share_prefix)
    return functools.partial(pad_batch, pad_id=pad)


def encode_splits(cfg: RunConfig, splits: Splits, tokenizer, model) -> Encoded:
    """Tokenise train and val for `model` (packing them into rows if asked) with the matching collate function."""
    if cfg.task == "classify":
        ids = tokenizer([e.text for e in splits.train], truncation=True, max_length=cfg.max_length)["input_ids"]
        return Encoded(splits.train, splits.val, collate_for(cfg, tokenizer, model), lengths=[len(i) for i in ids])
    stats = LoadStats("encode")
    train = encode_prompts(cfg, splits.train, tokenizer, model, stats)
    val = encode_prompts(cfg, splits.val, tokenizer, model, stats)
    packed = cfg.pack and not is_seq2seq(model)
    if packed:
        train, val = (pack(part, cfg.max_length, cfg.share_prefix) for part in (train, val))
    lengths = [row_length(row, cfg.share_prefix) if packed else len(row.input_ids) for row in train]
    notes = dict(stats.notes) | {f"skipped: {reason}": n for reason, n in stats.skipped.items()}
    return Encoded(train, val, collate_for(cfg, tokenizer, model, packed), notes, lengths)
