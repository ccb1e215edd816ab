"""`ferry export --ensemble`: one ONNX graph combining several checkpoints, checked against
the members' own PyTorch probabilities computed here with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferry.files import read_manifest
from tests.cli import EXPORT_FAST, run, run_fails
from tests.fixtures import member_probs, text_checkpoint
from tests.tiny import LABELS


@pytest.fixture(scope="module")
def members(tmp_path_factory, bert_ckpt, distilbert_ckpt) -> list[Path]:
    """Three members sharing one tokenizer and held-out split: two BERTs (different seeds) and a DistilBERT."""
    other = text_checkpoint(tmp_path_factory.mktemp("bert-seed1") / "ckpt", "bert", seed=1)
    return [bert_ckpt, other, distilbert_ckpt]


def heldout_texts(ckpt: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in (ckpt / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows]


def onnx_probs(artifact: Path, texts: list[str], variant: str = "model.onnx") -> np.ndarray:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifact)
    session = ort.InferenceSession(str(artifact / variant), providers=["CPUExecutionProvider"])
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    (logits,) = session.run(["logits"], feeds)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def mean_artifact(members, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "artifact"
    argv = ["export", "--ensemble", *map(str, members), "--output", str(out), "--variants", "fp32,int8,int8-static", *EXPORT_FAST]
    from ferry.cli import main

    assert main(argv) == 0
    return out


def test_mean_ensemble_artifact_equals_the_mean_of_member_probabilities(members, mean_artifact):
    files = sorted(p.name for p in mean_artifact.iterdir())
    assert files == sorted([
        "config.json", "ferry.json", "model.onnx", "model_int8.onnx", "model_int8_static.onnx",
        "reference.jsonl", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
    ])
    texts, y = heldout_texts(members[0])
    probs = [member_probs(m, texts) for m in members]
    want = np.mean(probs, axis=0)
    got = onnx_probs(mean_artifact, texts)
    assert np.abs(got - want).max() < 1e-5

    m = read_manifest(mean_artifact)
    assert m["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]  # the union: DistilBERT takes no token_type_ids
    ens = m["ensemble"]
    assert ens["combine"] == "mean"
    assert [e["checkpoint"] for e in ens["members"]] == [str(p.resolve()) for p in members]
    assert [e["model_type"] for e in ens["members"]] == ["bert", "bert", "distilbert"]
    assert [e["weight"] for e in ens["members"]] == pytest.approx([1 / 3] * 3)
    for e, p in zip(ens["members"], probs):
        assert e["heldout_accuracy"] == pytest.approx(float((p.argmax(-1) == y).mean()))
    assert ens["heldout_accuracy"] == pytest.approx(float((want.argmax(-1) == y).mean()))
    fp32 = m["variants"]["fp32"]
    assert fp32["status"] == "pass" and fp32["parity"]["max_abs_diff"] < 1e-4
    assert m["default_variant"]["cpu"] in ("int8-static", "fp32")
    assert m["source"]["ensemble"] == [str(p.resolve()) for p in members]
    assert m["timings"]["export_s"] > 0 and m["timings"]["optimize_s"] > 0  # the members' export and optimization apart


@pytest.mark.parametrize("combine", ["weighted", "vote"])
def test_weighted_and_vote_match_an_independent_computation(members, combine, tmp_path, capsys):
    pair = members[:2] if combine == "weighted" else members
    out = tmp_path / combine
    extra = ["--weights", "3,1"] if combine == "weighted" else []
    rc, _, err = run(["export", "--ensemble", *map(str, pair), "--combine", combine, *extra, "--output", str(out), "--variants", "fp32", *EXPORT_FAST], capsys)
    assert rc == 0, err
    texts, _ = heldout_texts(members[0])
    probs = np.stack([member_probs(m, texts) for m in pair])
    if combine == "weighted":
        want = 0.75 * probs[0] + 0.25 * probs[1]
    else:
        votes = np.zeros_like(probs[0])
        for p in probs:
            votes[np.arange(len(p)), p.argmax(-1)] += 1
        want = (votes + probs.mean(0)) / (len(probs) + 1)
        assert np.array_equal(want.argmax(-1), (votes + 1e-3 * probs.mean(0)).argmax(-1))  # most votes wins
    got = onnx_probs(out, texts)
    assert np.abs(got - want).max() < 1e-5
    assert read_manifest(out)["ensemble"]["combine"] == combine


def test_parity_and_bench_rebuild_the_pytorch_ensemble(mean_artifact, tmp_path, capsys):
    rc, out, err = run(["parity", str(mean_artifact), "--variants", "fp32", *EXPORT_FAST], capsys)
    assert rc == 0, err
    assert "fp32" in out and "pass" in out
    report = tmp_path / "bench"
    rc, _, err = run(["bench", str(mean_artifact), "--output", str(report), "--variants", "fp32", "--batch-sizes", "2",
                      "--seq-lengths", "16", "--max-seconds", "0.2", "--warmup", "1", "--quiet", "--threads", "1"], capsys)
    assert rc == 0, err
    bench = json.loads((report / "bench.json").read_text())
    engines = {r["engine"] for r in bench["results"]}
    assert any(e.startswith("pytorch") for e in engines) and any("fp32" in e for e in engines)


def test_bad_ensembles_are_one_line_errors(members, bert_ckpt, tmp_path, capsys):
    a, b = map(str, members[:2])
    out = ["--output", str(tmp_path / "out")]
    run_fails(["export", "--ensemble", a, *out], capsys, "at least 2")
    run_fails(["export", a, "--ensemble", a, b, *out], capsys, "not both")
    run_fails(["export", *out], capsys, "CHECKPOINT", "--ensemble")
    run_fails(["export", "--ensemble", a, a, *out], capsys, "same checkpoint twice")
    run_fails(["export", "--ensemble", a, b, "--weights", "1,2", *out], capsys, "--combine weighted only")
    run_fails(["export", "--ensemble", a, b, "--combine", "weighted", "--weights", "1", *out], capsys, "one per member")
    run_fails(["export", "--ensemble", a, b, "--combine", "weighted", "--weights", "1,0", *out], capsys, "positive")
    run_fails(["export", "--ensemble", a, b, "--variants", "fp32,fp16", *out], capsys, "fp16")
    run_fails(["export", a, "--combine", "vote", *out], capsys, "--ensemble only")
    run_fails(["export", "--ensemble", a, str(tmp_path / "nope"), *out], capsys, "--ensemble", "nope")

    relabelled = tmp_path / "relabelled"
    shutil.copytree(bert_ckpt, relabelled)
    config = json.loads((relabelled / "config.json").read_text())
    config["id2label"] = {k: v.upper() for k, v in config["id2label"].items()}
    (relabelled / "config.json").write_text(json.dumps(config))
    run_fails(["export", "--ensemble", a, str(relabelled), *out], capsys, "labels", str(relabelled))

    retokenized = tmp_path / "retokenized"
    shutil.copytree(bert_ckpt, retokenized)
    with open(retokenized / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("zzznewtoken\n")
    run_fails(["export", "--ensemble", a, str(retokenized), *out], capsys, "tokenizer", str(retokenized))

    resplit = tmp_path / "resplit"
    shutil.copytree(bert_ckpt, resplit)
    lines = (resplit / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    (resplit / "heldout.jsonl").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    run_fails(["export", "--ensemble", a, str(resplit), *out], capsys, "held-out splits differ", "--data")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("combine", ["mean", "vote"])
def test_the_one_member_pass_gives_what_the_ensemble_forward_gives(members, combine):
    # export computes the reference's held-out logits and the member accuracies in one pass;
    # it must equal the PyTorch ensemble's own forward on the same batches
    from types import SimpleNamespace

    from export import ensemble
    from export.parity import text_batches, torch_logits
    from finetune.checkpoint import check_valid_checkpoint_dir, load_model, load_tokenizer

    models = [load_model(check_valid_checkpoint_dir(m)).eval() for m in members]
    model = ensemble.torch_ensemble(models, [0.5, 0.3, 0.2], combine)
    tok = load_tokenizer(members[0])
    texts, y = heldout_texts(members[0])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    logits, accs = ensemble.heldout_pass(model, tok, SimpleNamespace(texts=texts, label_ids=y), 64, names)
    batches, index = text_batches(tok, texts, 64, names)
    want = np.zeros_like(logits)
    for feeds, ix in zip(batches, index):
        want[ix] = torch_logits(model, feeds)
    np.testing.assert_array_equal(logits, want)
    for m, acc in zip(members, accs):
        probs = member_probs(m, texts)
        assert acc == pytest.approx(float((probs.argmax(-1) == np.asarray(y)).mean()))
