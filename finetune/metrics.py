"""Classification metrics from a confusion matrix (numpy only, so every stage can use them)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def report(cm: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the matrix itself.

    A class never predicted has precision 0; a class absent from the data has recall 0
    and is left out of the macro average (as scikit-learn does with ``labels`` present).
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "examples": int(total),
        "per_class": {
            str(label): {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
    }


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    return report(confusion_matrix(y_true, y_pred, len(labels)), labels)


def format_report(rep: dict[str, Any], title: str = "") -> str:
    """A small text table: per-class precision/recall/F1/support, then the confusion matrix."""
    labels = list(rep["per_class"])
    width = max([len("class")] + [len(label) for label in labels])
    lines = [title] if title else []
    lines.append(f"  {'class':<{width}}  precision  recall      f1  support")
    for label, m in rep["per_class"].items():
        lines.append(
            f"  {label:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}"
        )
    cm = rep["confusion_matrix"]
    cell = max([len(str(v)) for row in cm for v in row] + [len(str(i)) for i in range(len(labels))] + [3])
    lines.append("  confusion matrix (rows true, columns predicted, in the order above):")
    for label, row in zip(labels, cm):
        lines.append(f"  {label:<{width}}  " + " ".join(f"{v:>{cell}d}" for v in row))
    return "\n".join(lines)
