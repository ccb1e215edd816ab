"""The files `ferry predict` reads and writes: CSV, TSV, JSON Lines and Parquet, one chunk at a time.

Reading never holds the whole file: CSV and TSV go through pyarrow's streaming reader
(``pyarrow.csv.open_csv``), Parquet through ``ParquetFile.iter_batches``, JSON Lines through
blocks of bytes split at ``\\n``. Every reader yields *raw chunks* of exactly ``chunk_rows`` rows
(the last one shorter), the same chunks whether the local loop or a Ray read task reads them,
so both runs score the same rows together and write the same bytes.

A raw chunk is a pyarrow Table:

- CSV/TSV: every column as text (a value is passed through as written: ``007`` stays ``007``),
  the input column as bytes (decoded per row, so a row that is not UTF-8 is a bad row, not a
  failed file). An unquoted empty field is null (no text); a quoted one (``""``) is the empty
  string. Quoted fields may span lines, as the csv module reads them for ``ferry finetune``.
- Parquet: the file's own columns and types.
- JSON Lines: one column ``line`` with each non-blank line's bytes (a line ends at ``\\n`` alone:
  U+2028 inside a string is text), parsed per row by :func:`parse_lines`.

Kept columns of JSON Lines travel as their JSON text and are written back as such to JSON
Lines; to CSV, TSV or Parquet a string is written as the string, any other value as its JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from ferry.errors import DataError, first_line

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
EXTENSION = {fmt: ext for ext, fmt in FORMATS.items()}
LINE = "line"  # the one column of a JSON Lines raw chunk
BLOCK = 1 << 20
# Column names that name an id, the column kept by default (the first one found, in file order).
ID_NAMES = ("id",)


def format_of(path: Path, flag: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{flag} {path}: unsupported extension '{path.suffix}'; use .csv, .tsv, .jsonl or .parquet")
    return fmt


def csv_options(fmt: str, names: list[str], column: str, binary_input: bool = True) -> dict[str, Any]:
    """The pyarrow CSV options of a raw chunk (open_csv's keyword arguments)."""
    import pyarrow as pa
    import pyarrow.csv as pc

    types = {n: pa.string() for n in names}
    if binary_input:
        types[column] = pa.binary()
    return {
        "read_options": pc.ReadOptions(block_size=BLOCK),
        "parse_options": pc.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
        "convert_options": pc.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True,
                                             quoted_strings_can_be_null=False),
    }


def header(path: Path, fmt: str) -> list[str]:
    """The column names of a file (JSON Lines: the keys of its first object, in order)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except Exception as e:  # pyarrow raises many types for a damaged file
            raise DataError(f"--data {path}: not a readable Parquet file ({first_line(e)})") from None
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for raw in f:  # the first line that is a JSON object (a bad line before it is a bad row)
                try:
                    row = json.loads(raw) if raw.strip() else None
                except ValueError:
                    continue
                if isinstance(row, dict):
                    return list(row)
        return []
    import csv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:  # a BOM is not part of a name (pyarrow skips it too)
        try:
            return next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","))
        except StopIteration:
            raise DataError(f"--data {path}: the file is empty") from None
        except csv.Error as e:
            raise DataError(f"--data {path}: cannot read the header ({e})") from None


def columns_needed(fmt: str, column: str, keep: list[str]) -> list[str] | None:
    """The columns a raw chunk holds (None for JSON Lines, whose chunks hold the lines)."""
    return None if fmt == "jsonl" else [column] + [k for k in keep if k != column]


def read_chunks(source: str | Path | BinaryIO, fmt: str, chunk_rows: int, names: list[str], column: str,
                needed: list[str] | None) -> Iterator[Any]:
    """Raw chunks of exactly ``chunk_rows`` rows (the last one shorter) of a file or an open stream.

    Raises:
        DataError: a file pyarrow cannot parse (a CSV row with more fields than the header, a
            damaged Parquet file), with pyarrow's reason.
    """
    import pyarrow as pa

    if fmt == "jsonl":
        yield from _jsonl_chunks(source, chunk_rows)
        return
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(source).iter_batches(batch_size=chunk_rows, columns=needed)
        else:
            import pyarrow.csv as pc

            opts = csv_options(fmt, names, column)
            opts["convert_options"].include_columns = needed
            batches = pc.open_csv(source, **opts)
        yield from rebatch(batches, chunk_rows)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowIOError) as e:
        where = source if isinstance(source, (str, Path)) else "the data file"
        raise DataError(f"--data {where}: cannot read it as {fmt.upper()} ({first_line(e, 300)})") from None


def rebatch(batches: Any, rows: int) -> Iterator[Any]:
    """Tables of exactly ``rows`` rows (the last one shorter) from record batches of any size."""
    import pyarrow as pa

    pending: list[Any] = []
    held = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - held, batch.num_rows)
            pending.append(batch.slice(0, take))
            held += take
            batch = batch.slice(take)
            if held == rows:
                yield pa.Table.from_batches(pending).combine_chunks()
                pending, held = [], 0
    if held:
        yield pa.Table.from_batches(pending).combine_chunks()


def _jsonl_chunks(source: str | Path | BinaryIO, chunk_rows: int) -> Iterator[Any]:
    import pyarrow as pa

    def table(lines: list[bytes]) -> Any:
        return pa.table({LINE: pa.array(lines, pa.binary())})

    f = open(source, "rb") if isinstance(source, (str, Path)) else source
    try:
        lines: list[bytes] = []
        rest = b""
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            for part in parts:
                if part.strip():
                    lines.append(part)
                    if len(lines) == chunk_rows:
                        yield table(lines)
                        lines = []
        if rest.strip():
            lines.append(rest)
        if lines:
            yield table(lines)
    finally:
        if f is not source:
            f.close()


def parse_lines(lines: list[bytes], column: str, keep: list[str]) -> tuple[list[Any], dict[str, list[str]], list[str | None]]:
    """(input values, kept columns as JSON text, per-row problem or None) of JSON Lines rows."""
    values: list[Any] = []
    kept: dict[str, list[str]] = {k: [] for k in keep}
    problems: list[str | None] = []
    for raw in lines:
        problem, row = None, None
        try:
            row = json.loads(raw.rstrip(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            problem = f"not valid UTF-8 (byte {e.start})"
        except ValueError as e:  # JSONDecodeError, or an integer of more than 4,300 digits
            problem = f"not valid JSON ({getattr(e, 'msg', None) or first_line(e)})"
        if problem is None and not isinstance(row, dict):
            problem = "not a JSON object"
        row = row if isinstance(row, dict) else {}
        values.append(row.get(column))
        problems.append(problem)
        for k in keep:
            kept[k].append(json.dumps(row.get(k), ensure_ascii=False))
    return values, kept, problems


def count_and_hash(path: Path, fmt: str) -> tuple[str, int]:
    """(sha256 of the file, its rows for the progress bar): Parquet's from its metadata, else an
    estimate from its lines (more than the rows when blank JSON Lines or quoted line breaks are in it)."""
    import hashlib

    h = hashlib.sha256()
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return h.hexdigest(), pq.ParquetFile(path).metadata.num_rows
    lines += last != b"\n"  # a last line without its \n
    return h.hexdigest(), max(lines - (fmt in ("csv", "tsv")), 0)


# --- output -------------------------------------------------------------------------------


def plain(value: str | None) -> str | None:
    """A kept JSON Lines value as written to CSV, TSV or Parquet: a string as itself, null as null,
    anything else as its JSON text."""
    if value is None or value == "null":
        return None
    return json.loads(value) if value.startswith('"') else value


class Writer:
    """Appends output chunks to one open file of ``fmt``; the Parquet file is finished by :meth:`close`.

    ``raw_json`` names the columns holding JSON text (kept columns of JSON Lines input).
    """

    def __init__(self, f: BinaryIO, fmt: str, raw_json: list[str], header: bool):
        self.f, self.fmt, self.raw_json, self.header = f, fmt, set(raw_json), header
        self.parquet: Any = None

    def write(self, table: Any) -> None:
        if self.fmt == "jsonl":
            self.f.write(self._jsonl(table))
            return
        if self.raw_json:
            table = self._plain(table)
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.f, table.schema)
            self.parquet.write_table(table)
            return
        import pyarrow.csv as pc

        opts = pc.WriteOptions(include_header=self.header, delimiter="\t" if self.fmt == "tsv" else ",")
        pc.write_csv(table, self.f, write_options=opts)
        self.header = False

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()

    def _plain(self, table: Any) -> Any:
        import pyarrow as pa

        for name in self.raw_json:
            i = table.column_names.index(name)
            table = table.set_column(i, name, pa.array([plain(v) for v in table.column(i).to_pylist()], pa.string()))
        return table

    def _jsonl(self, table: Any) -> bytes:
        names = table.column_names
        keys = [json.dumps(n, ensure_ascii=False) for n in names]
        cols = []
        for n in names:
            values = table.column(n).to_pylist()
            if n in self.raw_json:
                cols.append(values)
            else:
                cols.append([json.dumps(v, ensure_ascii=False, default=str) for v in values])
        out = []
        for row in zip(*cols):
            out.append("{" + ", ".join(f"{k}: {v}" for k, v in zip(keys, row)) + "}\n")
        return "".join(out).encode("utf-8")
