"""Metrics against values computed by hand on a small example."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.metrics import classification_report, confusion_matrix, format_report, report


def test_confusion_matrix_rows_true_columns_predicted():
    cm = confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_report_by_hand():
    # true a a b b c, predicted a b b b a:
    # a: precision 1/2, recall 1/2, f1 1/2; b: precision 2/3, recall 1, f1 0.8; c: never predicted, 0.
    rep = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx(0.6)
    assert rep["examples"] == 5
    assert rep["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert rep["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert rep["per_class"]["c"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert rep["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_absent_class_is_left_out_of_macro_f1():
    # class c has no true example: macro-F1 averages a and b only (perfect here).
    rep = report(np.array([[2, 0, 0], [0, 3, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert rep["accuracy"] == 1.0
    assert rep["macro_f1"] == 1.0
    assert rep["per_class"]["c"]["support"] == 0


def test_matches_scikit_learn_on_random_labels():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    rep = classification_report(y, p, ["w", "x", "y", "z"])
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=[0, 1, 2, 3], zero_division=0)
    assert rep["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert rep["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert [rep["per_class"][c]["f1"] for c in "wxyz"] == pytest.approx(list(f1))
    assert [rep["per_class"][c]["precision"] for c in "wxyz"] == pytest.approx(list(prec))


def test_format_report_lists_every_class_and_the_matrix():
    text = format_report(classification_report([0, 1, 1], [0, 1, 0], ["neg", "pos"]), "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert any(line.split()[:2] == ["neg", "0.5000"] for line in lines)
    assert lines[-2].split() == ["neg", "1", "0"]
    assert lines[-1].split() == ["pos", "1", "1"]
