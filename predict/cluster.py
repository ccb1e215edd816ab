"""`ferry predict --ray`: the same job on Ray Data.

A read task reads the file with the local reader (predict/formats.py, wrapped as a Ray Data
datasource), so it cuts the same chunks, and makes each chunk one row of the dataset (its
number and its rows as Arrow IPC bytes): however Ray Data merges or splits blocks, a chunk
stays whole. ``map_batches`` hands the chunks, one at a time, to the idle actors of a fixed
pool (the manifest counts the chunks each one scored), each a
:class:`ChunkScorer` that opens the artifact once in its ``__init__`` (its integrity check
included) and runs the variant the driver chose. The driver reads the scored chunks back in
order (``preserve_order``) and writes them with the local writer, so the output is the local
run's, row for row and byte for byte.

Ray is an optional extra (``pip install 'ferry[ray]'``); this module imports it at the top and
is imported only once ``predict.cli.require_ray`` has found it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource

from ferry.errors import FerryError, first_line
from predict import formats
from predict.score import Job, Scorer

LOCAL = "local"  # the --ray address of a Ray instance started on this machine

INDEX, CHUNK, ACTOR = "index", "chunk", "actor"  # a row of the dataset: a chunk's number, its rows, who scored it


class ChunkSource(FileBasedDatasource):
    """The data file as Ray Data blocks: the local reader's raw chunks, after the first ``skip``."""

    def __init__(self, path: str, fmt: str, chunk_rows: int, names: list[str], column: str,
                 needed: list[str] | None, skip: int):
        """``skip``: the chunks an interrupted run wrote (--resume): read, not scored."""
        super().__init__(path)
        self.fmt, self.chunk_rows, self.names, self.column, self.needed, self.skip = fmt, chunk_rows, names, column, needed, skip

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        # Parquet needs random access; the stream the base class opens has none
        return filesystem.open_input_file(path) if self.fmt == "parquet" else super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
        for index, raw in enumerate(formats.read_chunks(f, self.fmt, self.chunk_rows, self.names, self.column, self.needed)):
            if index >= self.skip:
                yield pa.table({INDEX: [index], CHUNK: pa.array([to_ipc(raw)], pa.binary())})


class ChunkScorer:
    """A Ray actor's scorer: the artifact opened and checked once, then whole chunks, one per row."""

    def __init__(self, job: Job) -> None:
        self.scorer = Scorer(job)
        self.actor = ray.get_runtime_context().get_actor_id()

    def __call__(self, batch: Any) -> Any:
        chunks = [to_ipc(self.scorer(from_ipc(b))) for b in batch.column(CHUNK).to_pylist()]
        return pa.table({INDEX: batch.column(INDEX), CHUNK: pa.array(chunks, pa.binary()),
                         ACTOR: pa.array([self.actor] * len(chunks), pa.string())})


def to_ipc(table: Any) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> Any:
    return pa.ipc.open_stream(data).read_all()


def start(args: Any) -> bool:
    """Connect to the cluster, or start a local instance; True when this call started Ray."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    root = str(Path(__file__).resolve().parent.parent)  # the folder holding this checkout's packages
    try:
        if args.ray == LOCAL:
            # The workers of a local instance inherit the environment of the Ray processes started
            # here: PYTHONPATH gives them this checkout's code without a runtime_env to build.
            saved = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, saved) if p)
            try:
                ray.init(address="local", num_cpus=args.ray_cpus or os.cpu_count() or 1, **quiet)
            finally:
                os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)
        else:
            import ferry
            import predict
            import runtime

            # a cluster's workers get the driver's code (each node needs ferry's dependencies installed)
            ray.init(address=args.ray, runtime_env={"py_modules": [ferry, runtime, predict]}, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise FerryError(f"--ray {args.ray}: cannot start or reach Ray ({first_line(e)})") from None
    return True


def score_on_ray(job: Job, args: Any, plan: Any, skip: int, update: Callable[[int], None],
                 report: dict[str, Any]) -> Iterator[Any]:
    """The output tables of the chunks after the first ``skip``, in order, scored by a pool of Ray
    actors; ``report`` gets the pool (actors, threads per actor) and the chunks each actor scored."""
    started = start(args)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # chunks come back in file order
        ctx.enable_progress_bars = False  # the driver's bar counts the rows
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        threads = job.threads or 1
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = args.ray_actors or max(1, cpus // threads)
        job = dataclasses.replace(job, threads=threads)
        report.update(actors=actors, threads_per_actor=threads, chunks_per_actor=[])
        chunks_by_actor: Counter[str] = Counter()
        needed = formats.columns_needed(plan.fmt, plan.column, plan.keep)
        source = ChunkSource(str(Path(plan.data).resolve()), plan.fmt, args.chunk_rows, plan.names, plan.column, needed, skip)
        # reading takes no CPU of its own: the actors may hold them all and the read still runs
        ds = ray.data.read_datasource(source, num_cpus=0).map_batches(
            ChunkScorer, fn_constructor_args=(job,), batch_size=1, batch_format="pyarrow",
            # one chunk in flight per actor: the next chunk goes to the first actor that is idle
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1), num_cpus=threads)
        for expected, row in enumerate(ds.iter_rows(), start=skip):
            if row[INDEX] != expected:  # preserve_order promises file order: anything else is a bug
                raise RuntimeError(f"Ray Data returned chunk {row[INDEX]} where chunk {expected} was due")
            table = from_ipc(row[CHUNK])
            chunks_by_actor[row[ACTOR]] += 1
            report["chunks_per_actor"] = sorted(chunks_by_actor.values(), reverse=True)
            update(table.num_rows)
            yield table
    except ray.exceptions.RayError as e:
        raise cause(e) from None
    finally:
        if started:
            ray.shutdown()


def cause(e: BaseException) -> BaseException:
    """A FerryError raised in an actor (a bad artifact on a worker node) as itself; anything else as it came."""
    seen: BaseException | None = e
    for _ in range(10):  # a RayTaskError's cause, the cause of that...
        if seen is None or isinstance(seen, FerryError):
            break
        seen = getattr(seen, "cause", None) or seen.__cause__
    return seen if isinstance(seen, FerryError) else e
