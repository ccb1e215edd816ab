"""The engines `ferry bench` times: which run on this machine (:func:`plan_engines`), and how
each is loaded inside its worker process (:func:`load_pytorch`, :func:`load_variant`).

PyTorch runs the source checkpoint the way a user runs it at its best (eager fp32, and bf16
autocast where the CPU has bf16 instructions; fp32, fp16 and bf16 weights on CUDA); every
variant of the artifact runs through the engine and precision it is served with
(``runtime.engines.open_engine``: ONNX Runtime, OpenVINO).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.artifact import VariantSpec, check_valid_artifact_dir
from ferry.errors import FerryError

# How a PyTorch engine runs, per device and precision.
PYTORCH_MODES = {
    ("cpu", "fp32"): "eager fp32",
    ("cpu", "bf16"): "eager, torch.autocast('cpu', bfloat16)",
    ("cuda", "fp32"): "eager fp32",
    ("cuda", "fp16"): "eager, weights and activations fp16",
    ("cuda", "bf16"): "eager, weights and activations bf16",
}
NO_BF16 = "this CPU has no bf16 instructions (avx512_bf16 or amx_bf16): bf16 would be emulated"


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


def _variant_spec(spec: Any) -> VariantSpec:
    """A VariantSpec from an artifact variant's spec, or from a bare precision (ONNX Runtime)."""
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
            spec = _variant_spec(given)
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

