"""The default CPU variant against the fastest plain-PyTorch path, side by side in one run.

The default CPU variant is what ``runtime.predictor.Runtime(artifact, device="cpu")``
serves (``rt.variant.name``), or ``--variant``. Against it: PyTorch on the artifact's source
checkpoint, eager fp32, and bf16 autocast where the CPU has bf16 instructions. Each engine
runs in its own process and they are timed one at a time in interleaved rounds, with
``ferry bench``'s machinery (export/bench.py: plan, workers, windows, stability rule), at
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
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
    a = ap.parse_args()

    from export.bench import (
        BenchArgs, add_speedups, baseline_checks, busy_note, isa_text, jobs_for, machine_info, plan_engines, pytorch_source, run_grid,
        start_with_twins, text_grid,
    )
    from export.writer import quiet_libraries
    from export.parity import default_threads, markdown_table, text_table
    from ferry.files import library_versions
    from runtime.artifact import check_valid_artifact_dir
    from runtime.predictor import Runtime

    quiet_libraries()
    started = time.perf_counter()
    artifact = check_valid_artifact_dir(a.artifact)
    threads = a.threads or default_threads()
    if a.variant:  # forced, even one the server would refuse (a failed parity gate): a speed trial only
        served = artifact.variant(a.variant).name
        chosen_by = f"--variant (parity status: {artifact.variants[served].status})"
        notes: list[str] = []
    else:  # what the server would serve on this CPU; the runtime is closed again before any timing
        rt = Runtime(artifact, device="cpu", threads=threads)
        served, chosen_by = rt.variant.name, "Runtime(artifact, device='cpu').variant.name"
        notes = list(getattr(rt, "notes", []))
        del rt
    source = pytorch_source(artifact, a.checkpoint)
    specs, skipped = plan_engines({served: artifact.variants[served].spec}, "cpu", True, torch_cuda=False, ort_cuda=False)
    args = BenchArgs(artifact=str(artifact.path), batch_sizes=[int(b) for b in a.batch_sizes.split(",")], seq_lengths=[a.seq_length],
                     threads=threads, max_seconds=a.max_seconds, spread=a.spread, window_seconds=a.window_seconds, warmup=1, quiet=True)
    cells = text_grid(artifact, args, None)
    jobs = jobs_for(specs, artifact, a.checkpoint, threads)
    check_cells = [] if a.no_check_baseline else [(c.batch_size, c.seq_length) for c in cells]
    load_start = list(os.getloadavg())
    machine = machine_info()  # before the workers load: the load average is the other programs'
    busy = busy_note(machine)
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
    checks = {c["cell"]: c for c in baseline_checks(results, timings, check_cells)}

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
    headers = ["cell", "default variant", "p50 ms", "seq/s", "PyTorch paths", "fastest PyTorch", "seq/s ratio", "p50 ratio", "baseline check"]
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
    md = [
        f"# Default CPU variant vs the fastest plain-PyTorch path: {artifact.path}", "",
        f"- command: `{command}`",
        f"- CPU: {machine['cpu']}, {machine['physical_cores']} cores; {isa_text(machine['cpu_isa'])}; threads {threads} for every engine",
        f"- load average {load_start} at start, {report['machine']['load_average_end']} at end (a shared machine: ratios only)",
        f"- variant: **{served}** ({chosen_by}); PyTorch: {source}",
        "- each engine in its own process, one at a time, interleaved rounds (export/bench.py); ratios are default variant over the "
        "fastest PyTorch path: seq/s ratio = its throughput / PyTorch's, p50 ratio = PyTorch's p50 / its p50",
        *([f"- **busy machine**: {busy}"] if busy else []),
        "", markdown_table(headers, rows), "",
    ]
    if skipped:
        md.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    if failed:
        md.append("**Failed**: " + "; ".join(f"{k} ({v})" for k, v in failed.items()))
    for c in cells_out:
        if c["baseline_check"]:
            md.append(f"- baseline check {c['cell']}: {c['baseline_check']['status']}: {c['baseline_check']['message']}")
    (out_dir / "default_vs_pytorch.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print(text_table(headers, rows))
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
