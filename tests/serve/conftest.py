"""Fixtures of the serving tests: the tiny trained BERT exported by the real `ferry export`, and a
BentoML home for the servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory, bert_ckpt) -> Path:
    """The tiny trained classifier exported by the real `ferry export` (fp32, int8, int8-static)."""
    from ferry.cli import main

    out = tmp_path_factory.mktemp("serve-artifact") / "artifact"
    rc = main(["export", str(bert_ckpt), "--output", str(out), "--variants", "fp32,int8,int8-static"])
    assert rc == 0, "ferry export failed on the tiny checkpoint"
    return out


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory):
    """A temporary BentoML home (model store, bentos) for the servers and for in-process `ferry store`."""
    home = tmp_path_factory.mktemp("bentoml-home")
    saved = {k: os.environ.get(k) for k in ("BENTOML_HOME", "BENTOML_DO_NOT_TRACK")}
    os.environ.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True")
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
