"""`ferry bench ARTIFACT`: how fast is each form of the model, offline, side by side.

Engines: PyTorch on the source checkpoint the way a user runs it at its best (eager fp32,
and bf16 autocast where the CPU has bf16 instructions; fp32, fp16 and bf16 weights on
CUDA) and every variant of the artifact through the engine and precision it is served with
(``runtime.engines.open_engine``: ONNX Runtime, OpenVINO). A variant whose engine is
missing or cannot open it here is skipped, with the reason in the report.

Each engine runs in its own process (multiprocessing, "spawn"), which loads its model once
and then waits. Each cell of the grid (batch size x sequence length, or ``--texts`` with
their natural lengths) is timed in rounds: the parent tells one engine at a time to run one
timing window, so only one engine computes at any moment, with all the cores and a process
of its own (no other engine's thread pools or allocations beside it). Rounds go on until
the spread of each engine's last windows is under ``--spread`` or the cell has used
``--max-seconds``, so drift on a shared machine hits all engines alike and a speedup is a
ratio measured in the same cell of the same run. An engine whose process crashes is
reported under ``failed`` and the others go on.

Per cell and engine: p50/p90/p99 latency, sequences/s and tokens/s, peak memory (RSS growth
of the engine's process during its windows, from the kernel's high-water mark;
``max_memory_allocated`` for PyTorch on CUDA) and the speedup over **the fastest PyTorch
path** on the same device and cell (named in ``baseline``). The headline is that speedup at
batch 32 x 128 (else the largest cell). The baseline check: on the headline cell each
PyTorch path has a twin, a fresh process of its own on the same model and inputs that runs
plain back-to-back calls, timed in the same rounds (so a change in the machine's load hits
both); the fastest path's in-grid p50 within 5% of its twin's is "ok", else the report warns
that every speedup is off by that much.

The report is ``bench.json`` (with the machine: CPU model and ISA flags, cores, GPU,
library versions, load), ``bench.md`` and two PNG plots.
``ferry bench --compare A.json B.json`` prints the ratios between two reports.

The module map: :mod:`bench.engines` plans and loads the engines, :mod:`bench.timing` runs
them (a process each, the rounds), :mod:`bench.report` turns the results into the headline,
the tables, the files and the plots; this module holds the verb, the grid and the baseline
check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.engines import EngineSpec, plan_engines
from bench.report import (
    add_speedups, busy_note, cell_key, compare, headlines, machine_info, percentile, pick_headline, print_report, spread,
    write_bench_report,
)
from bench.timing import TWIN, Cell, Job, Timing, Worker, start_with_twins, time_cell
from runtime.artifact import check_valid_artifact_dir
from ferry import errors
from ferry.config import opt, positive, to_dict
from ferry.errors import CheckpointError, ConfigError, FerryError
from ferry.files import atomic_dir, check_output_dir, library_versions, now_iso, sha256_file
from ferry.tasks import task_named

BASELINE = "pytorch-fp32"
VERSIONS = ("torch", "onnxruntime-gpu", "onnxruntime", "openvino", "transformers", "optimum-onnx", "onnx", "numpy")
# The in-grid PyTorch baseline within this fraction of a standalone loop counts as "ok".
BASELINE_TOLERANCE = 0.05


def _all_positive(values: list[int]) -> str | None:
    return None if all(v > 0 for v in values) else "must all be > 0"


@dataclasses.dataclass
class BenchArgs:
    """Options of `ferry bench` (offline)."""

    # "" rather than None: the positional is optional with --compare (parse requires a None one)
    artifact: str = opt("", "artifact directory written by ferry export", positional=True)
    output: str | None = opt(None, "report directory (default: <artifact>-bench beside the artifact)", short="-o")
    overwrite: bool = opt(False, "replace an existing --output")
    variants: list[str] = opt([], "artifact variants to run, each through its own engine and precision (default: all in the artifact)")
    pytorch: bool = opt(True, "also run PyTorch on the source checkpoint: eager fp32, and bf16 autocast where the CPU "
                        "has bf16 (the fastest of them is the speedup baseline)")
    checkpoint: str | None = opt(None, "the PyTorch checkpoint (default: the artifact's source)")
    device: str = opt("auto", "cpu engines only, cuda engines only, or auto (CPU, and CUDA when usable)", choices=("auto", "cpu", "cuda"))
    batch_sizes: list[int] = opt([1, 8, 32, 64], "batch sizes of the grid", check=_all_positive)
    seq_lengths: list[int] = opt(
        [16, 64, 128, 256], "sequence lengths of the grid (tokens per text, all real); an image artifact's grid is "
        "--batch-sizes at its one image size (this option is ignored)", check=_all_positive,
    )
    texts: str | None = opt(None, "real texts (.txt one per line, or .csv/.tsv/.jsonl/.parquet): natural lengths instead of --seq-lengths")
    text_column: str = opt("text", "text column of --texts")
    images: str | None = opt(None, "image artifacts: real images (a <label>/<image> folder) instead of random pixels")
    threads: int | None = opt(None, "threads for every engine alike: PyTorch, ONNX Runtime, OpenVINO (default: the physical cores)", check=positive)
    warmup: int = opt(1, "untimed calls per engine and cell", check=lambda v: None if v >= 0 else "must be >= 0")
    max_seconds: float = opt(4.0, "time limit per cell (all engines together, one at a time), after warm-up", check=positive)
    spread: float = opt(0.10, "stable when (max-min)/median of the last windows is below this", check=positive)
    windows: int = opt(3, "windows compared for stability", check=lambda v: None if v >= 2 else "must be >= 2")
    window_seconds: float = opt(0.25, "least time per timing window (a window has one call or more)", check=positive)
    seed: int = opt(0, "seed of the random tokens")
    check_baseline: bool = opt(True, "on the headline cell (32x128, else the largest), time each PyTorch path also in a fresh "
                               "process of its own running a plain loop (nothing else in it), in the same rounds as the grid, and warn when "
                               "the baseline's p50 in the grid is off by more than 5 percent")
    compare: list[str] = opt([], "two bench.json reports: print the ratios B/A instead of benchmarking")
    quiet: bool = opt(False, "no progress bars")


# ---------------------------------------------------------------- inputs


def grid_cells(tokenizer: Any, vocab: int, batch_sizes: Sequence[int], seq_lengths: Sequence[int], max_length: int, input_names: Sequence[str], seed: int) -> tuple[list[Cell], list[int]]:
    """Cells of random full-length texts; sequence lengths above the model's are dropped (returned)."""
    from export.inputs import pad_id, random_ids
    from runtime.tokens import collate

    rng = np.random.default_rng(seed)
    cells, dropped = [], sorted({s for s in seq_lengths if s > max_length})
    for s in [s for s in seq_lengths if s <= max_length]:
        for b in batch_sizes:
            ids = random_ids(tokenizer, vocab, b, s, rng, full=True)
            cells.append(Cell(b, s, [collate(ids, pad_id(tokenizer), input_names)], [b * s]))
    return cells, dropped


def text_cells(tokenizer: Any, texts: Sequence[str], batch_sizes: Sequence[int], max_length: int, input_names: Sequence[str]) -> list[Cell]:
    """Cells of real texts: consecutive batches, each padded to its own longest text."""
    from export.inputs import encode, pad_id
    from runtime.tokens import collate

    ids = encode(tokenizer, texts, max_length)
    cells = []
    for b in batch_sizes:
        groups = [ids[i : i + b] for i in range(0, len(ids), b)]
        groups = [g for g in groups if len(g) == b] or [(ids * b)[:b]]
        cells.append(Cell(b, "natural", [collate(g, pad_id(tokenizer), input_names) for g in groups], [sum(map(len, g)) for g in groups]))
    return cells


def text_grid(artifact: Any, args: BenchArgs) -> list[Cell]:
    """The cells of a text artifact: --texts at natural lengths, else batch sizes x --seq-lengths."""
    from export.parity import usable_length
    from finetune.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(artifact.path)
    max_length = artifact.max_length
    positions = usable_length(json.loads((artifact.path / "config.json").read_text()), 10**9) if (artifact.path / "config.json").is_file() else max_length
    if args.texts:
        from export.inputs import read_texts

        cells = text_cells(tokenizer, read_texts(args.texts, args.text_column), args.batch_sizes, max_length, artifact.manifest["inputs"])
        dropped: list[int] = []
    else:
        cells, dropped = grid_cells(tokenizer, len(tokenizer), args.batch_sizes, args.seq_lengths, positions, artifact.manifest["inputs"], args.seed)
        if not cells:
            raise ConfigError(f"--seq-lengths: all above the model's {positions} positions")
        if dropped:
            print(f"warning: --seq-lengths {','.join(map(str, dropped))} exceed the model's {positions} positions; skipped", file=sys.stderr)
    return cells


def image_cells(artifact: Any, batch_sizes: Sequence[int], folder: str | None, seed: int) -> list[Cell]:
    """The cells of an image artifact: one per batch size at the model's one image size.

    Random normalized pixels, or with ``folder`` real images preprocessed by
    ``runtime.pixels.preprocess`` (timed: the model only, as for texts). Sequence lengths
    do not apply; ``seq_length`` holds the image size and "tokens" count images.
    """
    size = artifact.manifest.get("image_size") or {}
    h, w = int(size["height"]), int(size["width"])
    if folder:
        from finetune.images import read_image_folder
        from runtime.pixels import load_processor, open_image, preprocess

        files, _ = read_image_folder(folder, "--images")
        pixels = preprocess([open_image(f, str(f)) for f in files[: max(batch_sizes)]], load_processor(artifact.path))
    else:
        pixels = np.random.default_rng(seed).standard_normal((max(batch_sizes), 3, h, w)).astype(np.float32)
    cells = []
    for b in batch_sizes:
        batch = np.resize(pixels, (b, 3, h, w))  # repeats the images when the folder has fewer than b
        cells.append(Cell(b, f"{h}x{w}", [{"pixel_values": batch}], [b]))
    return cells


# ---------------------------------------------------------------- results


def cell_result(spec: EngineSpec, cell: Cell, t: Timing, windows: int, max_spread: float) -> dict[str, Any]:
    """The result row of one engine in one cell: its latencies, throughput, peak memory, and
    whether the spread of its last ``windows`` windows came under ``max_spread`` (stable)."""
    total = sum(t.latencies)
    recent = t.window_means[-windows:]
    return {
        "engine": spec.name,
        "kind": spec.kind,
        "runtime": spec.engine,
        "mode": spec.mode,
        "device": spec.device,
        "precision": spec.precision,
        "variant": spec.variant,
        "batch_size": cell.batch_size,
        "seq_length": cell.seq_length,
        "calls": len(t.latencies),
        "windows": len(t.window_means),
        "spread": spread(recent) if len(recent) > 1 else None,
        "stable": len(recent) >= windows and spread(recent) < max_spread,
        "latency_ms": {
            "p50": 1e3 * percentile(t.latencies, 50),
            "p90": 1e3 * percentile(t.latencies, 90),
            "p99": 1e3 * percentile(t.latencies, 99),
            "mean": 1e3 * total / len(t.latencies),
            "min": 1e3 * min(t.latencies),
        },
        "sequences_per_s": t.sequences / total,
        "tokens_per_s": t.tokens / total,
        "peak_rss_mb": t.peak_bytes / 2**20,
        "settle_ms": 1e3 * percentile(t.settle, 50) if t.settle else None,
        "cuda_peak_mb": None if t.cuda_peak_bytes is None else t.cuda_peak_bytes / 2**20,
    }


# ---------------------------------------------------------------- the baseline check


def compare_baseline(in_grid: Sequence[float], standalone: Sequence[float], tolerance: float = BASELINE_TOLERANCE,
                     engine: str = BASELINE, cell: str = "") -> dict[str, Any]:
    """The in-grid baseline's p50 latency against a standalone loop's, as a ratio.

    Args:
        in_grid, standalone: latencies (seconds) of the same engine on the same inputs,
            in the grid and in a plain loop in a fresh process.
        tolerance: "ok" when the ratio is within 1 +- tolerance, else "warn".

    Returns:
        engine, cell, both p50s (ms), ratio (in-grid / standalone: above 1, the grid's
        baseline is slower and every speedup over it is inflated by that much), status, message.
    """
    grid_ms, alone_ms = 1e3 * percentile(in_grid, 50), 1e3 * percentile(standalone, 50)
    ratio = grid_ms / alone_ms
    ok = abs(ratio - 1) <= tolerance
    where = f"{engine}{' at ' + cell if cell else ''}"
    msg = f"{where}: in the grid p50 {grid_ms:.1f} ms, alone in a fresh process {alone_ms:.1f} ms, ratio {ratio:.2f}"
    if ok:
        msg += f" (within {tolerance:.0%}): the baseline is honest"
    else:
        direction = "slower" if ratio > 1 else "faster"
        inflated = "inflated" if ratio > 1 else "deflated"
        msg = (f"WARNING: the grid's PyTorch baseline is {abs(ratio - 1):.0%} {direction} than a plain loop, so every "
               f"speedup in this report is {inflated} by about that much. " + msg + "; other programs on the machine "
               "do this too (PyTorch's OpenMP threads stall whenever one of them loses its core): compare the load averages and run again")
    return {
        "engine": engine, "cell": cell, "in_grid_p50_ms": grid_ms, "standalone_p50_ms": alone_ms,
        "in_grid_calls": len(in_grid), "standalone_calls": len(standalone), "ratio": ratio,
        "tolerance": tolerance, "status": "ok" if ok else "warn", "message": msg,
    }


def baseline_checks(results: list[dict[str, Any]], timings: dict[tuple[str, str], Timing], cells: Sequence[tuple[int, Any]]) -> list[dict[str, Any]]:
    """Per device and checked cell: the fastest PyTorch path's in-grid latencies against its
    standalone twin's, measured in the same rounds (:func:`compare_baseline`)."""
    checks = []
    for (device, b, s) in dict.fromkeys(cell_key(r) for r in results):
        if (b, s) not in cells:
            continue
        rows = [r for r in results if cell_key(r) == (device, b, s) and r["kind"] == "pytorch"]
        if not rows:
            continue
        base = max(rows, key=lambda r: r["sequences_per_s"])
        label = f"{b}x{s}"
        twin = timings.get((base["engine"] + TWIN, label))
        if twin is None or not twin.latencies:
            why = twin.error if twin is not None and twin.error else "the standalone process did not run"
            checks.append({"engine": base["engine"], "cell": label, "device": device, "status": "failed", "message": f"baseline check failed: {why}"})
            continue
        checks.append({**compare_baseline(timings[base["engine"], label].latencies, twin.latencies, engine=base["engine"], cell=label),
                       "device": device})
    return checks


# ---------------------------------------------------------------- the command


def _compare_paths(args: BenchArgs) -> list[str] | None:
    """``--compare A.json B.json`` parses as --compare A.json plus the positional B.json."""
    paths = list(args.compare)
    if not paths:
        return None
    if len(paths) == 1 and args.artifact:
        paths.append(args.artifact)
    if len(paths) != 2:
        raise ConfigError(f"--compare takes two reports (A.json B.json), got {len(paths)}")
    return paths


def pytorch_source(artifact: Any, checkpoint: str | None) -> str:
    """The PyTorch source of an artifact, checked before any worker starts (the worker loads it).

    Raises:
        CheckpointError: no source recorded, or it is gone or not a checkpoint.
    """
    ensemble_spec = None if checkpoint else artifact.manifest.get("ensemble")
    if ensemble_spec:
        return "ensemble of " + ", ".join(m["checkpoint"] for m in ensemble_spec["members"])
    source = checkpoint or (artifact.manifest.get("source") or {}).get("checkpoint")
    if not source or not Path(source).is_dir():
        found = f"source checkpoint {source} of {artifact.path} not found" if source else f"{artifact.path}: the manifest names no source checkpoint"
        raise CheckpointError(f"{found}; pass --checkpoint DIR or --no-pytorch (no speedups then)")
    from finetune.checkpoint import check_valid_checkpoint_dir

    check_valid_checkpoint_dir(source, "--checkpoint" if checkpoint else "source checkpoint")
    return str(source)


def torch_sees_cuda() -> bool:
    """Whether PyTorch can use a GPU; without an NVIDIA driver, known without importing torch."""
    from runtime.engines import gpu_present

    if not gpu_present():
        return False
    import torch

    return bool(torch.cuda.is_available())


def jobs_for(specs: list[EngineSpec], artifact: Any, checkpoint: str | None, threads: int) -> list[Job]:
    """What each worker loads: the source checkpoint for PyTorch, the variant's file otherwise."""
    jobs = []
    for spec in specs:
        if spec.kind == "pytorch":
            jobs.append(Job(spec, "bench.engines:load_pytorch", {"artifact": str(artifact.path), "checkpoint": checkpoint, "threads": threads}))
        else:
            jobs.append(Job(spec, "bench.engines:load_variant", {"path": str(artifact.variants[spec.variant].path), "threads": threads}))
    return jobs


def run_grid(
    workers: list[Worker], cells: list[Cell], args: BenchArgs, twins: Sequence[Worker] = (), twin_cells: Sequence[tuple[int, Any]] = (),
) -> tuple[list[dict[str, Any]], dict[str, str], dict[tuple[str, str], Timing]]:
    """Every cell, CPU engines then CUDA engines, each group interleaved by :func:`time_cell`.

    ``twins`` (:func:`standalone_twin` workers) join the rounds of their engine's device in
    the cells of ``twin_cells`` only: the baseline check, measured under the same load as
    the grid. Their timings are returned, not their results.
    Returns the result rows, the engines that failed (name -> cell and reason; a failed
    engine is not asked again) and the timings by (engine, cell label).
    """
    from tqdm.auto import tqdm

    results: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    timings_by: dict[tuple[str, str], Timing] = {}
    bar = tqdm(cells, desc="bench", unit="cell", file=sys.stderr, disable=args.quiet)
    for cell in bar:
        bar.set_postfix_str(cell.label)
        for dev in ("cpu", "cuda"):
            group = [w for w in workers if w.spec.device == dev and w.spec.name not in failed]
            if not group:
                continue
            names = {w.spec.name for w in group}
            checking = (cell.batch_size, cell.seq_length) in twin_cells
            extra = [t for t in twins if checking and t.spec.name.removesuffix(TWIN) in names and t.spec.name not in failed]
            timings = time_cell(group + extra, cell, warmup=args.warmup, windows=args.windows, max_spread=args.spread,
                                window_seconds=args.window_seconds, max_seconds=args.max_seconds)
            for w in group + extra:
                t = timings[w.spec.name]
                timings_by[w.spec.name, cell.label] = t
                if t.latencies and w in group:
                    results.append(cell_result(w.spec, cell, t, args.windows, args.spread))
                if t.error:
                    failed[w.spec.name] = f"cell {cell.label}: {t.error}"
                    print(f"warning: {w.spec.name} failed in cell {cell.label}: {t.error}; the other engines go on", file=sys.stderr)
    bar.close()
    return results, failed, timings_by


def _sort_unavailable(unavailable: dict[str, tuple[str, str | None, bool]], skipped: dict[str, str]) -> None:
    """The engines that could not load (see :func:`bench.timing.start_workers`): a missing
    engine, or one that cannot compile its model here, joins ``skipped`` with the reason; bad
    input (a damaged model or checkpoint) is raised as its own one-line error (exit status 2)."""
    for name, (reason, kind, ferry_error) in unavailable.items():
        if name.endswith(TWIN):
            continue  # its engine failed to load the same way, reported under its own name
        if kind == "EngineUnavailable":
            skipped[name] = reason
        elif ferry_error:
            raise getattr(errors, kind or "", FerryError)(reason)
        else:
            skipped[name] = f"could not load: {reason}"


def measure(jobs: list[Job], cells: list[Cell], args: BenchArgs, skipped: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, str], list[dict[str, Any]]]:
    """Starts a process per engine (and the baseline check's twins), runs the grid, stops them.

    This process only coordinates: it never runs a model, so no thread pool of its own
    competes with the engine being timed. Returns the result rows with their speedups, the
    engines that failed and the baseline checks; an engine that could not load joins
    ``skipped``.
    """
    check_cells = [pick_headline((c.batch_size, c.seq_length) for c in cells)] if args.check_baseline else []
    workers, twins, unavailable = start_with_twins(jobs, bool(check_cells))
    try:
        _sort_unavailable(unavailable, skipped)
        results, failed, timings = run_grid(workers, cells, args, twins, check_cells)
    finally:
        for w in workers + twins:
            w.stop()
    add_speedups(results)
    checks = baseline_checks(results, timings, check_cells)
    return results, {k: v for k, v in failed.items() if not k.endswith(TWIN)}, checks  # a twin's failure is its check's message


def bench(args: BenchArgs) -> int:
    paths = _compare_paths(args)
    if paths:
        print(compare(*paths))
        return 0
    if not args.artifact:
        raise ConfigError("ARTIFACT is required (or --compare A.json B.json)")
    from export.parity import default_threads
    from export.writer import quiet_libraries
    from runtime.engines import cuda_usable

    started = time.perf_counter()
    artifact = check_valid_artifact_dir(args.artifact)
    task = task_named(artifact.task)
    if task.image and args.texts:
        raise ConfigError(f"--texts: {artifact.path} is an {task} artifact; pass --images DIR (a <label>/<image> folder)")
    if args.images and not task.image:
        raise ConfigError(f"--images: {artifact.path} is a {task} artifact; pass --texts FILE")
    names = artifact.select(args.variants)
    output = Path(args.output) if args.output else artifact.path.parent / f"{artifact.path.name}-bench"
    check_output_dir(output, args.overwrite, [artifact.path])  # before minutes of timing, not after
    threads = args.threads or default_threads()
    quiet_libraries()

    source = pytorch_source(artifact, args.checkpoint) if args.pytorch else None
    variants = {n: artifact.variants[n].spec for n in names}
    specs, skipped = plan_engines(variants, args.device, args.pytorch, torch_sees_cuda(), cuda_usable())
    cells = image_cells(artifact, args.batch_sizes, args.images, args.seed) if task.image else text_grid(artifact, args)
    machine = machine_info()  # before the workers load: the load average is the other programs'
    results, failed, checks = measure(jobs_for(specs, artifact, args.checkpoint, threads), cells, args, skipped)

    via_cli = sys.argv and (sys.argv[0].endswith("ferry") or sys.argv[0].endswith(os.path.join("ferry", "__main__.py")))
    command = "ferry bench " + " ".join(sys.argv[2:]) if via_cli else f"ferry bench {args.artifact}"
    report = {
        "stage": "bench",
        "artifact": str(artifact.path),
        "artifact_manifest_sha256": sha256_file(artifact.path / "ferry.json"),
        "checkpoint": source,
        "command": command,
        "machine": {**machine, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "threads": threads,
        "isolation": "one process per engine (spawn), one engine timed at a time, windows interleaved in rounds",
        "engines": [dataclasses.asdict(s) for s in specs],
        "skipped": skipped,
        "failed": failed,
        "headline": headlines(results),
        "baseline_check": checks,
        "busy": busy_note(machine),
        "settings": to_dict(args),
        "results": results,
        "versions": library_versions(*VERSIONS),
        "created": now_iso(),
        "duration_s": round(time.perf_counter() - started, 1),
    }
    with atomic_dir(output, args.overwrite, [artifact.path]) as staging:
        write_bench_report(staging, report)
    print_report(report, output)
    return 0
