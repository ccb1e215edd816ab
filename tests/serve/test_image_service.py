"""POST /classify-image on a real `ferry serve` process, on a tiny CNN exported by `ferry export`."""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import numpy as np
import pytest

from ferry.cli import main
from ferry.tasks import IMAGE_TASK
from tests import fixtures, tiny
from tests.server import Server, raw_post
from tests.serve.images import EPS, png_claiming

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image_artifact(tmp_path_factory, resnet_ckpt):
    out = tmp_path_factory.mktemp("serve-image") / "artifact"
    assert main(["export", str(resnet_ckpt), "--output", str(out), "--variants", "fp32,fp16", "--quiet", "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def server(image_artifact, bentoml_home, tmp_path_factory):
    s = Server(image_artifact, tmp_path_factory.mktemp("img-logs") / "server.log", bentoml_home, "--variant", "fp32",
               "--max-images", "4", "--max-image-bytes", "20000", "--max-image-pixels", "10000")
    try:
        yield s.wait_ready()
    finally:
        assert s.stop() == 0


def offline_labels(artifact, pictures) -> list[str]:
    """Labels from ONNX Runtime on the artifact's fp32 model, preprocessed here with transformers' own processor."""
    import onnxruntime as ort
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor.from_pretrained(artifact)
    pixels = processor(images=[p.convert("RGB") for p in pictures], return_tensors="np")["pixel_values"].astype(np.float32)
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"pixel_values": pixels})[0]
    return [tiny.IMAGE_LABELS[i] for i in logits.argmax(-1)]


def pictures():
    return [tiny.image(label, seed=500 + i) for i, label in enumerate(tiny.IMAGE_LABELS)] + [tiny.image("red", seed=9, mode="L")]


def classify(url: str, **kw) -> httpx.Response:
    return httpx.post(url + "/classify-image", timeout=60, **kw)


def test_multipart_and_base64_agree_with_offline_onnx(server, image_artifact):
    pics = pictures()
    want = offline_labels(image_artifact, pics)
    assert len(set(want[:3])) == 3  # the tiny CNN tells the three colours apart
    files = [("images", (f"{i}.png", tiny.png_bytes(p), "image/png")) for i, p in enumerate(pics)]
    r = classify(server.url, files=files, data={"return_all_scores": "true"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["label"] for x in results] == want
    assert all(abs(sum(x["scores"].values()) - 1) < 1e-5 and x["score"] == max(x["scores"].values()) for x in results)
    b64 = [base64.b64encode(tiny.png_bytes(p, "JPEG" if i == 0 else "PNG")).decode() for i, p in enumerate(pics)]
    r = classify(server.url, json={"images": b64})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [x["label"] for x in got][1:] == want[1:] and "scores" not in got[0]


def test_info_reports_the_task(server):
    body = httpx.get(server.url + "/info", timeout=10).json()
    assert body["model"]["task"] == IMAGE_TASK
    assert body["image_size"] == {"height": fixtures.IMAGE_SIZE, "width": fixtures.IMAGE_SIZE}


@pytest.mark.parametrize("kw, status, needle", [
    ({"json": {"images": []}}, 400, "no images"),
    ({"json": {"images": ["!!!"]}}, 400, "not valid base64"),
    ({"json": {"images": [base64.b64encode(b"hello, not an image").decode()]}}, 422, "not an image"),
    ({"files": [("images", ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"))]}, 422, "images[0]"),
    ({"json": {"imgs": []}}, 400, "unknown key 'imgs'"),
    ({"json": {"images": ["aGk="], "return_all_scores": "maybe"}}, 400, "return_all_scores"),
    ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "content type 'text/plain'"),
    ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"content": b'{"images": [' + b"7" * 5000 + b"]}", "headers": {"content-type": "application/json"}}, 400, "more than 4300 digits"),
    ({"json": {"images": ["aGk=\n!"]}}, 400, "not valid base64"),
    ({"json": {"images": [base64.b64encode(EPS).decode()]}}, 422, "accepted format"),
    ({"files": [("images", ("d.eps", EPS, "application/postscript"))]}, 422, "accepted format"),
    ({"json": {"images": [base64.b64encode(png_claiming(20_000, 20_000)).decode()]}}, 413, "pixels"),
    ({"files": [("images", ("bomb.png", png_claiming(30_000, 30_000), "image/png"))]}, 413, "pixels"),
])
def test_bad_payloads_are_4xx(server, kw, status, needle):
    r = classify(server.url, **kw)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"] and "\n" not in r.json()["error"]


def test_limits_are_413(server):
    png = tiny.png_bytes(tiny.image("red", seed=1))
    r = classify(server.url, files=[("images", (f"{i}.png", png, "image/png")) for i in range(5)])
    assert r.status_code == 413 and "limit of 4" in r.json()["error"]
    from PIL import Image

    big = tiny.png_bytes(Image.new("RGB", (200, 100), "red"))  # 20000 pixels > 10000, a few hundred bytes
    r = classify(server.url, json={"images": [base64.b64encode(big).decode()]})
    assert r.status_code == 413 and "pixels" in r.json()["error"], r.text
    noise = np.random.default_rng(0).integers(0, 255, (100, 90, 3)).astype("uint8")  # 9000 pixels, > 20000 bytes
    heavy = tiny.png_bytes(Image.fromarray(noise))
    assert len(heavy) > 20000
    r = classify(server.url, files=[("images", ("n.png", heavy, "image/png"))])
    assert r.status_code == 413 and "bytes" in r.json()["error"], r.text


def test_base64_as_the_base64_command_prints_it(server):
    """`base64 FILE` wraps at 76 columns; the newlines are not part of the data."""
    png = tiny.png_bytes(tiny.image("green", seed=3, size=40))
    flat = classify(server.url, json={"images": [base64.b64encode(png).decode()]})
    wrapped = base64.encodebytes(png).decode()
    assert wrapped.count("\n") > 1
    r = classify(server.url, json={"images": [wrapped, wrapped.replace("\n", "\r\n")]})
    assert flat.status_code == 200 and r.status_code == 200, r.text
    assert [x["label"] for x in r.json()["results"]] == [flat.json()["results"][0]["label"]] * 2


def test_the_image_body_cap_is_what_the_images_need(server):
    """4 images of 20,000 bytes, as base64 wrapped with escaped CRLFs, plus a part header each and
    64 KiB: a Content-Length past it is refused at once; a chunked body once the cap is passed."""
    cap = httpx.get(server.url + "/info", timeout=10).json()["serving"]["max_body_bytes"]
    assert cap == 4 * ((20_000 + 2) // 3 * 4 * 80 // 76 + 1024) + 65_536
    status, _, body = raw_post(server.port, "/classify-image", {"content-type": "application/json", "content-length": str(cap + 1)})
    assert status == 413 and f"limit of {cap} bytes" in json.loads(body)["error"]
    chunks = [b'{"images": ["' + b"A" * 16_384] + [b"A" * 16_384] * 200  # 3.3 MB if it were all read
    status, _, body = raw_post(server.port, "/classify-image", {"content-type": "application/json"}, chunks, chunked=True)
    assert status == 413 and f"limit of {cap} bytes" in json.loads(body)["error"]
    assert classify(server.url, json={"images": [base64.b64encode(tiny.png_bytes(tiny.image("red", seed=1))).decode()]}).status_code == 200


RSS_BOUND = 32 * 2**20  # growth of the server's process tree over a fuzz run (measured: 4-5 MiB over 5,000 cases)


def test_fuzz_classify_image_never_5xx_and_memory_stays_bounded(server):
    """FERRY_FUZZ_N (default 1,000) seeded malformed bodies: the JSON cases of the text fuzz, random
    bytes and broken headers of every accepted format as images, base64 and multipart both."""
    from tests.serve import fuzz

    png = tiny.png_bytes(tiny.image("red", seed=2))
    url = server.url + "/classify-image"
    fuzz.run_fuzz(url, fuzz.image_cases(1, png), 50)
    before = fuzz.process_tree_rss(server.proc.pid)
    out = fuzz.run_fuzz(url, fuzz.image_cases(17, png), fuzz.fuzz_n())
    after = fuzz.process_tree_rss(server.proc.pid)
    print(f"fuzz: {out['statuses']}, RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert out["failures"] == [], (out["failures"][:10], out["statuses"])
    r = classify(server.url, files=[("images", ("ok.png", png, "image/png"))])
    assert r.status_code == 200 and r.json()["results"][0]["label"] in tiny.IMAGE_LABELS
    assert after - before < RSS_BOUND, f"RSS grew by {(after - before) / 2**20:.0f} MiB over the fuzz run"


def test_text_route_on_an_image_server_is_4xx(server):
    r = httpx.post(server.url + "/classify", json={"texts": ["hello"]}, timeout=10)
    assert r.status_code == 400 and "/classify-image" in r.json()["error"]


def test_store_registers_an_image_artifact(image_artifact, bentoml_home, capsys):
    import yaml

    assert main(["store", str(image_artifact), "--name", "ferry-image"]) == 0
    tag = capsys.readouterr().out.strip().splitlines()[-1]
    name, version = tag.split(":")
    stored = bentoml_home / "models" / name / version
    assert (stored / "preprocessor_config.json").read_bytes() == (image_artifact / "preprocessor_config.json").read_bytes()
    meta = yaml.safe_load((stored / "model.yaml").read_text())["metadata"]
    assert meta["task"] == IMAGE_TASK and meta["labels"] == tiny.IMAGE_LABELS and meta["image_size"] == {"height": fixtures.IMAGE_SIZE, "width": fixtures.IMAGE_SIZE}
    assert "max_length" not in meta
    assert meta["variants"]["fp16"] == {"precision": "fp16", "status": "unverified"}  # batch invariance unmeasured: absent


def test_an_edited_preprocessor_config_stops_the_start(image_artifact, tmp_path, capsys, server):
    art = tmp_path / "copy"
    shutil.copytree(image_artifact, art)  # ferry export listed every file with its sha256
    with open(art / "preprocessor_config.json", "ab") as f:
        f.write(b"\n")
    # the port of the running server: a ferry serve that got past its checks would stop there
    rc = main(["serve", str(art), "--variant", "fp32", "--host", "127.0.0.1", "--port", str(server.port)])
    err = capsys.readouterr().err
    assert rc == 2 and "preprocessor_config.json" in err and "does not match the manifest" in err
    assert len(err.strip().splitlines()) == 1
