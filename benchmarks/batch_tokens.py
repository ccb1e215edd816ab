"""How many padded tokens a served batch should hold: the engine's throughput per batch shape.

The serving runtime closes a model batch when its padded tokens would pass a budget
(``--max-batch-tokens``, the way text-embeddings-inference's ``max-batch-tokens`` works),
besides the dispatcher's count (``--max-batch-size``). This script times the artifact's
variant, as one server worker runs it (``--threads``, default: what `ferry serve` gives a
worker on this machine), on batches of random token ids of each sequence length and batch
size, and reports tokens/s per padded-token count. The smallest budget that reaches
``--within`` of the best throughput is the one to serve with: past it a bigger batch only
adds latency and memory.

    python benchmarks/batch_tokens.py --artifact runs/pipeline-bbc/artifact [--variant fp32] [--output runs/batch-tokens.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_shape(run, batch: int, seq: int, vocab: int, seconds: float, rng) -> float:
    """Median seconds of one batch of ``batch`` x ``seq`` random ids (after one untimed run)."""
    ids = [list(map(int, rng.integers(1000, vocab, size=seq))) for _ in range(batch)]
    run(ids)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 50):
        t = time.perf_counter()
        run(ids)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="runs/pipeline-bbc/artifact")
    ap.add_argument("--variant", default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: a server worker's on this machine)")
    ap.add_argument("--seq-lengths", default="16,128,512")
    ap.add_argument("--batch-sizes", default="1,4,8,16,32,64,128")
    ap.add_argument("--max-tokens", type=int, default=16384, help="skip shapes above this many tokens")
    ap.add_argument("--seconds", type=float, default=1.5, help="timing per shape")
    ap.add_argument("--within", type=float, default=0.95, help="a budget is enough once it reaches this share of the best tokens/s")
    ap.add_argument("--output", default=None, help="also write the table to this JSON file")
    args = ap.parse_args()

    from runtime.hardware import read_cpu
    from runtime.predictor import Runtime
    from serve.settings import worker_split

    threads = args.threads or worker_split("cpu", None, None)[1]
    rt = Runtime(args.artifact, variant=args.variant, device="cpu", threads=threads, choose=False)
    vocab = int(rt.inputs.tokenizer.get_vocab_size())
    rng = np.random.default_rng(0)
    seqs = [min(int(s), rt.inputs.max_length) for s in args.seq_lengths.split(",")]
    rows = []
    for seq in dict.fromkeys(seqs):
        for batch in map(int, args.batch_sizes.split(",")):
            if batch * seq > args.max_tokens:
                continue
            s = time_shape(lambda ids: rt.inputs.run_ids(rt.engine, ids), batch, seq, vocab, args.seconds, rng)
            rows.append({"seq": seq, "batch": batch, "tokens": batch * seq, "ms": s * 1000, "tokens_per_s": batch * seq / s})
            print(f"{batch:>4} x {seq:<4} {batch * seq:>6} tokens  {s * 1000:8.1f} ms  {batch * seq / s:9.0f} tokens/s", file=sys.stderr)
    best = max(r["tokens_per_s"] for r in rows)
    enough = min((r["tokens"] for r in rows if r["tokens_per_s"] >= args.within * best), default=None)
    cpu = read_cpu()
    print(f"\nCPU: {cpu.describe()}; variant {args.variant}, threads {threads}")
    print("| seq | batch | padded tokens | ms per batch | tokens/s | share of best |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seq']} | {r['batch']} | {r['tokens']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / best:.0%} |")
    print(f"\nsmallest padded-token count within {args.within:.0%} of the best throughput: {enough}")
    if args.output:
        Path(args.output).write_text(json.dumps({"cpu": cpu.as_dict(), "variant": args.variant, "threads": threads, "rows": rows,
                                                 "best_tokens_per_s": best, "enough_tokens": enough}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
