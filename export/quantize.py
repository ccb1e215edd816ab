"""Quantized and half-precision variants of an optimized fp32 ONNX model.

- ``int8``: dynamic quantization (weights int8 per channel, activation scales computed per
  batch at run time); the weight and activation types follow the CPU's instruction set.
- ``int8-static``: static QDQ quantization with activation ranges calibrated on training
  texts; only the linear layers' MatMuls are quantized, so LayerNorm, GELU, Softmax and
  the classifier head keep fp32 inputs. Fixed scales make it batch-invariant.
- ``fp16``: float16 weights and compute with fp32 inputs and outputs, for the CUDA provider.

No PyTorch here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ferry.errors import FerryError

ISAS = ("avx512_vnni", "avx2", "arm64")
# Per instruction set, the types ONNX Runtime's CPU kernels run fastest with (see
# onnxruntime.quantization.quantize_static's "Choosing parameters for CPU inference"):
# without VNNI, u8 x s8 products go through VPMADDUBSW, whose int16 sums can saturate,
# so weights use 7 bits (reduce_range); VNNI and ARM accumulate in int32 directly.
ISA_PARAMS: dict[str, dict[str, Any]] = {
    "avx512_vnni": {"activations": "uint8", "weights": "int8", "reduce_range": False},
    "avx2": {"activations": "uint8", "weights": "int8", "reduce_range": True},
    "arm64": {"activations": "uint8", "weights": "int8", "reduce_range": False},
}
TWO_GB = 2**31  # protobuf's limit: bigger models keep their weights in an external data file


def detect_isa(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The quantization target of this CPU: arm64, avx512_vnni or avx2 (also the fallback)."""
    from runtime.hardware import read_cpu

    return read_cpu(cpuinfo, machine).isa


def op_counts(path: str | Path) -> dict[str, int]:
    """Node count per op type, most frequent first: shows which fusions took place."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def external_data_file(path: Path) -> Path | None:
    """The external weights file of ``path``, if the model keeps its weights outside."""
    for candidate in (path.with_name(path.name + "_data"), path.with_name(path.name + ".data")):
        if candidate.is_file():
            return candidate
    return None


def model_bytes(path: Path) -> int:
    ext = external_data_file(path)
    return path.stat().st_size + (ext.stat().st_size if ext else 0)


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _linear_matmuls(model: Any) -> tuple[list[str], list[str]]:
    """(MatMul nodes with a constant weight, MatMul nodes multiplying two activations).

    The second kind is the attention core when it is not fused (Q·Kᵀ feeds Softmax); it stays fp32.
    """
    weights = {t.name for t in model.graph.initializer}
    linear, activation = [], []
    for n in model.graph.node:
        if n.op_type == "MatMul":
            (linear if any(i in weights for i in n.input) else activation).append(n.name)
    return linear, activation


def _declare_float_tensors(model: Any, nodes: set[str]) -> int:
    """Declare the activations around ``nodes`` as float tensors.

    The calibrator only measures tensors whose type it knows, and ONNX shape inference
    cannot see through ORT's fused ops (SkipLayerNormalization, BiasGelu, ...), so without
    this the MatMul inputs stay unmeasured and are silently left unquantized.
    """
    from onnx import TensorProto, helper

    known = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    known |= {t.name for t in model.graph.initializer}
    added = 0
    for n in model.graph.node:
        if n.name in nodes:
            for t in (*n.input, *n.output):
                if t and t not in known:
                    model.graph.value_info.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
                    known.add(t)
                    added += 1
    return added


def quantize_dynamic_int8(src: Path, dst: Path, isa: str, op_types: list[str] | None = None) -> dict[str, Any]:
    """Dynamic int8, per channel; ``op_types`` limits it (None: ONNX Runtime's default, which
    also turns Conv into ConvInteger); returns the settings to record."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    params = ISA_PARAMS[isa]
    big = model_bytes(src) > TWO_GB
    quantize_dynamic(
        src,
        dst,
        per_channel=True,
        reduce_range=params["reduce_range"],
        weight_type=_qtype(params["weights"]),
        op_types_to_quantize=op_types,
        use_external_data_format=big,
        # Shape inference cannot see through ORT's fused ops (Attention, SkipLayerNorm):
        # their outputs are float.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {"method": "dynamic", "isa": isa, "per_channel": True, **params, **({"op_types": op_types} if op_types else {})}


class _Reader:
    """ONNX Runtime's CalibrationDataReader over prepared input dicts."""

    def __init__(self, feeds: Iterable[dict[str, Any]]):
        self._feeds = list(feeds)
        self._it: Iterator[dict[str, Any]] = iter(self._feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_static_int8(
    src: Path, dst: Path, feeds: list[dict[str, Any]], isa: str, method: str = "minmax", percentile: float = 99.999,
    conv: bool = False, keep_fp32: Sequence[str] = (),
) -> dict[str, Any]:
    """Static QDQ int8 calibrated on ``feeds`` (one input dict per calibration text or image).

    Only MatMuls with a constant weight are quantized (and, with ``conv``, every Conv but the
    nodes named in ``keep_fp32``: the bulk of a CNN's compute): LayerNorm, GELU and Softmax
    inputs, the attention core and the classifier head stay fp32.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    if not feeds:
        raise FerryError("int8-static: no calibration texts")
    params = ISA_PARAMS[isa]
    big = model_bytes(src) > TWO_GB
    model = onnx.load(str(src), load_external_data=True)
    linear, attention = _linear_matmuls(model)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in keep_fp32] if conv else []
    _declare_float_tensors(model, set(linear) | set(convs))
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[method]
    extra: dict[str, Any] = {
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        "MatMulConstBOnly": True,
        "CalibMovingAverage": False,
        # MatMul outputs stay fp32: ORT then runs MatMulIntegerToFloat (int8 inputs, fp32
        # result) instead of requantizing every output to 8 bits.
        "OpTypesToExcludeOutputQuantization": ["MatMul"],
    }
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    if big:  # a ModelProto over 2 GB cannot be serialized in one piece
        prepared = dst.with_name(dst.stem + "-prepared.onnx")
        onnx.save(model, str(prepared), save_as_external_data=True, all_tensors_to_one_file=True, location=prepared.name + "_data")
        model = prepared
    quantize_static(
        model,
        dst,
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Conv"] if convs else ["MatMul"],
        nodes_to_quantize=linear + convs,
        nodes_to_exclude=attention,
        per_channel=True,
        reduce_range=params["reduce_range"],
        activation_type=_qtype(params["activations"]),
        weight_type=_qtype(params["weights"]),
        use_external_data_format=big,
        calibrate_method=calibrate,
        calibration_providers=["CPUExecutionProvider"],
        extra_options=extra,
    )
    return {
        "method": "static-qdq",
        "isa": isa,
        "per_channel": True,
        **params,
        "calibration": {"method": method, "samples": len(feeds), **({"percentile": percentile} if method == "percentile" else {})},
        "quantized_nodes": len(linear) + len(convs),
        "fp32_kept": "LayerNorm, GELU, Softmax inputs, the attention core, the pooler and classifier head",
    }
