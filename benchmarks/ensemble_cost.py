"""What an ensemble costs: one ensemble artifact against one of its members, side by side.

Both run the same held-out texts (the ensemble's held-out split, natural lengths) through
ONNX Runtime on the same variant, with `ferry bench`'s interleaved timing windows, so
machine noise hits both alike. Reports p50 latency and throughput per batch size and their
ratios (ensemble / member).

    python benchmarks/ensemble_cost.py --ensemble runs/bbc-ensemble --member runs/bbc-onnx \\
        --batch-sizes 1,32 --output runs/ensemble-cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ensemble", required=True, help="artifact written by ferry export --ensemble")
    ap.add_argument("--member", required=True, help="artifact of one member, exported alone")
    ap.add_argument("--variant", default="fp32", help="variant to run in both (default fp32)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: physical cores)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time limit per batch size")
    ap.add_argument("--output", required=True, help="JSON report to write")
    a = ap.parse_args()

    from runtime.artifact import check_valid_artifact_dir
    from bench.engines import EngineSpec, onnx_engine
    from bench.offline import BenchArgs, cell_result, text_cells
    from bench.timing import time_cell
    from export.inputs import read_jsonl_texts
    from export.parity import default_threads
    from finetune.checkpoint import load_tokenizer

    ens, member = check_valid_artifact_dir(a.ensemble, "--ensemble"), check_valid_artifact_dir(a.member, "--member")
    spec = ens.manifest.get("ensemble")
    if not spec or not spec.get("heldout_source"):
        sys.exit(f"--ensemble {a.ensemble}: not an ensemble artifact with a held-out split")
    texts, _ = read_jsonl_texts(Path(spec["heldout_source"]))
    threads = a.threads or default_threads()
    tokenizer = load_tokenizer(ens.path)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    cells = text_cells(tokenizer, texts, sizes, min(ens.max_length, member.max_length), ens.manifest["inputs"])
    engines = [
        onnx_engine(EngineSpec(f"member-{a.variant}", "onnx", "cpu", a.variant, a.variant), member.variants[a.variant].path, threads),
        onnx_engine(EngineSpec(f"ensemble-{a.variant}", "onnx", "cpu", a.variant, a.variant), ens.variants[a.variant].path, threads),
    ]
    rule = BenchArgs()  # ferry bench's stability rule
    rows = []
    for cell in cells:
        timings = time_cell(engines, cell, warmup=2, windows=rule.windows, max_spread=rule.spread, window_seconds=0.5, max_seconds=a.max_seconds)
        got = {e.spec.name: cell_result(e.spec, cell, timings[e.spec.name], rule.windows, rule.spread) for e in engines}
        m, e = got[f"member-{a.variant}"], got[f"ensemble-{a.variant}"]
        row = {
            "batch_size": cell.batch_size,
            "member": {"p50_ms": m["latency_ms"]["p50"], "seq_per_s": m["sequences_per_s"], "stable": m["stable"]},
            "ensemble": {"p50_ms": e["latency_ms"]["p50"], "seq_per_s": e["sequences_per_s"], "stable": e["stable"]},
            "p50_ratio": e["latency_ms"]["p50"] / m["latency_ms"]["p50"],
            "throughput_ratio": e["sequences_per_s"] / m["sequences_per_s"],
        }
        rows.append(row)
        print(f"batch {cell.batch_size}: p50 member {row['member']['p50_ms']:.1f} ms, ensemble {row['ensemble']['p50_ms']:.1f} ms "
              f"({row['p50_ratio']:.2f}x); seq/s member {row['member']['seq_per_s']:.1f}, ensemble "
              f"{row['ensemble']['seq_per_s']:.1f} ({row['throughput_ratio']:.2f}x)", flush=True)
    members = [{"checkpoint": m["checkpoint"], "heldout_accuracy": m["heldout_accuracy"]} for m in spec["members"]]
    report = {"ensemble": str(ens.path), "member": str(member.path), "variant": a.variant, "threads": threads,
              "texts": len(texts), "combine": spec["combine"], "members": members,
              "ensemble_heldout_accuracy": spec["heldout_accuracy"], "rows": rows}
    Path(a.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
