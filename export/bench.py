"""`ferry bench ARTIFACT`: how fast is each form of the model, offline, side by side.

Engines: PyTorch eager on the source checkpoint (fp32; fp16 and bf16 on CUDA) and ONNX
Runtime for each variant, on CPU and on CUDA when a GPU is usable. Each cell of the grid
(batch size x sequence length, or ``--texts`` with their natural lengths) runs every
engine interleaved: warm-up, then rounds in which each engine times one window of
calls, until the spread of each engine's last windows is under ``--spread`` or the cell
has used ``--max-seconds``. So drift on a shared machine hits all engines alike, and a
speedup is a ratio measured in the same cell of the same run.

Per cell and engine: p50/p90/p99 latency, sequences/s and tokens/s, peak memory (RSS
growth on CPU, ``max_memory_allocated`` for PyTorch on CUDA) and the speedup over PyTorch
eager fp32 on the same device. The report is ``bench.json`` (with the machine: CPU model,
cores, GPU, library versions, load), ``bench.md`` and two PNG plots.

``ferry bench --compare A.json B.json`` prints the ratios between two reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime.artifact import check_valid_artifact_dir
from ferry.config import opt, positive, to_dict
from ferry.errors import CheckpointError, ConfigError, FerryError
from ferry.files import atomic_dir, check_output_dir, library_versions, now_iso, sha256_file, write_json

REPORT, TABLE, LATENCY_PNG, THROUGHPUT_PNG = "bench.json", "bench.md", "latency.png", "throughput.png"
BASELINE = "pytorch-fp32"
SETTLE_S = 0.05
VERSIONS = ("torch", "onnxruntime-gpu", "onnxruntime", "transformers", "optimum-onnx", "onnx", "numpy")


def _all_positive(values: list[int]) -> str | None:
    return None if all(v > 0 for v in values) else "must all be > 0"


@dataclasses.dataclass
class BenchArgs:
    """Options of `ferry bench` (offline)."""

    # "" rather than None: the positional is optional with --compare (parse requires a None one)
    artifact: str = opt("", "artifact directory written by ferry export", positional=True)
    output: str | None = opt(None, "report directory (default: <artifact>-bench beside the artifact)", short="-o")
    overwrite: bool = opt(False, "replace an existing --output")
    variants: list[str] = opt([], "ONNX variants to run (default: all in the artifact)")
    pytorch: bool = opt(True, "also run PyTorch eager on the source checkpoint (the speedup baseline)")
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
    threads: int | None = opt(None, "threads for PyTorch and ONNX Runtime alike (default: the physical cores)", check=positive)
    warmup: int = opt(1, "untimed calls per engine and cell", check=lambda v: None if v >= 0 else "must be >= 0")
    max_seconds: float = opt(4.0, "time limit per cell (all engines together), after warm-up", check=positive)
    spread: float = opt(0.10, "stable when (max-min)/median of the last windows is below this", check=positive)
    windows: int = opt(3, "windows compared for stability", check=lambda v: None if v >= 2 else "must be >= 2")
    window_seconds: float = opt(0.25, "least time per timing window (a window has one call or more)", check=positive)
    seed: int = opt(0, "seed of the random tokens")
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
    info = {
        "cpu": cpu,
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
    name: str
    kind: str  # "pytorch" or "onnx"
    device: str  # "cpu" or "cuda"
    precision: str
    variant: str | None = None

    @property
    def baseline(self) -> str:
        return f"{BASELINE}-{self.device}"


def plan_engines(
    variants: dict[str, str], device: str, pytorch: bool, torch_cuda: bool, ort_cuda: bool
) -> tuple[list[EngineSpec], dict[str, str]]:
    """The engines to run and the ones skipped with the reason.

    Args:
        variants: variant name -> precision.
        device: "auto", "cpu" or "cuda".
        torch_cuda, ort_cuda: whether PyTorch / ONNX Runtime can use a GPU here.
    """
    engines: list[EngineSpec] = []
    skipped: dict[str, str] = {}
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "auto": ["cpu", "cuda"]}[device]
    if device == "auto" and not torch_cuda and not ort_cuda:
        devices = ["cpu"]
        skipped["cuda engines"] = "no CUDA GPU usable by PyTorch or ONNX Runtime here"
    for dev in devices:
        if pytorch:
            for precision in ("fp32",) if dev == "cpu" else ("fp32", "fp16", "bf16"):
                name = f"pytorch-{precision}-{dev}"
                if dev == "cuda" and not torch_cuda:
                    skipped[name] = "PyTorch sees no CUDA GPU"
                else:
                    engines.append(EngineSpec(name, "pytorch", dev, precision))
        for variant, precision in variants.items():
            name = f"onnx-{variant}-{dev}"
            if dev == "cpu" and precision == "fp16":
                skipped[name] = "fp16 is for the CUDA provider"
            elif dev == "cuda" and precision == "int8":
                skipped[name] = "int8 variants are tuned for CPU kernels"
            elif dev == "cuda" and not ort_cuda:
                skipped[name] = "ONNX Runtime has no usable CUDA provider here"
            else:
                engines.append(EngineSpec(name, "onnx", dev, precision, variant))
    if device == "cuda" and not engines:
        raise FerryError("--device cuda: no CUDA GPU usable by PyTorch or ONNX Runtime here; use --device cpu")
    return engines, skipped


class Engine:
    """A callable model run on prepared inputs; ``prepare`` converts inputs outside the timing."""

    def __init__(self, spec: EngineSpec, run: Callable[[Any], Any], prepare: Callable[[dict[str, np.ndarray]], Any], sync: Callable[[], None] | None = None):
        self.spec, self.run, self.prepare, self.sync = spec, run, prepare, sync or (lambda: None)


def pytorch_engine(spec: EngineSpec, model: Any) -> Engine:
    import copy

    import torch

    net = model
    if spec.device == "cuda":
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        net = copy.deepcopy(model).to("cuda", dtype=dtype)
    net.eval()
    dev = torch.device(spec.device)

    def prepare(feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: torch.from_numpy(v).to(dev) for k, v in feeds.items()}

    def run(batch: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return net(**batch).logits

    return Engine(spec, run, prepare, torch.cuda.synchronize if spec.device == "cuda" else None)


def onnx_engine(spec: EngineSpec, path: Path, threads: int) -> Engine:
    from runtime.engines import CUDA, active_provider, create_session

    session = create_session(path, spec.device, threads)
    if spec.device == "cuda" and active_provider(session) != CUDA:
        raise FerryError(f"{path}: ONNX Runtime fell back to {active_provider(session)}; no usable GPU for {spec.name}")
    wanted = [i.name for i in session.get_inputs()]

    def prepare(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: feeds[k] for k in wanted}

    return Engine(spec, lambda batch: session.run(None, batch), prepare)


class PeakRSS:
    """The largest resident-set growth of this process while the block runs (sampled)."""

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
    tokens: int = 0
    sequences: int = 0
    window_means: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0
    cuda_peak_bytes: int | None = None


def time_cell(engines: list[Engine], cell: Cell, args: BenchArgs) -> dict[str, Timing]:
    """Warm up every engine, then interleave timing windows until all are stable or time is up."""
    prepared = {e.spec.name: [e.prepare(b) for b in cell.batches] for e in engines}
    timings = {e.spec.name: Timing() for e in engines}
    cursor = {e.spec.name: 0 for e in engines}
    per_call = {}
    for e in engines:
        t0 = time.perf_counter()
        for i in range(max(1, args.warmup)):
            e.run(prepared[e.spec.name][i % len(cell.batches)])
        e.sync()
        per_call[e.spec.name] = (time.perf_counter() - t0) / max(1, args.warmup)
    start = time.perf_counter()

    def stable(t: Timing) -> bool:
        return len(t.window_means) >= args.windows and spread(t.window_means[-args.windows :]) < args.spread

    while True:
        for e in engines:
            name = e.spec.name
            t = timings[name]
            if stable(t):
                continue
            # Let the previous engine's worker threads go idle (ORT and OpenMP pools spin
            # after a run), so one engine's spinning never slows the next one's window.
            time.sleep(SETTLE_S)
            calls = max(1, int(args.window_seconds / max(per_call[name], 1e-6)))
            window = []
            torch_cuda = e.spec.kind == "pytorch" and e.spec.device == "cuda"
            if torch_cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as mem:
                for _ in range(calls):
                    i = cursor[name] % len(cell.batches)
                    cursor[name] += 1
                    c0 = time.perf_counter()
                    e.run(prepared[name][i])
                    e.sync()
                    window.append(time.perf_counter() - c0)
                    t.tokens += cell.real_tokens[i]
                    t.sequences += cell.batch_size
            t.peak_bytes = max(t.peak_bytes, mem.peak)
            if torch_cuda:
                t.cuda_peak_bytes = max(t.cuda_peak_bytes or 0, int(torch.cuda.max_memory_allocated()))
            t.latencies.extend(window)
            t.window_means.append(sum(window) / len(window))
            per_call[name] = t.window_means[-1]
        if all(stable(t) for t in timings.values()):
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
        "cuda_peak_mb": None if t.cuda_peak_bytes is None else t.cuda_peak_bytes / 2**20,
    }


def add_speedups(results: list[dict[str, Any]]) -> None:
    """Each engine's throughput over PyTorch eager fp32 on the same device, in the same cell."""
    base = {
        (r["device"], r["batch_size"], r["seq_length"]): r["sequences_per_s"]
        for r in results
        if r["kind"] == "pytorch" and r["precision"] == "fp32"
    }
    for r in results:
        b = base.get((r["device"], r["batch_size"], r["seq_length"]))
        r["speedup"] = r["sequences_per_s"] / b if b else None
        r["baseline"] = f"{BASELINE}-{r['device']}" if b else None


# ---------------------------------------------------------------- report


TABLE_HEADERS = ["engine", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "tok/s", "peak MB", "speedup", "stable"]


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        lat = r["latency_ms"]
        peak = r["cuda_peak_mb"] if r.get("cuda_peak_mb") is not None else r["peak_rss_mb"]
        rows.append([
            r["engine"], str(r["batch_size"]), str(r["seq_length"]), f"{lat['p50']:.1f}", f"{lat['p90']:.1f}", f"{lat['p99']:.1f}",
            f"{r['sequences_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{peak:.0f}",
            "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x", "yes" if r["stable"] else "no",
        ])
    return rows


def markdown_report(report: dict[str, Any]) -> str:
    from export.parity import markdown_table

    m = report["machine"]
    lines = [
        f"# ferry bench: {report['artifact']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['physical_cores']} cores ({m['logical_cores']} logical), GPU: {m['gpu'] or 'none'}, "
        f"load average at start {m['load_average']}",
        f"- threads: {report['threads']} (PyTorch and ONNX Runtime alike); speedup = sequences/s over PyTorch eager fp32 on the same device, same cell, same run",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        markdown_table(TABLE_HEADERS, table_rows(report["results"])),
    ]
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
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


def bench(args: BenchArgs) -> int:
    paths = _compare_paths(args)
    if paths:
        print(compare(*paths))
        return 0
    if not args.artifact:
        raise ConfigError("ARTIFACT is required (or --compare A.json B.json)")
    from export.export import quiet_libraries
    from export.parity import default_threads, text_table
    from runtime.engines import cuda_usable

    started = time.perf_counter()
    artifact = check_valid_artifact_dir(args.artifact)
    image = artifact.task == "image-classification"
    if image and args.texts:
        raise ConfigError(f"--texts: {artifact.path} is an image-classification artifact; pass --images DIR (a <label>/<image> folder)")
    if args.images and not image:
        raise ConfigError(f"--images: {artifact.path} is a {artifact.task} artifact; pass --texts FILE")
    names = artifact.select(args.variants)
    output = Path(args.output) if args.output else artifact.path.parent / f"{artifact.path.name}-bench"
    check_output_dir(output, args.overwrite, [artifact.path])  # before minutes of timing, not after
    threads = args.threads or default_threads()
    quiet_libraries()

    import torch

    torch.set_num_threads(threads)
    model = None
    source = None
    if args.pytorch:
        from export.parity import load_artifact_source

        _, model, _, source = load_artifact_source(artifact, args.checkpoint, " or --no-pytorch (no speedups then)")
    torch_cuda = torch.cuda.is_available()
    ort_cuda = cuda_usable()
    variants = {n: artifact.variants[n].info.get("precision", "fp32") for n in names}
    specs, skipped = plan_engines(variants, args.device, args.pytorch, torch_cuda, ort_cuda)

    if image:
        cells = image_cells(artifact, args.batch_sizes, args.images, args.seed)
    else:
        cells = text_grid(artifact, args, model)

    engines = []
    for spec in specs:
        if spec.kind == "pytorch":
            engines.append(pytorch_engine(spec, model))
        else:
            engines.append(onnx_engine(spec, artifact.variants[spec.variant].path, threads))

    machine = machine_info()
    results: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    bar = tqdm(cells, desc="bench", unit="cell", file=sys.stderr, disable=args.quiet)
    for cell in bar:
        bar.set_postfix_str(cell.label)
        for dev in ("cpu", "cuda"):
            group = [e for e in engines if e.spec.device == dev]
            if not group:
                continue
            timings = time_cell(group, cell, args)
            results += [summarize(e.spec, cell, timings[e.spec.name], args) for e in group]
    bar.close()
    add_speedups(results)

    command = "ferry bench " + " ".join(sys.argv[2:]) if sys.argv and sys.argv[0].endswith("ferry") else f"ferry bench {args.artifact}"
    report = {
        "stage": "bench",
        "artifact": str(artifact.path),
        "artifact_manifest_sha256": sha256_file(artifact.path / "ferry.json"),
        "checkpoint": source,
        "command": command,
        "machine": {**machine, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "threads": threads,
        "engines": [dataclasses.asdict(s) for s in specs],
        "skipped": skipped,
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
    if skipped:
        print("skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    print(f"wrote {output}/{{{REPORT},{TABLE},{LATENCY_PNG},{THROUGHPUT_PNG}}} in {report['duration_s']:.0f}s (threads {threads}, load average {machine['load_average']})")
    return 0
