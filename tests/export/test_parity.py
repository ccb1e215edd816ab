"""`ferry parity` and the parity pieces: the gate passes, fails on a broken model, and the
fp16/CUDA path is judged correctly with the provider list faked."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ferry.files import read_manifest
from runtime.engines import cuda_usable, gpu_present
from tests import fixtures, tiny
from tests.artifacts import write_manifest
from tests.export.reference import reference
from tests.cli import run


def test_parity_command_checks_every_variant(bert_artifact, tmp_path, capsys):
    report = tmp_path / "parity.json"
    # (fp16's gate widened: on a GPU the tiny model's random 128-token inputs may pass 1e-2)
    rc, out, err = run(["parity", str(bert_artifact), "--quiet", "--threads", "1", "--fp16-max-diff", "0.05",
                        "--report", str(report)], capsys)
    assert rc == 0, err
    for name in ("fp32", "int8", "int8-static", "fp16"):
        assert name in out
    data = json.loads(report.read_text())
    assert set(data["variants"]) == {"fp32", "int8", "int8-static", "fp16"}
    assert data["variants"]["fp32"]["status"] == "pass"
    assert data["variants"]["fp16"]["status"] == ("pass" if cuda_usable() else "unverified")
    assert data["variants"]["int8"]["heldout"]["source"].endswith("heldout.jsonl")


def test_parity_on_data_file(bert_artifact, tmp_path, capsys):
    data = tiny.write_csv(tmp_path / "extra.csv", tiny.texts(4, seed=21))
    report = tmp_path / "r.json"
    rc, out, err = run(["parity", str(bert_artifact), "--data", str(data), "--variants", "fp32,int8", "--quiet",
                        "--report", str(report)], capsys)
    assert rc == 0, err
    held = json.loads(report.read_text())["variants"]["int8"]["heldout"]
    assert held["source"] == str(data) and held["examples"] == 12


def test_parity_fails_on_perturbed_onnx(bert_artifact, tmp_path, capsys):
    """A model whose weights were changed after export (hash updated): the gate fails, exit 1."""
    import onnx
    from onnx import numpy_helper

    from ferry.files import sha256_file

    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    model = onnx.load(str(art / "model.onnx"))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 2:
            init.CopyFrom(numpy_helper.from_array((w * 1.01).astype(np.float32), init.name))
    onnx.save(model, str(art / "model.onnx"))
    m = json.loads((art / "ferry.json").read_text())
    m["variants"]["fp32"]["sha256"] = sha256_file(art / "model.onnx")
    write_manifest(art, m)
    rc, out, err = run(["parity", str(art), "--variants", "fp32", "--quiet"], capsys)
    assert rc == 1
    assert "fp32 failed the parity gate" in err and "Traceback" not in err
    assert "fail" in out


def test_fp16_is_unverified_without_cuda_and_never_passed(bert_artifact, bert_ckpt):
    from export.parity import check_variant

    ref, args = reference(bert_ckpt)
    # Provider list without CUDA: not run at all.
    res = check_variant("fp16", bert_artifact / "model_fp16.onnx", ref, args.gates(), threads=args.threads, available=["CPUExecutionProvider"])
    assert res["status"] == "unverified" and res["batch_invariance"] is None
    # CUDA listed (as onnxruntime-gpu lists it) but no GPU behind it: ORT falls back to CPU,
    # and the variant stays unverified rather than being judged on the wrong provider.
    if not gpu_present():  # (on a GPU machine this runs on CUDA: see the gpu test below)
        res = check_variant("fp16", bert_artifact / "model_fp16.onnx", ref, args.gates(), threads=args.threads,
                            available=["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert res["status"] == "unverified" and "fell back" in res["reason"]
    # Asked for CPU only: unverified too.
    res = check_variant("fp16", bert_artifact / "model_fp16.onnx", ref, args.gates(), threads=args.threads, device="cpu",
                        available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert res["status"] == "unverified"


def test_output_name_mismatch_fails_before_values(bert_artifact, bert_ckpt, tmp_path):
    import onnx

    from export.parity import check_variant

    model = onnx.load(str(bert_artifact / "model.onnx"))
    old = model.graph.output[0].name
    model.graph.output[0].name = "scores"
    for node in model.graph.node:
        node.output[:] = ["scores" if o == old else o for o in node.output]
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    ref, args = reference(bert_ckpt)
    res = check_variant("fp32", tmp_path / "renamed.onnx", ref, args.gates(), threads=args.threads)
    assert res["status"] == "fail" and "expected 'logits'" in res["reason"]


def test_random_inputs_are_right_padded_with_varied_lengths():
    from export.inputs import random_ids
    from runtime.tokens import collate

    tok = fixtures.tokenizer()
    rng = np.random.default_rng(0)
    ids = random_ids(tok, len(tok), 6, 20, rng)
    feeds = collate(ids, tok.pad_token_id, ["input_ids", "attention_mask", "token_type_ids"])
    mask = feeds["attention_mask"]
    assert feeds["input_ids"].shape == (6, 20) and mask[0].sum() == 20
    assert len(set(mask.sum(1).tolist())) > 1  # varied real lengths
    for row, m in zip(feeds["input_ids"], mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # right padding
        assert row[0] == tok.cls_token_id and row[n - 1] == tok.sep_token_id
        assert (row[n:] == tok.pad_token_id).all()
        assert not set(row[1 : n - 1].tolist()) & set(tok.all_special_ids)


def test_usable_length_caps_at_positions():
    from export.parity import usable_length

    assert usable_length({"max_position_embeddings": 512, "model_type": "bert"}, 128) == 128
    assert usable_length({"max_position_embeddings": 128, "model_type": "bert"}, 512) == 128
    # RoBERTa's positions start after the padding index
    assert usable_length({"max_position_embeddings": 514, "model_type": "roberta", "pad_token_id": 1}, 1024) == 512


@pytest.mark.gpu
def test_fp16_passes_its_gate_on_a_real_gpu(bert_artifact):
    """On a machine with a usable CUDA provider, ferry export verifies fp16 there (not 'unverified')."""
    if not cuda_usable():
        pytest.skip("needs a CUDA GPU")
    fp16 = read_manifest(bert_artifact)["variants"]["fp16"]
    assert fp16["status"] == "pass", fp16["parity"]
    assert fp16["parity"]["max_abs_diff"] <= 1e-2
