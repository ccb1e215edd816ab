"""Input files for the `ferry predict` tests: the same rows as CSV, TSV, JSON Lines and Parquet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests import tiny


def rows(n_per_class: int = 12) -> list[dict]:
    """{"id", "text", "topic"} rows whose texts differ widely in length, long and short interleaved
    (so sorting a chunk by length moves rows around), a long one past the model's 64 tokens."""
    out = []
    for i, (text, label) in enumerate(tiny.texts(n_per_class, seed=5)):
        if i % 4 == 1:
            text = " ".join([text] * (2 + i % 9))
        out.append({"id": f"r{i:03d}", "text": text, "topic": label})
    return out


def write(path: Path, rows: list[dict]) -> Path:
    """``rows`` written in the format of ``path``'s extension (Parquet: row groups of 5 rows)."""
    fmt = path.suffix[1:]
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    return path


def read(path: Path) -> list[dict]:
    """The rows of an output file, values as written (CSV: text; empty fields None)."""
    fmt = path.suffix[1:]
    if fmt in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: (v if v != "" else None) for k, v in r.items()} for r in csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")]
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def predictions(path: Path) -> list[tuple]:
    """(id, label, score as a float) per output row."""
    return [(r["id"], r["label"], None if r["score"] is None else float(r["score"])) for r in read(path)]
