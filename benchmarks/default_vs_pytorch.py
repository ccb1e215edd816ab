"""The default CPU variant against the fastest plain-PyTorch path, side by side in one run.

The default CPU variant is what ``runtime.predictor.Runtime(artifact, device="cpu")``
serves (``rt.variant.name``), or ``--variant``. Against it: PyTorch on the artifact's source
checkpoint, eager fp32, and bf16 autocast where the CPU has bf16 instructions. Each engine
runs in its own process and they are timed one at a time in interleaved rounds, with
``ferry bench``'s machinery (bench/: plan, workers, windows, stability rule), at
batch 32 x 128 and batch 1 x 128 (random token ids of exactly 128 tokens). Reported per
cell: p50 latency and sequences/s of each, the ratio of the default variant over the
fastest PyTorch path (throughput, and p50 latency), and the baseline check (each PyTorch path
also in a fresh process of its own running a plain loop, in the same rounds). With the
CPU model and its flags and the command; JSON and Markdown.

    python benchmarks/default_vs_pytorch.py --artifact runs/bbc-onnx --output runs/default-vs-pytorch
    python benchmarks/default_vs_pytorch.py --artifact runs/bbc-onnx --variant int8-static --output runs/dvp-int8s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, help="artifact directory written by ferry export")
    ap.add_argument("--checkpoint", default=None, help="the PyTorch checkpoint (default: the artifact's source)")
    ap.add_argument("--variant", default=None, help="force this variant instead of what the serving runtime chooses on CPU "
                    "(even one whose parity gate failed: a speed trial)")
    ap.add_argument("--batch-sizes", default="32,1", help="batch sizes (default 32,1)")
    ap.add_argument("--seq-length", type=int, default=128, help="tokens per text, all real (default 128)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every engine (default: the physical cores)")
    ap.add_argument("--max-seconds", type=float, default=40.0, help="time limit per cell, all engines together (default 40)")
    ap.add_argument("--spread", type=float, default=0.10, help="stability: (max-min)/median of the last windows below this")
    ap.add_argument("--window-seconds", type=float, default=0.25, help="least time per timing window")
    ap.add_argument("--no-check-baseline", action="store_true", help="skip the standalone PyTorch loops (the baseline check)")
    ap.add_argument("--output", required=True, help="directory for default_vs_pytorch.json and .md")
    return ap.parse_args()


def default_variant(artifact: Any, forced: str | None, threads: int) -> tuple[str, str, list[str]]:
    """(variant, how it was chosen, the runtime's notes): ``forced``, or what the server serves on this CPU."""
    from runtime.predictor import Runtime

    if forced:  # even one the server would refuse (a failed parity gate): a speed trial only
        served = artifact.variant(forced).name
        return served, f"--variant (parity status: {artifact.variants[served].status})", []
    rt = Runtime(artifact, device="cpu", threads=threads)  # closed again before any timing
    return rt.variant.name, "Runtime(artifact, device='cpu').variant.name", list(getattr(rt, "notes", []))


def measure(jobs: list[Any], cells: list[Any], args: Any, check_cells: list[Any], served: str,
            skipped: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, str], list[dict[str, Any]]]:
    """``ferry bench``'s grid on these engines: results with speedups, failures, baseline checks."""
    from bench.offline import baseline_checks, run_grid
    from bench.report import add_speedups
    from bench.timing import start_with_twins

    workers, twins, unavailable = start_with_twins(jobs, bool(check_cells))
    try:
        for name, (reason, _, _) in unavailable.items():
            skipped[name] = reason
        if f"onnx-{served}-cpu" in unavailable:
            sys.exit(f"the default variant {served} cannot run here: {unavailable[f'onnx-{served}-cpu'][0]}")
        results, failed, timings = run_grid(workers, cells, args, twins, check_cells)
    finally:
        for w in workers + twins:
            w.stop()
    add_speedups(results)
    return results, failed, baseline_checks(results, timings, check_cells)


def compare_cells(cells: list[Any], results: list[dict[str, Any]], checks: dict[str, dict[str, Any]], served: str) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Per cell: the default variant against each PyTorch path and the fastest one; and the table rows."""
    variant_engine = f"onnx-{served}-cpu"
    rows, cells_out = [], []
    for cell in cells:
        here = {r["engine"]: r for r in results if r["batch_size"] == cell.batch_size}
        torch_rows = [r for r in here.values() if r["kind"] == "pytorch"]
        v = here.get(variant_engine)
        if not torch_rows or v is None:
            continue
        fastest = max(torch_rows, key=lambda r: r["sequences_per_s"])
        check = checks.get(cell.label)
        out = {
            "cell": cell.label, "batch_size": cell.batch_size, "seq_length": cell.seq_length,
            "variant": {"engine": variant_engine, "p50_ms": v["latency_ms"]["p50"], "sequences_per_s": v["sequences_per_s"], "stable": v["stable"]},
            "pytorch": {r["engine"]: {"mode": r["mode"], "p50_ms": r["latency_ms"]["p50"], "sequences_per_s": r["sequences_per_s"],
                                      "stable": r["stable"]} for r in torch_rows},
            "fastest_pytorch": fastest["engine"],
            "throughput_ratio": v["sequences_per_s"] / fastest["sequences_per_s"],
            "p50_ratio": fastest["latency_ms"]["p50"] / v["latency_ms"]["p50"],
            "baseline_check": check,
        }
        cells_out.append(out)
        torch_text = "; ".join(f"{k} {x['p50_ms']:.1f} ms, {x['sequences_per_s']:.1f} seq/s" for k, x in out["pytorch"].items())
        rows.append([cell.label, served, f"{out['variant']['p50_ms']:.1f}", f"{out['variant']['sequences_per_s']:.1f}", torch_text,
                     fastest["engine"], f"{out['throughput_ratio']:.2f}x", f"{out['p50_ratio']:.2f}x",
                     "-" if check is None else f"{check['status']} ({check.get('ratio', float('nan')):.2f})"])
    return cells_out, rows


HEADERS = ["cell", "default variant", "p50 ms", "seq/s", "PyTorch paths", "fastest PyTorch", "seq/s ratio", "p50 ratio", "baseline check"]


def markdown(report: dict[str, Any], rows: list[list[str]]) -> str:
    from bench.report import isa_text
    from ferry.tables import markdown_table

    machine = report["machine"]
    md = [
        f"# Default CPU variant vs the fastest plain-PyTorch path: {report['artifact']}", "",
        f"- command: `{report['command']}`",
        f"- CPU: {machine['cpu']}, {machine['physical_cores']} cores; {isa_text(machine['cpu_isa'])}; threads {report['threads']} for every engine",
        f"- load average {machine['load_average_start']} at start, {machine['load_average_end']} at end (a shared machine: ratios only)",
        f"- variant: **{report['variant']}** ({report['chosen_by']}); PyTorch: {report['checkpoint']}",
        "- each engine in its own process, one at a time, interleaved rounds (bench/timing.py); ratios are default variant over the "
        "fastest PyTorch path: seq/s ratio = its throughput / PyTorch's, p50 ratio = PyTorch's p50 / its p50",
        *([f"- **busy machine**: {report['busy']}"] if report["busy"] else []),
        "", markdown_table(HEADERS, rows), "",
    ]
    if report["skipped"]:
        md.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items()))
    if report["failed"]:
        md.append("**Failed**: " + "; ".join(f"{k} ({v})" for k, v in report["failed"].items()))
    for c in report["cells"]:
        if c["baseline_check"]:
            md.append(f"- baseline check {c['cell']}: {c['baseline_check']['status']}: {c['baseline_check']['message']}")
    return "\n".join(md) + "\n"


def main() -> int:
    a = parse_args()
    from bench.engines import plan_engines
    from bench.offline import BenchArgs, jobs_for, pytorch_source, text_grid
    from bench.report import busy_note, isa_text, machine_info
    from export.parity import default_threads
    from export.writer import quiet_libraries
    from ferry.files import library_versions
    from ferry.tables import text_table
    from runtime.artifact import check_valid_artifact_dir

    quiet_libraries()
    started = time.perf_counter()
    artifact = check_valid_artifact_dir(a.artifact)
    threads = a.threads or default_threads()
    served, chosen_by, notes = default_variant(artifact, a.variant, threads)
    source = pytorch_source(artifact, a.checkpoint)
    specs, skipped = plan_engines({served: artifact.variants[served].spec}, "cpu", True, torch_cuda=False, ort_cuda=False)
    args = BenchArgs(artifact=str(artifact.path), batch_sizes=[int(b) for b in a.batch_sizes.split(",")], seq_lengths=[a.seq_length],
                     threads=threads, max_seconds=a.max_seconds, spread=a.spread, window_seconds=a.window_seconds, warmup=1, quiet=True)
    cells = text_grid(artifact, args)
    check_cells = [] if a.no_check_baseline else [(c.batch_size, c.seq_length) for c in cells]
    load_start = list(os.getloadavg())
    machine = machine_info()  # before the workers load: the load average is the other programs'
    busy = busy_note(machine)
    results, failed, checks = measure(jobs_for(specs, artifact, a.checkpoint, threads), cells, args, check_cells, served, skipped)
    cells_out, rows = compare_cells(cells, results, {c["cell"]: c for c in checks}, served)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    report = {
        "command": command, "artifact": str(artifact.path), "checkpoint": source, "variant": served, "chosen_by": chosen_by, "notes": notes,
        "threads": threads, "machine": {**machine, "load_average_start": load_start, "load_average_end": list(os.getloadavg())},
        "busy": busy, "skipped": skipped, "failed": failed, "cells": cells_out, "results": results,
        "versions": library_versions("torch", "onnxruntime-gpu", "onnxruntime", "openvino", "transformers", "numpy"),
        "duration_s": round(time.perf_counter() - started, 1),
    }
    out_dir = Path(a.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "default_vs_pytorch.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "default_vs_pytorch.md").write_text(markdown(report, rows), encoding="utf-8")
    print(text_table(HEADERS, rows))
    print(f"CPU: {machine['cpu']}; {isa_text(machine['cpu_isa'])}")
    if busy:
        print(f"warning: {busy}", file=sys.stderr)
    for c in cells_out:
        if c["baseline_check"] and c["baseline_check"]["status"] != "ok":
            print(f"*** {c['baseline_check']['message']}", file=sys.stderr)
    print(f"wrote {out_dir}/default_vs_pytorch.json, default_vs_pytorch.md in {report['duration_s']:.0f}s")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
