"""Data formats, labels and the stratified split."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from ferry.errors import DataError
from ferry.files import read_manifest
from finetune.data import load_labelled, stratified_split
from tests.cli import finetune_argv, run_ok
from tests.finetune.datafiles import write


FORMATS = {"csv": "train.csv", "tsv": "train.tsv", "jsonl": "train.jsonl", "parquet": "train.parquet", "dir": "train"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_reads_the_same_examples(tmp_path, rows, fmt):
    path = write(tmp_path / FORMATS[fmt], rows, fmt)
    ex = load_labelled(str(path))
    got = sorted(zip(ex.texts, ex.labels))
    assert got == sorted(rows)
    assert ex.source["rows"] == len(rows)
    assert ex.source["dropped_empty"] == 0
    assert isinstance(ex.source["sha256"], str) and len(ex.source["sha256"]) == 64


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_integer_labels_become_label_names(tmp_path, rows, fmt):
    names = sorted({y for _, y in rows})
    int_rows = [(t, names.index(y)) for t, y in rows]
    ex = load_labelled(str(write(tmp_path / FORMATS[fmt], int_rows, fmt)))
    assert set(ex.labels) == {"0", "1", "2"}
    assert Counter(ex.labels) == Counter(str(y) for _, y in int_rows)


def test_directory_hash_covers_names_and_contents(tmp_path, rows):
    a = write(tmp_path / "a", rows, "dir")
    b = write(tmp_path / "b", rows, "dir")
    assert load_labelled(str(a)).source["sha256"] == load_labelled(str(b)).source["sha256"]
    first = sorted((b / "food").iterdir())[0]
    first.write_text(first.read_text() + " extra", encoding="utf-8")
    assert load_labelled(str(a)).source["sha256"] != load_labelled(str(b)).source["sha256"]
    c = write(tmp_path / "c", rows, "dir")
    moved = sorted((c / "food").iterdir())[0]
    moved.rename(c / "food" / "zzz.txt")
    assert load_labelled(str(a)).source["sha256"] != load_labelled(str(c)).source["sha256"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_finetune_trains_on_every_format(tmp_path, tiny_bert, rows, capsys, fmt):
    data = write(tmp_path / FORMATS[fmt], rows, fmt)
    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, data, out, "--epochs", "1"), capsys)
    manifest = read_manifest(out)
    assert manifest["labels"] == ["food", "sport", "tech"]
    assert manifest["data"]["train"]["rows"] == len(rows)
    assert manifest["split"]["sizes"] == {"train": 96, "validation": 12, "test": 12}


def test_integer_labels_end_to_end(tmp_path, tiny_bert, rows, capsys):
    names = sorted({y for _, y in rows})
    data = write(tmp_path / "train.jsonl", [(t, names.index(y)) for t, y in rows], "jsonl")
    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, data, out, "--epochs", "1"), capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1", "2": "2"}
    assert config["label2id"] == {"0": 0, "1": 1, "2": 2}


def test_stratified_split_is_fixed_disjoint_and_covers_every_class():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    parts = stratified_split(labels, [0.1, 0.2], seed=7, what="test")
    assert parts == stratified_split(labels, [0.1, 0.2], seed=7, what="test")
    assert parts != stratified_split(labels, [0.1, 0.2], seed=8, what="test")
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(100))  # disjoint and complete
    counts = [Counter(labels[i] for i in p) for p in parts]
    assert counts[1] == {"a": 5, "b": 3, "c": 2}
    assert counts[2] == {"a": 10, "b": 6, "c": 4}
    assert counts[0] == {"a": 35, "b": 21, "c": 14}


def test_split_keeps_one_example_per_class_in_each_part():
    labels = ["a"] * 40 + ["rare"] * 3
    rest, val, test = stratified_split(labels, [0.1, 0.1], seed=0, what="x")
    for part in (rest, val, test):
        assert "rare" in {labels[i] for i in part}


def test_split_refuses_a_class_too_small():
    with pytest.raises(DataError, match="class 'rare' has 2 examples"):
        stratified_split(["a"] * 40 + ["rare"] * 2, [0.1, 0.1], seed=0, what="x")


def test_finetune_split_sizes_per_class_in_manifest(trained):
    split = read_manifest(trained)["split"]
    assert split["seed"] == 42
    assert split["fractions"] == {"validation": 0.1, "test": 0.1}
    assert split["sizes"] == {"train": 96, "validation": 12, "test": 12}
    for name, size in split["sizes"].items():
        assert sum(split["per_class"][name].values()) == size
        assert all(n > 0 for n in split["per_class"][name].values())


def test_given_validation_and_test_files_are_not_split(tmp_path, tiny_bert, rows, capsys):
    train = write(tmp_path / "train.csv", rows[:90], "csv")
    val = write(tmp_path / "val.csv", rows[90:105], "csv")
    test = write(tmp_path / "test.jsonl", rows[105:], "jsonl")
    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, train, out, "--epochs", "1", "--validation", str(val), "--test", str(test)), capsys)
    m = read_manifest(out)
    assert m["split"]["sizes"] == {"train": 90, "validation": 15, "test": 15}
    assert m["split"]["fractions"] == {}
    assert m["data"]["validation"]["path"] == str(val)
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert [(r["text"], r["label"]) for r in heldout] == rows[105:]
    validation = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [(r["text"], r["label"]) for r in validation] == rows[90:105]


# --- hostile text: line separators, quotes, huge fields, huge integers --------------------------------

# Each of these characters is a line break for str.splitlines() but not for CSV or JSON Lines.
HOSTILE_TEXTS = [
    "next\u0085line", "line\u2028separator", "paragraph\u2029separator", "form\x0cfeed", "vertical\x0btab",
    "crlf\r\ninside", "lone\rcr", "lf\ninside", 'quotes "inside", and a comma', '"quoted"', "tab\tinside",
    "  spaces around  ", "x" * (200 * 1024),
]


def hostile_rows() -> list[tuple[str, str]]:
    return [(t, "ab"[i % 2]) for i, t in enumerate(HOSTILE_TEXTS)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_hostile_texts_survive_every_reader_byte_for_byte(tmp_path, fmt):
    from export.inputs import read_texts

    rows = hostile_rows()
    path = tmp_path / FORMATS[fmt]
    if fmt == "jsonl":  # characters written raw, as json.dumps(ensure_ascii=False) writes them
        path.write_text("".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows),
                        encoding="utf-8")
    else:
        write(path, rows, fmt)
    ex = load_labelled(str(path))
    assert list(zip(ex.texts, ex.labels)) == rows
    assert read_texts(str(path)) == HOSTILE_TEXTS


def test_a_text_file_is_split_on_line_ends_only(tmp_path):
    from export.inputs import read_texts

    one_line = [t for t in HOSTILE_TEXTS if "\n" not in t and "\r" not in t]
    path = tmp_path / "texts.txt"
    path.write_bytes(("\r\n".join(one_line[:3]) + "\n" + "\n".join(one_line[3:]) + "\n").encode())
    assert read_texts(str(path)) == one_line


def test_hostile_texts_survive_write_jsonl_and_every_reader_of_it(tmp_path):
    from export.inputs import read_jsonl_texts
    from finetune.data import Examples, write_jsonl

    rows = hostile_rows()
    path = tmp_path / "heldout.jsonl"
    write_jsonl(path, Examples([t for t, _ in rows], [y for _, y in rows]))
    # line-safe: even a reader that splits on every Unicode line break sees one line per example
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(rows)
    ex = load_labelled(str(path))
    assert list(zip(ex.texts, ex.labels)) == rows
    assert read_jsonl_texts(path) == ([t for t, _ in rows], [y for _, y in rows])


def test_finetune_keeps_hostile_texts_in_its_heldout_file(tmp_path, tiny_bert, rows, capsys):
    from export.inputs import read_jsonl_texts

    extra = [(t, "food") for t in HOSTILE_TEXTS[:12]]
    data = write(tmp_path / "train.csv", rows + extra, "csv")
    out = tmp_path / "ckpt"
    run_ok(finetune_argv(tiny_bert, data, out, "--epochs", "1", "--test-fraction", "0.5", "--calibration-samples", "200"), capsys)
    texts = read_jsonl_texts(out / "heldout.jsonl")[0] + read_jsonl_texts(out / "calibration.jsonl")[0]
    assert set(HOSTILE_TEXTS[:12]) <= set(texts)


def test_csv_error_is_a_data_error_naming_file_and_row(tmp_path, monkeypatch):
    import finetune.data as data_mod

    path = write(tmp_path / "train.csv", [("short", "a"), ("y" * 5000, "b")], "csv")
    old = csv.field_size_limit()
    monkeypatch.setattr(data_mod, "allow_fields_of", lambda size: csv.field_size_limit(1000))
    try:
        with pytest.raises(DataError, match=r"train\.csv: row 3: .*field larger than field limit"):
            load_labelled(str(path))
    finally:
        csv.field_size_limit(old)


@pytest.mark.parametrize("fmt", ["jsonl", "heldout"])
def test_json_integer_of_5000_digits_is_a_data_error(tmp_path, fmt):
    from export.inputs import read_jsonl_texts

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": ' + "9" * 5000 + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl: line 2"):
        load_labelled(str(path)) if fmt == "jsonl" else read_jsonl_texts(path)


@pytest.mark.parametrize("label", ["--1", "-", "²", "1-"])
def test_labels_that_look_like_numbers_sort(label):
    from finetune.data import sort_labels

    assert sorted(sort_labels({label, "2", "3"})) == sorted({label, "2", "3"})
    assert sort_labels({"-1", "10", "2"}) == ["-1", "2", "10"]
