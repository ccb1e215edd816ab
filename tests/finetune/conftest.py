"""Fixtures for the fine-tuning tests: tiny data in every format and a fast CLI runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.cli import main
from tests import tiny
from tests.cli import run_fails  # noqa: F401  (re-exported to the tests)

# Settings that make a tiny run take about a second.
FAST = ["--epochs", "2", "--batch-size", "16", "--max-length", "32", "--learning-rate", "5e-3",
        "--calibration-samples", "20", "--quiet"]


def finetune_argv(model: Path, train: Path | str, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--train", str(train), "--output", str(output), *FAST, *extra]


def run_ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def rows() -> list[tuple[str, str]]:
    """120 learnable rows, 40 per class."""
    return tiny.texts(40, seed=1)


@pytest.fixture(scope="session")
def train_csv(tmp_path_factory, rows) -> Path:
    return tiny.write_csv(tmp_path_factory.mktemp("data") / "train.csv", rows)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_bert, train_csv) -> Path:
    """One complete checkpoint shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    rc = main(finetune_argv(tiny_bert, train_csv, out, "--epochs", "3"))
    assert rc == 0
    return out
