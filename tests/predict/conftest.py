"""Fixtures of the `ferry predict` tests: a tiny trained text classifier exported by the real `ferry
export`, the texts to score, and a real `ferry serve` of the same artifact."""

from __future__ import annotations

import pytest

from tests.predict import data
from tests.serve.conftest import Server, trained_checkpoint


@pytest.fixture(scope="session")
def text_artifact(tmp_path_factory):
    """fp32 (batch-invariant) and int8 (dynamic: batch-dependent, so run one text per call)."""
    from ferry.cli import main

    root = tmp_path_factory.mktemp("predict-artifact")
    ckpt = trained_checkpoint(root / "ckpt")
    out = root / "artifact"
    assert main(["export", str(ckpt), "--output", str(out), "--variants", "fp32,int8", "--quiet"]) == 0
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
def image_artifact(tmp_path_factory):
    """A tiny CNN fine-tuned by the real `ferry finetune --task image-classification`, exported fp32."""
    from ferry.cli import main
    from tests import images

    root = tmp_path_factory.mktemp("predict-image")
    ckpt = images.make_checkpoint(root / "ckpt", "resnet")
    out = root / "artifact"
    assert main(["export", str(ckpt), "--output", str(out), "--variants", "fp32", "--quiet", "--threads", "1",
                 "--parity-batch-sizes", "1,3"]) == 0
    return out
