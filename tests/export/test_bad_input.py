"""Bad input to export, parity and bench: one line naming the file and the fix, exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ferry.files import sha256_file
from tests import fixtures, tiny
from tests.artifacts import write_manifest
from tests.cli import run_fails


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_directory_without_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_fails(["export", str(empty), "--output", str(tmp_path / "out")], capsys, str(empty), "ferry finetune")
    run_fails(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "out")], capsys, "no such directory", "ferry finetune")
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type(bert_ckpt, tmp_path, capsys):
    ckpt = copy_ckpt(bert_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (ckpt / "config.json").write_text(json.dumps(config))
    line = run_fails(["export", str(ckpt), "--output", str(tmp_path / "out")], capsys, "'frobnicator'", "not supported", "supported:")
    # the supported ones come from optimum's TasksManager
    for name in ("bert", "distilbert", "roberta"):
        assert name in line


def test_corrupted_safetensors(bert_ckpt, tmp_path, capsys):
    ckpt = copy_ckpt(bert_ckpt, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    run_fails(["export", str(ckpt), "--output", str(tmp_path / "out")], capsys, str(ckpt / "model.safetensors"), "corrupted")
    assert not (tmp_path / "out").exists()


def test_tokenizer_that_does_not_match_the_model(tmp_path, capsys):
    tok = fixtures.tokenizer()
    # an embedding matrix smaller than the tokenizer's vocabulary
    ckpt = fixtures.text_checkpoint(tmp_path / "ckpt", "bert", steps=0, vocab_size=len(tok) - 40, tok=tok)
    run_fails(
        ["export", str(ckpt), "--output", str(tmp_path / "out")], capsys,
        f"{len(tok)} tokens", f"{len(tok) - 40} rows", "does not belong to this model",
    )


def test_unwritable_output(bert_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run_fails(["export", str(bert_ckpt), "--output", str(blocker / "artifact")], capsys, "--output", "is a file, not a directory")


def test_output_inside_the_checkpoint(bert_ckpt, capsys):
    run_fails(["export", str(bert_ckpt), "--output", str(bert_ckpt / "onnx")], capsys, "inside the input")


def test_bad_options_are_collected(bert_ckpt, capsys):
    line = run_fails(["export", str(bert_ckpt), "--variants", "int8,int4"], capsys, "'int4' is not one of")
    line = run_fails(["export", str(bert_ckpt), "--variants", "int8"], capsys, "--output is required", "must include fp32")
    assert ";" in line


def test_int8_static_without_calibration(tmp_path, bert_ckpt, capsys):
    ckpt = copy_ckpt(bert_ckpt, tmp_path / "ckpt")
    (ckpt / "calibration.jsonl").unlink()
    run_fails(["export", str(ckpt), "--output", str(tmp_path / "o"), "--variants", "fp32,int8-static"], capsys,
              "no calibration.jsonl", "--calibration FILE")


def corrupted_artifact(bert_artifact: Path, tmp_path: Path, fix_hash: bool) -> Path:
    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    model = art / "model_int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    model.write_bytes(bytes(data[: len(data) * 2 // 3]))
    if fix_hash:  # damaged before hashing: only loading it can tell
        m = json.loads((art / "ferry.json").read_text())
        m["variants"]["int8"]["sha256"] = sha256_file(model)
        write_manifest(art, m)
    return art


@pytest.mark.parametrize("verb", ["parity", "bench"])
def test_corrupted_onnx_detected_by_hash(verb, bert_artifact, tmp_path, capsys):
    art = corrupted_artifact(bert_artifact, tmp_path, fix_hash=False)
    extra = ["--output", str(tmp_path / "b")] if verb == "bench" else []
    run_fails([verb, str(art), "--variants", "int8", "--quiet", *extra], capsys, "model_int8.onnx", "does not match", "re-export")


@pytest.mark.parametrize("verb", ["parity", "bench"])
def test_corrupted_onnx_that_will_not_load(verb, bert_artifact, tmp_path, capsys):
    art = corrupted_artifact(bert_artifact, tmp_path, fix_hash=True)
    extra = ["--output", str(tmp_path / "b"), "--batch-sizes", "1", "--seq-lengths", "8", "--max-seconds", "0.1"] if verb == "bench" else []
    run_fails([verb, str(art), "--variants", "int8", "--quiet", *extra], capsys, "model_int8.onnx", "not a loadable ONNX model")


def test_parity_and_bench_need_an_artifact(bert_ckpt, tmp_path, capsys):
    run_fails(["parity", str(bert_ckpt)], capsys, "not by ferry export", "ferry export")
    run_fails(["bench", str(tmp_path / "nothing")], capsys, "no such directory", "ferry export")


def test_parity_with_moved_checkpoint(bert_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    m = json.loads((art / "ferry.json").read_text())
    m["source"]["checkpoint"] = str(tmp_path / "gone")
    write_manifest(art, m)
    run_fails(["parity", str(art)], capsys, "not found", "--checkpoint DIR")
    run_fails(["bench", str(art), "--output", str(tmp_path / "b")], capsys, "not found", "--no-pytorch")


def test_parity_data_with_unknown_label(bert_artifact, tmp_path, capsys):
    data = tiny.write_csv(tmp_path / "d.csv", [("the goal", "sport"), ("a recipe", "weather")])
    run_fails(["parity", str(bert_artifact), "--data", str(data), "--quiet"], capsys, "label 'weather'", "sport")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, a directory nobody can write in")
def test_output_in_a_directory_nobody_can_write(bert_ckpt, capsys):
    run_fails(["export", str(bert_ckpt), "--output", "/proc/ferry-test/artifact"], capsys, "--output", "cannot write in")


@pytest.mark.parametrize("key, value, needle", [
    ("variants", [], "'variants' must be a non-empty mapping"),
    ("variants", {"fp32": "model.onnx"}, "variant 'fp32' must be a mapping with a 'file' name"),
    ("labels", "abc", "'labels' must be a non-empty list of strings"),
    ("inputs", [1, 2], "'inputs' must be a non-empty list of strings"),
    ("max_length", "512", "'max_length' must be an integer"),
    ("default_variant", ["fp32"], "'default_variant' must be a mapping"),
])
def test_malformed_artifact_manifest_is_one_line_and_status_2(bert_artifact, tmp_path, capsys, key, value, needle):
    """A manifest with a wrong type (sealed, so the seal is not what refuses it): named, never a traceback."""
    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    m = json.loads((art / "ferry.json").read_text())
    m[key] = value
    write_manifest(art, m)
    run_fails(["parity", str(art), "--quiet"], capsys, "ferry.json", needle, "re-export")
    run_fails(["serve", str(art)], capsys, needle)
