"""`ferry evaluate CHECKPOINT --data FILE` and the shared predict_logits."""

from __future__ import annotations

import json

import numpy as np

from ferry.files import read_manifest
from tests import tiny
from tests.cli import run_fails, run_ok


def test_evaluate_on_the_heldout_file_matches_training_metrics(trained, tmp_path, capsys):
    report = tmp_path / "eval.json"
    out = run_ok(["evaluate", str(trained), "--data", str(trained / "heldout.jsonl"), "--output", str(report)], capsys)
    expected = read_manifest(trained)["metrics"]["test"]
    got = json.loads(report.read_text())
    assert got["metrics"]["confusion_matrix"] == expected["confusion_matrix"]
    assert got["metrics"]["accuracy"] == expected["accuracy"]
    assert got["max_length"] == 32
    assert f"accuracy {expected['accuracy']:.4f}" in out
    assert "confusion matrix" in out


def test_evaluate_defaults_to_the_heldout_split(trained, capsys):
    out = run_ok(["evaluate", str(trained), "--quiet"], capsys)
    assert out.strip().splitlines() == [
        f"accuracy {read_manifest(trained)['metrics']['test']['accuracy']:.4f}, "
        f"macro-F1 {read_manifest(trained)['metrics']['test']['macro_f1']:.4f} on 12 examples"
    ]


def test_evaluate_any_labelled_file(trained, tmp_path, rows, capsys):
    data = tiny.write_csv(tmp_path / "more.csv", tiny.texts(5, seed=99))
    out = run_ok(["evaluate", str(trained), "--data", str(data), "--quiet"], capsys)
    assert out.strip().endswith("on 15 examples")


def test_evaluate_bad_inputs(trained, tmp_path, capsys):
    run_fails(["evaluate", str(tmp_path / "none")], capsys, f"CHECKPOINT {tmp_path / 'none'}: no such directory")
    run_fails(["evaluate"], capsys, "CHECKPOINT is required")
    data = tiny.write_csv(tmp_path / "x.csv", [("hello there", "weather")])
    run_fails(["evaluate", str(trained), "--data", str(data)], capsys,
              "label 'weather' is not one of the checkpoint's labels (food, sport, tech)")
    run_fails(["evaluate", str(trained), "--data", str(data), "--text-column", "body"], capsys,
              "--text-column 'body' not in x.csv")


def test_predict_logits_is_batch_and_order_independent(trained):
    from finetune.batching import predict_logits
    from finetune.checkpoint import check_valid_checkpoint_dir, load_model, load_tokenizer

    ckpt = check_valid_checkpoint_dir(trained)
    model, tok = load_model(ckpt), load_tokenizer(trained)
    texts = [t for t, _ in tiny.texts(4, seed=5)]
    a = predict_logits(model, tok, texts, batch_size=5, max_length=32)
    one_by_one = np.concatenate([predict_logits(model, tok, [t], batch_size=1, max_length=32) for t in texts])
    assert a.shape == (12, 3) and a.dtype == np.float32
    np.testing.assert_allclose(a, one_by_one, atol=1e-5)
    import torch

    with torch.inference_mode():
        enc = tok(texts[:1], return_tensors="pt", truncation=True, max_length=32)
        direct = model.eval()(**enc).logits.numpy()
    np.testing.assert_allclose(a[:1], direct, atol=1e-5)
