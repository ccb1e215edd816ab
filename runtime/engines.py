"""The engines that run an artifact's ONNX files: ONNX Runtime (CPU, CUDA, TensorRT providers)
and OpenVINO (CPU, fp32 / bf16 inference precision, int8 from a QDQ graph).

A variant is a (graph file, engine, precision) triple (:data:`runtime.artifact.VARIANTS`);
:func:`open_engine` opens one and returns an :class:`Engine` whose ``run(feed)`` gives the
logits. Shared by export parity, the offline bench and the serving runtime, so every stage
runs a model the same way. No PyTorch here.
"""

from __future__ import annotations

import abc
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ferry.errors import ArtifactError, FerryError, first_line
from runtime.hardware import usable_cpus

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPT_LEVELS = ("disable", "basic", "extended", "all")
ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
ENGINES = (ONNXRUNTIME, OPENVINO)
# The Python package each engine needs, for the error that names it.
ENGINE_PACKAGES = {ONNXRUNTIME: "onnxruntime-gpu", OPENVINO: "openvino"}
# OpenVINO's CPU inference precision per variant precision; int8 comes from the graph's
# QuantizeLinear/DequantizeLinear pairs, around which the rest runs in f32.
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits along the last axis, in float64 (the one softmax every stage applies)."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class EngineUnavailable(ArtifactError):
    """The engine a variant needs is not installed, or cannot open the variant on this machine."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def gpu_present() -> bool:
    """Whether an NVIDIA GPU and driver are visible. ``onnxruntime-gpu`` lists the CUDA
    provider even on machines without one, and then fails (noisily) when asked for it."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def cuda_usable() -> bool:
    """Whether ONNX Runtime here can run the CUDA provider: it lists it and a GPU is present."""
    return CUDA in available_providers() and gpu_present()


def choose_providers(device: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """The provider list for ``device``: "cpu", "cuda" or "auto" (CUDA when ONNX Runtime has it).

    Raises:
        FerryError: "cuda" asked for but the CUDA provider is not in this ONNX Runtime.
    """
    available = available_providers() if available is None else list(available)
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise FerryError(
                f"--device cuda: ONNX Runtime here has no {CUDA} (providers: {', '.join(available)}); "
                "install onnxruntime-gpu with a CUDA runtime, or use --device cpu"
            )
        return [CUDA, CPU]
    if device != "auto":
        raise FerryError(f"--device {device!r} is not one of: auto, cpu, cuda")
    return [CUDA, CPU] if CUDA in available else [CPU]


def session_options(threads: int | None = None, optimization: str = "all") -> Any:
    import onnxruntime as ort

    if optimization not in OPT_LEVELS:
        raise FerryError(f"optimization level {optimization!r} is not one of: {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime picks the physical cores
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 3  # errors only: a CUDA fallback is reported by us, not by ORT's log
    return so


def create_session(
    path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    optimization: str = "all",
    available: Sequence[str] | None = None,
    model_bytes: bytes | None = None,
) -> Any:
    """An InferenceSession on the best provider for ``device``.

    The provider actually used is ``session.get_providers()[0]``: ONNX Runtime falls back
    to CPU when CUDA is listed but no GPU is usable, and callers report what they got.

    Args:
        model_bytes: the model itself, already read (and checked) by the caller; ``path`` then
            only names it in errors.

    Raises:
        ArtifactError: the file is missing or not a loadable ONNX model.
    """
    import onnxruntime as ort

    path = Path(path)
    if model_bytes is None and not path.is_file():
        raise ArtifactError(f"{path}: ONNX file not found")
    providers = choose_providers(device, available)
    try:
        model = str(path) if model_bytes is None else model_bytes
        return ort.InferenceSession(model, session_options(threads, optimization), providers=providers)
    except Exception as e:  # ORT raises its own exception types for a damaged or invalid model
        raise ArtifactError(f"{path}: not a loadable ONNX model ({first_line(e)})") from None


def active_provider(session: Any) -> str:
    return session.get_providers()[0]




class Engine(abc.ABC):
    """One opened variant: ``run(feed)`` returns the first output (the logits) as float32.

    ``loaded_from_bytes``: built from bytes its caller had read and checked, not from the file.

    Attributes:
        engine: "onnxruntime" or "openvino".
        provider: what actually runs it (an ONNX Runtime provider, or "OpenVINO CPU").
        precision: the variant's precision (fp32, bf16, int8, fp16).
        input_names / output_names: the graph's.
    """

    engine: str
    provider: str
    precision: str
    input_names: list[str]
    output_names: list[str]
    loaded_from_bytes: bool = False

    @abc.abstractmethod
    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's first output for ``feed``, as float32."""


class OrtEngine(Engine):
    """An ONNX Runtime session; on CUDA, inputs and the output go through IO binding."""

    engine = ONNXRUNTIME

    def __init__(self, session: Any, precision: str = "fp32"):
        self.session = session
        self.precision = precision
        self.provider = active_provider(session)
        self.io_binding = self.provider in (CUDA, TENSORRT)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        name = self.output_names[0]
        if not self.io_binding:
            return np.asarray(self.session.run([name], feed)[0], dtype=np.float32)
        # CUDA: inputs copied once to the GPU as OrtValues, the output allocated there by
        # ORT, then one copy back; no staging through ORT's CPU feeds.
        binding = self.session.io_binding()
        for key, array in feed.items():
            binding.bind_ortvalue_input(key, device_value(np.ascontiguousarray(array)))
        binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)


def device_value(array: np.ndarray, device_id: int = 0) -> Any:
    """An OrtValue holding ``array`` on the GPU (one host-to-device copy)."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array, "cuda", device_id)


def shares_the_cpu(threads: int) -> bool:
    """Whether a process given ``threads`` engine threads leaves cores to others: ``ferry serve``'s
    workers and ``ferry predict --ray``'s actors each take a share. OpenVINO must not pin such a
    process's threads: every process would pin to the same first cores. On 2 cores (AMD EPYC,
    AVX2; demo artifact, openvino-fp32; benchmarks/openvino_pinning.py), 2 processes x 1 thread
    ran 5.75-5.94 texts/s pinned and 10.77-11.23 unpinned."""
    return threads < usable_cpus()


class OpenVinoEngine(Engine):
    """OpenVINO's CPU plugin on an ONNX file, at an explicit inference precision.

    The precision is always set: on a CPU with AMX or AVX512-BF16, OpenVINO's own default
    is bf16, which would turn an "fp32" variant into a bf16 one. One infer request per
    thread (a request is not thread-safe). Dynamic activation quantization is off, so an
    answer never depends on the rest of its batch.
    """

    engine = OPENVINO

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None, core: Any = None):
        import openvino as ov

        self.precision = precision
        core = core or ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
            if shares_the_cpu(int(threads)):
                config["ENABLE_CPU_PINNING"] = False
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        # What OpenVINO actually runs: it quietly keeps f32 where the CPU has no bf16.
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self.provider = "OpenVINO CPU"
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self._local = threading.local()

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()}, share_inputs=False)
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)


def engine_installed(engine: str) -> bool:
    """Whether the Python package of ``engine`` imports here."""
    import importlib.util

    module = {ONNXRUNTIME: "onnxruntime", OPENVINO: "openvino"}[engine]
    return importlib.util.find_spec(module) is not None


def open_engine(
    path: str | Path,
    engine: str = ONNXRUNTIME,
    precision: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
    optimization: str = "all",
    available: Sequence[str] | None = None,
    session_factory: Callable[..., Any] | None = None,
    tensorrt: bool = False,
    model_bytes: bytes | None = None,
) -> Engine:
    """Open ``path`` with ``engine`` at ``precision`` on ``device``.

    Args:
        session_factory: builds the ONNX Runtime session (tests pass a fake); defaults to
            :func:`create_session`.
        tensorrt: on CUDA, put ONNX Runtime's TensorRT provider first (fp16 enabled when
            ``precision`` is fp16), where this ONNX Runtime has it.
        model_bytes: the file's content, read and checked by the caller: ONNX Runtime's own
            session is built from it (the engine's ``loaded_from_bytes`` is then True);
            the other engines open ``path``.

    Raises:
        EngineUnavailable: the engine's package is missing, or it cannot compile the file here.
        ArtifactError: the file is missing or not a loadable ONNX model.
    """
    if engine not in ENGINES:
        raise ArtifactError(f"{path}: unknown engine {engine!r}; engines are: {', '.join(ENGINES)}")
    if engine == OPENVINO:
        if not Path(path).is_file():
            raise ArtifactError(f"{path}: ONNX file not found")
        if not engine_installed(OPENVINO):
            raise EngineUnavailable(f"{path}: the openvino package is not installed (pip install openvino)")
        if device == "cuda":
            raise EngineUnavailable(f"{path}: ferry runs OpenVINO on the CPU only")
        try:
            return OpenVinoEngine(Path(path), precision, threads)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses when a graph cannot compile here
            raise EngineUnavailable(f"{path}: OpenVINO cannot compile it on this CPU ({first_line(e)})") from None
    from_bytes = False
    if tensorrt and device == "cuda":
        session = create_tensorrt_session(path, precision, threads, available)
    elif session_factory is None and model_bytes is not None:
        session = create_session(path, device=device, threads=threads, optimization=optimization, available=available, model_bytes=model_bytes)
        from_bytes = True
    else:
        session = (session_factory or create_session)(path, device=device, threads=threads, optimization=optimization, available=available)
    engine = OrtEngine(session, precision)
    engine.loaded_from_bytes = from_bytes
    return engine


def tensorrt_providers(precision: str, available: Sequence[str] | None = None) -> list[Any]:
    """The provider list for ONNX Runtime's TensorRT provider: TensorRT first (fp16 kernels
    allowed for an fp16 variant, an engine cache beside nothing), then CUDA, then CPU.

    Raises:
        EngineUnavailable: this ONNX Runtime has no TensorRT provider.
    """
    available = available_providers() if available is None else list(available)
    if TENSORRT not in available:
        raise EngineUnavailable(f"ONNX Runtime here has no {TENSORRT} (providers: {', '.join(available)})")
    options = {"trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": False}
    return [(TENSORRT, options), CUDA, CPU]


def create_tensorrt_session(path: str | Path, precision: str, threads: int | None, available: Sequence[str] | None = None) -> Any:
    import onnxruntime as ort

    providers = tensorrt_providers(precision, available)
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # TensorRT fails on unsupported ops or a missing libnvinfer
        raise EngineUnavailable(f"{path}: ONNX Runtime's TensorRT provider cannot open it ({first_line(e)})") from None
