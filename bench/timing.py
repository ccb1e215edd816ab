"""How `ferry bench` times a cell: each engine in a process of its own, one engine at a time.

Each engine runs in its own process (multiprocessing, "spawn": a :class:`Worker`), which
loads its model once and then waits. A cell (batch size x sequence length) is timed in
rounds by :func:`time_cell`: the parent tells one engine at a time to run one timing
window, so only one engine computes at any moment, with all the cores and a process of its
own (no other engine's thread pools or allocations beside it). Rounds go on until the spread
of each engine's last windows is under a limit or the cell has used its time, so drift on a
shared machine hits all engines alike. An engine whose process crashes gets the reason in
its :class:`Timing` and the others go on.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from bench.engines import Engine, EngineSpec
from bench.report import spread
from ferry.errors import FerryError, first_line

# After a window, the engine's worker threads keep spinning for a while (ONNX Runtime's
# pool: ~50-60 ms of a core after each run on the AMD EPYC here; OpenMP: a few ms), and they
# would steal cores from the next engine. A worker process is waited for until its threads
# are idle (their CPU time stops growing), up to SETTLE_MAX_S; in-process engines (Local)
# get the fixed SETTLE_S pause.
SETTLE_S = 0.05
SETTLE_MAX_S = 0.5
IDLE_PERIOD_S = 0.005  # idle: under IDLE_SHARE of one core in each of IDLE_PERIODS periods in a row
IDLE_SHARE = 0.1
IDLE_PERIODS = 3  # one quiet period is not enough on a busy machine: a spinning thread may just be waiting for a core
TWIN = " (standalone)"  # the name of an engine's twin in the baseline check


@dataclasses.dataclass
class Cell:
    batch_size: int
    seq_length: int | str  # tokens per text, or "natural" with --texts
    batches: list[dict[str, np.ndarray]]  # one call uses one batch, cycling
    real_tokens: list[int]  # per batch

    @property
    def label(self) -> str:
        return f"{self.batch_size}x{self.seq_length}"


# ---------------------------------------------------------------- peak memory


class PeakRSS:
    """The largest resident-set growth of this process while the block runs (sampled by a thread)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc, self._interval = psutil.Process(), interval
        self.peak = 0

    def __enter__(self) -> "PeakRSS":
        self._base = self._proc.memory_info().rss
        self._top = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._top = max(self._top, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._top = max(self._top, self._proc.memory_info().rss)
        self.peak = self._top - self._base


class HighWaterRSS:
    """The resident-set growth of this process while the block runs, from the kernel's
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``): exact, and no
    sampling thread competing with the engine for the cores and the GIL. Linux only."""

    def __init__(self) -> None:
        self.peak = 0

    @staticmethod
    def usable() -> bool:
        try:
            HighWaterRSS._reset()
            return HighWaterRSS._status("VmHWM") > 0
        except OSError:
            return False

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS (Linux >= 4.0)

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else 0

    def __enter__(self) -> "HighWaterRSS":
        self._reset()
        self._base = self._status("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(0, self._status("VmHWM") - self._base)


class NoMemory:
    """No memory measurement (for experiments that need the timing alone)."""

    peak = 0

    def __enter__(self) -> "NoMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def memory_meter(how: str = "auto") -> Callable[[], Any]:
    """A factory of peak-memory context managers: "auto" (high-water mark where the kernel
    has it, else a sampling thread), "hwm", "thread" or "none"."""
    if how == "auto":
        how = "hwm" if HighWaterRSS.usable() else "thread"
    return {"hwm": HighWaterRSS, "thread": PeakRSS, "none": NoMemory}[how]




# ---------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    latencies: list[float] = dataclasses.field(default_factory=list)
    batches: list[int] = dataclasses.field(default_factory=list)  # the batch each call ran
    tokens: int = 0
    sequences: int = 0
    window_means: list[float] = dataclasses.field(default_factory=list)
    settle: list[float] = dataclasses.field(default_factory=list)  # seconds until idle after each window
    peak_bytes: int = 0
    cuda_peak_bytes: int | None = None
    error: str | None = None  # why the engine stopped in this cell (its process crashed, ...)


@dataclasses.dataclass
class Window:
    """One timing window of one engine: per call its latency (s) and the batch it ran."""

    latencies: list[float]
    batches: list[int]
    peak_bytes: int = 0
    cuda_peak_bytes: int | None = None


class EngineFailed(FerryError):
    """An engine failed while timing (an exception in its run, or its process died)."""


class Local:
    """Times one :class:`Engine` in the calling process. A worker process runs one of these;
    :func:`time_cell` also drives them directly (``benchmarks/`` scripts, experiments)."""

    def __init__(self, engine: Engine, memory: str = "auto"):
        self.engine, self.spec = engine, engine.spec
        self.meter = memory_meter(memory)
        self.prepared: list[Any] = []
        self.cursor = 0

    def load_cell(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.prepared = [self.engine.prepare(b) for b in batches]
        self.cursor = 0

    def warmup(self, calls: int) -> float:
        """Runs ``calls`` untimed calls (at least one); returns the mean seconds per call."""
        t0 = time.perf_counter()
        for i in range(max(1, calls)):
            self.engine.run(self.prepared[i % len(self.prepared)])
        self.engine.sync()
        return (time.perf_counter() - t0) / max(1, calls)

    def window(self, calls: int) -> Window:
        """``calls`` timed calls, cycling through the cell's batches."""
        e = self.engine
        torch_cuda = e.spec.kind == "pytorch" and e.spec.device == "cuda"
        if torch_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        latencies, used = [], []
        with self.meter() as mem:
            for _ in range(calls):
                i = self.cursor % len(self.prepared)
                self.cursor += 1
                c0 = time.perf_counter()
                e.run(self.prepared[i])
                e.sync()
                latencies.append(time.perf_counter() - c0)
                used.append(i)
        cuda_peak = int(torch.cuda.max_memory_allocated()) if torch_cuda else None
        return Window(latencies, used, mem.peak, cuda_peak)

    def settle(self) -> float:
        """The fixed pause after a window (this process cannot tell its own pools' spinning apart)."""
        time.sleep(SETTLE_S)
        return SETTLE_S


@dataclasses.dataclass
class Job:
    """What a worker process loads: ``loader`` ("module:function") is called with the spec
    and ``kwargs`` inside the worker and returns the :class:`Engine`."""

    spec: EngineSpec
    loader: str
    kwargs: dict[str, Any]
    memory: str = "auto"


def _quiet_worker() -> None:
    """Warnings and library logs off in a worker (the parent reports what matters), without
    importing another engine's library into the process."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("transformers", "onnxruntime", "openvino", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _error_text(e: BaseException) -> str:
    """The error's type and the first line of its message: why an engine failed."""
    return f"{type(e).__name__}: {first_line(e, 300)}" if str(e).strip() else type(e).__name__


def worker_main(conn: Any, job: Job) -> None:
    """A worker process: load the engine once, then serve the parent's requests until "stop".

    Replies ("ready", facts) or ("unavailable", reason, error class, whether a FerryError)
    after loading; then
    ("ok", result) per request, or ("error", reason) after which the worker exits.
    """
    _quiet_worker()
    try:
        module, func = job.loader.split(":")
        engine = getattr(importlib.import_module(module), func)(job.spec, **job.kwargs)
        local = Local(engine, job.memory)
    except BaseException as e:  # reported to the parent: skipped with the reason, or (bad input) a one-line error
        conn.send(("unavailable", first_line(e, 300), type(e).__name__, isinstance(e, FerryError)))
        conn.close()
        return
    conn.send(("ready", {"pid": os.getpid()}))
    try:
        while True:
            op, *params = conn.recv()
            if op == "stop":
                break
            conn.send(("ok", getattr(local, op)(*params)))
    except EOFError:  # the parent is gone
        pass
    except BaseException as e:  # the parent reports the engine as failed and goes on
        try:
            conn.send(("error", _error_text(e)))
        except OSError:
            pass
    finally:
        conn.close()


def process_cpu_ns(pid: int) -> int | None:
    """CPU time (ns) used so far by all threads of process ``pid`` (Linux schedstat), or None."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total


def wait_idle(pid: int, cap: float = SETTLE_MAX_S, period: float = IDLE_PERIOD_S, share: float = IDLE_SHARE,
              periods: int = IDLE_PERIODS) -> float:
    """Waits until process ``pid`` uses under ``share`` of one core in each of ``periods``
    consecutive periods of ``period`` seconds (its pools stopped spinning), at most ``cap``
    seconds; returns the seconds waited. Without schedstat (not Linux), the fixed SETTLE_S pause."""
    start = time.perf_counter()
    last = process_cpu_ns(pid)
    if last is None:
        time.sleep(SETTLE_S)
        return SETTLE_S
    quiet = 0
    while time.perf_counter() - start < cap:
        time.sleep(period)
        now = process_cpu_ns(pid)
        if now is None:
            break
        quiet = quiet + 1 if now - last < share * period * 1e9 else 0
        if quiet >= periods:
            break
        last = now
    return time.perf_counter() - start


class Worker:
    """The parent's handle on one engine in its own process (multiprocessing, "spawn": a
    fresh interpreter, nothing inherited from this process but the job)."""

    def __init__(self, job: Job, context: Any = None):
        import multiprocessing

        ctx = context or multiprocessing.get_context("spawn")
        self.spec = job.spec
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, job), name=f"ferry-bench {job.spec.name}", daemon=True)
        self.process.start()
        child.close()  # so that recv() sees EOF when the worker dies
        self.error: str | None = None  # set once it failed; it gets no more requests
        self.info: dict[str, Any] = {}

    def _reply(self) -> Any:
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise EngineFailed(f"its process died ({why})") from None
        if reply[0] == "error":
            raise EngineFailed(reply[1])
        return reply

    def ready(self) -> tuple[bool, str | None, str | None, bool]:
        """Waits for the load: (loaded, the reason it did not, the error class, whether a FerryError)."""
        try:
            reply = self._reply()
        except EngineFailed as e:
            return False, str(e), None, False
        if reply[0] == "unavailable":
            return False, reply[1], reply[2], reply[3]
        self.info = reply[1]
        return True, None, None, False

    def _ask(self, op: str, *params: Any) -> Any:
        try:
            self.conn.send((op, *params))
        except (OSError, ValueError):
            return self._reply()  # the pipe is broken: say how the process ended
        return self._reply()[1]

    def load_cell(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._ask("load_cell", batches)

    def warmup(self, calls: int) -> float:
        return float(self._ask("warmup", calls))

    def window(self, calls: int) -> Window:
        return self._ask("window", calls)

    def settle(self) -> float:
        """Waits until the worker's threads are idle; returns the seconds waited."""
        return wait_idle(self.process.pid)

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


def start_workers(jobs: list[Job]) -> tuple[list[Worker], dict[str, tuple[str, str | None, bool]]]:
    """One worker per job, all loading at once (loading is not timed); returns the ready
    ones and, per engine that could not load, (reason, error class, whether a FerryError)."""
    workers = [Worker(job) for job in jobs]
    ready, unavailable = [], {}
    for w in workers:
        ok, reason, kind, ferry_error = w.ready()
        if ok:
            ready.append(w)
        else:
            unavailable[w.spec.name] = (reason or "could not load", kind, ferry_error)
            w.stop()
    return ready, unavailable


def standalone_twin(job: Job) -> Job:
    """The same engine for the baseline check: its own fresh process (started with the others,
    idle until its cell), a plain loop of calls with nothing measured around them."""
    return dataclasses.replace(job, spec=dataclasses.replace(job.spec, name=job.spec.name + TWIN), memory="none")


def start_with_twins(jobs: list[Job], check_baseline: bool) -> tuple[list[Worker], list[Worker], dict[str, tuple[str, str | None, bool]]]:
    """(workers, twins, unavailable): a process per engine and, when the baseline is checked, a
    :func:`standalone_twin` of each PyTorch path; see :func:`start_workers` for ``unavailable``."""
    twin_jobs = [standalone_twin(j) for j in jobs if j.spec.kind == "pytorch"] if check_baseline else []
    started, unavailable = start_workers(jobs + twin_jobs)
    twins = [w for w in started if w.spec.name.endswith(TWIN)]
    return [w for w in started if w not in twins], twins, unavailable



def time_cell(engines: Sequence[Any], cell: Cell, *, warmup: int, windows: int, max_spread: float, window_seconds: float,
              max_seconds: float) -> dict[str, Timing]:
    """Warm up every engine, then interleave timing windows until all are stable or time is up.

    Args:
        engines: :class:`Worker` (each in its own process: what `ferry bench` runs),
            :class:`Local` or plain :class:`Engine` (timed in this process). Only one engine
            runs at a time. An engine that fails (its :class:`EngineFailed`) gets
            ``Timing.error`` and no more windows; the others go on.
        warmup: untimed calls per engine before its first window (at least one).
        windows, max_spread: an engine is stable, and gets no more windows, once the
            spread of its last ``windows`` window means is under ``max_spread``.
        window_seconds: the least time of one window (its number of calls comes from the
            last window's mean).
        max_seconds: rounds stop after this long, stable or not.
    """
    runners = [Local(e) if isinstance(e, Engine) else e for e in engines]
    timings = {r.spec.name: Timing() for r in runners}
    per_call: dict[str, float] = {}
    live = []
    for r in runners:
        try:
            r.load_cell(cell.batches)
            per_call[r.spec.name] = r.warmup(warmup)
            r.settle()
            live.append(r)
        except EngineFailed as e:
            timings[r.spec.name].error = str(e)
    start = time.perf_counter()

    def stable(t: Timing) -> bool:
        return len(t.window_means) >= windows and spread(t.window_means[-windows:]) < max_spread

    while live:
        for r in list(live):
            name = r.spec.name
            t = timings[name]
            if stable(t):
                continue
            calls = max(1, int(window_seconds / max(per_call[name], 1e-6)))
            try:
                w = r.window(calls)
            except EngineFailed as e:
                t.error = str(e)
                live.remove(r)
                continue
            # Its worker threads go idle before the next engine starts (ORT and OpenMP
            # pools spin after a run), so one engine's spinning never slows another's window.
            t.settle.append(r.settle())
            for i in w.batches:
                t.tokens += cell.real_tokens[i]
                t.sequences += cell.batch_size
            t.peak_bytes = max(t.peak_bytes, w.peak_bytes)
            if w.cuda_peak_bytes is not None:
                t.cuda_peak_bytes = max(t.cuda_peak_bytes or 0, w.cuda_peak_bytes)
            t.latencies.extend(w.latencies)
            t.batches.extend(w.batches)
            t.window_means.append(sum(w.latencies) / len(w.latencies))
            per_call[name] = t.window_means[-1]
        if all(stable(timings[r.spec.name]) for r in live):
            break
        if time.perf_counter() - start > max_seconds:
            break
    return timings

