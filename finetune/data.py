"""Labelled text data: CSV, TSV, JSONL, Parquet, or a directory of ``<label>/*.txt`` files.

Every problem is a :class:`DataError` naming the file, row, column or flag and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ferry.errors import DataError, first_line
from ferry.files import resolve, sha256_file

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


@dataclasses.dataclass
class Examples:
    """Texts with their labels (always strings), and where they came from."""

    texts: list[str]
    labels: list[str]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int], name: str) -> "Examples":
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices], {"split_of": name})


# int() refuses more than 4,300 digits; a longer label sorts as text
INTEGER = re.compile(r"-?[0-9]{1,4000}")


def sort_labels(labels: set[str]) -> list[str]:
    """Integer labels (ASCII digits, one optional minus) in numeric order, others alphabetically."""
    if all(INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def split_lines(text: str) -> list[str]:
    """Lines ended by \\n, \\r\\n or \\r only: unlike str.splitlines(), U+0085, U+2028, U+2029, form
    feed and vertical tab stay inside a line, as in CSV and JSON Lines."""
    return io.StringIO(text, newline=None).read().split("\n")


def allow_fields_of(size: int) -> None:
    """Let the csv module read a field as long as the whole file (its default limit is 128 KiB)."""
    csv.field_size_limit(max(csv.field_size_limit(), min(size + 1, 2**31 - 1)))


DECODE_HINT = " or pass --decode-errors replace"


def decode_text(raw: bytes, where: str, decode_errors: str, hint: str = DECODE_HINT) -> str:
    """UTF-8 (a BOM allowed); an undecodable byte is a DataError naming ``where``, or U+FFFD with "replace"."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if decode_errors == "replace":
            return raw.decode("utf-8", errors="replace")
        raise DataError(
            f"{where}: byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8; re-encode the file as UTF-8{hint}"
        ) from None


def _column_error(path: Path, flag: str, name: str, columns: list[str]) -> DataError:
    return DataError(f"{flag} '{name}' not in {path.name}; columns are: {', '.join(map(str, columns))}")


def read_rows(
    path: Path, text_column: str, label_column: str | None, decode_errors: str, hint: str = DECODE_HINT
) -> tuple[list[Any], list[Any] | None, int]:
    """(texts, labels, row number of the first data row) of a CSV/TSV/JSONL/Parquet file.

    ``label_column`` None reads texts alone (labels None): the unlabelled texts of
    ``ferry bench --texts`` and ``ferry export --calibration``.
    """
    wanted = [("--text-column", text_column)] + ([("--label-column", label_column)] if label_column is not None else [])
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown format '{path.suffix}'; use .csv, .tsv, .jsonl, .parquet or a directory of <label>/*.txt")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises many types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
        for flag, name in wanted:
            if name not in table.column_names:
                raise _column_error(path, flag, name, table.column_names)
        labels = table.column(label_column).to_pylist() if label_column is not None else None
        return table.column(text_column).to_pylist(), labels, 1
    text = decode_text(path.read_bytes(), str(path), decode_errors, hint)
    if fmt == "jsonl":
        texts, labels = [], []
        seen_columns: set[str] = set()
        # JSON Lines ends lines with \\n alone; any other line break is part of a line.
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or an integer of more than 4,300 digits
                raise DataError(f"{path}: line {n} is not valid JSON ({getattr(e, 'msg', None) or e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n} is not a JSON object")
            seen_columns.update(row)
            for flag, name in wanted:
                if name not in row:
                    cols = sorted(seen_columns)
                    raise DataError(f"{flag} '{name}' not in {path.name} line {n}; columns are: {', '.join(cols)}")
            texts.append(row[text_column])
            if label_column is not None:
                labels.append(row[label_column])
        return texts, labels if label_column is not None else None, 1
    # As open(newline=""): the csv module itself finds the rows, so a quoted field keeps its line breaks.
    allow_fields_of(len(text))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    rows = _csv_rows(reader, path)
    try:
        header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: the file is empty") from None
    for flag, name in wanted:
        if name not in header:
            raise _column_error(path, flag, name, header)
    ti = header.index(text_column)
    li = header.index(label_column) if label_column is not None else None
    texts, labels = [], []
    for row in rows:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: row {reader.line_num} has {len(row)} fields, the header has {len(header)}")
        texts.append(row[ti])
        if li is not None:
            labels.append(row[li])
    return texts, labels if li is not None else None, 2


def _csv_rows(reader: Any, path: Path) -> Any:
    """The rows of ``reader``; a csv.Error is a DataError naming the file and the row."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}: row {reader.line_num}: {e}; fix the quoting of that row") from None


def _read_dir(path: Path, decode_errors: str) -> tuple[list[str], list[str], str]:
    """(texts, labels, sha256) of a ``<label>/*.txt`` directory.

    The digest covers the sorted relative paths and the bytes of every file read, so
    renaming, moving or editing any example changes it.
    """
    texts, labels = [], []
    digest = hashlib.sha256()
    for label_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(label_dir.glob("*.txt")):
            raw = f.read_bytes()
            digest.update(f"{label_dir.name}/{f.name}".encode() + b"\0" + hashlib.sha256(raw).digest())
            texts.append(decode_text(raw, str(f), decode_errors).strip())
            labels.append(label_dir.name)
    if not texts:
        raise DataError(f"{path}: no <label>/*.txt files in this directory")
    return texts, labels, digest.hexdigest()


def load_labelled(
    path: str,
    text_column: str = "text",
    label_column: str = "label",
    decode_errors: str = "error",
    empty_texts: str = "drop",
    flag: str = "--train",
    quiet: bool = False,
) -> Examples:
    """Read a labelled file or directory.

    Args:
        path: a .csv/.tsv/.jsonl/.parquet file, a ``<label>/*.txt`` directory, or ``pkg:...``.
        decode_errors: "error" refuses non-UTF-8 bytes, "replace" substitutes U+FFFD.
        empty_texts: "drop" drops null or empty texts with a warning, "error" refuses them.
        flag: the option that named the path, for error messages.
    """
    p = resolve(path)
    if not p.exists():
        raise DataError(f"{flag} {path}: file not found")
    if p.is_dir():
        texts, labels, digest = _read_dir(p, decode_errors)
        first_row = 1
    else:
        texts, labels, first_row = read_rows(p, text_column, label_column, decode_errors)
        digest = sha256_file(p)
    if not texts:
        raise DataError(f"{flag} {path}: the dataset is empty")
    keep, empty_rows = [], []
    for i, (t, y) in enumerate(zip(texts, labels)):
        if y is None or (isinstance(y, str) and not y.strip()) or isinstance(y, float) and y != y:
            raise DataError(f"{p.name}: row {i + first_row}, column '{label_column}': the label is empty")
        if isinstance(y, (float, bool)) or not isinstance(y, (str, int)):
            if isinstance(y, float) and y.is_integer():
                labels[i] = int(y)
            else:
                raise DataError(f"{p.name}: row {i + first_row}, column '{label_column}': label {y!r} is not a string or an integer")
        if t is None or not isinstance(t, str) or not t.strip():
            if t is not None and not isinstance(t, str):
                raise DataError(f"{p.name}: row {i + first_row}, column '{text_column}': text {t!r} is not a string")
            empty_rows.append(i + first_row)
        else:
            keep.append(i)
    if empty_rows:
        shown = ", ".join(map(str, empty_rows[:5])) + (" ..." if len(empty_rows) > 5 else "")
        if empty_texts == "error":
            raise DataError(
                f"{p.name}: {len(empty_rows)} null or empty texts in column '{text_column}' (rows {shown}); "
                "remove them or pass --empty-texts drop"
            )
        if not quiet:
            print(f"warning: {p.name}: dropped {len(empty_rows)} null or empty texts (rows {shown})", file=sys.stderr)
    if not keep:
        raise DataError(f"{flag} {path}: the dataset is empty after dropping empty texts")
    source = {"path": str(path), "sha256": digest, "rows": len(keep), "dropped_empty": len(empty_rows)}
    return Examples([texts[i] for i in keep], [str(labels[i]) for i in keep], source)


def stratified_split(labels: list[str], fractions: list[float], seed: int, what: str) -> list[list[int]]:
    """Split indices by class into ``[rest, *parts]`` with the given fractions.

    Each class keeps at least one example in every part, so a class with fewer than
    ``len(fractions) + 1`` examples is refused.
    """
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    need = len(fractions) + 1
    small = {y: len(ix) for y, ix in by_class.items() if len(ix) < need}
    if small:
        y, n = sorted(small.items(), key=lambda kv: kv[1])[0]
        raise DataError(
            f"class '{y}' has {n} example{'s' * (n != 1)}; a stratified split into {what} needs at least {need} "
            "per class; add examples or pass --validation and --test files"
        )
    for y in sort_labels(set(by_class)):
        ix = by_class[y][:]
        rng.shuffle(ix)
        counts = [max(1, round(len(ix) * f)) for f in fractions]
        while sum(counts) > len(ix) - 1:
            counts[counts.index(max(counts))] -= 1
        start = 0
        for k, c in enumerate(counts, 1):
            parts[k].extend(ix[start : start + c])
            start += c
        parts[0].extend(ix[start:])
    return [sorted(p) for p in parts]


def check_labels_known(examples: Examples, known: set[str], flag: str) -> None:
    unknown = Counter(y for y in examples.labels if y not in known)
    if unknown:
        y, n = unknown.most_common(1)[0]
        raise DataError(
            f"{flag} {examples.source.get('path')}: label '{y}' ({n} rows) is absent from the training data; "
            f"training labels are: {', '.join(sort_labels(known))}"
        )


# Line breaks for str.splitlines() that json.dumps(ensure_ascii=False) leaves raw; escaped, so that
# every reader, however it splits lines, sees one example per line. Inside a JSON string (the only
# place they can appear) the escape means the same character.
_LINE_SAFE = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def write_jsonl(path: Path, examples: Examples) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for t, y in zip(examples.texts, examples.labels):
            f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False).translate(_LINE_SAFE) + "\n")
