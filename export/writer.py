"""What an export writes and prints, whatever its task: each variant's manifest block, the
manifest fields every export shares, the default variants, the progress lines, the summary.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from export import quantize
from export.parity import parity_table, pytorch_accuracy
from ferry.files import library_versions, now_iso, sha256_file
from runtime.artifact import FAIL, PASS, VARIANTS
from runtime.hardware import read_cpu


# The default CPU variant must be batch-invariant: these, in order, when they pass.
CPU_DEFAULT_ORDER = ("int8-static", "fp32")


# A variant that runs another variant's file needs that variant made (its file and its quantization).
NEEDS = {"openvino-int8-static": "int8-static"}


def quiet_libraries() -> None:
    """Silence the exporters' warnings and info logs: ferry reports what matters itself."""
    warnings.filterwarnings("ignore")
    for name in ("transformers", "optimum", "onnxruntime", "torch.onnx", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:  # pragma: no cover
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


class Steps:
    """An export's numbered progress lines on stderr ("[2/4] optimizing the graph (O2)"), none when ``quiet``."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.done = total, quiet, 0

    def __call__(self, text: str, same_step: bool = False) -> None:
        """Print the next step's line (``same_step``: another line of the current step)."""
        if not same_step:
            self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)


def graph_info(path: Path) -> tuple[int, list[str], list[str]]:
    """(opset, input names, output names) of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return int(opset), [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def variant_entry(name: str, path: Path, res: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One variant's manifest block: its file, engine and precision, and its parity verdict."""
    spec = VARIANTS[name]
    inv = res.get("batch_invariance")
    provider = {"openvino": "OpenVINO CPU"}.get(spec.engine) or (
        ("TensorrtExecutionProvider" if name.endswith("-tensorrt") else "CUDAExecutionProvider") if spec.device == "cuda" else "CPUExecutionProvider")
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": quantize.model_bytes(path),
        "engine": spec.engine,
        "precision": spec.precision,
        "device": spec.device,
        "provider": provider,
        "batch_invariant": None if inv is None else bool(inv["invariant"]),
        "status": res["status"],
        "graph_ops": quantize.op_counts(path),
        **extra,
        "parity": res,
    }


def manifest_common(variants: dict[str, dict[str, Any]], defaults: dict[str, str | None], *, forced_cpu: bool,
                    settings: dict[str, Any], timings: dict[str, float], versions: Sequence[str]) -> dict[str, Any]:
    """The artifact manifest's fields that every export shares: the variants, the defaults and how
    they were picked (``forced_cpu``: by --cpu-default), the ``settings``, timings, library
    versions, machine and time."""
    return {
        "variants": variants,
        "default_variant": defaults,
        "default_variant_rule": {
            "cpu": "forced by --cpu-default" if forced_cpu else "first passing, batch-invariant variant among " + ", ".join(CPU_DEFAULT_ORDER),
            "gpu": "fp16 unless it failed, else fp32",
        },
        "settings": settings,
        "machine": read_cpu().as_dict(),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "versions": library_versions(*versions),
        "created": now_iso(),
    }


def choose_defaults(variants: dict[str, dict[str, Any]], forced_cpu: str | None) -> dict[str, str | None]:
    """The default variant for CPU (batch-invariant and passing) and for GPU (fp16 unless it failed)."""
    cpu = None
    if forced_cpu:
        cpu = forced_cpu
    else:
        for name in CPU_DEFAULT_ORDER:
            info = variants.get(name)
            if info and info["status"] == PASS and info.get("batch_invariant"):
                cpu = name
                break
    gpu = None
    if "fp16" in variants and variants["fp16"]["status"] != FAIL:
        gpu = "fp16"
    elif variants.get("fp32", {}).get("status") == PASS:
        gpu = "fp32"
    return {"cpu": cpu, "gpu": gpu}


def summarize(variants: dict[str, dict[str, Any]], defaults: dict[str, str], output: Path, started: float) -> int:
    """Print the parity table, the default variants and every failure; 1 when fp32 failed, else 0."""
    print(parity_table(variants, pytorch_accuracy(variants)))
    print(f"default variant: cpu={defaults['cpu']} gpu={defaults['gpu']}")
    for name, info in variants.items():
        if info["status"] != PASS:
            print(f"  {name}: {info['status']} ({info['parity'].get('reason', '')})")
    print(f"wrote {output} in {time.perf_counter() - started:.1f}s")
    if variants["fp32"]["status"] == FAIL:
        print(
            f"ferry export: error: fp32 failed the parity gate ({variants['fp32']['parity'].get('reason')}); "
            f"{output} records the failure and has no servable fp32",
            file=sys.stderr,
        )
        return 1
    return 0

