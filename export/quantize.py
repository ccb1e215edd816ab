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
SMOOTH_SAMPLES = 64  # calibration inputs whose per-channel maxima set the SmoothQuant scales


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


def _smoothing_targets(model: Any, nodes: Sequence[str]) -> dict[str, list[tuple[Any, str]]]:
    """Per activation tensor, the MatMuls of ``nodes`` that read it, with their weight's name."""
    weights = {t.name for t in model.graph.initializer}
    wanted, groups = set(nodes), {}
    for n in model.graph.node:
        if n.name in wanted and n.op_type == "MatMul" and n.input[1] in weights and n.input[0] not in weights:
            groups.setdefault(n.input[0], []).append((n, n.input[1]))
    return groups


def _input_absmax(model: Any, tensors: list[str], feeds: Sequence[dict[str, Any]], path: Path, big: bool) -> dict[str, Any]:
    """Per-channel max |x| of ``tensors`` (last axis) over ``feeds``, from one fp32 pass."""
    import numpy as np
    import onnx
    from onnx import helper

    from runtime.engines import create_session

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    del aug.graph.output[:]
    aug.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    onnx.save(aug, str(path), save_as_external_data=big, location=path.name + "_data")
    session = create_session(path, "cpu")
    found: dict[str, Any] = {}
    for feed in feeds:
        for t, v in zip(tensors, session.run(tensors, feed)):
            m = np.abs(v.reshape(-1, v.shape[-1])).max(0)
            found[t] = m if t not in found else np.maximum(found[t], m)
    return found


def smooth_matmul_inputs(model: Any, nodes: Sequence[str], feeds: Sequence[dict[str, Any]], alpha: float, work: Path,
                         big: bool = False) -> dict[str, Any]:
    """SmoothQuant (Xiao et al. 2023) on the activation inputs of ``nodes``, in place.

    A transformer's activations have a few channels far larger than the rest, so one
    per-tensor int8 scale leaves the others a handful of levels. Each input channel j is
    divided by s_j = max|x_j|^alpha / max|W_j|^(1-alpha) (a Mul on the MatMul's branch only:
    the residual stream is untouched) and row j of the weights multiplied by it, which moves
    part of the range into the per-channel weight scales. The product is unchanged in fp32.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    import time

    started = time.perf_counter()
    groups = _smoothing_targets(model, nodes)
    if not groups:
        return {"alpha": alpha, "tensors": 0}
    absmax = _input_absmax(model, list(groups), feeds, work / "smooth-absmax.onnx", big)
    inits = {t.name: t for t in model.graph.initializer}
    position = {n.name: i for i, n in enumerate(model.graph.node)}
    inserts = []
    for x, readers in groups.items():
        ws = [numpy_helper.to_array(inits[w]) for _, w in readers]
        wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)
        scale = np.maximum(absmax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        scale = np.clip(scale, 1e-2, 1e2).astype(np.float32)
        name = x + "_smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), name + "_inv_scale"))
        inserts.append((min(position[n.name] for n, _ in readers), helper.make_node("Mul", [x, name + "_inv_scale"], [name], name=name + "_Mul")))
        for (n, w), weight in zip(readers, ws):
            n.input[0] = name
            inits[w].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), w))
    for at, node in sorted(inserts, key=lambda t: -t[0]):  # keep the graph topologically sorted
        model.graph.node.insert(at, node)
    return {"alpha": alpha, "tensors": len(groups), "calibration_samples": len(feeds), "seconds": round(time.perf_counter() - started, 2)}


def _fp32_bypass(path: Path, quantized: set[str]) -> int:
    """Give the fp32 consumers of every quantized activation back the fp32 tensor.

    ONNX Runtime's QDQ quantizer rewires *every* reader of a quantized tensor to its
    DequantizeLinear output, so the LayerNorm outputs that feed the Q/K/V and FFN MatMuls
    also reach the next residual connection (SkipLayerNormalization) rounded to 8 bits: the
    residual stream itself got quantized, 12 times in a 6-layer BERT, for no speed gain.
    Returns the number of inputs rewired.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    fp32_of = {
        n.output[0]: producer[n.input[0]].input[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in producer and producer[n.input[0]].op_type == "QuantizeLinear"
    }
    rewired = 0
    for n in model.graph.node:
        if n.name in quantized or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, t in enumerate(n.input):
            if t in fp32_of:
                n.input[i] = fp32_of[t]
                rewired += 1
    if rewired:  # only the wiring changes: external tensors stay in the data file the graph names
        path.write_bytes(model.SerializeToString())
    return rewired


def _calibration_cache_kwargs(cache: Path | None) -> dict[str, Any]:
    """``calibration_cache_path`` where this ONNX Runtime has it (1.31 does): the first
    quantize_static calibrates and saves the ranges, later quantize() calls of the same
    StaticQuantizer load them instead of running the calibration texts again."""
    import inspect

    from onnxruntime.quantization import quantize_static

    if cache is not None and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        return {"calibration_cache_path": str(cache)}
    return {}


def unquantize_matmuls(qdq: Path, fp32: Path, dst: Path, keep: Sequence[str], big: bool = False) -> int:
    """Write ``qdq`` to ``dst`` with the MatMuls named in ``keep`` back in fp32: each reads its
    fp32 input and its fp32 weight from ``fp32`` (the graph ``qdq`` was quantized from) again,
    and the QuantizeLinear/DequantizeLinear nodes and tensors nobody reads any more go. The
    same graph as quantizing without them, with no second calibration or weight quantization.
    Returns the number of MatMuls restored."""
    import onnx

    model = onnx.load(str(qdq), load_external_data=True)
    source = onnx.load(str(fp32), load_external_data=True)
    original = {n.name: n for n in source.graph.node if n.op_type == "MatMul"}
    weights = {t.name: t for t in source.graph.initializer}
    have = {t.name for t in model.graph.initializer}
    restored = 0
    for n in model.graph.node:
        if n.name in keep and n.name in original:
            del n.input[:]
            n.input.extend(original[n.name].input)
            for name in n.input:
                if name in weights and name not in have:
                    model.graph.initializer.append(weights[name])
                    have.add(name)
            restored += 1
    while True:  # drop the Q/DQ nodes left without readers, then the tensors only they read
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    read = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True, location=dst.name + "_data")
    return restored


class StaticQuantizer:
    """int8-static of one graph, calibrated once and quantized as often as asked.

    ``quantize(dst, keep_fp32)`` writes the QDQ model with the MatMuls (and, with ``conv``,
    the Convs) named in ``keep_fp32`` left in fp32; the calibrated ranges are reused between
    calls where ONNX Runtime can cache them (else each call calibrates again).
    ``keeping(qdq, info, dst, keep)`` derives a variant with more MatMuls in fp32 from one
    already quantized, by graph surgery (what the text fp32 fallback's tries use).
    With ``smooth`` > 0 the MatMul inputs are smoothed first (:func:`smooth_matmul_inputs`).
    """

    def __init__(self, src: Path, work: Path, feeds: list[dict[str, Any]], isa: str, method: str = "minmax",
                 percentile: float = 99.999, conv: bool = False, smooth: float = 0.0):
        import onnx

        if not feeds:
            raise FerryError("int8-static: no calibration texts")
        work.mkdir(parents=True, exist_ok=True)
        self.isa, self.method, self.percentile, self.conv, self.feeds = isa, method, percentile, conv, feeds
        self.big = model_bytes(src) > TWO_GB
        model = onnx.load(str(src), load_external_data=True)
        self.linear, self.attention = _linear_matmuls(model)
        self.convs = [n.name for n in model.graph.node if n.op_type == "Conv"] if conv else []
        self.smoothing = smooth_matmul_inputs(model, self.linear, feeds[:SMOOTH_SAMPLES], smooth, work, self.big) if smooth > 0 and self.linear else None
        _declare_float_tensors(model, set(self.linear) | set(self.convs))
        self.cache = work / "calibration-ranges.json"
        if self.cache.exists():
            self.cache.unlink()
        # saved once: every quantize() reads it (a ModelProto over 2 GB cannot be serialized in one piece)
        self.model = work / "prepared.onnx"
        onnx.save(model, str(self.model), save_as_external_data=self.big, all_tensors_to_one_file=True, location=self.model.name + "_data")

    def keeping(self, qdq: Path, info: dict[str, Any], dst: Path, keep: Sequence[str]) -> dict[str, Any]:
        """``qdq`` (written by :meth:`quantize` with ``info``) with the MatMuls in ``keep`` back in fp32."""
        restored = unquantize_matmuls(qdq, self.model, dst, keep, self.big)
        return {**info, "quantized_nodes": info["quantized_nodes"] - restored}

    def quantize(self, dst: Path, keep_fp32: Sequence[str] = ()) -> dict[str, Any]:
        """Write the variant to ``dst``; returns the settings to record."""
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        params = ISA_PARAMS[self.isa]
        keep = set(keep_fp32)
        linear = [n for n in self.linear if n not in keep]
        convs = [n for n in self.convs if n not in keep]
        extra: dict[str, Any] = {
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            "MatMulConstBOnly": True,
            "CalibMovingAverage": False,
            # MatMul outputs stay fp32: ORT then runs MatMulIntegerToFloat (int8 inputs, fp32
            # result) instead of requantizing every output to 8 bits.
            "OpTypesToExcludeOutputQuantization": ["MatMul"],
        }
        if self.method == "percentile":
            extra["CalibPercentile"] = self.percentile
        calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[self.method]
        nodes = linear + convs
        if nodes:
            quantize_static(
                self.model,
                dst,
                _Reader(self.feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Conv"] if self.convs else ["MatMul"],
                nodes_to_quantize=nodes,
                nodes_to_exclude=self.attention,
                per_channel=True,
                reduce_range=params["reduce_range"],
                activation_type=_qtype(params["activations"]),
                weight_type=_qtype(params["weights"]),
                use_external_data_format=self.big,
                calibrate_method=calibrate,
                calibration_providers=["CPUExecutionProvider"],
                extra_options=extra,
                **_calibration_cache_kwargs(self.cache),
            )
        else:  # nothing left to quantize (an empty nodes_to_quantize would mean "all" to ORT)
            onnx.save(onnx.load(str(self.model)), str(dst), save_as_external_data=self.big, all_tensors_to_one_file=True,
                      location=dst.name + "_data")
        info: dict[str, Any] = {
            "method": "static-qdq",
            "isa": self.isa,
            "per_channel": True,
            **params,
            "calibration": {"method": self.method, "samples": len(self.feeds), **({"percentile": self.percentile} if self.method == "percentile" else {})},
            "quantized_nodes": len(nodes),
            "fp32_kept": "LayerNorm, GELU, Softmax inputs, the attention core, the pooler and classifier head",
        }
        if not self.convs and nodes:
            # MatMul-only graphs (transformers): the residual stream stays fp32. Not done with
            # Convs, where ORT fuses DQ-Conv-Q into QLinearConv only when Q is the sole reader.
            info["fp32_residual_inputs_restored"] = _fp32_bypass(dst, set(nodes))
        if self.smoothing:
            info["smoothing"] = {"method": "SmoothQuant", **self.smoothing}
        return info


def quantize_static_int8(
    src: Path, dst: Path, feeds: list[dict[str, Any]], isa: str, method: str = "minmax", percentile: float = 99.999,
    conv: bool = False, keep_fp32: Sequence[str] = (),
) -> dict[str, Any]:
    """Static QDQ int8 calibrated on ``feeds`` (one input dict per calibration text or image).

    Only MatMuls with a constant weight are quantized (and, with ``conv``, every Conv but the
    nodes named in ``keep_fp32``: the bulk of a CNN's compute): LayerNorm, GELU and Softmax
    inputs, the attention core and the classifier head stay fp32.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ferry-int8s-", dir=dst.parent) as work:
        return StaticQuantizer(src, Path(work), feeds, isa, method, percentile, conv).quantize(dst, keep_fp32)


# ---------------------------------------------------------------- the fp32 fallback of a text model

# int8-static of a transformer: how many of the most sensitive MatMuls to keep in fp32, tried in turn
KEEP_FP32_MATMULS = (0, 2, 4, 8, 12)
# A try reaches the gate when its labels agree with fp32 on the validation texts, and still
# would with its error doubled: a margin for text that differs from the validation split, and
# a measure that still tells tries apart when they all flip 0 or 1 validation labels.
ERROR_SAFETY = 2.0


def compare_logits(reference: Any, logits: Any) -> dict[str, Any]:
    """Label agreement of ``logits`` with ``reference`` (also with the error scaled by
    :data:`ERROR_SAFETY`), the flips and the mean |Δlogit|."""
    import numpy as np

    want = reference.argmax(-1)
    safe = reference + ERROR_SAFETY * (logits - reference)
    return {
        "agreement": round(float((logits.argmax(-1) == want).mean()), 6),
        f"agreement_at_{ERROR_SAFETY:g}x_error": round(float((safe.argmax(-1) == want).mean()), 6),
        "flips": int((logits.argmax(-1) != want).sum()),
        "mean_abs_diff": round(float(np.abs(logits - reference).mean()), 6),
    }


def reaches_gate(measured: dict[str, Any], gate: float) -> bool:
    return measured["agreement"] >= gate and measured[f"agreement_at_{ERROR_SAFETY:g}x_error"] >= gate


def choose_fp32_matmuls(quantize_keeping: Any, measure: Any, ranked: Sequence[str], gate: float,
                        steps: Sequence[int] = KEEP_FP32_MATMULS) -> tuple[int, list[dict[str, Any]]]:
    """How many of the ``ranked`` MatMuls (most sensitive first) int8-static keeps in fp32, and every try.

    ``quantize_keeping(k)`` writes the variant with ``ranked[:k]`` in fp32; ``measure(k)`` compares
    it with fp32 on the validation texts (:func:`compare_logits`). The first ``k`` of ``steps``
    that reaches ``gate`` (:func:`reaches_gate`) wins: the smallest set, so the most speed kept.
    If none does, the best try: highest agreement, then agreement at the doubled error, then
    the smallest mean |Δlogit|, then the fewest fp32 MatMuls.
    """
    tried: list[dict[str, Any]] = []
    for k in steps:
        if k > len(ranked):
            break
        quantize_keeping(k)
        tried.append({"fp32_matmuls": k, **measure(k), "nodes": list(ranked[:k])})
        if reaches_gate(tried[-1], gate):
            return k, tried
    key = f"agreement_at_{ERROR_SAFETY:g}x_error"
    best = max(tried, key=lambda t: (t["agreement"], t[key], -t["mean_abs_diff"], -t["fp32_matmuls"]))
    return best["fp32_matmuls"], tried


def qdq_matmul_params(path: Path) -> dict[str, dict[str, Any]]:
    """Per quantized MatMul of a QDQ graph, what its integer kernel computes with: the fp32
    activation it reads (before any smoothing Mul), the smoothing's 1/s, the activation's
    scale, zero point and integer range, and the dequantized weight ([in, out])."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    init = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def array(name: str) -> Any:
        return numpy_helper.to_array(init[name])

    found = {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or not all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input):
            continue
        act_dq, w_dq = producer[n.input[0]], producer[n.input[1]]
        act_q = producer.get(act_dq.input[0])
        if act_q is None or act_q.op_type != "QuantizeLinear" or w_dq.input[0] not in init:
            continue
        x, inv = act_q.input[0], None
        smooth = producer.get(x)
        if smooth is not None and smooth.op_type == "Mul" and smooth.input[1].endswith("_inv_scale") and smooth.input[1] in init:
            x, inv = smooth.input[0], array(smooth.input[1])
        zp = array(act_dq.input[2])
        info = np.iinfo(zp.dtype)
        w_zp = array(w_dq.input[2]).astype(np.float32) if len(w_dq.input) > 2 else 0.0
        weight = (array(w_dq.input[0]).astype(np.float32) - w_zp) * array(w_dq.input[1]).astype(np.float32)
        found[n.name] = {"input": x, "inv_scale": inv, "scale": float(array(act_dq.input[1])), "zero_point": int(zp),
                         "qmin": int(info.min), "qmax": int(info.max), "weight": weight.astype(np.float32)}
    return found
