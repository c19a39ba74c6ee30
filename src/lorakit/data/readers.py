"""Reading data files into records, with errors that name the file, the line (or array index) and the field.

JSON arrays (streamed record by record), JSONL, Parquet, and the plain text the task loaders read (TSV, CSV). A
record that cannot be used raises a DataError, or with strict=False is skipped and counted by reason in the file's
`LoadStats`; the loaders (classification.py, prompts.py, conversations.py) return those counts and print nothing.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DataError


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
    if head and head[0] not in "[{" and p.suffix.lower() in (".csv", ".tsv", ".txt"):
        raise DataError(f"{p}: a {p.suffix.lower()[1:].upper()} file, but this task's data are JSON records: a JSON "
                        "array, JSONL (one object per line) or Parquet (CSV and TSV are read for task classify)")
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
CUT_OFF = ("file cut off", "file cut off inside a record")  # what strict=False yields instead of raising


class _JSONArray:
    """A JSON array file read CHUNK characters at a time: `buf` holds what is read and not yet parsed, `pos` where
    parsing stands in it; the lines and columns of what was dropped are counted, so errors name the file's own."""

    def __init__(self, path: Path, f) -> None:
        self.path, self.f, self.decoder = path, f, json.JSONDecoder()
        self.buf, self.pos, self.lines_before, self.column_before = "", 0, 0, 0

    def read_more(self) -> bool:
        try:
            chunk = self.f.read(CHUNK)
        except UnicodeDecodeError:
            read_text(self.path)  # raises the error with its line and column
            raise
        if "\0" in chunk:
            read_text(self.path)
        self.buf += chunk
        return bool(chunk)

    def next_char(self) -> str:
        """The next non-blank character (reading on as needed); '' at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.read_more():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def where(self, at: int) -> tuple[int, int]:
        """Line and column in the file of buffer position `at`."""
        line, column = _line_col(self.buf, at, "\n")
        return self.lines_before + line, column + (self.column_before if line == 1 else 0)

    def before_record(self, index: int) -> str | None:
        """The first character of record `index`, past the comma before it; None when the array closes instead. A
        missing comma, or the file's end, is a DataError."""
        c = self.next_char()
        if c == "]":
            return None
        if index and c == ",":
            self.pos += 1
            c = self.next_char()
        elif index and c:
            line, column = self.where(self.pos)
            raise DataError(f"{self.path}, line {line}: invalid JSON (expected ',' or ']' after record {index - 1} at "
                            f"column {column})", reason="invalid JSON")
        if not c:
            raise DataError(f"{self.path}, line {self.where(len(self.buf))[0]}: the file ends after record {index - 1} "
                            "without closing the array (']'); is it truncated?", reason="file cut off")
        return c

    def record(self, index: int):
        """Record `index`, decoded from where parsing stands (reading on while it runs into the next chunk)."""
        while True:
            try:
                value, self.pos = self.decoder.raw_decode(self.buf, self.pos)
                return value
            except json.JSONDecodeError as e:
                if self.read_more():
                    continue
                error = _json_error(self.path, self.buf, e, *self.where(e.pos))
                if _ends_early(self.buf, e):
                    raise DataError(f"{error} It ends inside record {index}; skip_invalid keeps the {index:,} complete "
                                    "records before it", reason="file cut off inside a record") from None
                raise error from None

    def forget_parsed(self) -> None:
        """Drop what is parsed once it passes a chunk, keeping the line and column count of what stays."""
        if self.pos <= CHUNK:
            return
        newline = self.buf.rfind("\n", 0, self.pos)
        if newline >= 0:
            self.lines_before += self.buf.count("\n", 0, newline + 1)
            self.column_before, keep = 0, newline + 1
        else:
            self.column_before, keep = self.column_before + self.pos, self.pos
        self.buf, self.pos = self.buf[keep:], self.pos - keep


def _json_array_records(path: Path, strict: bool) -> Iterator[tuple[str, dict | DataError]]:
    """The records of a JSON array, decoded one at a time from CHUNK-sized reads: a 125 MB file is never held whole,
    only the records. A file that ends inside a record (a cut-off download) is an error naming the line and the
    record; with strict=False the complete records before it come, then the cut-off end as a DataError."""
    with open(path, encoding="utf-8-sig") as f:
        reader = _JSONArray(path, f)
        if reader.next_char() != "[":
            raise DataError(f"{path}: expected a JSON array")
        reader.pos += 1
        index = 0
        while True:
            try:
                if reader.before_record(index) is None:
                    return
                rec = reader.record(index)
            except DataError as error:
                if strict or error.reason not in CUT_OFF:
                    raise
                yield f"index {index}", error
                return
            if not isinstance(rec, dict):
                raise DataError(f"{path}, index {index}: expected a JSON object, got {type(rec).__name__}")
            yield f"index {index}", rec
            index += 1
            reader.forget_parsed()


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


def collect(path, rows: Iterator[tuple[str, dict]], parse, strict: bool) -> tuple[list, LoadStats]:
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


def collect_noted(path, strict: bool, parse) -> tuple[list, LoadStats]:
    """`collect` over a file's records where parse(rec, where) gives (item, notes): what was detected or cleaned
    up in a record; the notes of the records kept add up in stats.notes."""
    notes = Counter()

    def kept(rec: dict, where: str):
        item, found = parse(rec, where)
        notes.update(found)
        return item

    items, stats = collect(path, iter_records(path, strict), kept, strict)
    stats.notes.update(notes)
    return items, stats
