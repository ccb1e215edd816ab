"""An ensemble artifact served by a real `ferry serve` process answers with the mean of its
members' PyTorch probabilities (computed here with transformers)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from ferry.cli import main
from tests import tiny
from tests.fixtures import member_probs, text_checkpoint
from tests.server import Server

pytestmark = pytest.mark.slow


def test_served_ensemble_equals_the_mean_of_member_probabilities(tmp_path_factory, bentoml_home, bert_ckpt):
    root = tmp_path_factory.mktemp("served-ensemble")
    members = [bert_ckpt, text_checkpoint(root / "b", "distilbert", seed=1)]
    artifact = root / "artifact"
    assert main(["export", "--ensemble", *map(str, members), "--output", str(artifact), "--variants", "fp32", "--quiet"]) == 0
    texts = [t for t, _ in tiny.texts(4, seed=21)]
    server = Server(artifact, root / "server.log", bentoml_home, "--variant", "fp32").wait_ready()
    try:
        r = httpx.post(server.url + "/classify", json={"texts": texts, "return_all_scores": True}, timeout=120)
        info = httpx.get(server.url + "/info", timeout=30).json()
    finally:
        assert server.stop() == 0
    assert r.status_code == 200, r.text
    want = np.mean([member_probs(m, texts) for m in members], axis=0)
    got = np.array([[res["scores"][label] for label in info["labels"]] for res in r.json()["results"]])
    assert got.shape == want.shape == (len(texts), 3)
    assert np.abs(got - want).max() < 1e-5
    assert [res["label"] for res in r.json()["results"]] == [info["labels"][i] for i in want.argmax(-1)]
    assert info["model"]["ensemble"] == {"combine": "mean", "members": [str(m.resolve()) for m in members]}
