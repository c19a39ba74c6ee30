"""`lorakit data`: what training will see, before paying for a run. The load counts (read, kept, skipped by reason),
how encoding changed the examples (truncated, turns dropped), tokens and trained tokens, and examples as the model
sees them with the trained spans marked: colour in a terminal, [[...]] when piped, or one JSON object per example.
A preference pair shows its prompt once, then the chosen reply (marked as trained text) and the rejected one (in red,
or between {{ and }}).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from ..config import RunConfig
from .examples import IGNORE, EncodedExample
from .pipeline import check_max_length, encode_examples, load_splits
from .preferences import EncodedPair
from .readers import LoadStats

# how each kind of trained text is marked: in a terminal (bold green, bold red), and when piped
COLOURS = {"trained": ("\033[1;32m", "\033[0m"), "rejected": ("\033[1;31m", "\033[0m")}
MARKS = {"trained": ("[[", "]]"), "rejected": ("{{", "}}")}


@dataclass
class Preview:
    """One example as the model sees it: the pieces of its text in order, each marked "" (not trained), "trained"
    or (a preference pair's other reply) "rejected"."""

    pieces: list[tuple[str, str]]
    tokens: int
    trained_tokens: int

    def to_dict(self) -> dict:
        out = {"text": "".join(text for text, _ in self.pieces),
               "trained": [text for text, mark in self.pieces if mark == "trained"],
               "tokens": self.tokens, "trained_tokens": self.trained_tokens}
        rejected = [text for text, mark in self.pieces if mark == "rejected"]
        return out | ({"rejected": rejected} if rejected else {})

    def marked(self, marks: dict[str, tuple[str, str]]) -> str:
        return "".join(f"{marks[mark][0]}{text}{marks[mark][1]}" if mark else text for text, mark in self.pieces)


def preview_encoded(tokenizer, example: EncodedExample, seq2seq: bool = False) -> Preview:
    """A causal example split into runs of labelled and unlabelled tokens; a seq2seq one as its encoder input
    followed by its target (all of which is trained)."""
    if seq2seq:
        target = [t for t in example.labels if t != IGNORE]
        return Preview([(tokenizer.decode(example.input_ids), ""), ("\n→ ", ""), (tokenizer.decode(target), "trained")],
                       len(example.input_ids) + len(target), len(target))
    n_trained = sum(label != IGNORE for label in example.labels)
    return Preview(labelled_pieces(tokenizer, example, "trained"), len(example.input_ids), n_trained)


def labelled_pieces(tokenizer, example: EncodedExample, mark: str) -> list[tuple[str, str]]:
    """The example's text in runs of labelled tokens (marked `mark`) and unlabelled ones."""
    pieces, run, state = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE
        if trained != state and run:
            pieces.append((tokenizer.decode(run), mark if state else ""))
            run = []
        run.append(token)
        state = trained
    if run:
        pieces.append((tokenizer.decode(run), mark if state else ""))
    return pieces


def preview_pair(tokenizer, pair: EncodedPair) -> Preview:
    """A preference pair: the prompt once, then the chosen reply (its trained tokens marked "trained") and the
    rejected one (marked "rejected")."""
    pieces = [(tokenizer.decode(pair.prompt_ids), ""), ("\n[chosen] ", "")]
    pieces += labelled_pieces(tokenizer, pair.chosen, "trained") + [("\n[rejected] ", "")]
    pieces += labelled_pieces(tokenizer, pair.rejected, "rejected")
    n_trained = sum(lab != IGNORE for r in (pair.chosen, pair.rejected) for lab in r.labels)
    return Preview(pieces, len(pair), n_trained)


def preview_classified(tokenizer, example, labels: list[str], max_length: int) -> Preview:
    """A text for a classifier: what the model reads (truncated as in training); the head learns its label."""
    ids = tokenizer(example.text, truncation=True, max_length=max_length)["input_ids"]
    return Preview([(example.text, ""), (f"\n→ label {labels[example.label]}", "trained")], len(ids), 0)


def previews(cfg: RunConfig, tokenizer_for: Callable[[], tuple], show: int) -> tuple[dict, list[Preview]]:
    """(counts, the first `show` training examples as previews) for a recipe. The data is read first (its errors
    come before any model is looked up), then `tokenizer_for()` gives (tokenizer, whether the model is an
    encoder-decoder) to encode it with."""
    splits = load_splits(cfg)
    tokenizer, seq2seq = tokenizer_for()
    counts = {"files": splits.stats, "splits": {"train": len(splits.train), "val": len(splits.val),
                                                 "test": len(splits.test)}}
    if cfg.task == "classify":
        check_max_length(cfg, tokenizer)
        shown = [preview_classified(tokenizer, e, splits.labels, cfg.max_length) for e in splits.train]
        counts["tokens"] = sum(p.tokens for p in shown)
        return counts, shown[:show]
    stats, encoded = LoadStats("encode"), []
    step = 256
    for i in tqdm(range(0, len(splits.train), step), desc="encode", disable=len(splits.train) <= step, file=sys.stderr):
        encoded += encode_examples(cfg, splits.train[i:i + step], tokenizer, seq2seq, stats)
    if cfg.task == "preference":
        shown = [preview_pair(tokenizer, e) for e in encoded]
    else:
        shown = [preview_encoded(tokenizer, e, seq2seq) for e in encoded]
    counts |= {"encoded": len(encoded), "skipped_at_encoding": dict(stats.skipped), "notes": dict(stats.notes),
               "tokens": sum(p.tokens for p in shown), "trained_tokens": sum(p.trained_tokens for p in shown)}
    return counts, shown[:show]


def print_counts(counts: dict, file=None) -> None:
    """The counts as lines, to `file` (the current standard output when None: looked up at call time, so a
    redirected or captured stdout is the one written to)."""
    file = file or sys.stdout
    for name, stats in counts["files"].items():
        line = (f"{name}: {stats['path']}: read {stats['read']:,}, kept {stats['kept']:,}, skipped "
                f"{sum(stats['skipped'].values()):,}")
        print(line + "".join(f"\n  skipped: {reason}: {n:,}" for reason, n in stats["skipped"].items())
              + "".join(f"\n  {note}: {n:,}" for note, n in stats["notes"].items()), file=file)
    print("splits: " + ", ".join(f"{k} {v:,}" for k, v in counts["splits"].items()), file=file)
    if "encoded" in counts:
        print(f"train, encoded: {counts['encoded']:,} examples, {counts['tokens']:,} tokens, "
              f"{counts['trained_tokens']:,} trained ({counts['trained_tokens'] / max(counts['tokens'], 1):.0%})",
              file=file)
        for reason, n in counts["skipped_at_encoding"].items():
            print(f"  skipped: {reason}: {n:,}", file=file)
        for note, n in counts["notes"].items():
            print(f"  {note}: {n:,}", file=file)
    else:
        print(f"train: {counts['tokens']:,} tokens (a classifier trains on the label, not on tokens)", file=file)


def show_data(cfg: RunConfig, tokenizer_for: Callable[[], tuple], show: int = 3, as_json: bool = False) -> dict:
    """Print the counts and `show` examples (or, with as_json, one JSON object per example; counts to stderr)."""
    counts, shown = previews(cfg, tokenizer_for, show)
    if as_json:
        print_counts(counts, file=sys.stderr)
        for p in shown:
            print(json.dumps(p.to_dict(), ensure_ascii=False))
        return counts
    print_counts(counts)
    tty = sys.stdout.isatty()
    marks = COLOURS if tty else MARKS
    legend = "trained text in green" if tty else "trained text between [[ and ]]"
    if cfg.task == "preference":
        legend = ("chosen reply in green, rejected in red" if tty else
                  "chosen reply between [[ and ]], rejected between {{ and }}")
    for i, p in enumerate(shown, 1):
        print(f"\n--- example {i} of the training split: {p.tokens:,} tokens, {p.trained_tokens:,} trained "
              f"({legend}) ---\n{p.marked(marks)}")
    return counts
