"""Fixtures of the `ferry predict` tests: a tiny trained text classifier exported by the real `ferry
export`, the texts to score, and a real `ferry serve` of the same artifact."""

from __future__ import annotations

import pytest

from tests.predict import data
from tests.server import Server


@pytest.fixture(scope="session")
def text_artifact(tmp_path_factory, bert_ckpt):
    """fp32 (batch-invariant) and int8 (dynamic: batch-dependent, so run one text per call)."""
    from ferry.cli import main

    out = tmp_path_factory.mktemp("predict-artifact") / "artifact"
    assert main(["export", str(bert_ckpt), "--output", str(out), "--variants", "fp32,int8", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def rows():
    return data.rows()


@pytest.fixture(scope="module")
def server(text_artifact, tmp_path_factory):
    """`ferry serve ARTIFACT --variant fp32` as a real process, one worker."""
    home = tmp_path_factory.mktemp("bentoml-home")
    s = Server(text_artifact, home / "server.log", home, "--variant", "fp32", "--workers", "1", "--threads", "1")
    try:
        yield s.wait_ready()
    finally:
        assert s.stop() == 0


@pytest.fixture(scope="session")
def image_artifact(tmp_path_factory, resnet_ckpt):
    """A tiny CNN fine-tuned by the real `ferry finetune` of an image task, exported fp32."""
    from ferry.cli import main

    out = tmp_path_factory.mktemp("predict-image") / "artifact"
    assert main(["export", str(resnet_ckpt), "--output", str(out), "--variants", "fp32", "--quiet", "--threads", "1",
                 "--parity-batch-sizes", "1,3"]) == 0
    return out
