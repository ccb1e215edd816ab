"""Real `ferry serve` processes for the tests: on 127.0.0.1 at a free port, stopped by the test,
and a raw HTTP client for requests httpx would not send as asked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
