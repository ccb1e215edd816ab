"""`ferry predict` on an image artifact: paths in CSV, bytes in Parquet, unreadable images as bad rows."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ferry.cli import main
from runtime.pixels import open_image, preprocess
from runtime.predictor import Runtime
from tests import tiny
from tests.predict import data


@pytest.mark.slow
def test_images_by_path_and_by_bytes(image_artifact, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = []
    for k, label in enumerate(tiny.IMAGE_LABELS * 3):
        tiny.image(label, size=24, seed=50 + k).save(folder / f"{k}.png")
        names.append(f"imgs/{k}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [{"id": f"i{k}", "image": n} for k, n in enumerate(names)]
    rows[2:2] = [{"id": "missing", "image": "imgs/nope.png"}, {"id": "broken", "image": "imgs/broken.png"}]
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "image"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out.csv"
    argv = ["predict", str(image_artifact), "--data", str(src), "--output", str(out), "--chunk-rows", "4",
            "--batch-size", "3", "--all-scores", "--quiet"]
    assert main(argv) == 0
    got = data.read(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    assert got[2]["label"] is None and got[2]["error"].startswith("imgs/nope.png: cannot read it")
    assert got[3]["label"] is None and "imgs/broken.png" in got[3]["error"]

    # each image's answer is the server runtime's answer for it
    rt = Runtime(image_artifact, device="cpu")
    good = [r for r in rows if r["id"].startswith("i")]
    pixels = preprocess([open_image((tmp_path / r["image"]).read_bytes(), r["image"]) for r in good], rt.inputs.processor)
    probs = np.concatenate([rt.run_batch(pixels[k : k + 1]).probs for k in range(len(good))])
    answers = [g for g in got if g["error"] is None]
    assert [a["label"] for a in answers] == [rt.labels[int(p.argmax())] for p in probs]
    for a, p in zip(answers, probs):
        assert abs(float(a["score"]) - float(p.max())) <= 1e-6
    assert sum(a["label"] == name for a, name in zip(answers, tiny.IMAGE_LABELS * 3)) >= 6  # trained: mostly right

    # Parquet with the image bytes themselves
    table = pa.table({"id": [r["id"] for r in good], "image": [(tmp_path / r["image"]).read_bytes() for r in good]})
    pq.write_table(table, tmp_path / "bytes.parquet")
    assert main(["predict", str(image_artifact), "--data", str(tmp_path / "bytes.parquet"),
                 "--output", str(tmp_path / "bytes-out.parquet"), "--quiet"]) == 0
    again = data.read(tmp_path / "bytes-out.parquet")
    assert [(r["id"], r["label"]) for r in again] == [(a["id"], a["label"]) for a in answers]
