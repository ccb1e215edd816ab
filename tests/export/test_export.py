"""`ferry export` end to end on tiny models: files, manifest, ONNX vs PyTorch, the gate."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from runtime.artifact import check_valid_artifact_dir
from runtime.engines import cuda_usable
from ferry.files import read_manifest, sha256_file
from ferry.tasks import TEXT_TASK
from tests.cli import EXPORT_FAST, run
from tests.tiny import LABELS

BERT_FILES = {
    "ferry.json", "config.json", "model.onnx", "model_int8.onnx", "model_int8_static.onnx", "model_fp16.onnx",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "reference.jsonl",
}


def onnx_vs_pytorch(ckpt: Path, onnx_path: Path) -> tuple[list[str], float]:
    """Run the exported file and the PyTorch checkpoint on the same right-padded batches at
    three batch sizes and three sequence lengths; return the ONNX inputs and max |Δlogit|."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    accepted = inspect.signature(model.forward).parameters
    rng = np.random.default_rng(0)
    words = "the match goal chip code pasta soup team data bread very good".split()
    worst = 0.0
    for batch in (1, 4, 9):
        for length in (5, 20, 60):
            texts = [" ".join(rng.choice(words, size=int(rng.integers(1, length + 1)))) for _ in range(batch)]
            texts[0] = " ".join(["goal"] * length)  # one row reaches the full length
            enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
            assert enc["attention_mask"].min() == 0 or batch == 1  # real lengths vary inside a batch
            (onnx_logits,) = session.run(["logits"], {n: enc[n].astype(np.int64) for n in names})
            with torch.inference_mode():
                want = model(**{k: torch.from_numpy(v) for k, v in enc.items() if k in accepted}).logits.numpy()
            assert onnx_logits.shape == (batch, len(LABELS))
            worst = max(worst, float(np.abs(onnx_logits - want).max()))
    return names, worst


def test_bert_artifact_files_and_manifest(bert_artifact, bert_ckpt):
    assert {p.name for p in bert_artifact.iterdir()} == BERT_FILES
    m = read_manifest(bert_artifact)
    assert m["stage"] == "export" and m["task"] == TEXT_TASK
    assert m["labels"] == LABELS
    assert m["source"]["checkpoint"] == str(bert_ckpt.resolve())
    assert m["source"]["manifest_sha256"] == sha256_file(bert_ckpt / "ferry.json")
    assert m["source"]["model_type"] == "bert"
    assert m["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert m["outputs"] == ["logits"]
    assert isinstance(m["opset"], int) and m["opset"] >= 11
    assert m["max_length"] == 64
    assert set(m["versions"]) >= {"python", "ferry", "torch", "onnx", "onnxruntime-gpu", "optimum-onnx"}
    assert list(m["variants"]) == ["fp32", "int8", "int8-static", "fp16"]
    for name, v in m["variants"].items():
        path = bert_artifact / v["file"]
        assert v["sha256"] == sha256_file(path) and v["bytes"] == path.stat().st_size
        assert {"precision", "provider", "batch_invariant", "status", "parity", "graph_ops", "optimization"} <= set(v)
    fp32, int8, static, fp16 = (m["variants"][n] for n in ("fp32", "int8", "int8-static", "fp16"))
    assert (fp32["precision"], int8["precision"], static["precision"], fp16["precision"]) == ("fp32", "int8", "int8", "fp16")
    assert fp16["provider"] == "CUDAExecutionProvider" and fp32["provider"] == "CPUExecutionProvider"
    # The graph carries ONNX Runtime's transformer fusions.
    assert fp32["graph_ops"].get("Attention", 0) == 2 and fp32["graph_ops"].get("SkipLayerNormalization", 0) >= 2
    assert fp32["optimization"]["level"] == "O2" and m["settings"]["optimization"] == "O2"
    assert int8["quantization"]["method"] == "dynamic" and int8["quantization"]["per_channel"] is True
    assert static["quantization"]["method"] == "static-qdq"
    assert static["quantization"]["calibration"]["samples"] == 30  # all of the checkpoint's calibration texts
    # fp32 meets its gate; fp16 cannot be verified without CUDA; int8s are judged on labels.
    assert fp32["status"] == "pass" and fp32["parity"]["max_abs_diff"] <= 1e-4
    if not cuda_usable():  # (on a GPU: see test_parity's gpu test)
        assert fp16["status"] == "unverified" and "CUDA" in fp16["parity"]["reason"]
    for v in (int8, static):
        held = v["parity"]["heldout"]
        assert held["examples"] == 36 and held["agreement"] >= 0.99
        assert v["status"] == "pass"
    # Batch invariance is measured: fixed scales are invariant, per-batch scales are not.
    assert fp32["batch_invariant"] is True and static["batch_invariant"] is True
    assert int8["batch_invariant"] is False and int8["parity"]["batch_invariance"]["max_abs_prob_diff"] > 1e-5
    if cuda_usable():
        assert fp16["batch_invariant"] in (True, False)  # measured on the GPU
    else:
        assert fp16["batch_invariant"] is None
    assert m["default_variant"] == {"cpu": "int8-static", "gpu": "fp16"}
    assert [v["engine"] for v in m["variants"].values()] == ["onnxruntime"] * 4
    assert set(m["machine"]["features"]) == {"avx2", "avx512", "vnni", "bf16", "amx", "fp16"} and m["machine"]["model"]
    # The reference `ferry serve` re-checks against: PyTorch's logits on the held-out texts' first tokens.
    ref = m["reference"]
    assert (ref["texts"], ref["max_tokens"], ref["sha256"]) == (36, 64, sha256_file(bert_artifact / ref["file"]))
    import torch
    from transformers import AutoModelForSequenceClassification

    rows = [json.loads(line) for line in (bert_artifact / ref["file"]).read_text().splitlines()]
    model = AutoModelForSequenceClassification.from_pretrained(bert_ckpt).eval()
    for row in rows[:5]:
        ids = torch.tensor([row["input_ids"]])
        with torch.inference_mode():
            want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
        assert len(row["input_ids"]) <= 64 and np.abs(np.array(row["logits"]) - want).max() < 1e-5
    # The reader the serving stage uses accepts it, and every file matches its hash.
    art = check_valid_artifact_dir(bert_artifact)
    assert art.variant(device="cpu").name == "int8-static"
    for v in art.variants.values():
        v.verify()


def test_parity_block_records_all_measures(bert_artifact):
    p = read_manifest(bert_artifact)["variants"]["fp32"]["parity"]
    assert p["checks"] == {"output_names": "ok", "shapes": "ok"}
    # random tokens: batch sizes 1 and 3 at lengths 8, 24 and 64
    assert p["random"]["cases"] == [[1, 8], [3, 8], [1, 24], [3, 24], [1, 64], [3, 64]]
    assert p["random"]["agreement"] == 1.0
    held = p["heldout"]
    assert set(held) >= {"max_abs_diff", "mean_abs_diff", "agreement", "pytorch", "onnx", "delta_accuracy_points", "delta_macro_f1_points"}
    assert held["pytorch"]["accuracy"] == held["onnx"]["accuracy"]
    assert p["gates"] == {"max_abs_diff": 1e-4}
    assert read_manifest(bert_artifact)["variants"]["int8"]["parity"]["gates"] == {"min_agreement": 0.995, "max_accuracy_drop_points": 1.0}


def test_bert_onnx_matches_pytorch_at_three_shapes(bert_artifact, bert_ckpt):
    names, worst = onnx_vs_pytorch(bert_ckpt, bert_artifact / "model.onnx")
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    assert worst <= 1e-4


@pytest.mark.parametrize("arch", ["distilbert", "roberta"])
def test_export_distilbert_and_roberta(arch, request, tmp_path, capsys):
    ckpt = request.getfixturevalue(f"{arch}_ckpt")
    out = tmp_path / "artifact"
    rc, stdout, err = run(["export", str(ckpt), "--output", str(out), "--variants", "fp32,int8", *EXPORT_FAST], capsys)
    assert rc == 0, err
    # The architecture's own inputs: no token_type_ids for DistilBERT or RoBERTa.
    names, worst = onnx_vs_pytorch(ckpt, out / "model.onnx")
    assert names == ["input_ids", "attention_mask"]
    assert worst <= 1e-4
    m = read_manifest(out)
    assert m["inputs"] == ["input_ids", "attention_mask"]
    assert list(m["variants"]) == ["fp32", "int8"]
    assert m["variants"]["fp32"]["status"] == "pass"
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model_int8.onnx", "config.json", "ferry.json", "tokenizer.json"} <= files
    if arch == "roberta":
        assert {"vocab.json", "merges.txt"} <= files
    # The table is printed.
    assert "variant" in stdout and "fp32" in stdout and "pass" in stdout


def test_gate_fails_on_broken_export(bert_ckpt, tmp_path, capsys, monkeypatch):
    """Perturbed weights in the exported fp32 model: the gate fails, export exits 1 and records it."""
    import onnx
    from onnx import numpy_helper

    from export import text as export_module

    real_optimize = export_module.optimize

    def optimize_then_break(raw_dir, out_dir, level, model_type, **kw):
        info = real_optimize(raw_dir, out_dir, level, model_type, **kw)
        path = out_dir / "model.onnx"
        model = onnx.load(str(path))
        biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        w = numpy_helper.to_array(biggest).copy()
        w += np.random.default_rng(0).normal(0, 0.05, w.shape).astype(w.dtype)
        biggest.CopyFrom(numpy_helper.from_array(w, biggest.name))
        onnx.save(model, str(path))
        return info

    monkeypatch.setattr(export_module, "optimize", optimize_then_break)
    out = tmp_path / "broken"
    rc, stdout, err = run(["export", str(bert_ckpt), "--output", str(out), *EXPORT_FAST], capsys)
    assert rc == 1
    assert "fp32 failed the parity gate" in err and "Traceback" not in err
    assert "fail" in stdout  # the table shows it
    m = read_manifest(out)
    fp32 = m["variants"]["fp32"]
    assert fp32["status"] == "fail" and fp32["parity"]["max_abs_diff"] > 1e-4
    assert m["default_variant"]["cpu"] != "fp32" and m["default_variant"]["gpu"] is None
    assert not check_valid_artifact_dir(out).variants["fp32"].servable


def test_judge_applies_each_gate():
    from export.parity import judge

    fp32 = {"max_abs_diff": 1e-4}
    assert judge("fp32", {"max_abs_diff": 9e-5}, fp32)[0] == "pass"
    status, reason = judge("fp32", {"max_abs_diff": 2e-4}, fp32)
    assert status == "fail" and "2.00e-04 > 0.0001" in reason
    assert judge("fp16", {"max_abs_diff": 2e-2}, {"max_abs_diff": 1e-2})[0] == "fail"
    int8 = {"min_agreement": 0.99, "max_accuracy_drop_points": 1.0}
    held = {"agreement": 0.995, "delta_accuracy_points": -0.5}
    assert judge("int8", {"heldout": held}, int8)[0] == "pass"
    status, reason = judge("int8", {"heldout": {"agreement": 0.98, "delta_accuracy_points": 0.0}}, int8)
    assert status == "fail" and "agreement 98.00% < 99.00%" in reason
    status, reason = judge("int8", {"heldout": {"agreement": 0.995, "delta_accuracy_points": -1.5}}, int8)
    assert status == "fail" and "accuracy drop 1.50 points > 1" in reason
    # an accuracy gain is no drop
    assert judge("int8", {"heldout": {"agreement": 0.995, "delta_accuracy_points": 2.0}}, int8)[0] == "pass"
    assert judge("int8", {}, int8)[0] == "unverified"


def test_choose_defaults_rule():
    from export.writer import choose_defaults

    def v(status, inv):
        return {"status": status, "batch_invariant": inv}

    assert choose_defaults({"fp32": v("pass", True), "int8": v("pass", False), "int8-static": v("pass", True)}, None) == {"cpu": "int8-static", "gpu": "fp32"}
    # int8-static failing: fp32; dynamic int8 is never chosen on its own
    assert choose_defaults({"fp32": v("pass", True), "int8": v("pass", False), "int8-static": v("fail", True)}, None)["cpu"] == "fp32"
    assert choose_defaults({"fp32": v("pass", False), "int8": v("pass", False)}, None)["cpu"] is None
    assert choose_defaults({"fp32": v("pass", True), "int8": v("pass", False)}, "int8")["cpu"] == "int8"
    # gpu: fp16 unless failed (unverified allowed), else a passing fp32
    assert choose_defaults({"fp32": v("pass", True), "fp16": v("unverified", None)}, None)["gpu"] == "fp16"
    assert choose_defaults({"fp32": v("pass", True), "fp16": v("fail", None)}, None)["gpu"] == "fp32"


def test_cpu_default_forced(bert_artifact, bert_ckpt, tmp_path, capsys):
    out = tmp_path / "forced"
    rc, _, err = run(["export", str(bert_ckpt), "--output", str(out), *EXPORT_FAST, "--variants", "fp32,int8", "--cpu-default", "int8"], capsys)
    assert rc == 0, err
    m = read_manifest(out)
    assert m["default_variant"]["cpu"] == "int8"
    assert m["default_variant_rule"]["cpu"] == "forced by --cpu-default"


def test_existing_output_needs_overwrite(bert_ckpt, tmp_path, capsys):
    from tests.cli import run_fails

    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    run_fails(["export", str(bert_ckpt), "--output", str(out), *EXPORT_FAST], capsys, "already exists", "--overwrite")
    assert (out / "keep.txt").exists()
    rc, _, err = run(["export", str(bert_ckpt), "--output", str(out), *EXPORT_FAST, "--overwrite"], capsys)
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "ferry.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_plain_hf_directory_without_heldout(tmp_path, capsys):
    """Any HF sequence-classification directory exports; int8 is unverified without labelled data."""
    from tests import fixtures, tiny

    tok = fixtures.tokenizer()
    model = fixtures.text_model("bert", tok)
    plain = tmp_path / "plain"
    model.save_pretrained(plain, safe_serialization=True)
    tok.save_pretrained(plain)
    out = tmp_path / "art"
    rc, stdout, err = run(["export", str(plain), "--output", str(out), "--variants", "fp32,int8", *EXPORT_FAST], capsys)
    assert rc == 0, err
    m = read_manifest(out)
    assert m["source"]["manifest_sha256"] is None
    assert m["variants"]["fp32"]["status"] == "pass"
    assert m["variants"]["int8"]["status"] == "unverified" and "--data" in m["variants"]["int8"]["parity"]["reason"]
    # With --data the int8 gate has labelled data to judge by.
    data = tiny.write_csv(tmp_path / "data.csv", tiny.texts(5, seed=3))
    out2 = tmp_path / "art2"
    rc, _, err = run(["export", str(plain), "--output", str(out2), "--variants", "fp32,int8", *EXPORT_FAST, "--data", str(data)], capsys)
    assert rc == 0, err
    assert read_manifest(out2)["variants"]["int8"]["parity"]["heldout"]["examples"] == 15


def test_external_data_path(bert_ckpt, tmp_path, capsys, monkeypatch):
    """Models over 2 GB keep weights in a side file: exercised on the tiny model by forcing it."""
    from export import quantize

    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")  # optimum's exporter writes model.onnx_data
    monkeypatch.setattr(quantize, "TWO_GB", 0)  # quantizers write external data too
    out = tmp_path / "big"
    rc, _, err = run(["export", str(bert_ckpt), "--output", str(out), *EXPORT_FAST, "--variants", "fp32,int8,int8-static"], capsys)
    assert rc == 0, err
    m = read_manifest(out)
    ext = m["variants"]["fp32"]["external_data"]
    assert ext["file"] == "model.onnx_data" and (out / ext["file"]).stat().st_size == ext["bytes"]
    assert m["variants"]["fp32"]["status"] == "pass"
    for name in ("int8", "int8-static"):
        assert m["variants"][name]["status"] == "pass"
    art = check_valid_artifact_dir(out)
    for v in art.variants.values():
        v.verify()
    # a damaged side file is caught by the hash check
    (out / ext["file"]).write_bytes(b"\0" * ext["bytes"])
    with pytest.raises(Exception, match="model.onnx_data: sha256"):
        art.variants["fp32"].verify()
