"""Labelled text data written in every format `ferry finetune` reads, for the finetune tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write(path: Path, rows: list[tuple[str, object]], fmt: str) -> Path:
    """Write (text, label) rows in ``fmt``; labels keep their Python type where the format can."""
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow(["text", "label"])
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), path)
    elif fmt == "dir":
        path.mkdir()
        for i, (t, y) in enumerate(rows):
            (path / str(y)).mkdir(exist_ok=True)
            (path / str(y) / f"{i:03d}.txt").write_text(t + "\n", encoding="utf-8")
    return path
