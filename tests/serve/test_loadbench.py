"""`ferry bench --url`: statistics, metrics parsing, an unreachable server, a server that fails part way."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ferry.cli import main
from bench.load import batch_stats, parse_metrics
from bench.report import percentiles

METRICS = """# HELP ferry_batch_texts Texts per model batch
# TYPE ferry_batch_texts histogram
ferry_batch_texts_bucket{le="1.0"} 2.0
ferry_batch_texts_count 5.0
ferry_batch_texts_sum 40.0
bentoml_service_adaptive_batch_size_count{method_name="batch",worker_index="1"} 3.0
bentoml_service_adaptive_batch_size_count{method_name="batch",worker_index="2"} 2.0
bentoml_service_adaptive_batch_size_sum{method_name="batch",worker_index="1"} 20.0
bentoml_service_adaptive_batch_size_sum{method_name="batch",worker_index="2"} 10.0
"""


def test_parse_metrics_sums_label_sets():
    m = parse_metrics(METRICS)
    assert m["ferry_batch_texts_count"] == 5.0 and m["ferry_batch_texts_sum"] == 40.0
    assert m["bentoml_service_adaptive_batch_size_count"] == 5.0
    assert m["bentoml_service_adaptive_batch_size_sum"] == 30.0


def test_batch_stats_are_deltas_over_a_level():
    before = {"ferry_batch_texts_count": 1.0, "ferry_batch_texts_sum": 4.0}
    stats = batch_stats(before, parse_metrics(METRICS))
    assert stats["batches"] == 4 and stats["texts_per_batch"] == 9.0
    assert stats["requests_per_batch"] == 6.0
    assert batch_stats(None, None)["texts_per_batch"] is None


def test_percentiles():
    p = percentiles([float(i) for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01) and p["max"] == 100.0
    assert percentiles([])["p99"] is None


def test_unreachable_url_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "lb"
    rc = main(["bench", "--url", f"http://127.0.0.1:{port}", "--texts", str(texts_file(tmp_path)), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--url http://127.0.0.1:{port}: cannot reach the server" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_help_lists_the_load_test_options(capsys):
    with pytest.raises(SystemExit) as e:  # argparse exits after printing the help
        main(["bench", "--url", "http://127.0.0.1:3000", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "load-test a live ferry server" in out and "--rates" in out and "125 percent of the closed loop's best" in out


def test_bad_url_is_a_config_error(tmp_path, capsys):
    assert main(["bench", "--url", "localhost:3000", "--output", str(tmp_path / "x")]) == 2
    assert "expected http://HOST:PORT" in capsys.readouterr().err


def texts_file(tmp_path):
    p = tmp_path / "texts.txt"
    p.write_text("one text\nanother text\n\na third\n", encoding="utf-8")
    return p


class Flaky(BaseHTTPRequestHandler):
    """Ready, answers the first 12 /classify requests, then fails every one with 500."""

    served = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/readyz":
            self._send(200, {})
        else:
            self._send(404, {"error": "no"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with Flaky.lock:
            Flaky.served += 1
            n = Flaky.served
        if n <= 12:
            self._send(200, {"results": [{"label": "x", "score": 1.0, "truncated": False}]})
        else:
            self._send(500, {"error": "broken"})


def test_a_sweep_that_fails_part_way_writes_what_it_measured(tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "lb"
    try:
        rc = main([
            "bench", "--url", f"http://127.0.0.1:{server.server_port}", "--concurrency", "1,2,4", "--rates", "10",
            "--requests", "10", "--warmup", "0", "--texts", str(texts_file(tmp_path)), "--output", str(out),
        ])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert rc == 2
    assert "concurrency 4: all 10 requests failed (first: HTTP 500" in err and "holds what was measured" in err
    assert sorted(p.name for p in out.iterdir()) == ["loadbench.json", "loadbench.md", "loadbench.png"]
    report = json.loads((out / "loadbench.json").read_text())
    assert [(r["concurrency"], r["ok"], r["errors"]) for r in report["closed_loop"]] == [(1, 10, 0), (2, 2, 8), (4, 0, 10)]
    assert report["complete"] is False and report["open_loop"] == []
    assert report["server"] is None  # no /info on this server: the report says so rather than guessing
