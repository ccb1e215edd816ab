"""What `ferry bench` reports: the statistics, the headline, the tables, the files and the plots.

The offline bench writes ``bench.json`` (with the machine: CPU model and ISA flags, cores,
GPU, library versions, load), ``bench.md`` and two PNG plots, and prints the same table;
``ferry bench --compare A.json B.json`` prints the ratios between two reports. The load test
(``ferry bench --url``) writes ``loadbench.json``, ``loadbench.md`` and ``loadbench.png``.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from ferry.errors import FerryError
from ferry.files import read_json_object, write_json
from ferry.tables import markdown_table, text_table

REPORT, TABLE, LATENCY_PNG, THROUGHPUT_PNG = "bench.json", "bench.md", "latency.png", "throughput.png"
LOAD_REPORT = ("loadbench.json", "loadbench.md", "loadbench.png")
# The cell of the headline speedup and of the baseline check, when the grid has it.
HEADLINE_CELL = (32, 128)


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart the recent windows are."""
    med = percentile(values, 50)
    return (max(values) - min(values)) / med if med > 0 else float("inf")


def percentiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p95, p99 and max of latencies in ms (all None for no latencies)."""
    if not values_ms:
        return {k: None for k in ("mean", "p50", "p90", "p95", "p99", "max")}
    out: dict[str, float | None] = {"mean": sum(values_ms) / len(values_ms)}
    out.update({f"p{q}": percentile(values_ms, q) for q in (50, 90, 95, 99)})
    out["max"] = max(values_ms)
    return out


# ---------------------------------------------------------------- machine


def busy_note(machine: dict[str, Any]) -> str | None:
    """A warning when other programs kept the machine busy at the start (1-minute load
    average over half the logical cores): PyTorch's OpenMP threads stall whenever one of
    them loses its core, far more than ONNX Runtime's pool, so speedups come out inflated."""
    load, cores = machine.get("load_average"), machine.get("logical_cores") or 1
    if not load or load[0] <= 0.5 * cores:
        return None
    return (f"the machine was busy before the bench started (load average {load[0]:.1f} on {cores} logical cores): PyTorch's "
            "OpenMP threads stall whenever another program takes one of their cores, so its times and every speedup over it "
            "move with that load; measure on a quiet machine, or compare with --threads 1")


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from runtime.hardware import read_cpu

    info = {
        "cpu": cpu,
        "cpu_isa": read_cpu().as_dict(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "gpu": None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


def isa_text(isa: dict[str, Any] | None) -> str:
    """"avx2 yes, avx512 no, ..." from ``runtime.hardware.Cpu.as_dict()``."""
    if not isa:
        return "unknown"
    return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa["features"].items())


# ---------------------------------------------------------------- speedups and the headline


def cell_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return r["device"], r["batch_size"], r["seq_length"]


def add_speedups(results: list[dict[str, Any]]) -> None:
    """Each engine's throughput over the fastest PyTorch path on the same device, in the same
    cell (``speedup``, that path named in ``baseline``), and over PyTorch eager fp32
    (``speedup_fp32``)."""
    fastest: dict[tuple[Any, ...], dict[str, Any]] = {}
    fp32: dict[tuple[Any, ...], float] = {}
    for r in results:
        if r["kind"] != "pytorch":
            continue
        key = cell_key(r)
        if key not in fastest or r["sequences_per_s"] > fastest[key]["sequences_per_s"]:
            fastest[key] = r
        if r["precision"] == "fp32":
            fp32[key] = r["sequences_per_s"]
    for r in results:
        base = fastest.get(cell_key(r))
        r["speedup"] = r["sequences_per_s"] / base["sequences_per_s"] if base else None
        r["baseline"] = base["engine"] if base else None
        b32 = fp32.get(cell_key(r))
        r["speedup_fp32"] = r["sequences_per_s"] / b32 if b32 else None


def pick_headline(cells: Any) -> tuple[int, Any] | None:
    """Of (batch size, seq length) pairs, the headline one: 32 x 128 when there, else the largest."""
    cells = set(cells)
    if not cells:
        return None
    if HEADLINE_CELL in cells:
        return HEADLINE_CELL
    return max(cells, key=lambda c: (c[0] * (c[1] if isinstance(c[1], int) else 1), c[0]))


def headline_cell(results: list[dict[str, Any]], device: str) -> tuple[int, Any] | None:
    """The cell the headline is read at: batch 32 x 128 when benchmarked, else the largest."""
    return pick_headline((r["batch_size"], r["seq_length"]) for r in results if r["device"] == device)


def headlines(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per device: at the headline cell, the fastest PyTorch path (the baseline) and the
    fastest variant with its speedup over that baseline."""
    out = {}
    for device in dict.fromkeys(r["device"] for r in results):
        cell = headline_cell(results, device)
        rows = [r for r in results if r["device"] == device and (r["batch_size"], r["seq_length"]) == cell]
        torch_rows = [r for r in rows if r["kind"] == "pytorch"]
        variants = [r for r in rows if r["kind"] != "pytorch"]
        base = max(torch_rows, key=lambda r: r["sequences_per_s"]) if torch_rows else None
        best = max(variants, key=lambda r: r["sequences_per_s"]) if variants else None
        out[device] = {
            "batch_size": cell[0],
            "seq_length": cell[1],
            "baseline": base["engine"] if base else None,
            "baseline_mode": base["mode"] if base else None,
            "pytorch_paths": {r["engine"]: round(r["sequences_per_s"], 3) for r in torch_rows},
            "best": best["engine"] if best else None,
            "speedup": best["speedup"] if best and base else None,
        }
    return out


def headline_text(device: str, h: dict[str, Any]) -> str:
    cell = f"batch {h['batch_size']} x {h['seq_length']}"
    if not h["baseline"]:
        return f"{device}, {cell}: no PyTorch baseline (--no-pytorch)"
    paths = ", ".join(f"{k} {v:.1f} seq/s" for k, v in h["pytorch_paths"].items())
    best = f"{h['best']} {h['speedup']:.2f}x" if h["best"] else "no variant"
    return f"{device}, {cell}: {best} over the fastest PyTorch path, {h['baseline']} ({h['baseline_mode']}; PyTorch paths: {paths})"


# ---------------------------------------------------------------- the offline report


TABLE_HEADERS = ["engine", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "tok/s", "peak MB", "speedup", "over", "stable"]


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        lat = r["latency_ms"]
        peak = r["cuda_peak_mb"] if r.get("cuda_peak_mb") is not None else r["peak_rss_mb"]
        rows.append([
            r["engine"], str(r["batch_size"]), str(r["seq_length"]), f"{lat['p50']:.1f}", f"{lat['p90']:.1f}", f"{lat['p99']:.1f}",
            f"{r['sequences_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{peak:.0f}",
            "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x", r.get("baseline") or "-", "yes" if r["stable"] else "no",
        ])
    return rows


def markdown_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# ferry bench: {report['artifact']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['physical_cores']} cores ({m['logical_cores']} logical), GPU: {m['gpu'] or 'none'}, "
        f"load average at start {m['load_average']}, at end {m.get('load_average_end')}",
        f"- CPU ISA: {isa_text(m.get('cpu_isa'))} (flags: {', '.join((m.get('cpu_isa') or {}).get('flags') or []) or 'none of interest'})",
        f"- threads: {report['threads']} (every engine alike); each engine in its own process, one at a time, windows interleaved in rounds",
        "- speedup = sequences/s over the fastest PyTorch path on the same device and cell (column 'over'), same run",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
    ]
    for device, h in (report.get("headline") or {}).items():
        lines.append(f"- **headline**: {headline_text(device, h)}")
    if report.get("busy"):
        lines.append(f"- **busy machine**: {report['busy']}")
    for check in report.get("baseline_check") or []:
        text = check["message"]
        lines.append(f"- baseline check: **{check['status']}**: " + (f"**{text}**" if check["status"] != "ok" else text))
    lines += ["", markdown_table(TABLE_HEADERS, table_rows(report["results"]))]
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    if report.get("failed"):
        lines += ["", "**Failed**: " + "; ".join(f"{k} ({v})" for k, v in report["failed"].items())]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], latency_png: Path, throughput_png: Path) -> None:
    """Latency vs batch size per engine (one panel per sequence length), and throughput per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = list(dict.fromkeys(r["seq_length"] for r in results))
    engines = list(dict.fromkeys(r["engine"] for r in results))
    for path, key, ylabel in (
        (latency_png, lambda r: r["latency_ms"]["p50"], "p50 latency (ms)"),
        (throughput_png, lambda r: r["sequences_per_s"], "sequences / s"),
    ):
        fig, axes = plt.subplots(1, len(seqs), figsize=(4.2 * len(seqs), 3.6), squeeze=False)
        for ax, s in zip(axes[0], seqs):
            for eng in engines:
                pts = sorted((r["batch_size"], key(r)) for r in results if r["engine"] == eng and r["seq_length"] == s)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=eng)
            ax.set_xscale("log", base=2)
            if path == latency_png:
                ax.set_yscale("log")
            ax.set_title(f"sequence length {s}")
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def write_bench_report(directory: Path, report: dict[str, Any]) -> None:
    """``bench.json``, ``bench.md`` and the two plots, in ``directory``."""
    write_json(directory / REPORT, report)
    (directory / TABLE).write_text(markdown_report(report), encoding="utf-8")
    plot(report["results"], directory / LATENCY_PNG, directory / THROUGHPUT_PNG)


def print_report(report: dict[str, Any], output: Path) -> None:
    """The table and the headline on stdout; failures, a busy machine and a baseline check
    that is not ok on stderr, where they are seen."""
    machine = report["machine"]
    print(text_table(TABLE_HEADERS, table_rows(report["results"])))
    print(f"CPU: {machine['cpu']}; {isa_text(machine.get('cpu_isa'))}")
    for device, h in report["headline"].items():
        print(f"headline: {headline_text(device, h)}")
    if report["skipped"]:
        print("skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items()))
    if report["failed"]:
        print("FAILED: " + "; ".join(f"{k} ({v})" for k, v in report["failed"].items()), file=sys.stderr)
    if report["busy"]:
        print(f"warning: {report['busy']}", file=sys.stderr)
    for check in report["baseline_check"]:
        if check["status"] == "ok":
            print(f"baseline check ok: {check['message']}")
        else:
            print(f"\n*** baseline check {check['status']}: {check['message']} ***\n", file=sys.stderr)
    print(f"wrote {output}/{{{REPORT},{TABLE},{LATENCY_PNG},{THROUGHPUT_PNG}}} in {report['duration_s']:.0f}s "
          f"(threads {report['threads']}, load average {machine['load_average']})")


# ---------------------------------------------------------------- compare


def load_report(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / REPORT
    data = read_json_object(p, f"--compare {path}: file not found", f"--compare {path}")
    if data.get("stage") != "bench" or not isinstance(data.get("results"), list):
        raise FerryError(f"--compare {path}: not a ferry bench report ({REPORT})")
    return data


def compare(a_path: str, b_path: str) -> str:
    """A table of B/A ratios of throughput and p50 latency for the cells both reports have."""
    a, b = load_report(a_path), load_report(b_path)
    key = lambda r: (r["engine"], r["batch_size"], str(r["seq_length"]))  # noqa: E731
    bmap = {key(r): r for r in b["results"]}
    rows, only_a = [], []
    for r in a["results"]:
        other = bmap.pop(key(r), None)
        if other is None:
            only_a.append(key(r))
            continue
        rows.append([
            r["engine"], str(r["batch_size"]), str(r["seq_length"]),
            f"{r['sequences_per_s']:.1f}", f"{other['sequences_per_s']:.1f}", f"{other['sequences_per_s'] / r['sequences_per_s']:.2f}x",
            f"{r['latency_ms']['p50']:.1f}", f"{other['latency_ms']['p50']:.1f}", f"{other['latency_ms']['p50'] / r['latency_ms']['p50']:.2f}x",
        ])
    if not rows:
        raise FerryError(f"--compare: {a_path} and {b_path} have no cell (engine, batch, seq) in common")
    headers = ["engine", "batch", "seq", "A seq/s", "B seq/s", "B/A seq/s", "A p50 ms", "B p50 ms", "B/A p50"]
    out = [f"A = {a_path}\nB = {b_path}", text_table(headers, rows)]
    if only_a or bmap:
        out.append(f"cells only in A: {len(only_a)}, only in B: {len(bmap)}")
    return "\n".join(out)


# ---------------------------------------------------------------- the load test's report


def write_load_markdown(path: Path, report: dict[str, Any]) -> None:
    """``loadbench.md``: the server, the texts, and a table per sweep with where it stopped."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def num(v: float | None, fmt: str = ".1f") -> str:
        return "-" if v is None else format(v, fmt)

    server = report.get("server") or {}
    lines = [
        f"# Load benchmark: {report['url']}",
        "",
        f"- server: variant `{server.get('variant')}` on `{server.get('provider')}`, "
        f"max_batch_size {((server.get('serving') or {}).get('max_batch_size'))}, "
        f"max_latency_ms {((server.get('serving') or {}).get('max_latency_ms'))}",
        f"- texts: {report['texts']['texts']} from `{report['texts']['path']}`, {report['settings']['texts_per_request']} per request",
        f"- latency budget (p99): {report['settings']['latency_budget_ms']:.0f} ms; complete: {report['complete']}",
        f"- created {report['created']}",
        "",
    ]
    for key, title, level in (("closed_loop", "Closed loop", "concurrency"), ("open_loop", "Open loop (Poisson arrivals)", "rate")):
        rows = report.get(key) or []
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            f"| {level} | requests | ok | errors | 503 | req/s | texts/s | p50 ms | p90 ms | p95 ms | p99 ms | texts/batch | requests/batch |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lat, b = r["latency_ms"], r["server_batch"]
            lines.append(
                f"| {num(r[level], 'g')} | {r['requests']} | {r['ok']} | {r['errors']} | {r['status_503']} | "
                f"{r['throughput_rps']:.1f} | {r['texts_per_s']:.1f} | {ms(lat['p50'])} | {ms(lat['p90'])} | "
                f"{ms(lat['p95'])} | {ms(lat['p99'])} | {num(b.get('texts_per_batch'))} | {num(b.get('requests_per_batch'))} |"
            )
        stop = (report.get("stopped") or {}).get(key)
        if stop:
            lines += ["", f"Stopped: {stop}"]
        lines.append("")
    if report.get("failure"):
        lines += ["## Failure", "", report["failure"], ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot_load(path: Path, report: dict[str, Any]) -> None:
    """``loadbench.png``: throughput and p99 latency per level, a panel per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed, opened = report.get("closed_loop") or [], report.get("open_loop") or []
    panels = [(closed, "concurrency", "closed loop: concurrency")] + ([(opened, "rate", "open loop: offered requests/s")] if opened else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (rows, key, xlabel) in zip(axes[0], panels):
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["throughput_rps"] for r in rows], "o-", color="tab:blue", label="throughput (req/s)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("requests/s", color="tab:blue")
        if key == "concurrency" and xs:
            ax.set_xscale("log", base=2)
        ax2 = ax.twinx()
        ax2.plot(xs, [r["latency_ms"]["p99"] or float("nan") for r in rows], "s--", color="tab:red", label="p99 latency (ms)")
        ax2.axhline(report["settings"]["latency_budget_ms"], color="tab:red", alpha=0.3, linestyle=":")
        ax2.set_ylabel("p99 ms", color="tab:red")
        ax.set_title(xlabel.split(":")[0])
        ax.grid(alpha=0.3)
    fig.suptitle(f"ferry load bench: {report['url']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_load_report(out: Path, report: dict[str, Any]) -> None:
    """The load test's three files in ``out``, rewritten after every level."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / LOAD_REPORT[0], report)
    write_load_markdown(out / LOAD_REPORT[1], report)
    plot_load(out / LOAD_REPORT[2], report)
