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
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime.artifact import check_valid_artifact_dir
from ferry.tasks import IMAGE_TASK
from ferry.config import opt, positive, to_dict
from ferry.errors import CheckpointError, ConfigError, FerryError
from ferry.files import atomic_dir, check_output_dir, library_versions, now_iso, sha256_file, write_json

REPORT, TABLE, LATENCY_PNG, THROUGHPUT_PNG = "bench.json", "bench.md", "latency.png", "throughput.png"
BASELINE = "pytorch-fp32"
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
VERSIONS = ("torch", "onnxruntime-gpu", "onnxruntime", "openvino", "transformers", "optimum-onnx", "onnx", "numpy")
# The cell of the headline speedup and of the baseline check, when the grid has it.
HEADLINE_CELL = (32, 128)
# The in-grid PyTorch baseline within this fraction of a standalone loop counts as "ok".
BASELINE_TOLERANCE = 0.05
# How a PyTorch engine runs, per device and precision.
PYTORCH_MODES = {
    ("cpu", "fp32"): "eager fp32",
    ("cpu", "bf16"): "eager, torch.autocast('cpu', bfloat16)",
    ("cuda", "fp32"): "eager fp32",
    ("cuda", "fp16"): "eager, weights and activations fp16",
    ("cuda", "bf16"): "eager, weights and activations bf16",
}
NO_BF16 = "this CPU has no bf16 instructions (avx512_bf16 or amx_bf16): bf16 would be emulated"
TWIN = " (standalone)"  # the name of an engine's twin in the baseline check


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


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart the recent windows are."""
    med = percentile(values, 50)
    return (max(values) - min(values)) / med if med > 0 else float("inf")


# ---------------------------------------------------------------- machine


def busy_note(machine: dict[str, Any]) -> str | None:
    """A warning when other programs kept the machine busy at the start (1-minute load
    average over half the logical cores): PyTorch's OpenMP threads stall whenever one of
    them loses its core, far more than ONNX Runtime's pool, so speedups come out inflated."""
    load, cores = machine.get("load_average"), machine.get("logical_cores") or 1
    if not load or load[0] <= 0.5 * cores:
        return None
    return (f"the machine was busy before the bench started (load average {load[0]:.1f} on {cores} logical cores): PyTorch's "
            "OpenMP threads stall whenever another program takes one of their cores, so its times and every speedup over it "
            "move with that load; measure on a quiet machine, or compare with --threads 1")


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from runtime.hardware import read_cpu

    info = {
        "cpu": cpu,
        "cpu_isa": read_cpu().as_dict(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "gpu": None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


# ---------------------------------------------------------------- engines


@dataclasses.dataclass
class EngineSpec:
    """One engine of the grid.

    Attributes:
        kind: "pytorch" (the source checkpoint) or "onnx" (an artifact variant).
        engine: what runs it: "torch", "onnxruntime" or "openvino".
        mode: how PyTorch runs it (``PYTORCH_MODES``); None for a variant.
    """

    name: str
    kind: str  # "pytorch" or "onnx"
    device: str  # "cpu" or "cuda"
    precision: str
    variant: str | None = None
    engine: str = "onnxruntime"
    mode: str | None = None

    @property
    def baseline(self) -> str:
        return f"{BASELINE}-{self.device}"


def _variant_spec(name: str, spec: Any) -> Any:
    """A VariantSpec from an artifact variant's spec, or from a bare precision (ONNX Runtime)."""
    from runtime.artifact import VariantSpec

    if isinstance(spec, VariantSpec):
        return spec
    precision = str(spec)
    return VariantSpec("", "onnxruntime", precision, "cuda" if precision == "fp16" else "cpu")


def plan_engines(
    variants: dict[str, Any],
    device: str,
    pytorch: bool,
    torch_cuda: bool,
    ort_cuda: bool,
    cpu: Any = None,
    installed: Callable[[str], bool] | None = None,
) -> tuple[list[EngineSpec], dict[str, str]]:
    """The engines to run and the ones skipped with the reason.

    Args:
        variants: variant name -> its ``runtime.artifact.VariantSpec`` (file, engine,
            precision, device), or a bare precision for an ONNX Runtime variant.
        device: "auto", "cpu" or "cuda".
        torch_cuda, ort_cuda: whether PyTorch / ONNX Runtime can use a GPU here.
        cpu: the ``runtime.hardware.Cpu`` (default: this machine's); bf16 autocast and
            bf16 variants are planned only when it has bf16 instructions.
        installed: whether an engine's package is installed (default:
            ``runtime.engines.engine_installed``).
    """
    if cpu is None:
        from runtime.hardware import read_cpu

        cpu = read_cpu()
    if installed is None:
        from runtime.engines import engine_installed

        installed = engine_installed
    engines: list[EngineSpec] = []
    skipped: dict[str, str] = {}
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "auto": ["cpu", "cuda"]}[device]
    if device == "auto" and not torch_cuda and not ort_cuda:
        devices = ["cpu"]
        skipped["cuda engines"] = "no CUDA GPU usable by PyTorch or ONNX Runtime here"
    bf16 = cpu.has("bf16")
    for dev in devices:
        if pytorch:
            for precision in ("fp32", "bf16") if dev == "cpu" else ("fp32", "fp16", "bf16"):
                name = f"pytorch-{precision}-{dev}"
                if dev == "cuda" and not torch_cuda:
                    skipped[name] = "PyTorch sees no CUDA GPU"
                elif dev == "cpu" and precision == "bf16" and not bf16:
                    skipped[name] = f"bf16 autocast: {NO_BF16}"
                else:
                    engines.append(EngineSpec(name, "pytorch", dev, precision, engine="torch", mode=PYTORCH_MODES[dev, precision]))
        for variant, given in variants.items():
            spec = _variant_spec(variant, given)
            name = f"onnx-{variant}-{dev}"
            if not installed(spec.engine):
                skipped[name] = f"the {spec.engine} package is not installed (pip install {spec.engine})"
            elif dev == "cpu" and spec.device == "cuda":
                skipped[name] = f"{spec.precision} is for the CUDA provider"
            elif dev == "cpu" and spec.precision == "bf16" and not bf16:
                skipped[name] = NO_BF16
            elif dev == "cuda" and spec.engine == "openvino":
                skipped[name] = "ferry runs OpenVINO on the CPU only"
            elif dev == "cuda" and spec.precision == "int8":
                skipped[name] = "int8 variants are tuned for CPU kernels"
            elif dev == "cuda" and not ort_cuda:
                skipped[name] = "ONNX Runtime has no usable CUDA provider here"
            else:
                engines.append(EngineSpec(name, "onnx", dev, spec.precision, variant, engine=spec.engine))
    if device == "cuda" and not engines:
        raise FerryError("--device cuda: no CUDA GPU usable by PyTorch or ONNX Runtime here; use --device cpu")
    return engines, skipped


class Engine:
    """A callable model run on prepared inputs; ``prepare`` converts inputs outside the timing."""

    def __init__(self, spec: EngineSpec, run: Callable[[Any], Any], prepare: Callable[[dict[str, np.ndarray]], Any], sync: Callable[[], None] | None = None):
        self.spec, self.run, self.prepare, self.sync = spec, run, prepare, sync or (lambda: None)


def pytorch_engine(spec: EngineSpec, model: Any) -> Engine:
    """PyTorch eager; on CPU, bf16 is ``torch.autocast`` over the fp32 model (how a user gets
    bf16 matmuls on a CPU with AMX or AVX512-BF16), on CUDA the model cast to the dtype."""
    import copy

    import torch

    net = model
    if spec.device == "cuda":
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        net = copy.deepcopy(model).to("cuda", dtype=dtype)
    net.eval()
    dev = torch.device(spec.device)
    autocast = spec.device == "cpu" and spec.precision == "bf16"

    def prepare(feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: torch.from_numpy(v).to(dev) for k, v in feeds.items()}

    def run(batch: dict[str, Any]) -> Any:
        with torch.inference_mode():
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return net(**batch).logits
            return net(**batch).logits

    return Engine(spec, run, prepare, torch.cuda.synchronize if spec.device == "cuda" else None)


def onnx_engine(spec: EngineSpec, path: Path, threads: int) -> Engine:
    """An artifact variant opened by ``runtime.engines.open_engine`` with its engine and precision.

    Raises:
        EngineUnavailable: the engine is not installed, cannot compile the file here, or
            (CUDA) ONNX Runtime fell back to the CPU.
    """
    from runtime.engines import CUDA, TENSORRT, EngineUnavailable, open_engine

    tensorrt = bool(spec.variant and spec.variant.endswith("-tensorrt"))
    engine = open_engine(path, spec.engine, spec.precision, spec.device, threads, tensorrt=tensorrt)
    if spec.device == "cuda" and engine.provider not in (CUDA, TENSORRT):
        raise EngineUnavailable(f"{path}: ONNX Runtime fell back to {engine.provider}; no usable GPU for {spec.name}")
    wanted = list(engine.input_names)

    def prepare(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: feeds[k] for k in wanted}

    return Engine(spec, engine.run, prepare)


def load_pytorch(spec: EngineSpec, artifact: str, checkpoint: str | None, threads: int) -> Engine:
    """The PyTorch engine of ``spec`` on the artifact's source checkpoint (run inside its worker)."""
    import torch

    from export.verify import load_artifact_source

    torch.set_num_threads(threads)
    _, model, _, _ = load_artifact_source(check_valid_artifact_dir(artifact), checkpoint, " or --no-pytorch (no speedups then)")
    return pytorch_engine(spec, model)


def load_variant(spec: EngineSpec, path: str, threads: int) -> Engine:
    """The engine of an artifact variant (run inside its worker)."""
    return onnx_engine(spec, Path(path), threads)


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


# ---------------------------------------------------------------- inputs


@dataclasses.dataclass
class Cell:
    batch_size: int
    seq_length: int | str  # tokens per text, or "natural" with --texts
    batches: list[dict[str, np.ndarray]]  # one call uses one batch, cycling
    real_tokens: list[int]  # per batch

    @property
    def label(self) -> str:
        return f"{self.batch_size}x{self.seq_length}"


def grid_cells(tokenizer: Any, vocab: int, batch_sizes: Sequence[int], seq_lengths: Sequence[int], max_length: int, input_names: Sequence[str], seed: int) -> tuple[list[Cell], list[int]]:
    """Cells of random full-length texts; sequence lengths above the model's are dropped (returned)."""
    from export.inputs import collate, pad_id, random_ids

    rng = np.random.default_rng(seed)
    cells, dropped = [], sorted({s for s in seq_lengths if s > max_length})
    for s in [s for s in seq_lengths if s <= max_length]:
        for b in batch_sizes:
            ids = random_ids(tokenizer, vocab, b, s, rng, full=True)
            cells.append(Cell(b, s, [collate(ids, pad_id(tokenizer), input_names)], [b * s]))
    return cells, dropped


def text_cells(tokenizer: Any, texts: Sequence[str], batch_sizes: Sequence[int], max_length: int, input_names: Sequence[str]) -> list[Cell]:
    """Cells of real texts: consecutive batches, each padded to its own longest text."""
    from export.inputs import collate, encode, pad_id

    ids = encode(tokenizer, texts, max_length)
    cells = []
    for b in batch_sizes:
        groups = [ids[i : i + b] for i in range(0, len(ids), b)]
        groups = [g for g in groups if len(g) == b] or [(ids * b)[:b]]
        cells.append(Cell(b, "natural", [collate(g, pad_id(tokenizer), input_names) for g in groups], [sum(map(len, g)) for g in groups]))
    return cells


def text_grid(artifact: Any, args: BenchArgs, model: Any) -> list[Cell]:
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
        vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer)) if model is not None else len(tokenizer)
        cells, dropped = grid_cells(tokenizer, vocab, args.batch_sizes, args.seq_lengths, positions, artifact.manifest["inputs"], args.seed)
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


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {(text.splitlines()[0] if text else '')[:300]}".rstrip(": ")


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
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else _one_line(e)
        conn.send(("unavailable", reason, type(e).__name__, isinstance(e, FerryError)))
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
            conn.send(("error", _one_line(e)))
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


def time_cell(engines: Sequence[Any], cell: Cell, args: BenchArgs) -> dict[str, Timing]:
    """Warm up every engine, then interleave timing windows until all are stable or time is up.

    ``engines`` are :class:`Worker` (each in its own process: what `ferry bench` runs),
    :class:`Local` or plain :class:`Engine` (timed in this process). Only one engine runs
    at a time. An engine that fails (its :class:`EngineFailed`) gets ``Timing.error`` and no
    more windows; the others go on.
    """
    runners = [Local(e) if isinstance(e, Engine) else e for e in engines]
    timings = {r.spec.name: Timing() for r in runners}
    per_call: dict[str, float] = {}
    live = []
    for r in runners:
        try:
            r.load_cell(cell.batches)
            per_call[r.spec.name] = r.warmup(args.warmup)
            r.settle()
            live.append(r)
        except EngineFailed as e:
            timings[r.spec.name].error = str(e)
    start = time.perf_counter()

    def stable(t: Timing) -> bool:
        return len(t.window_means) >= args.windows and spread(t.window_means[-args.windows :]) < args.spread

    while live:
        for r in list(live):
            name = r.spec.name
            t = timings[name]
            if stable(t):
                continue
            calls = max(1, int(args.window_seconds / max(per_call[name], 1e-6)))
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
        if time.perf_counter() - start > args.max_seconds:
            break
    return timings


def summarize(spec: EngineSpec, cell: Cell, t: Timing, args: BenchArgs) -> dict[str, Any]:
    total = sum(t.latencies)
    recent = t.window_means[-args.windows :]
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
        "stable": len(recent) >= args.windows and spread(recent) < args.spread,
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


def _cell_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return r["device"], r["batch_size"], r["seq_length"]


def add_speedups(results: list[dict[str, Any]]) -> None:
    """Each engine's throughput over the fastest PyTorch path on the same device, in the same
    cell (``speedup``, that path named in ``baseline``), and over PyTorch eager fp32
    (``speedup_fp32``)."""
    fastest: dict[tuple[Any, ...], dict[str, Any]] = {}
    fp32: dict[tuple[Any, ...], float] = {}
    for r in results:
        if r["kind"] != "pytorch":
            continue
        key = _cell_key(r)
        if key not in fastest or r["sequences_per_s"] > fastest[key]["sequences_per_s"]:
            fastest[key] = r
        if r["precision"] == "fp32":
            fp32[key] = r["sequences_per_s"]
    for r in results:
        base = fastest.get(_cell_key(r))
        r["speedup"] = r["sequences_per_s"] / base["sequences_per_s"] if base else None
        r["baseline"] = base["engine"] if base else None
        b32 = fp32.get(_cell_key(r))
        r["speedup_fp32"] = r["sequences_per_s"] / b32 if b32 else None


def pick_headline(cells: Any) -> tuple[int, Any] | None:
    """Of (batch size, seq length) pairs, the headline one: 32 x 128 when there, else the largest."""
    cells = set(cells)
    if not cells:
        return None
    if HEADLINE_CELL in cells:
        return HEADLINE_CELL
    return max(cells, key=lambda c: (c[0] * (c[1] if isinstance(c[1], int) else 1), c[0]))


def headline_cell(results: list[dict[str, Any]], device: str) -> tuple[int, Any] | None:
    """The cell the headline is read at: batch 32 x 128 when benchmarked, else the largest."""
    return pick_headline((r["batch_size"], r["seq_length"]) for r in results if r["device"] == device)


def headlines(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per device: at the headline cell, the fastest PyTorch path (the baseline) and the
    fastest variant with its speedup over that baseline."""
    out = {}
    for device in dict.fromkeys(r["device"] for r in results):
        cell = headline_cell(results, device)
        rows = [r for r in results if r["device"] == device and (r["batch_size"], r["seq_length"]) == cell]
        torch_rows = [r for r in rows if r["kind"] == "pytorch"]
        variants = [r for r in rows if r["kind"] != "pytorch"]
        base = max(torch_rows, key=lambda r: r["sequences_per_s"]) if torch_rows else None
        best = max(variants, key=lambda r: r["sequences_per_s"]) if variants else None
        out[device] = {
            "batch_size": cell[0],
            "seq_length": cell[1],
            "baseline": base["engine"] if base else None,
            "baseline_mode": base["mode"] if base else None,
            "pytorch_paths": {r["engine"]: round(r["sequences_per_s"], 3) for r in torch_rows},
            "best": best["engine"] if best else None,
            "speedup": best["speedup"] if best and base else None,
        }
    return out


def headline_text(device: str, h: dict[str, Any]) -> str:
    cell = f"batch {h['batch_size']} x {h['seq_length']}"
    if not h["baseline"]:
        return f"{device}, {cell}: no PyTorch baseline (--no-pytorch)"
    paths = ", ".join(f"{k} {v:.1f} seq/s" for k, v in h["pytorch_paths"].items())
    best = f"{h['best']} {h['speedup']:.2f}x" if h["best"] else "no variant"
    return f"{device}, {cell}: {best} over the fastest PyTorch path, {h['baseline']} ({h['baseline_mode']}; PyTorch paths: {paths})"


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


def baseline_checks(results: list[dict[str, Any]], timings: dict[tuple[str, str], Timing], cells: Sequence[tuple[int, Any]]) -> list[dict[str, Any]]:
    """Per device and checked cell: the fastest PyTorch path's in-grid latencies against its
    standalone twin's, measured in the same rounds (:func:`compare_baseline`)."""
    checks = []
    for (device, b, s) in dict.fromkeys(_cell_key(r) for r in results):
        if (b, s) not in cells:
            continue
        rows = [r for r in results if _cell_key(r) == (device, b, s) and r["kind"] == "pytorch"]
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


# ---------------------------------------------------------------- report


TABLE_HEADERS = ["engine", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "tok/s", "peak MB", "speedup", "over", "stable"]


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        lat = r["latency_ms"]
        peak = r["cuda_peak_mb"] if r.get("cuda_peak_mb") is not None else r["peak_rss_mb"]
        rows.append([
            r["engine"], str(r["batch_size"]), str(r["seq_length"]), f"{lat['p50']:.1f}", f"{lat['p90']:.1f}", f"{lat['p99']:.1f}",
            f"{r['sequences_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{peak:.0f}",
            "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x", r.get("baseline") or "-", "yes" if r["stable"] else "no",
        ])
    return rows


def isa_text(isa: dict[str, Any] | None) -> str:
    """"avx2 yes, avx512 no, ..." from ``runtime.hardware.Cpu.as_dict()``."""
    if not isa:
        return "unknown"
    return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa["features"].items())


def markdown_report(report: dict[str, Any]) -> str:
    from export.parity import markdown_table

    m = report["machine"]
    lines = [
        f"# ferry bench: {report['artifact']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['physical_cores']} cores ({m['logical_cores']} logical), GPU: {m['gpu'] or 'none'}, "
        f"load average at start {m['load_average']}, at end {m.get('load_average_end')}",
        f"- CPU ISA: {isa_text(m.get('cpu_isa'))} (flags: {', '.join((m.get('cpu_isa') or {}).get('flags') or []) or 'none of interest'})",
        f"- threads: {report['threads']} (every engine alike); each engine in its own process, one at a time, windows interleaved in rounds",
        "- speedup = sequences/s over the fastest PyTorch path on the same device and cell (column 'over'), same run",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
    ]
    for device, h in (report.get("headline") or {}).items():
        lines.append(f"- **headline**: {headline_text(device, h)}")
    if report.get("busy"):
        lines.append(f"- **busy machine**: {report['busy']}")
    for check in report.get("baseline_check") or []:
        text = check["message"]
        lines.append(f"- baseline check: **{check['status']}**: " + (f"**{text}**" if check["status"] != "ok" else text))
    lines += ["", markdown_table(TABLE_HEADERS, table_rows(report["results"]))]
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    if report.get("failed"):
        lines += ["", "**Failed**: " + "; ".join(f"{k} ({v})" for k, v in report["failed"].items())]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], latency_png: Path, throughput_png: Path) -> None:
    """Latency vs batch size per engine (one panel per sequence length), and throughput per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = list(dict.fromkeys(r["seq_length"] for r in results))
    engines = list(dict.fromkeys(r["engine"] for r in results))
    for path, key, ylabel in (
        (latency_png, lambda r: r["latency_ms"]["p50"], "p50 latency (ms)"),
        (throughput_png, lambda r: r["sequences_per_s"], "sequences / s"),
    ):
        fig, axes = plt.subplots(1, len(seqs), figsize=(4.2 * len(seqs), 3.6), squeeze=False)
        for ax, s in zip(axes[0], seqs):
            for eng in engines:
                pts = sorted((r["batch_size"], key(r)) for r in results if r["engine"] == eng and r["seq_length"] == s)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=eng)
            ax.set_xscale("log", base=2)
            if path == latency_png:
                ax.set_yscale("log")
            ax.set_title(f"sequence length {s}")
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------- compare


def load_report(path: str) -> dict[str, Any]:
    from ferry.files import read_json_object

    p = Path(path)
    if p.is_dir():
        p = p / REPORT
    data = read_json_object(p, f"--compare {path}: file not found", f"--compare {path}")
    if data.get("stage") != "bench" or not isinstance(data.get("results"), list):
        raise FerryError(f"--compare {path}: not a ferry bench report ({REPORT})")
    return data


def compare(a_path: str, b_path: str) -> str:
    """A table of B/A ratios of throughput and p50 latency for the cells both reports have."""
    from export.parity import text_table

    a, b = load_report(a_path), load_report(b_path)
    key = lambda r: (r["engine"], r["batch_size"], str(r["seq_length"]))  # noqa: E731
    bmap = {key(r): r for r in b["results"]}
    rows, only_a = [], []
    for r in a["results"]:
        other = bmap.pop(key(r), None)
        if other is None:
            only_a.append(key(r))
            continue
        rows.append([
            r["engine"], str(r["batch_size"]), str(r["seq_length"]),
            f"{r['sequences_per_s']:.1f}", f"{other['sequences_per_s']:.1f}", f"{other['sequences_per_s'] / r['sequences_per_s']:.2f}x",
            f"{r['latency_ms']['p50']:.1f}", f"{other['latency_ms']['p50']:.1f}", f"{other['latency_ms']['p50'] / r['latency_ms']['p50']:.2f}x",
        ])
    if not rows:
        raise FerryError(f"--compare: {a_path} and {b_path} have no cell (engine, batch, seq) in common")
    headers = ["engine", "batch", "seq", "A seq/s", "B seq/s", "B/A seq/s", "A p50 ms", "B p50 ms", "B/A p50"]
    out = [f"A = {a_path}\nB = {b_path}", text_table(headers, rows)]
    if only_a or bmap:
        out.append(f"cells only in A: {len(only_a)}, only in B: {len(bmap)}")
    return "\n".join(out)


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
            jobs.append(Job(spec, "export.bench:load_pytorch", {"artifact": str(artifact.path), "checkpoint": checkpoint, "threads": threads}))
        else:
            jobs.append(Job(spec, "export.bench:load_variant", {"path": str(artifact.variants[spec.variant].path), "threads": threads}))
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
            timings = time_cell(group + extra, cell, args)
            for w in group + extra:
                t = timings[w.spec.name]
                timings_by[w.spec.name, cell.label] = t
                if t.latencies and w in group:
                    results.append(summarize(w.spec, cell, t, args))
                if t.error:
                    failed[w.spec.name] = f"cell {cell.label}: {t.error}"
                    print(f"warning: {w.spec.name} failed in cell {cell.label}: {t.error}; the other engines go on", file=sys.stderr)
    bar.close()
    return results, failed, timings_by


def bench(args: BenchArgs) -> int:
    paths = _compare_paths(args)
    if paths:
        print(compare(*paths))
        return 0
    if not args.artifact:
        raise ConfigError("ARTIFACT is required (or --compare A.json B.json)")
    from export.writer import quiet_libraries
    from export.parity import default_threads, text_table
    from runtime.engines import cuda_usable

    started = time.perf_counter()
    artifact = check_valid_artifact_dir(args.artifact)
    image = artifact.task == IMAGE_TASK
    if image and args.texts:
        raise ConfigError(f"--texts: {artifact.path} is an image-classification artifact; pass --images DIR (a <label>/<image> folder)")
    if args.images and not image:
        raise ConfigError(f"--images: {artifact.path} is a {artifact.task} artifact; pass --texts FILE")
    names = artifact.select(args.variants)
    output = Path(args.output) if args.output else artifact.path.parent / f"{artifact.path.name}-bench"
    check_output_dir(output, args.overwrite, [artifact.path])  # before minutes of timing, not after
    threads = args.threads or default_threads()
    quiet_libraries()

    source = pytorch_source(artifact, args.checkpoint) if args.pytorch else None
    variants = {n: artifact.variants[n].spec for n in names}
    specs, skipped = plan_engines(variants, args.device, args.pytorch, torch_sees_cuda(), cuda_usable())
    cells = image_cells(artifact, args.batch_sizes, args.images, args.seed) if image else text_grid(artifact, args, None)

    # This process only coordinates: it never runs a model, so no thread pool of its own
    # competes with the engine being timed.
    jobs = jobs_for(specs, artifact, args.checkpoint, threads)
    check_cells = [pick_headline((c.batch_size, c.seq_length) for c in cells)] if args.check_baseline else []
    machine = machine_info()  # before the workers load: the load average is the other programs'
    busy = busy_note(machine)
    workers, twins, unavailable = start_with_twins(jobs, bool(check_cells))
    try:
        for name, (reason, kind, ferry_error) in unavailable.items():
            if name.endswith(TWIN):
                continue  # its engine failed to load the same way, reported under its own name
            if kind == "EngineUnavailable":  # a missing engine, or one that cannot compile the variant here
                skipped[name] = reason
            elif ferry_error:  # bad input (a damaged model or checkpoint): one line, exit status 2
                import ferry.errors

                raise getattr(ferry.errors, kind, FerryError)(reason)
            else:
                skipped[name] = f"could not load: {reason}"
        results, failed, timings = run_grid(workers, cells, args, twins, check_cells)
    finally:
        for w in workers + twins:
            w.stop()
    add_speedups(results)
    heads = headlines(results)
    checks = baseline_checks(results, timings, check_cells)
    failed = {k: v for k, v in failed.items() if not k.endswith(TWIN)}  # a twin's failure is its check's message

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
        "headline": heads,
        "baseline_check": checks,
        "busy": busy,
        "settings": to_dict(args),
        "results": results,
        "versions": library_versions(*VERSIONS),
        "created": now_iso(),
        "duration_s": round(time.perf_counter() - started, 1),
    }
    with atomic_dir(output, args.overwrite, [artifact.path]) as staging:
        write_json(staging / REPORT, report)
        (staging / TABLE).write_text(markdown_report(report), encoding="utf-8")
        plot(results, staging / LATENCY_PNG, staging / THROUGHPUT_PNG)
    print(text_table(TABLE_HEADERS, table_rows(results)))
    print(f"CPU: {machine['cpu']}; {isa_text(machine.get('cpu_isa'))}")
    for device, h in heads.items():
        print(f"headline: {headline_text(device, h)}")
    if skipped:
        print("skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    if failed:
        print("FAILED: " + "; ".join(f"{k} ({v})" for k, v in failed.items()), file=sys.stderr)
    if busy:
        print(f"warning: {busy}", file=sys.stderr)
    for check in checks:
        if check["status"] == "ok":
            print(f"baseline check ok: {check['message']}")
        else:
            print(f"\n*** baseline check {check['status']}: {check['message']} ***\n", file=sys.stderr)
    print(f"wrote {output}/{{{REPORT},{TABLE},{LATENCY_PNG},{THROUGHPUT_PNG}}} in {report['duration_s']:.0f}s (threads {threads}, load average {machine['load_average']})")
    return 0
