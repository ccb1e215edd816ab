"""The BentoML service as real `ferry serve` processes on 127.0.0.1, on a tiny model exported by `ferry export`."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest

from ferry.cli import main
from bench.load import parse_metrics
from tests import tiny
from tests.artifacts import write_manifest
from tests.server import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(served_artifact, bentoml_home, tmp_path_factory):
    """Three servers started together: fp32 with a 50 ms latency budget (for the idle 256-text
    request) and at most 4 requests at once, fp32 with the defaults, and the artifact's default CPU variant."""
    logs = tmp_path_factory.mktemp("server-logs")
    started = {
        "tight": Server(served_artifact, logs / "tight.log", bentoml_home, "--variant", "fp32", "--max-latency-ms", "50",
                        "--max-concurrency", "4"),
        "fp32": Server(served_artifact, logs / "fp32.log", bentoml_home, "--variant", "fp32"),
        "default": Server(served_artifact, logs / "default.log", bentoml_home),
    }
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        codes = {name: s.stop() for name, s in started.items()}
    # ferry serve stops cleanly on SIGTERM
    assert codes == {"tight": 0, "fp32": 0, "default": 0}, codes


def post(url: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/classify", content=content, headers={"content-type": "application/json"}, timeout=120, **kw)


def distinct_texts(n: int, seed: int) -> list[str]:
    seen, out = set(), []
    for text, _ in tiny.texts(200, seed=seed):
        if text not in seen:
            seen.add(text)
            out.append(text)
    # a few long texts, truncated to max_length, so batches mix very different lengths
    for i in range(0, len(out), 17):
        out[i] = " ".join([out[i]] * 12)
    assert len(out) >= n
    return out[:n]


# --- endpoints ---------------------------------------------------------------------------
def test_classify_answers_label_score_and_truncated(servers):
    url = servers["tight"].url
    long_text = "pizza pasta bread " * 100
    r = post(url, {"texts": ["the match team goal player", "", long_text]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    info = httpx.get(url + "/info").json()
    for res in results:
        assert set(res) == {"label", "score", "truncated"}
        assert res["label"] in info["labels"]
        assert 1 / len(info["labels"]) <= res["score"] <= 1.0
    assert [res["truncated"] for res in results] == [False, False, True]  # the empty string is valid input
    assert results[0]["label"] == "sport"  # the model was trained: this one is not a coin toss

    r = post(url, {"texts": ["computer software chip", "soup"], "return_all_scores": True})
    assert r.status_code == 200
    for res in r.json()["results"]:
        assert set(res["scores"]) == set(info["labels"])
        assert sum(res["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert res["scores"][res["label"]] == res["score"] == max(res["scores"].values())


def test_info_livez_readyz_metrics(servers, served_artifact):
    url = servers["tight"].url
    info = httpx.get(url + "/info").json()
    manifest = json.loads((served_artifact / "ferry.json").read_text())
    assert info["labels"] == manifest["labels"]
    assert info["variant"] == "fp32"
    assert info["provider"] == "CPUExecutionProvider"
    assert info["max_length"] == manifest["max_length"]
    assert info["sha256"] == manifest["variants"]["fp32"]["sha256"]
    assert info["parity"]["status"] == manifest["variants"]["fp32"]["status"]
    assert info["batch_invariant"] is True and info["batch_invariant_variant"] is True
    assert info["ready"] is True
    assert info["serving"]["max_latency_ms"] == 50 and info["serving"]["max_texts"] == 256

    default = httpx.get(servers["default"].url + "/info").json()
    # `ferry serve` chose the variant at start on this CPU and the worker re-checked it here.
    choice = default["choice"]
    assert default["variant"] == choice["variant"] in ("fp32", "int8-static")
    assert set(choice["timings_ms"]) == {"fp32", "int8-static"} and choice["seconds"] <= choice["budget_s"]
    assert "batch-invariant" in choice["skipped"]["int8"] and default["parity_here"]["status"] == "pass"
    assert default["batch_invariant_variant"] == manifest["variants"][default["variant"]]["batch_invariant"] is True
    assert set(default["cpu"]["features"]) >= {"avx2", "vnni", "bf16", "amx"}

    assert httpx.get(url + "/livez").status_code == 200
    assert httpx.get(url + "/readyz").status_code == 200
    post(url, {"texts": ["a few words", "and some more words here"]})
    metrics = httpx.get(url + "/metrics")
    assert metrics.status_code == 200
    m = parse_metrics(metrics.text)
    assert m["ferry_batch_texts_count"] >= 1 and m["ferry_batch_texts_sum"] >= 2
    assert m["ferry_batch_tokens_sum"] > 0 and m["ferry_batch_padded_tokens_sum"] >= m["ferry_batch_tokens_sum"]
    assert any(k.startswith("bentoml_service_request") for k in m)  # BentoML's own metrics are there too


@pytest.mark.parametrize("path", ["/batch", "/batch-image"])
def test_the_batch_endpoints_are_not_reachable_from_outside(servers, path):
    """The batchable endpoints are fed in process by /classify and /classify-image, past their
    validation, body cap and admission gate; over HTTP they do not exist."""
    url = servers["tight"].url
    for body in ({"texts": ["pizza", "goal"]}, {"texts": [3]}, {"pixels": [[1.0]]}, "junk"):
        r = httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 404, r.text
        assert "no route" in r.json()["error"]
    assert httpx.get(url + path, timeout=10).status_code == 404
    r = post(url, {"texts": ["pizza", "goal"]})  # the same batcher, in process
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def _label_sets(metrics_text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line.startswith("bentoml_")}


def test_random_paths_do_not_grow_the_metrics(servers):
    """BentoML labels its request metrics with the raw path: unknown paths are answered before that."""
    import random
    import string

    url = servers["tight"].url
    rng = random.Random(5)
    before = _label_sets(httpx.get(url + "/metrics", timeout=10).text)
    with httpx.Client(timeout=10) as client:
        for _ in range(200):
            path = "/" + "".join(rng.choices(string.ascii_letters + string.digits + "/-_.", k=rng.randint(1, 40)))
            r = client.request(rng.choice(["GET", "POST", "PUT", "DELETE"]), url + path, content=b"{}")
            assert r.status_code in (404, 405), (path, r.status_code)
            assert r.json()["error"]
    after = _label_sets(httpx.get(url + "/metrics", timeout=10).text)
    assert len(after - before) < 20, sorted(after - before)[:20]
    assert parse_metrics(httpx.get(url + "/metrics", timeout=10).text).get("ferry_unrouted_requests_total", 0) >= 200


def test_get_on_classify_is_a_json_405(servers):
    r = httpx.get(servers["tight"].url + "/classify", timeout=10)
    assert r.status_code == 405 and "POST" in r.json()["error"] and r.headers["allow"] == "POST"


# --- bad input: a 4xx JSON error each, and the server still answers --------------------------
BAD = [
    ("not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({"text": ["hello"]}, 400, "'texts' is missing"),
    ({"texts": "hello"}, 400, "must be a list"),
    ({"texts": ["ok", 3]}, 400, "texts[1] must be a string"),
    ({"texts": ["ok", None]}, 400, "texts[1] must be a string"),
    ({"texts": []}, 400, "empty"),
    ({"texts": ["x"] * 257}, 413, "more than the limit of 256"),
    ({"texts": ["ok", "y" * 50_001]}, 413, "texts[1] has 50001 characters"),
    ({"texts": ["ok"], "return_all_scores": "yes"}, 400, "return_all_scores"),
    ({"texts": ["ok"], "extra": 1}, 400, "unknown key 'extra'"),
    ('{"texts": ["ok", "a\\ud800b"]}', 400, "texts[1] is not valid Unicode"),
    (b'{"texts": ["\xff"]}', 400, "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, 400, "nested too deeply"),
    ('{"texts": ["ok"], "return_all_scores": ' + "1" * 5000 + "}", 400, "more than 4300 digits"),
    ('{"texts": [' + "9" * 4301 + "]}", 400, "more than 4300 digits"),
    # past 64 KiB a body is parsed as it is checked: the first problem is named, the rest never parsed
    ('{"junk": [' + "[]," * 100_000 + "[]]}", 400, "unknown key 'junk'"),
    ('{"texts": [[' + "[]," * 100_000 + "[]]]}", 400, "texts[0] must be a string, got a list"),
    ('{"texts": ["a"' + ', "a"' * 100_000 + "]}", 413, "more than the limit of 256"),
    ('{"texts": ["' + "\\u00e9" * 50_001 + '"]}', 413, "limit of 50000"),
    ('{"texts": ["' + "a" * 400_000 + '"]}', 413, "limit of 50000"),
    ('{"texts": ["ok"], "return_all_scores": [' + "[]," * 100_000 + "[]]}", 400, "return_all_scores"),
    ('{"texts": ["' + "a" * 100_000 + '"], "texts": ["b"]}', 400, "'texts' appears twice"),
    ('{"texts": ["' + "a" * 100_000 + '"]', 400, "not valid JSON"),
    ('{"texts": ["' + "a" * 100_000 + '"]} x', 400, "not valid JSON"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[b[2] for b in BAD])
def test_bad_input_gets_4xx_json_and_server_stays_healthy(servers, body, status, message):
    url = servers["tight"].url
    r = post(url, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert httpx.get(url + "/readyz").status_code == 200
    assert post(url, {"texts": ["still here"]}).status_code == 200


def test_a_large_valid_body_parses_like_a_small_one(servers):
    """Past 64 KiB the incremental parser takes the body: the same answers as json.loads'."""
    url = servers["tight"].url
    texts = ["caf\u00e9 \"pizza\"\n\tpasta \\ " + "x" * 3000, "", "the match team goal"] * 30
    body = json.dumps({"return_all_scores": True, "texts": texts}, indent=1)
    assert len(body) > 65536
    big = post(url, body)
    assert big.status_code == 200, big.text
    for text, got in zip(texts[:3], big.json()["results"]):
        alone = post(url, {"texts": [text], "return_all_scores": True}).json()["results"][0]
        assert (got["label"], got["truncated"], set(got["scores"])) == (alone["label"], alone["truncated"], set(alone["scores"]))
        assert got["score"] == pytest.approx(alone["score"], abs=1e-5)


def test_a_body_over_the_cap_is_413_before_it_is_read(servers):
    """The text server's cap is what 256 texts of 50,000 escaped characters need (76.8 MB), not the
    image server's; a Content-Length past it is refused at once, without waiting for the body."""
    from tests.server import raw_post

    s = servers["tight"]
    cap = httpx.get(s.url + "/info", timeout=10).json()["serving"]["max_body_bytes"]
    assert cap == 256 * 50_000 * 6 + 65_536
    status, _, body = raw_post(s.port, "/classify", {"content-type": "application/json", "content-length": str(cap + 1)}, timeout=20)
    assert status == 413 and f"limit of {cap} bytes" in json.loads(body)["error"]
    status, _, body = raw_post(s.port, "/classify-image", {"content-type": "application/json", "content-length": str(10**9)}, timeout=20)
    assert status == 400 and "POST texts to /classify" in json.loads(body)["error"]  # nothing read on the wrong route


def test_requests_past_max_concurrency_are_429(servers):
    url = servers["tight"].url
    assert httpx.get(url + "/info", timeout=10).json()["serving"]["max_concurrency"] == 4
    texts = distinct_texts(256, seed=3)
    responses = asyncio.run(_concurrent(url, [{"texts": texts}] * 12))
    codes = [r.status_code for r in responses]
    assert 429 in codes and set(codes) <= {200, 429, 503}, codes
    assert all(r.json()["error"] for r in responses if r.status_code != 200)


def test_256_texts_on_an_idle_server_with_a_50ms_budget(servers):
    """More texts than max_batch_size (32) and far more work than max_latency_ms=50: no 503."""
    texts = distinct_texts(256, seed=3)
    r = post(servers["tight"].url, {"texts": texts})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 256
    alone = [post(servers["tight"].url, {"texts": [t]}).json()["results"][0] for t in texts[:40:7]]
    assert [a["label"] for a in alone] == [x["label"] for x in results[:40:7]]


# --- concurrency: each response holds its own texts' answers, in order, equal to alone ---------
async def _concurrent(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(limits=limits, timeout=180) as client:
        return await asyncio.gather(*(client.post(url + "/classify", json=b) for b in bodies))


@pytest.mark.parametrize("which", ["fp32", "default"])
def test_200_concurrent_requests_match_answers_alone(servers, which):
    url = servers[which].url
    texts = distinct_texts(320, seed=11)
    # 200 requests of 1 to 3 distinct texts each
    bodies, i = [], 0
    for k in range(200):
        n = 1 + (k % 3 == 0) + (k % 5 == 0)
        bodies.append({"texts": texts[i : i + n]})
        i += n
    assert i <= len(texts)
    before = parse_metrics(httpx.get(url + "/metrics").text)
    responses = asyncio.run(_concurrent(url, bodies))
    after = parse_metrics(httpx.get(url + "/metrics").text)
    assert [r.status_code for r in responses] == [200] * 200
    with httpx.Client(timeout=60) as client:
        for body, r in zip(bodies, responses):
            got = r.json()["results"]
            assert len(got) == len(body["texts"])
            for text, res in zip(body["texts"], got):
                alone = client.post(url + "/classify", json={"texts": [text]}).json()["results"][0]
                assert res["label"] == alone["label"], text
                assert abs(res["score"] - alone["score"]) <= 1e-5, text
                assert res["truncated"] == alone["truncated"]
    # the requests really were merged: fewer model batches than texts
    # a histogram appears in /metrics only after its first observation: absent before means 0
    batches = after["ferry_batch_texts_count"] - before.get("ferry_batch_texts_count", 0.0)
    merged = after["ferry_batch_texts_sum"] - before.get("ferry_batch_texts_sum", 0.0)
    assert merged == i
    assert batches < merged


def test_load_bench_against_the_live_server(servers, tmp_path):
    out = tmp_path / "lb"
    rc = main([
        "bench", "--url", servers["fp32"].url, "--concurrency", "1,4", "--rates", "20", "--requests", "24",
        "--duration", "5", "--warmup", "2", "--texts", str(_texts_file(tmp_path)), "--output", str(out),
    ])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["loadbench.json", "loadbench.md", "loadbench.png"]
    report = json.loads((out / "loadbench.json").read_text())
    assert [row["concurrency"] for row in report["closed_loop"]] == [1, 4]
    assert [row["rate"] for row in report["open_loop"]] == [20.0]
    for row in report["closed_loop"] + report["open_loop"]:
        assert row["ok"] > 0 and row["throughput_rps"] > 0
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["server_batch"]["texts_per_batch"] >= 1
    assert report["server"]["variant"] == "fp32" and report["complete"] is True
    assert "| 4 |" in (out / "loadbench.md").read_text()


def _texts_file(tmp_path):
    p = tmp_path / "texts.txt"
    p.write_text("\n".join(distinct_texts(50, seed=5)), encoding="utf-8")
    return p


def test_answered_requests_leave_no_memory_behind(servers):
    """BentoML's timeout middleware kept a timer per request for the whole timeout (120 s) after
    the answer: about 5 KB a request. 3,000 quick requests now leave under 5 MiB behind."""
    from tests.serve import fuzz

    s = servers["fp32"]
    with httpx.Client(timeout=30) as client:
        for _ in range(300):
            client.get(s.url + "/livez")
        before = fuzz.process_tree_rss(s.proc.pid)
        for i in range(3000):
            r = client.get(s.url + "/livez") if i % 3 else client.post(s.url + "/classify", json={"x": 1})
            assert r.status_code in (200, 400)
        after = fuzz.process_tree_rss(s.proc.pid)
    assert after - before < 5 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over 3,000 requests"


# --- fuzz ------------------------------------------------------------------------------------
RSS_BOUND = 32 * 2**20  # growth of the server's process tree over a fuzz run (measured: 4-5 MiB over 5,000 cases)


def test_fuzz_classify_never_5xx_and_memory_stays_bounded(servers):
    """FERRY_FUZZ_N (default 1,000) seeded malformed bodies: truncated and garbage JSON, wrong types at
    every level, huge numbers, 100,000-deep nesting, bad encodings, oversized headers."""
    from tests.serve import fuzz

    s = servers["fp32"]
    fuzz.run_fuzz(s.url + "/classify", fuzz.text_cases(seed=1), 50)  # first requests: lazy imports, buffers
    before = fuzz.process_tree_rss(s.proc.pid)
    out = fuzz.run_fuzz(s.url + "/classify", fuzz.text_cases(seed=13), fuzz.fuzz_n())
    after = fuzz.process_tree_rss(s.proc.pid)
    print(f"fuzz: {out['statuses']}, RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert out["failures"] == [], (out["failures"][:10], out["statuses"])
    assert sum(out["statuses"].values()) == fuzz.fuzz_n()
    assert post(s.url, {"texts": ["the match team goal"]}).status_code == 200
    assert httpx.get(s.url + "/readyz", timeout=10).status_code == 200
    assert after - before < RSS_BOUND, f"RSS grew by {(after - before) / 2**20:.0f} MiB over the fuzz run"


# --- integrity ---------------------------------------------------------------------------
def tampered_copy(served_artifact, tmp_path):
    art = tmp_path / "tampered"
    shutil.copytree(served_artifact, art)
    with open(art / "model.onnx", "r+b") as f:  # flip one byte of the weights
        f.seek(-10, 2)
        b = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    return art


def test_ferry_serve_refuses_a_tampered_model(served_artifact, tmp_path, capsys):
    rc = main(["serve", str(tampered_copy(served_artifact, tmp_path)), "--variant", "fp32", "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "sha256" in err and "does not match the manifest" in err and "model.onnx" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bentoml_serve_refuses_a_tampered_model(served_artifact, tmp_path, bentoml_home):
    """The service itself checks, whoever starts it (a Bento, `bentoml serve`)."""
    import subprocess
    import sys

    from tests.server import ROOT, free_port, server_env

    env = server_env(bentoml_home) | {"FERRY_ARTIFACT": str(tampered_copy(served_artifact, tmp_path)), "FERRY_VARIANT": "fp32"}
    cmd = [sys.executable, "-m", "bentoml", "serve", "serve.service:Ferry", "--port", str(free_port()), "--host", "127.0.0.1"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if "refusing to start" in line]
    assert len(lines) == 1 and "does not match the manifest" in lines[0]
    assert "Traceback" not in p.stderr


def test_a_worker_that_cannot_load_its_model_stops_the_server(served_artifact, tmp_path, bentoml_home):
    """Past the start check (sha256 matches) but not loadable: one line, and the server stops
    instead of BentoML respawning the worker forever."""
    import subprocess
    import sys

    from ferry.files import sha256_file
    from tests.server import ROOT, free_port, server_env

    art = tmp_path / "broken"
    shutil.copytree(served_artifact, art)
    (art / "model.onnx").write_bytes(b"not a protobuf")
    manifest = json.loads((art / "ferry.json").read_text())
    manifest["variants"]["fp32"]["sha256"] = sha256_file(art / "model.onnx")
    write_manifest(art, manifest)
    env = server_env(bentoml_home) | {"FERRY_ARTIFACT": str(art), "FERRY_VARIANT": "fp32"}
    cmd = [sys.executable, "-m", "bentoml", "serve", "serve.service:Ferry", "--port", str(free_port()), "--host", "127.0.0.1"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    lines = [line for line in out.splitlines() if "refusing to start" in line]
    assert len(lines) == 1 and "not a loadable ONNX model" in lines[0], out[-2000:]
    assert "Traceback" not in out


def test_classify_image_on_a_text_server_is_4xx(servers):
    r = httpx.post(servers["fp32"].url + "/classify-image", json={"images": ["aGk="]}, timeout=10)
    assert r.status_code == 400 and "POST texts to /classify" in r.json()["error"]
