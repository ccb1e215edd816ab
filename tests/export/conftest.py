"""Fixtures of the export tests: the tiny BERT checkpoint exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.cli import main
from tests.cli import EXPORT_FAST


@pytest.fixture(scope="session")
def bert_artifact(tmp_path_factory, bert_ckpt) -> Path:
    """All four variants of the tiny BERT, exported once (the export must succeed)."""
    out = tmp_path_factory.mktemp("bert-art") / "artifact"
    rc = main(["export", str(bert_ckpt), "--output", str(out), "--variants", "fp32,int8,int8-static,fp16", *EXPORT_FAST])
    assert rc == 0
    return out
