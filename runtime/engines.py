"""ONNX Runtime sessions: provider choice, threads, optimization level.

Shared by parity, the offline bench and the serving runtime, so every stage runs a
model the same way. No PyTorch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ferry.errors import ArtifactError, FerryError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
OPT_LEVELS = ("disable", "basic", "extended", "all")


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
) -> Any:
    """An InferenceSession on the best provider for ``device``.

    The provider actually used is ``session.get_providers()[0]``: ONNX Runtime falls back
    to CPU when CUDA is listed but no GPU is usable, and callers report what they got.

    Raises:
        ArtifactError: the file is missing or not a loadable ONNX model.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: ONNX file not found")
    providers = choose_providers(device, available)
    try:
        return ort.InferenceSession(str(path), session_options(threads, optimization), providers=providers)
    except Exception as e:  # ORT raises its own exception types for a damaged or invalid model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}: not a loadable ONNX model ({first[:200]})") from None


def active_provider(session: Any) -> str:
    return session.get_providers()[0]
