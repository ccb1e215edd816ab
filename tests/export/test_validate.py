"""Parity as a library: `validate` collects every failure of a kind, then raises a typed error
(a ParityError); `check_variant` records it. Engines are faked here, so each case is exact and
fast; the real engines go through the same functions in test_parity.py and test_engines.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from export import parity
from runtime.tokens import collate
from export.parity import EngineFailed, GateArgs, Gates, Labelled, OutputMismatch, Reference, ValueMismatch
from ferry.errors import ParityError
from tests.cli import run_fails

NAMES = ["input_ids", "attention_mask"]
LABELS = ["x", "y", "z"]
GATES = GateArgs().gates()


def logits_of(feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Deterministic 'model': three scores from the sum of the real (unpadded) token ids."""
    s = (feeds["input_ids"] * feeds["attention_mask"]).sum(1)
    return np.stack([s % 3, (s // 3) % 3, s % 5], axis=1).astype(np.float32)


def reference() -> Reference:
    cases = [collate([[1, 5, 6, 2], [1, 7, 2]], 0, NAMES), collate([[1, 8, 9, 9, 2]], 0, NAMES)]
    texts = [[1, 5, 2], [1, 6, 6, 2], [1, 7, 2], [1, 9, 4, 2]]
    batches, index = [collate(texts[:2], 0, NAMES), collate(texts[2:], 0, NAMES)], [[0, 1], [2, 3]]
    held = np.concatenate([logits_of(b) for b in batches])
    labelled = Labelled(["a", "b", "c", "d"], held.argmax(-1).tolist(), "fake.jsonl")
    return Reference(cases, [logits_of(c) for c in cases], batches, index, labelled, held, texts, 3, LABELS, 0, NAMES)


def fake_engine(monkeypatch, run, output_names=("logits",), input_names=tuple(NAMES)) -> None:
    engine = SimpleNamespace(provider="CPUExecutionProvider", output_names=list(output_names), input_names=list(input_names), run=run)
    monkeypatch.setattr(parity, "open_for_parity", lambda *a, **k: (engine, None))


def test_a_faithful_variant_passes_and_is_measured(monkeypatch):
    fake_engine(monkeypatch, logits_of)
    block = parity.validate("fp32", Path("model.onnx"), reference(), GATES, threads=1)
    assert block["status"] == "pass" and block["max_abs_diff"] == 0.0
    assert block["checks"] == {"output_names": "ok", "shapes": "ok"}
    assert block["random"]["cases"] == [[2, 4], [1, 5]] and block["heldout"]["examples"] == 4
    assert block["batch_invariance"]["invariant"] is True
    assert parity.check_variant("fp32", Path("model.onnx"), reference(), GATES, threads=1) == block


def test_names_that_do_not_fit_are_all_named_before_running(monkeypatch):
    def run(feeds):
        raise AssertionError("never run")

    fake_engine(monkeypatch, run, output_names=["scores"], input_names=[*NAMES, "pixel_mask"])
    with pytest.raises(OutputMismatch) as caught:
        parity.validate("fp32", Path("model.onnx"), reference(), GATES)
    e = caught.value
    assert isinstance(e, ParityError) and len(e.failures) == 2
    assert "expected 'logits'" in e.failures[0] and "['pixel_mask']" in e.failures[1]
    assert e.block["status"] == "fail" and e.block["checks"] == {"outputs": e.block["reason"]}
    assert str(e).startswith("fp32: ")


def test_every_wrong_shape_is_collected_before_raising(monkeypatch):
    fake_engine(monkeypatch, lambda feeds: np.zeros((len(feeds["input_ids"]), 4), dtype=np.float32))
    with pytest.raises(OutputMismatch) as caught:
        parity.validate("int8", Path("model.onnx"), reference(), GATES)
    # batches of 2 and 1 random inputs, 2 and 2 held-out texts: each distinct shape once
    assert caught.value.failures == ["logits shape (2, 4), PyTorch's is (2, 3)", "logits shape (1, 4), PyTorch's is (1, 3)"]
    block = parity.check_variant("int8", Path("model.onnx"), reference(), GATES)
    assert block["status"] == "fail" and block["batch_invariance"] is None and "random" not in block


def test_values_beyond_the_gates_raise_with_every_gate_missed_and_the_measurements(monkeypatch):
    fake_engine(monkeypatch, lambda feeds: logits_of(feeds) + 0.1)
    with pytest.raises(ValueMismatch) as caught:
        parity.validate("fp32", Path("model.onnx"), reference(), GATES)
    assert caught.value.failures == ["max |Δlogit| 1.00e-01 > 0.0001"]
    assert caught.value.block["max_abs_diff"] == pytest.approx(0.1) and caught.value.block["batch_invariance"]["invariant"]

    fake_engine(monkeypatch, lambda feeds: -logits_of(feeds))  # every label changed
    with pytest.raises(ValueMismatch) as caught:
        parity.validate("int8", Path("model_int8.onnx"), reference(), GATES)
    assert [f.split(" ")[0] for f in caught.value.failures] == ["label", "accuracy"]
    assert caught.value.block["heldout"]["agreement"] < 1 and caught.value.block["reason"] == "; ".join(caught.value.failures)


def test_an_engine_that_raises_is_a_typed_failure(monkeypatch):
    def run(feeds):
        raise RuntimeError("kernel exploded\nsecond line")

    fake_engine(monkeypatch, run)
    with pytest.raises(EngineFailed) as caught:
        parity.validate("fp32", Path("model.onnx"), reference(), GATES)
    assert caught.value.failures == ["onnxruntime failed: kernel exploded"]
    assert caught.value.block["batch_invariance"] is None


def test_int8_without_labelled_data_is_unverified_not_failed(monkeypatch):
    ref = reference()
    ref.labelled, ref.logits, ref.batches, ref.batch_index = None, None, [], []
    fake_engine(monkeypatch, lambda feeds: -logits_of(feeds))
    block = parity.validate("int8", Path("model_int8.onnx"), ref, GATES)
    assert block["status"] == "unverified" and "--data" in block["reason"]


def test_gates_are_plain_values_the_options_set():
    gates = GateArgs(fp32_max_diff=1e-3, fp16_max_diff=0.5, int8_min_agreement=0.9, int8_max_drop=2.0, invariance_tol=0.1).gates()
    assert gates == Gates(1e-3, 0.5, 0.9, 2.0, 0.1)
    assert gates.for_precision("fp32") == {"max_abs_diff": 1e-3}
    assert gates.for_precision("fp16") == {"max_abs_diff": 0.5}
    assert gates.for_precision("int8") == gates.for_precision("bf16") == {"min_agreement": 0.9, "max_accuracy_drop_points": 2.0}


def test_every_task_has_an_export_part():
    from export.export import PARTS
    from ferry.tasks import ALL

    assert set(PARTS) == set(ALL)


def test_ensemble_option_problems_are_collected_with_the_others(tmp_path, capsys):
    from export.ensemble import option_problems

    assert option_problems(["a", "b"], "weighted", [1.0], ["fp32", "fp16"]) == [
        "--variants fp16, fp16-tensorrt: not available for an --ensemble in this version",
        "--weights has 1 values for 2 --ensemble members; give one per member",
    ]
    assert option_problems([], "vote", [], ["fp32"]) == ["--combine and --weights apply to an --ensemble only"]
    assert option_problems(["a", "b"], "mean", [], ["fp32", "int8"]) == []
    # on the command line, one line with every problem, before any checkpoint is read
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_fails(["export", "--ensemble", a, b, "--combine", "weighted", "--weights", "1", "--variants", "fp32,fp16"], capsys,
              "--output is required", "fp16-tensorrt", "one per member")


def test_steps_number_the_progress_lines(capsys):
    from export.writer import Steps

    say = Steps(3, quiet=False)
    say("exporting member 1")
    say("exporting member 2", same_step=True)
    say("making variants")
    assert capsys.readouterr().err.splitlines() == ["[1/3] exporting member 1", "[1/3] exporting member 2", "[2/3] making variants"]
    Steps(3, quiet=True)("nothing")
    assert capsys.readouterr().err == ""
