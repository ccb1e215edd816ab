"""Why was `ferry bench`'s in-process PyTorch baseline slower than a plain loop? Ablations, side by side.

PyTorch eager fp32 on one cell (default batch 32 x 128, random tokens of exactly that
length, as `ferry bench`'s grid) is timed in several set-ups at once, one set-up at a time
in interleaved rounds, each set-up in fresh processes of its own:

- ``alone``: PyTorch alone in its process (what a user measures);
- ``alone-back-to-back``: the same, the timed call right after an untimed one (a loop's
  steady state; in the other set-ups other processes run between two PyTorch calls);
- ``old-bench``: what `ferry bench` did before its engines got their own processes: the
  ONNX Runtime sessions of the artifact's CPU variants in the same process, each run once
  between two PyTorch calls, the 50 ms settle pause and the 5 ms peak-RSS sampling thread
  around every PyTorch call;
- ``old-bench-no-sampler``, ``old-bench-no-settle``: the same without that one piece;
- ``ort-loaded-idle``: the ONNX Runtime sessions loaded in the process but never run;
- ``sampler-only``: the plain loop plus settle pause and sampling thread, no ONNX Runtime;
- ``process-per-engine``: the new `ferry bench`: PyTorch alone in its process (peak memory
  from the kernel's high-water mark), each variant in a process of its own, run in turn
  between two PyTorch calls, each process waited for until its threads are idle.

Per set-up: the p50 of the PyTorch calls and its ratio to ``alone`` (the ratio per round,
then the median), plus per call, from ``getrusage`` of the PyTorch process (all its
threads): user and system CPU time, minor page faults, involuntary and voluntary context
switches, which say where the time goes (and, unlike wall time, barely move with the load
other programs put on a shared machine).

Two probes of the mechanisms, printed (no set-ups):

- ``--spin``: per engine (PyTorch and each variant, each in a fresh process), the CPU time
  its process burns while idle in the 200 ms after a run (thread pools spinning), and how
  long ``bench.timing.wait_idle`` waits for it;
- ``--threads-probe 2,1``: PyTorch alone at the cell with each intra-op thread count, alternated
  in rounds in one process (a 2-thread OpenMP team on 2 shared cores stalls at every
  barrier when another program takes a core).

    python benchmarks/baseline_isolation.py --artifact runs/bbc-onnx --rounds 8 --output runs/baseline-isolation
    python benchmarks/baseline_isolation.py --artifact runs/bbc-onnx --batch-size 8 --spin
    python benchmarks/baseline_isolation.py --artifact runs/bbc-onnx --batch-size 1 --threads-probe 2,1 --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass
class Proc:
    """One process of a set-up: PyTorch (timed) and/or ONNX Runtime sessions (run untimed)."""

    torch: bool = False
    ort: tuple[str, ...] = ()  # variant names whose sessions live in this process
    run_ort: bool = True
    sampler: bool = False  # the old PeakRSS thread around each PyTorch call
    settle: bool = False  # the old 50 ms pause before each PyTorch call
    hwm: bool = False  # the new high-water-mark memory reading around each PyTorch call
    pre: int = 0  # untimed PyTorch calls right before the timed one (a loop's steady state)
    idle_wait: bool = False  # the parent waits until this process is idle after its step (the new rule)


SETUPS: dict[str, list[Proc]] = {
    "alone": [Proc(torch=True)],
    "alone-back-to-back": [Proc(torch=True, pre=1)],
    "old-bench": [Proc(torch=True, ort=("*",), sampler=True, settle=True)],
    "old-bench-no-sampler": [Proc(torch=True, ort=("*",), settle=True)],
    "old-bench-no-settle": [Proc(torch=True, ort=("*",), sampler=True)],
    "ort-loaded-idle": [Proc(torch=True, ort=("*",), run_ort=False)],
    "sampler-only": [Proc(torch=True, sampler=True, settle=True)],
    # "*" split: one process per variant; the parent waits for each to go idle (bench.timing.wait_idle)
    "process-per-engine": [Proc(ort=("*",), idle_wait=True), Proc(torch=True, hwm=True, idle_wait=True)],
}


def worker(conn: Any, proc: Proc, artifact: str, variants: list[str], threads: int, batch: dict) -> None:
    from bench.engines import EngineSpec, load_pytorch, load_variant
    from bench.timing import SETTLE_S, HighWaterRSS, NoMemory, PeakRSS
    from runtime.artifact import check_valid_artifact_dir

    art = check_valid_artifact_dir(artifact)
    torch_engine = None
    if proc.torch:
        torch_engine = load_pytorch(EngineSpec("pytorch-fp32-cpu", "pytorch", "cpu", "fp32", engine="torch"), artifact, None, threads)
        torch_batch = torch_engine.prepare(batch)
    sessions = []
    for v in variants:
        spec = art.variants[v].spec
        e = load_variant(EngineSpec(f"onnx-{v}-cpu", "onnx", "cpu", spec.precision, v, engine=spec.engine), str(art.variants[v].path), threads)
        sessions.append((e, e.prepare(batch)))
    meter = PeakRSS if proc.sampler else HighWaterRSS if proc.hwm else NoMemory
    conn.send("ready")
    while True:
        op = conn.recv()
        if op == "stop":
            break
        if op == "warmup":
            for e, b in sessions:
                e.run(b)
            if torch_engine:
                torch_engine.run(torch_batch)
            conn.send(None)
            continue
        out: dict[str, Any] = {"ort_s": []}
        if proc.run_ort:
            for e, b in sessions:
                t0 = time.perf_counter()
                e.run(b)
                out["ort_s"].append(time.perf_counter() - t0)
        if torch_engine:
            for _ in range(proc.pre):
                torch_engine.run(torch_batch)
            if proc.settle:
                time.sleep(SETTLE_S)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            with meter():
                t0 = time.perf_counter()
                torch_engine.run(torch_batch)
                out["torch_s"] = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            out["minflt"] = r1.ru_minflt - r0.ru_minflt
            out["nivcsw"] = r1.ru_nivcsw - r0.ru_nivcsw
            out["nvcsw"] = r1.ru_nvcsw - r0.ru_nvcsw
            out["user_s"] = r1.ru_utime - r0.ru_utime  # all threads of the process
            out["sys_s"] = r1.ru_stime - r0.ru_stime  # page faults are paid here
        conn.send(out)


def spin_probe(conn: Any, artifact: str, variant: str | None, threads: int, batch: dict) -> None:
    """In a fresh process: after each of 3 runs, the CPU ms this process burns while its
    caller sleeps, at 2..200 ms (sent back), so the parent can also time wait_idle."""
    from bench.engines import EngineSpec, load_pytorch, load_variant
    from bench.timing import process_cpu_ns
    from runtime.artifact import check_valid_artifact_dir

    if variant is None:
        e = load_pytorch(EngineSpec("pytorch-fp32-cpu", "pytorch", "cpu", "fp32", engine="torch"), artifact, None, threads)
    else:
        v = check_valid_artifact_dir(artifact).variants[variant]
        e = load_variant(EngineSpec(variant, "onnx", "cpu", v.spec.precision, variant, engine=v.spec.engine), str(v.path), threads)
    b = e.prepare(batch)
    e.run(b)
    time.sleep(0.5)
    rows = []
    for _ in range(3):
        e.run(b)
        c0, t0, marks = process_cpu_ns(os.getpid()), time.perf_counter(), []
        for ms in (2, 5, 10, 20, 50, 100, 200):
            while time.perf_counter() - t0 < ms / 1e3:
                time.sleep(0.0005)
            marks.append((ms, (process_cpu_ns(os.getpid()) - c0) / 1e6))
        rows.append(marks)
        time.sleep(0.3)
    conn.send(rows)
    conn.recv()  # the parent now times wait_idle after one more run
    e.run(b)
    conn.send("ran")
    conn.recv()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--variants", default="", help="CPU variants run beside PyTorch (default: the artifact's ONNX Runtime CPU variants)")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated, from: " + ", ".join(SETUPS))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="for every engine (default: the physical cores, as ferry bench)")
    ap.add_argument("--output", default=None, help="directory for isolation.json and isolation.md (set-ups)")
    ap.add_argument("--spin", action="store_true", help="probe: CPU burnt after a run by each engine's process, and wait_idle")
    ap.add_argument("--threads-probe", default=None, metavar="A,B", help="probe: PyTorch alone with these thread counts, alternated")
    a = ap.parse_args()
    if not (a.output or a.spin or a.threads_probe):
        ap.error("--output (set-ups), --spin or --threads-probe")
    return a


def spin(ctx: Any, artifact: str, variants: list[str], threads: int, cell: Any) -> None:
    """The --spin probe: per engine, in a fresh process, the CPU burnt while idle after a run,
    and how long wait_idle waits for it."""
    from bench.timing import wait_idle

    for variant in [None, *variants]:
        parent, child = ctx.Pipe()
        pr = ctx.Process(target=spin_probe, args=(child, artifact, variant, threads, cell.batches[0]), daemon=True)
        pr.start()
        rows = parent.recv()
        parent.send("again")
        parent.recv()
        waited = wait_idle(pr.pid)
        parent.send("stop")
        pr.join(10)
        name = variant or "pytorch-fp32"
        for marks in rows:
            print(f"{name} at {cell.label}: CPU ms burnt while idle after a run: " + " ".join(f"{ms}ms:{c:.0f}" for ms, c in marks), flush=True)
        print(f"{name}: wait_idle waited {1e3 * waited:.0f} ms (load average {os.getloadavg()[0]:.1f})", flush=True)


def threads_probe(artifact: str, counts: list[int], rounds: int, cell: Any) -> None:
    """The --threads-probe: PyTorch alone at the cell, its thread count alternated in rounds in one process."""
    import torch

    from bench.engines import EngineSpec, load_pytorch
    from bench.report import percentile

    e = load_pytorch(EngineSpec("pytorch-fp32-cpu", "pytorch", "cpu", "fp32", engine="torch"), artifact, None, counts[0])
    b = e.prepare(cell.batches[0])
    got: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(rounds):
        for n in counts:
            torch.set_num_threads(n)
            e.run(b)
            lat = []
            for _ in range(5):
                t0 = time.perf_counter()
                e.run(b)
                lat.append(1e3 * (time.perf_counter() - t0))
            got[n] += lat
            print(f"round {r + 1} threads {n}: {[round(x) for x in lat]} ms (load average {os.getloadavg()[0]:.1f})", flush=True)
    for n in counts:
        print(f"threads {n}: p50 {percentile(got[n], 50):.0f} ms, min {min(got[n]):.0f} ms over {len(got[n])} calls at {cell.label}")


def expand_setups(names: list[str], variants: list[str]) -> dict[str, list[Proc]]:
    """The processes of each set-up, "*" replaced by the variants (a process each where PyTorch is not in it)."""
    setups = {}
    for name in names:
        procs = []
        for p in SETUPS[name]:
            if p.ort == ("*",) and not p.torch:  # one process per variant
                procs += [dataclasses.replace(p, ort=(v,)) for v in variants]
            else:
                procs.append(dataclasses.replace(p, ort=tuple(variants) if p.ort == ("*",) else p.ort))
        setups[name] = procs
    return setups


def start_setups(ctx: Any, setups: dict[str, list[Proc]], artifact: str, threads: int, cell: Any) -> dict[str, list[Any]]:
    """Every set-up's processes, loaded and warmed up: (Proc, pipe, process) per process."""
    handles: dict[str, list[Any]] = {}
    for name, procs in setups.items():
        handles[name] = []
        for p in procs:
            parent, child = ctx.Pipe()
            pr = ctx.Process(target=worker, args=(child, p, artifact, list(p.ort), threads, cell.batches[0]), daemon=True)
            pr.start()
            child.close()
            handles[name].append((p, parent, pr))
    for hs in handles.values():
        for _, conn, _ in hs:
            assert conn.recv() == "ready"
            conn.send("warmup")
            conn.recv()
    return handles


def time_setups(handles: dict[str, list[Any]], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """One PyTorch call per set-up and round, the set-ups in turn (reversed every other
    round); returns each set-up's PyTorch calls and stops the processes."""
    from bench.timing import wait_idle

    setups = list(handles)
    calls: dict[str, list[dict[str, Any]]] = {n: [] for n in setups}
    for r in range(rounds):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))  # no set-up always first after another
        for name in order:
            torch_out = None
            for p, conn, pr in handles[name]:
                conn.send("step")
                out = conn.recv()
                if p.idle_wait:
                    wait_idle(pr.pid)
                if p.torch:
                    torch_out = out
            calls[name].append(torch_out)
        print(f"round {r + 1}: " + ", ".join(f"{n} {1e3 * calls[n][-1]['torch_s']:.0f} ms" for n in setups), flush=True)
    for hs in handles.values():
        for _, conn, pr in hs:
            conn.send("stop")
            pr.join(10)
    return calls


def summarize_setups(calls: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, dict[str, Any]], list[list[str]]]:
    """Per set-up: p50, min, the median per-round ratio to ``alone`` and the rusage medians; and the table rows."""
    from bench.report import percentile

    alone = [c["torch_s"] for c in calls["alone"]] if "alone" in calls else None
    rows, summary = [], {}
    for name, cs in calls.items():
        lat = [c["torch_s"] for c in cs]
        ratio = statistics.median(x / y for x, y in zip(lat, alone)) if alone else None
        s = {"p50_ms": 1e3 * percentile(lat, 50), "min_ms": 1e3 * min(lat), "ratio_to_alone": ratio,
             "minflt_per_call": statistics.median(c["minflt"] for c in cs), "nivcsw_per_call": statistics.median(c["nivcsw"] for c in cs),
             "nvcsw_per_call": statistics.median(c["nvcsw"] for c in cs), "latencies_ms": [round(1e3 * x, 1) for x in lat],
             "user_ms_per_call": 1e3 * statistics.median(c["user_s"] for c in cs), "sys_ms_per_call": 1e3 * statistics.median(c["sys_s"] for c in cs)}
        summary[name] = s
        rows.append([name, f"{s['p50_ms']:.0f}", f"{s['min_ms']:.0f}", "-" if ratio is None else f"{ratio:.2f}",
                     f"{s['user_ms_per_call']:.0f}", f"{s['sys_ms_per_call']:.0f}",
                     f"{s['minflt_per_call']:.0f}", f"{s['nivcsw_per_call']:.0f}", f"{s['nvcsw_per_call']:.0f}"])
    return summary, rows


def main() -> int:
    a = parse_args()
    import multiprocessing

    from bench.offline import BenchArgs, text_grid
    from bench.report import isa_text, machine_info
    from export.parity import default_threads
    from ferry.tables import markdown_table, text_table
    from runtime.artifact import check_valid_artifact_dir

    art = check_valid_artifact_dir(a.artifact)
    variants = [v for v in a.variants.split(",") if v] or [
        n for n, v in art.variants.items() if v.spec.device == "cpu" and v.spec.engine == "onnxruntime"]
    threads = a.threads or default_threads()
    [cell] = text_grid(art, BenchArgs(artifact=a.artifact, batch_sizes=[a.batch_size], seq_lengths=[a.seq_length]))
    ctx = multiprocessing.get_context("spawn")
    if a.spin:
        spin(ctx, a.artifact, variants, threads, cell)
        return 0
    if a.threads_probe:
        threads_probe(a.artifact, [int(x) for x in a.threads_probe.split(",")], a.rounds, cell)
        return 0
    setups = expand_setups(a.setups.split(","), variants)
    handles = start_setups(ctx, setups, a.artifact, threads, cell)
    print(f"{len(setups)} set-ups ready; {a.rounds} rounds of PyTorch eager fp32 at {cell.label}, threads {threads}", flush=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    summary, rows = summarize_setups(time_setups(handles, a.rounds))
    headers = ["set-up", "p50 ms", "min ms", "ratio to alone (median per round)", "user CPU ms / call", "sys CPU ms / call",
               "minor faults / call", "invol. ctx sw / call", "vol. ctx sw / call"]
    machine = machine_info()
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    report = {"command": command, "artifact": str(art.path), "cell": cell.label, "threads": threads, "variants": variants,
              "rounds": a.rounds, "machine": machine, "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
              "duration_s": round(time.perf_counter() - started, 1), "setups": {n: [dataclasses.asdict(p) for p in ps] for n, ps in setups.items()},
              "results": summary}
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "isolation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = [f"# PyTorch eager fp32 at {cell.label}: in-process vs alone", "", f"- command: `{command}`",
          f"- machine: {machine['cpu']} ({isa_text(machine['cpu_isa'])}), {machine['physical_cores']} cores; threads {threads}; load average "
          f"{list(load_start)} -> {list(os.getloadavg())}", f"- variants beside PyTorch: {', '.join(variants)}", "",
          markdown_table(headers, rows), ""]
    (out / "isolation.md").write_text("\n".join(md), encoding="utf-8")
    print(text_table(headers, rows))
    print(f"wrote {out}/isolation.json, isolation.md")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
