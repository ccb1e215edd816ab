"""Fixtures of the fine-tuning tests: tiny data and one complete fine-tuned checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.cli import main
from tests import tiny
from tests.cli import finetune_argv


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
