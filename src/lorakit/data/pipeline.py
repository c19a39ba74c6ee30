"""A run's data path, one way: read -> split -> encode -> batch, each a step of its own, called once in that order.

read(cfg)                                 the recipe's files as records of its task, with what each file gave; the
                                          only place a run's data paths are resolved (config.paths)
split(records, cfg)                       train / val / test, reproducibly from the seed; label names for classify
encode(splits, cfg, tokenizer, seq2seq)   train and val for one model: template, tokens, labels; packed rows
batcher(cfg, tokenizer, seq2seq, packed)  how a list of examples becomes a batch of tensors

Reading and splitting need no tokenizer, so a classifier knows its labels before its model is built, and evaluation
rebuilds the very test split training left out.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..errors import DataError
from .classification import ClassificationData, balance
from .collate import classification_batch, pack, packed_batch, pad_batch, row_length, seq2seq_batch
from .conversations import ChatData, encode_conversations
from .preferences import PreferenceData, encode_pairs, pair_batch
from .prompts import InstructionData, PromptData, SummarizationData
from .readers import LoadStats
from .splitting import stratified_split

LOADERS = {"instruct": InstructionData, "summarize": SummarizationData, "chat": ChatData,  # the generative tasks
           "preference": PreferenceData}
TaskData = ClassificationData | PromptData | ChatData | PreferenceData


@dataclass
class Records:
    """What a run's files hold: the main file's data, the separate validation / test files' (when given), and what
    each file read gave (`loaded`: "data", "val_data", "test_data")."""

    main: TaskData
    val: TaskData | None = None
    test: TaskData | None = None
    loaded: dict[str, LoadStats] = field(default_factory=dict)


@dataclass
class Splits:
    """Raw examples per split (TextExample, PromptExample or Conversation), label names for classify, and what each
    file read gave, for the caller to show and record."""

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


def read_file(cfg: RunConfig, path: Path) -> TaskData:
    """One data file read in the task's format, with the recipe's fields and strictness."""
    strict = not cfg.skip_invalid
    if cfg.task == "classify":
        return ClassificationData.load(path, labels=cfg.labels or None, text_field=cfg.text_field,
                                       label_field=cfg.label_field, strict=strict)
    return LOADERS[cfg.task].load(path, strict=strict)


def read(cfg: RunConfig) -> Records:
    """Step 1: the recipe's files (`data`, and `val_data` / `test_data` where given) as records; a classifier's
    val and test files are read with the training file's labels (a label it has not is an error)."""
    records = Records(read_file(cfg, cfg.data_file(cfg.data)))
    records.loaded["data"] = records.main.stats
    part_cfg = replace(cfg, labels=list(records.main.labels)) if cfg.task == "classify" else cfg
    for part in ("val", "test"):
        name = getattr(cfg, f"{part}_data")
        if name:
            setattr(records, part, read_file(part_cfg, cfg.data_file(name, f"{part}_data")))
            records.loaded[f"{part}_data"] = getattr(records, part).stats
    return records


def examples_of(data: TaskData) -> list:
    """A loaded file's examples: prompt/response pairs, labelled texts or conversations."""
    return data.conversations if isinstance(data, ChatData) else data.examples


def split(records: Records, cfg: RunConfig) -> Splits:
    """Step 2: train / val / test, reproducibly from `seed`. A classifier's split is stratified by label (and its
    train part balanced with `balance`); given val or test files, the main file is all training data; else one file
    is cut by `split`. `max_records` caps train, `max_eval_records` test, `max_val_records` (default:
    max_eval_records) val."""
    if records.val is not None or records.test is not None:
        parts = {"train": list(examples_of(records.main))}
        random.Random(cfg.seed).shuffle(parts["train"])
        for part in ("val", "test"):
            extra = getattr(records, part)
            parts[part] = examples_of(extra) if extra is not None else []
    elif cfg.task == "classify":
        parts = records.main.split(tuple(cfg.split), cfg.seed)
    else:
        parts = stratified_split(examples_of(records.main), lambda e: 0, tuple(cfg.split), cfg.seed)
    labels = records.main.labels if cfg.task == "classify" else None
    if cfg.task == "classify" and cfg.balance:
        parts["train"] = balance(parts["train"], cfg.seed)
    return Splits(_limit(parts["train"], cfg.max_records),
                  _limit(parts["val"], cfg.max_val_records or cfg.max_eval_records),
                  _limit(parts["test"], cfg.max_eval_records), labels, records.loaded)


def _limit(items: list, n: int) -> list:
    return items[:n] if n else items


def load_splits(cfg: RunConfig) -> Splits:
    """read, then split: the run's examples before any tokenizer is involved."""
    return split(read(cfg), cfg)


def check_max_length(cfg: RunConfig, tokenizer) -> None:
    """max_length must leave room for text after the special tokens the tokenizer adds to every example (below
    that, tokenizers silently skip truncation or keep no text)."""
    special = tokenizer.num_special_tokens_to_add()
    if cfg.max_length <= special:
        raise DataError(f"max_length {cfg.max_length} leaves no room for text: {cfg.model}'s tokenizer adds {special} "
                        f"special token{'s' if special != 1 else ''} to every example; give more (e.g. 128)")


def encode_examples(cfg: RunConfig, examples: list, tokenizer, seq2seq: bool, stats: LoadStats | None = None) -> list:
    """Prompt examples, conversations or preference pairs tokenised for a model: seq2seq (the dialogue to the
    encoder) or causal (the loss on the response, the assistant's turns, or each reply of a pair)."""
    check_max_length(cfg, tokenizer)
    stats = stats if stats is not None else LoadStats("encode")
    if cfg.task == "preference":
        if seq2seq:
            raise DataError(f"task preference needs a decoder-only model; {cfg.model} is an encoder-decoder")
        return encode_pairs(examples, tokenizer, cfg.max_length, cfg.template, stats, strict=not cfg.skip_invalid)
    if cfg.task == "chat":
        if seq2seq:
            raise DataError(f"task chat needs a decoder-only model; {cfg.model} is an encoder-decoder")
        return encode_conversations(examples, tokenizer, cfg.max_length, cfg.template, cfg.train_on, stats,
                                    strict=not cfg.skip_invalid)
    data = PromptData(examples, stats)
    if seq2seq:
        return data.encode_seq2seq(tokenizer, max_source=cfg.max_length, max_target=cfg.max_new_tokens * 2)
    return data.encode(tokenizer, cfg.max_length, cfg.template, cfg.train_on_prompt)


def encode(splits: Splits, cfg: RunConfig, tokenizer, seq2seq: bool) -> Encoded:
    """Step 3: train and val for one model (packed into rows if asked), with the batcher that fits them."""
    if cfg.task == "classify":
        check_max_length(cfg, tokenizer)
        ids = tokenizer([e.text for e in splits.train], truncation=True, max_length=cfg.max_length)["input_ids"]
        return Encoded(splits.train, splits.val, batcher(cfg, tokenizer, seq2seq), lengths=[len(i) for i in ids])
    stats = LoadStats("encode")
    train = encode_examples(cfg, splits.train, tokenizer, seq2seq, stats)
    val = encode_examples(cfg, splits.val, tokenizer, seq2seq, stats)
    packed = cfg.pack and not seq2seq and cfg.task != "preference"  # a pair is packed into its own row already
    if packed:
        train, val = (pack(part, cfg.max_length, cfg.share_prefix) for part in (train, val))
    lengths = [row_length(row, cfg.share_prefix) if packed else len(row) if cfg.task == "preference"
               else len(row.input_ids) for row in train]
    notes = dict(stats.notes) | {f"skipped: {reason}": n for reason, n in stats.skipped.items()}
    return Encoded(train, val, batcher(cfg, tokenizer, seq2seq, packed), notes, lengths)


def batcher(cfg: RunConfig, tokenizer, seq2seq: bool, packed: bool = False) -> Callable[[list], dict]:
    """Step 4: how to batch this task's examples for a model: classification, seq2seq, packed rows or padding."""
    pad = tokenizer.pad_token_id
    if cfg.task == "classify":
        return functools.partial(classification_batch, tokenizer=tokenizer, max_length=cfg.max_length)
    if cfg.task == "preference":
        return functools.partial(pair_batch, pad_id=pad)
    if seq2seq:
        return functools.partial(seq2seq_batch, pad_id=pad)
    if packed:
        return functools.partial(packed_batch, pad_id=pad, share_prefix=cfg.share_prefix)
    return functools.partial(pad_batch, pad_id=pad)
