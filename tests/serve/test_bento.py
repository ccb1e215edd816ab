"""`ferry store`, then `bentoml build` with the project's bentofile.yaml, in a temporary BENTOML_HOME."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import httpx
import pytest
import yaml

from ferry.cli import main
from tests.server import ROOT, free_port, server_env

pytestmark = pytest.mark.slow


def bentoml(home, *args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "bentoml", *args], cwd=ROOT, env=server_env(home), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"bentoml {' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def bento(bentoml_home):
    return bentoml_home


def test_store_build_and_export_a_bento_that_carries_its_model(bento, served_artifact, tmp_path, capsys):
    # ferry store registers the artifact in the (temporary) model store and prints its tag
    assert main(["store", str(served_artifact)]) == 0
    tag = capsys.readouterr().out.strip().splitlines()[-1]
    name, version = tag.split(":")
    assert name == "ferry-classifier" and version
    stored = bento / "models" / name / version
    assert (stored / "ferry.json").read_bytes() == (served_artifact / "ferry.json").read_bytes()
    meta = yaml.safe_load((stored / "model.yaml").read_text())["metadata"]
    manifest = json.loads((served_artifact / "ferry.json").read_text())
    assert meta["labels"] == manifest["labels"]
    assert meta["variants"]["int8"]["batch_invariant"] is False and meta["variants"]["fp32"]["batch_invariant"] is True

    bentoml(bento, "build")  # offline: bentofile.yaml turns package locking off; it packs ferry-classifier:latest
    built = (bento / "bentos" / "ferry" / "latest").read_text().strip()
    bento_tag, bento_dir = f"ferry:{built}", bento / "bentos" / "ferry" / built
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "serve.service:Ferry"
    assert [m["tag"] for m in info["services"][0]["models"]] == [tag]
    assert (bento_dir / "src" / "serve" / "service.py").is_file() and (bento_dir / "src" / "runtime" / "artifact.py").is_file()
    assert not (bento_dir / "src" / "export").exists() and not (bento_dir / "src" / "finetune").exists()
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements and "torch" not in requirements

    # the exported Bento (what `bentoml containerize` packs) holds the model files themselves
    archive = tmp_path / "ferry.bento"
    bentoml(bento, "export", bento_tag, str(archive))
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for f in ("model.onnx", "model_int8_static.onnx", "ferry.json", "tokenizer.json"):
        assert f"./models/{name}/{version}/{f}" in names
    assert "./src/serve/service.py" in names


def test_the_bento_serves_its_stored_model(bento, served_artifact):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "ferry:latest", "--port", str(port), "--host", "127.0.0.1"],
        cwd=ROOT, env=server_env(bento), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import time

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
        info = httpx.get(url + "/info").json()
        assert info["model"]["store_tag"].startswith("ferry-classifier:")
        # The worker chose its variant on this CPU (timed, re-checked here): one of the passing, batch-invariant ones.
        assert info["variant"] == info["choice"]["variant"] and info["variant"] in ("fp32", "int8-static")
        assert set(info["choice"]["timings_ms"]) == {"fp32", "int8-static"} and info["parity_here"]["status"] == "pass"
        r = httpx.post(url + "/classify", json={"texts": ["the match team goal player"]}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"] == "sport"
    finally:
        proc.terminate()
        proc.wait(30)


def test_ferry_serve_import_registers_the_artifact_and_serves_it_from_the_store(bento, served_artifact, monkeypatch, capsys):
    import serve.cli

    started = {}
    monkeypatch.setattr(serve.cli, "run_server", lambda settings, host, port: started.update(settings=settings) or 0)
    assert main(["serve", str(served_artifact), "--import", "--port", str(free_port())]) == 0
    settings = started["settings"]
    assert settings.artifact is None and settings.model_tag.startswith("ferry-classifier:")
    name, version = settings.model_tag.split(":")
    assert (bento / "models" / name / version / "ferry.json").is_file()
    assert f"registered the artifact as {settings.model_tag}" in capsys.readouterr().err
