"""`ferry predict ARTIFACT --data FILE --output OUT`: score a whole file with the served variant.

The model runs as `ferry serve` runs it (the same runtime, the same hardware-aware choice of
variant at start or ``--variant``, the same batching per inference call), over a file read in
chunks (predict/formats.py), on this machine or on Ray Data (``--ray``, predict/cluster.py).
The output (predict/output.py) is written beside its destination and renamed when complete;
``--resume`` continues an interrupted run. ``OUT.ferry.json`` records what was run on what.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from ferry.config import opt, positive, to_dict
from ferry.errors import ConfigError, DataError, FerryError
from ferry.files import MANIFEST, library_versions, now_iso, output_lock, sha256_file, write_json
from ferry.tasks import IMAGE, TEXT, task_named
from runtime.engines import OPT_LEVELS
from predict import formats
from predict.output import Partial
from predict.score import ERROR, Job, output_columns

ON_ERROR = ("record", "fail")
VERSIONS = ("onnxruntime-gpu", "onnxruntime", "openvino", "tokenizers", "numpy", "pyarrow", "ray")


@dataclasses.dataclass
class PredictArgs:
    """Score every row of a CSV, TSV, JSON Lines or Parquet file with an artifact's served variant."""

    artifact: str | None = opt(None, "the artifact directory written by ferry export", positional=True)
    data: str | None = opt(None, "the file to score: .csv, .tsv, .jsonl or .parquet (read in chunks, never whole)")
    output: str | None = opt(None, "the output file; its manifest is written beside it as OUTPUT.ferry.json", short="-o")
    text_column: str = opt(TEXT.column, "text artifacts: the column holding the texts")
    image_column: str = opt(IMAGE.column, "image artifacts: the column holding image paths (relative to the data "
                            "file's folder) or, in Parquet, image bytes")
    keep_columns: list[str] | None = opt(None, "input columns copied to the output, in their order ('*': all but the "
                                         "input column) (default: the column named id, if there is one)")
    format: str | None = opt(None, "output format (default: the input's)", choices=tuple(formats.EXTENSION))
    all_scores: bool = opt(False, "also write every label's probability, one column score_<label> per label")
    variant: str | None = opt(None, "the variant to run (default: what ferry serve serves here: on CPU the fastest "
                              "variant that passes its gate on this machine, chosen at start; on GPU the artifact's GPU default)")
    device: str = opt("auto", "where to run: auto (CUDA when ONNX Runtime can use a GPU), cpu or cuda", choices=("auto", "cpu", "cuda"))
    threads: int | None = opt(None, "engine threads (default: one per physical core; with --ray: 1 per actor)", check=positive)
    optimization: str = opt("all", "ONNX Runtime graph optimization level", choices=OPT_LEVELS)
    batch_size: int | None = opt(None, "most texts or images per inference call (default: ferry serve's "
                                 "max_batch_size on the device: 32 on CPU, 128 on GPU)", check=positive)
    max_batch_tokens: int | None = opt(None, "token budget of one inference call, padding included (default: ferry "
                                       "serve's on the device: 4096 on CPU, 16384 on GPU)", check=positive)
    chunk_rows: int = opt(1024, "rows read, scored and written at a time (the unit of --resume and of a Ray task); "
                          "texts are sorted by length within a chunk", check=positive)
    on_error: str = opt("record", "a bad row (no text, a text that is not a string, an unreadable image): record "
                        "it in the error column with no prediction, or fail at the first one", choices=ON_ERROR)
    resume: bool = opt(False, "continue the interrupted run on --output (same artifact, variant, input and settings)")
    overwrite: bool = opt(False, "replace an existing --output")
    ray: str | None = opt(None, "run on Ray Data: an address ('auto': the cluster of `ray start` on this machine, "
                          "ray://HOST:PORT) or, with no value, a Ray instance started here (default: off, no Ray)",
                          const="local")
    ray_cpus: int | None = opt(None, "--ray with no address: the CPUs of the Ray instance started here (default: "
                               "all of this machine's)", check=positive)
    ray_actors: int | None = opt(None, "--ray: scoring actors, each loading the artifact once (default: the "
                                 "cluster's CPUs / --threads)", check=positive)
    quiet: bool = opt(False, "no progress bar")


@dataclasses.dataclass
class Plan:
    """What the checks before any work resolved."""

    data: Path
    output: Path
    fmt: str  # input format
    out_fmt: str
    names: list[str]
    column: str
    keep: list[str]
    task: Any


def check(args: PredictArgs) -> Plan:
    """Everything that can be checked before a model is loaded; one line naming the flag and the fix."""
    from runtime.artifact import check_valid_artifact_dir

    if args.artifact is None:
        raise ConfigError("ARTIFACT is required")
    missing = [f for f, v in (("--data", args.data), ("--output", args.output)) if not v]
    if missing:
        raise ConfigError([f"{f} is required" for f in missing])
    task = task_named(check_valid_artifact_dir(args.artifact).task)
    data = Path(args.data).expanduser()  # type: ignore[arg-type]
    if data.is_dir():
        raise DataError(f"--data {data}: is a directory; give a .csv, .tsv, .jsonl or .parquet file")
    if not data.is_file():
        raise DataError(f"--data {data}: file not found")
    fmt = formats.format_of(data, "--data")
    out_fmt = args.format or fmt
    output = Path(args.output).expanduser()  # type: ignore[arg-type]
    check_output(output, out_fmt, data, args)
    names = formats.header(data, fmt)
    column = args.image_column if task.image else args.text_column
    flag = "--image-column" if task.image else "--text-column"
    if column not in names:
        raise DataError(f"{flag} '{column}' not in {data.name}; {columns_text(names, fmt)}")
    keep = keep_columns(args.keep_columns, names, column, data, fmt)
    return Plan(data, output, fmt, out_fmt, names, column, keep, task)


def check_output(output: Path, fmt: str, data: Path, args: PredictArgs) -> None:
    import os

    ext = output.suffix.lower()
    if ext in formats.FORMATS and formats.FORMATS[ext] != fmt:
        raise ConfigError(f"--output {output}: a {ext} name for {fmt} output; name it {output.stem}{formats.EXTENSION[fmt]} "
                          f"or pass --format {formats.FORMATS[ext]}")
    if output.resolve() == data.resolve():
        raise ConfigError(f"--output {output} is the --data file; choose another name")
    if output.is_dir():
        raise ConfigError(f"--output {output}: is a directory; give a file name")
    if output.exists() and not args.overwrite:
        raise ConfigError(f"--output {output} already exists; pass --overwrite to replace it")
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError(f"--output {output}: no folder {parent}; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: cannot write in {parent} (permission denied)")


def keep_columns(given: list[str] | None, names: list[str], column: str, data: Path, fmt: str) -> list[str]:
    if given is None:
        return [n for n in names if n.lower() in formats.ID_NAMES and n != column][:1]
    if given == ["*"]:
        return [n for n in names if n != column]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise DataError(f"--keep-columns '{unknown[0]}' not in {data.name}; {columns_text(names, fmt)}")
    return list(dict.fromkeys(given))


def columns_text(names: list[str], fmt: str) -> str:
    where = "the keys of its first JSON object are" if fmt == "jsonl" else "columns are"
    return f"{where}: {', '.join(names) or '(none)'}"


def predict(args: PredictArgs) -> int:
    plan = check(args)
    if args.ray is not None:
        require_ray()  # absent: one line naming the extra, before any work
    with output_lock(plan.output):
        partial = Partial(plan.output, plan.out_fmt, plan.keep if plan.fmt == "jsonl" else [], args.resume, args.overwrite)
        try:
            return run(args, plan, partial)
        except DataError:
            partial.discard()  # a bad row with --on-error fail, a file pyarrow cannot parse: a rerun needs another input
            raise
        finally:
            partial.close()


def require_ray() -> None:
    """Raises FerryError naming the extra when Ray (with Ray Data) is not installed."""
    import importlib

    try:
        importlib.import_module("ray.data")
    except ImportError:
        raise FerryError("--ray needs Ray, which is not installed here: pip install 'ferry[ray]'") from None


def run(args: PredictArgs, plan: Plan, partial: Partial) -> int:
    from predict.score import Scorer

    started, t0 = now_iso(), time.perf_counter()
    input_sha, estimate = formats.count_and_hash(plan.data, plan.fmt)
    variant = args.variant or partial.recorded.get("variant")  # a resumed run keeps the variant it chose
    job = Job(str(Path(args.artifact).resolve()), variant, args.device, args.threads, args.optimization,  # type: ignore[arg-type]
              args.batch_size, args.max_batch_tokens, plan.fmt, plan.column, tuple(plan.keep), args.all_scores,
              str(plan.data.resolve().parent))
    # With --ray and a named variant the driver only reads the artifact's facts: the actors re-check
    # the variant where they run, as the server's workers do.
    scorer = Scorer(dataclasses.replace(job, choose=args.ray is None or variant is None))
    rt = scorer.runtime
    for note in rt.notes:
        print(f"ferry predict: warning: {note}", file=sys.stderr)
    job = dataclasses.replace(job, variant=rt.variant.name, device=rt.device, batch_size=scorer.batch_size,
                              max_batch_tokens=scorer.max_tokens)
    collide = [c for c in plan.keep if c in output_columns(scorer.labels, [], args.all_scores)]
    if collide:
        raise ConfigError(f"--keep-columns '{collide[0]}' has the name of an output column; keep the others, or rename it in the data")
    fingerprint = {"artifact": job.artifact, "artifact_sha256": sha256_file(Path(job.artifact) / MANIFEST),
                   "variant": job.variant, "input": str(plan.data.resolve()), "input_sha256": input_sha,
                   "format": plan.out_fmt, "column": plan.column, "keep": plan.keep, "all_scores": args.all_scores,
                   "chunk_rows": args.chunk_rows, "batch_size": job.batch_size, "max_batch_tokens": job.max_batch_tokens,
                   "optimization": args.optimization, "device": job.device, "on_error": args.on_error}
    done = partial.begin(fingerprint)
    setup = time.perf_counter() - t0
    bar = progress(args, estimate, partial.state["rows"])
    ray_report: dict[str, Any] = {"address": args.ray}  # --ray: the actor pool and the chunks each actor scored
    try:
        if args.ray is not None:
            from predict.cluster import score_on_ray

            outputs = score_on_ray(job, args, plan, done, bar.update, ray_report)
        else:
            outputs = local_chunks(scorer, plan, args.chunk_rows, done, bar.update)
        for index, table in enumerate(outputs, start=done):
            errors = bad_rows(table, index * args.chunk_rows)
            if errors and args.on_error == "fail":
                row, error = errors[0]
                raise DataError(f"--data {plan.data}: row {row}: {error} (--on-error fail stops at the first bad row)")
            partial.add(table, errors)
    finally:
        bar.close()
    partial.finish(empty_output(scorer_columns(job, rt.labels), job), args.overwrite)
    seconds = time.perf_counter() - t0
    write_manifest(args, plan, job, rt, partial.state, input_sha, started, seconds, setup, done, ray_report)
    summary(plan, partial.state, seconds, setup, rt, args)
    return 0


def local_chunks(scorer: Any, plan: Plan, chunk_rows: int, skip: int, update: Any) -> Iterator[Any]:
    """The output tables of the chunks after the first ``skip``, scored here."""
    needed = formats.columns_needed(plan.fmt, plan.column, plan.keep)
    for index, raw in enumerate(formats.read_chunks(plan.data, plan.fmt, chunk_rows, plan.names, plan.column, needed)):
        if index >= skip:
            yield scorer(raw, update)


def bad_rows(table: Any, first_row: int) -> list[tuple[int, str]]:
    """(row number counted from 1, error) of the chunk's bad rows; ``first_row``: the rows before it."""
    return [(first_row + i + 1, e) for i, e in enumerate(table.column(ERROR).to_pylist()) if e is not None]


def scorer_columns(job: Job, labels: list[str]) -> list[str]:
    return output_columns(labels, job.keep, job.all_scores)


def empty_output(columns: list[str], job: Job) -> Any:
    """The output table of no rows (the header or schema of an input without rows)."""
    import pyarrow as pa

    from predict.score import LABEL

    types = {c: pa.string() if c in (LABEL, ERROR) or c in job.keep else pa.float64() for c in columns}
    return pa.table({c: pa.array([], t) for c, t in types.items()})


def progress(args: PredictArgs, estimate: int | None, done: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=estimate, initial=done, unit="rows", desc="ferry predict", file=sys.stderr, disable=args.quiet,
                dynamic_ncols=True, mininterval=1.0, smoothing=0.1)


def write_manifest(args: PredictArgs, plan: Plan, job: Job, rt: Any, state: dict[str, Any], input_sha: str,
                   started: str, seconds: float, setup: float, resumed: int, ray_report: dict[str, Any]) -> None:
    from runtime.artifact import CONTENT

    manifest = rt.artifact.manifest
    v = rt.variant
    write_json(plan.output.with_name(plan.output.name + "." + MANIFEST), {
        "stage": "predict",
        "artifact": {"path": job.artifact, "sha256": sha256_file(Path(job.artifact) / MANIFEST),
                     "content_sha256": manifest.get(CONTENT), "task": rt.artifact.task, "labels": rt.labels},
        "variant": {"name": v.name, "engine": v.engine, "precision": v.info.get("precision"), "sha256": v.info.get("sha256"),
                    "parity": v.status, "provider": rt.provider, "device": rt.device,
                    "choice": rt.choice.as_dict() if getattr(rt, "choice", None) else None},
        "engine": v.engine,
        "input": {"path": str(plan.data.resolve()), "sha256": input_sha, "format": plan.fmt, "rows": state["rows"],
                  "column": plan.column},
        "output": {"path": str(plan.output.resolve()), "sha256": sha256_file(plan.output), "format": plan.out_fmt,
                   "rows": state["rows"], "columns": scorer_columns(job, rt.labels)},
        "errors": {"rows": state["errors"], "first": state["first_errors"]},
        "settings": {**to_dict(args), "batch_size": job.batch_size, "max_batch_tokens": job.max_batch_tokens},
        "ray": None if args.ray is None else ray_report,
        "resumed_after_chunks": resumed,
        "time": {"started": started, "finished": now_iso(), "seconds": round(seconds, 3),
                 "startup_seconds": round(setup, 3), "rows_per_s": rate(state["rows"] - state["rows_before"], seconds - setup)},
        "versions": library_versions(*VERSIONS),
    })


def rate(rows: int, seconds: float) -> float | None:
    return round(rows / seconds, 3) if seconds > 0 else None


def summary(plan: Plan, state: dict[str, Any], seconds: float, setup: float, rt: Any, args: PredictArgs) -> None:
    """One line: rows, seconds, rows/s (of the scoring, after the start-up), variant, bad rows."""
    scored = state["rows"] - state["rows_before"]
    where = f"on Ray ({args.ray})" if args.ray is not None else f"on {rt.provider}"
    resumed = f" ({state['rows_before']} done before the resume)" if state["rows_before"] else ""
    print(f"ferry predict: {state['rows']} rows{resumed} in {seconds:.1f} s ({rate(scored, seconds - setup) or 0:.1f} rows/s "
          f"after a {setup:.1f} s start-up), variant '{rt.variant.name}' ({rt.variant.engine} "
          f"{rt.variant.info.get('precision', '?')}) {where}; {state['errors']} bad rows (column {ERROR}); wrote {plan.output}")
