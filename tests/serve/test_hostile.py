"""Servers whose model misbehaves: NaN scores, an inference that raises on some texts, a warm-up
that fails in every worker of a two-worker server. Real `ferry serve` processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import numpy as np
import pytest

from ferry.files import sha256_file
from tests.artifacts import write_manifest
from tests.server import Server

pytestmark = pytest.mark.slow

VOCAB = 142  # tests/assets/vocab.txt
NAN_ID = 44  # "pizza": its embedding row is NaN
RAISE_ID = 102  # "!": looked up past the end of the table, so ONNX Runtime raises


def hostile_model(path, labels: int) -> None:
    """logits = sum over unmasked tokens of table[id]; table["pizza"] is NaN, and "!" is moved past
    the table's end (ONNX Runtime: 'indices element out of data bounds'). The warm-up texts use neither."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).normal(size=(VOCAB, labels)).astype(np.float32)
    table[NAN_ID] = np.nan
    nodes = [
        helper.make_node("Equal", ["input_ids", "raise_id"], ["is_bad"]),
        helper.make_node("Add", ["input_ids", "far"], ["moved"]),
        helper.make_node("Where", ["is_bad", "moved", "input_ids"], ["ids"]),
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["logits"], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array(RAISE_ID, dtype=np.int64), "raise_id"),
        numpy_helper.from_array(np.array(10_000, dtype=np.int64), "far"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes, "hostile",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def served_copy(src, dst, model=None, **changes):
    """A copy of the artifact ``src`` serving only fp32 (``model`` replacing its graph), with no
    reference logits (so no start-up re-check), and top-level manifest keys changed."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "ferry.json").read_text())
    if model is not None:
        model(dst / "model.onnx", len(m["labels"]))
    m["variants"] = {"fp32": {**m["variants"]["fp32"], "sha256": sha256_file(dst / "model.onnx")}}
    m["default_variant"] = {"cpu": "fp32", "gpu": None}
    m.pop("reference", None)
    m.update(changes)
    write_manifest(dst, m)
    return dst


@pytest.fixture(scope="module")
def hostile(served_artifact, bentoml_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    art = served_copy(served_artifact, root / "artifact", hostile_model)
    s = Server(art, root / "server.log", bentoml_home, "--variant", "fp32")
    try:
        yield s.wait_ready()
    finally:
        assert s.stop() == 0


def post(url, texts):
    return httpx.post(url + "/classify", json={"texts": texts}, timeout=60)


def test_nan_scores_are_a_clean_json_5xx(hostile):
    """A NaN score has no honest answer (its label is whatever argmax makes of NaN): the request
    gets a JSON 500 naming the text and the cause instead of a plain 500 from the JSON encoder."""
    r = post(hostile.url, ["the match", "pizza"])
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert "texts[1]" in err and "non-finite" in err and "\n" not in err
    ok = post(hostile.url, ["the match"])
    assert ok.status_code == 200 and np.isfinite(ok.json()["results"][0]["score"])


def test_an_inference_error_is_a_clean_json_5xx_for_its_request_only(hostile):
    r = post(hostile.url, ["the match !"])
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert "texts[0]" in err and "out of" in err and "\n" not in err

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [["goal !"] if i % 5 == 0 else ["the match team", "code data"] for i in range(40)]
            return bodies, await asyncio.gather(*(client.post(hostile.url + "/classify", json={"texts": b}) for b in bodies))

    bodies, responses = asyncio.run(burst())
    for body, r in zip(bodies, responses):
        if "!" in body[0]:  # the failing text fails its own request, in whatever batch it was merged
            assert r.status_code == 500 and "texts[0]" in r.json()["error"], r.text
        else:  # its batch mates are answered
            assert r.status_code == 200, r.text
    assert httpx.get(hostile.url + "/readyz", timeout=10).status_code == 200


def test_a_warm_up_that_fails_stops_a_two_worker_server(served_artifact, bentoml_home, tmp_path):
    """The model loads but cannot run (one label more in the manifest than the model has): the
    warm-up fails, and the server stops with one line instead of staying up unready."""
    art = served_copy(served_artifact, tmp_path / "art", labels=[*json.loads((served_artifact / "ferry.json").read_text())["labels"], "extra"])
    s = Server(art, tmp_path / "server.log", bentoml_home, "--variant", "fp32", "--workers", "2")
    deadline = time.monotonic() + 180
    ready = []
    try:
        while s.proc.poll() is None and time.monotonic() < deadline:
            try:
                ready.append(httpx.get(s.url + "/readyz", timeout=2).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        code = s.proc.poll()
    finally:
        s.stop()
    log = s.log.read_text(errors="replace")
    assert code is not None, f"the server is still up after its warm-up failed:\n{s.log_tail()}"
    assert code != 0 and 200 not in ready
    lines = [line for line in log.splitlines() if "refusing to serve" in line]
    assert lines and all("warm-up" in line and "logits of shape" in line for line in lines), log[-3000:]
    assert "Traceback" not in log


def test_a_two_worker_server_is_ready_once_both_workers_are(served_artifact, bentoml_home, tmp_path):
    """/readyz is 200 only when every worker has run its warm-up: then each one answers."""
    s = Server(served_artifact, tmp_path / "server.log", bentoml_home, "--variant", "fp32", "--workers", "2")
    try:
        s.wait_ready()
        infos = [httpx.get(s.url + "/info", timeout=10).json() for _ in range(6)]
        assert {i["serving"]["ready_workers"] for i in infos} == {2} and all(i["ready"] for i in infos)
        r = httpx.post(s.url + "/classify", json={"texts": ["the match team goal"]}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"] == "sport"
    finally:
        assert s.stop() == 0
