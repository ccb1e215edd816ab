"""Fixtures of the serving tests: a tiny trained classifier, exported with the real `ferry export`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import tiny
from tests.artifacts import write_manifest

MAX_LENGTH = 64
ROOT = Path(__file__).resolve().parents[2]


def trained_checkpoint(path: Path, steps: int = 80, seed: int = 0) -> Path:
    """A tiny BERT classifier trained for a few steps on tiny.texts(), written as a ferry checkpoint.

    Trained rather than random so its answers are decisive: quantized variants then agree
    with fp32 and pass export's gate, and label comparisons are not decided by noise.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model gains nothing from threads, and spinning ones crawl on a busy CPU
    try:
        return _train(path, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(path: Path, steps: int, seed: int) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from finetune.checkpoint import write_checkpoint
    from finetune.data import Examples

    tok = tiny.tokenizer()
    rows = tiny.texts(40, seed=seed)
    labels = sorted({y for _, y in rows})
    torch.manual_seed(seed)
    config = BertConfig(
        # The committed vocab.txt lists "a" twice, so the largest id is len(vocab): size the table to it.
        vocab_size=max(tok.get_vocab().values()) + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={y: i for i, y in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train, heldout = rows[:90], rows[90:]
    model.train()
    for step in range(steps):
        batch = [train[(step * 16 + k) % len(train)] for k in range(16)]
        enc = tok([t for t, _ in batch], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
        y = torch.tensor([labels.index(l) for _, l in batch])
        loss = model(**enc, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    manifest = {
        "task": "text-classification",
        "base_model": {"given": "tiny-bert (built in the test)"},
        "labels": labels,
        "settings": {"max_length": MAX_LENGTH, "seed": seed, "steps": steps},
    }
    ex = lambda rs, name: Examples([t for t, _ in rs], [y for _, y in rs], {"split_of": name})  # noqa: E731
    write_checkpoint(path, model, tok, manifest, heldout=ex(heldout, "heldout"), calibration=ex(train[:64], "train"))
    return path


# --- servers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(bentoml_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(
        BENTOML_HOME=str(bentoml_home), BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


class Server:
    """`ferry serve ARTIFACT --port P ...` as a real process on 127.0.0.1, stopped by the test."""

    def __init__(self, artifact: Path, log: Path, bentoml_home: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "ferry", "serve", str(artifact), "--port", str(self.port), "--host", "127.0.0.1", *args]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=server_env(bentoml_home), cwd=ROOT)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 120.0) -> "Server":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ferry serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"ferry serve not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ferry serve stops the BentoML server gracefully
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def copy_artifact(src, dst, **manifest_changes):
    """A copy of the artifact ``src`` at ``dst`` with top-level manifest keys replaced; (dst, manifest)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "ferry.json").read_text())
    for key, value in manifest_changes.items():
        m[key] = value
    return dst, write_manifest(dst, m)


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory) -> Path:
    """A tiny trained classifier exported by the real `ferry export` (fp32, int8, int8-static)."""
    from ferry.cli import main

    root = tmp_path_factory.mktemp("serve-artifact")
    ckpt = trained_checkpoint(root / "ckpt")
    out = root / "artifact"
    rc = main(["export", str(ckpt), "--output", str(out), "--variants", "fp32,int8,int8-static"])
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


def raw_post(port: int, path: str, headers: dict[str, str], chunks=(), chunked: bool = False, timeout: float = 20.0):
    """POST over a plain socket, for bodies httpx would not send as asked (a Content-Length with no
    body, a chunked body that stops as soon as the server answers); returns (status, headers, body).

    Each chunk is sent only while the server has not answered yet, so a server that refuses a body
    part-way is seen refusing it, instead of the client failing on a connection it closed.
    """
    import select

    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if chunked:
        head += "Transfer-Encoding: chunked\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((head + "\r\n").encode())
        for chunk in chunks:
            if select.select([s], [], [], 0.05)[0]:  # answered already: stop sending
                break
            try:
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            if chunked:
                try:
                    s.sendall(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
        data = b""
        while b"\r\n\r\n" not in data:
            block = s.recv(65536)
            if not block:
                break
            data += block
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        got = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        length = int(got.get("content-length", "0"))
        while len(body) < length:
            block = s.recv(65536)
            if not block:
                break
            body += block
        return status, got, body
