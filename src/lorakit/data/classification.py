"""Classification data: labelled texts from TSV (`label<TAB>text`, the SMS Spam Collection), CSV (a header row) or
JSON / JSONL / Parquet records with text and label fields; the label names, and balancing by down-sampling."""
from __future__ import annotations

import csv
import io
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .examples import TextExample
from .readers import LoadStats, collect, get_text, iter_records, read_text
from .splitting import stratified_split


@dataclass
class ClassificationData:
    """Labelled texts with the label names; ids follow `labels` order."""

    examples: list[TextExample]
    labels: list[str]
    stats: LoadStats

    @classmethod
    def load(cls, path: str | Path, labels: list[str] | None = None, text_field: str = "text",
             label_field: str = "label", strict: bool = True) -> "ClassificationData":
        """Read a TSV (`label<TAB>text`, split on the first tab), CSV (header row) or JSON/JSONL file."""
        p = Path(path)
        rows = _classification_rows(p, text_field, label_field, strict)
        known = list(labels) if labels else None

        def parse(rec: dict, where: str) -> tuple[str, str]:
            label, text = get_text(rec, label_field, where).strip(), get_text(rec, text_field, where)
            if known is not None and label not in known:
                raise DataError(f"{where}: field {label_field!r}: unknown label {label!r} (known: {', '.join(known)})",
                                reason="unknown label")
            return text, label

        pairs, stats = collect(p, rows, parse, strict)
        counts = Counter(lab for _, lab in pairs)
        names = known or sorted(counts)
        if len(counts) < 2:
            found = ", ".join(f"{name} {counts[name]:,}" for name in (names if known else counts))
            raise DataError(f"{p}: every record has the same label ({found} of {len(pairs):,} kept records); "
                            "a classifier needs examples of at least two labels")
        ids = {n: i for i, n in enumerate(names)}
        return cls([TextExample(t, ids[lab]) for t, lab in pairs], names, stats)

    def split(self, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 42) -> dict[str, list]:
        """Stratified train/val/test split: each label is cut in the same proportions, reproducibly by seed."""
        return stratified_split(self.examples, lambda e: e.label, fractions, seed)


def _classification_rows(p: Path, text_field: str, label_field: str,
                         strict: bool = True) -> Iterator[tuple[str, dict]]:
    suffix = p.suffix.lower()
    if suffix in (".json", ".jsonl", ".parquet"):
        yield from iter_records(p, strict)
        return
    text = read_text(p)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for rec in reader:
            yield f"line {reader.line_num}", {k: v for k, v in rec.items() if k is not None}
        return
    for n, line in enumerate(text.splitlines(), 1):  # TSV: label<TAB>text, the text may hold more tabs
        if not line.strip():
            continue
        if "\t" not in line:
            yield f"line {n}", {text_field: line}  # reported as a missing label field
            continue
        label, body = line.split("\t", 1)
        yield f"line {n}", {label_field: label, text_field: body}


def balance(examples: list[TextExample], seed: int = 42) -> list[TextExample]:
    """Down-sample every class to the size of the smallest one."""
    rng = random.Random(seed)
    groups: dict[int, list] = {}
    for e in examples:
        groups.setdefault(e.label, []).append(e)
    n = min(len(g) for g in groups.values())
    out = [e for k in sorted(groups) for e in rng.sample(groups[k], n)]
    rng.shuffle(out)
    return out
