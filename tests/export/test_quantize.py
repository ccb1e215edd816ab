"""The variants' graphs: what got quantized, what stayed fp32, and fp16's fp32 inputs/outputs."""

from __future__ import annotations

from collections import Counter

import pytest

from export import quantize


def ops(path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize(
    "cpuinfo, machine, isa",
    [
        ("flags\t\t: fpu sse avx avx2 fma\n", "x86_64", "avx2"),
        ("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n", "x86_64", "avx512_vnni"),
        ("Features\t: fp asimd\n", "aarch64", "arm64"),
        ("", "arm64", "arm64"),
        ("flags\t\t: fpu sse\n", "x86_64", "avx2"),  # the fallback
    ],
)
def test_detect_isa(cpuinfo, machine, isa):
    assert quantize.detect_isa(cpuinfo, machine) == isa


def test_dynamic_int8_quantizes_the_linear_layers(bert_artifact):
    counts = ops(bert_artifact / "model_int8.onnx")
    assert counts["MatMulInteger"] >= 6  # 2 layers x (attention output, FFN in, FFN out)
    assert counts["QAttention"] == 2  # the fused attention's QKV projection too
    assert counts["DynamicQuantizeLinear"] >= 1
    assert "MatMul" not in counts


def test_static_int8_quantizes_activations_and_keeps_sensitive_ops_fp32(bert_artifact):
    """Every linear MatMul, Q/K/V projections included, gets a calibrated QuantizeLinear on its
    input (a model with only weight DequantizeLinear would be weight-only int8: slow and not
    what was asked)."""
    fp32 = ops(bert_artifact / "model.onnx")
    static = ops(bert_artifact / "model_int8_static.onnx")
    # 2 layers x (Q, K, V, attention output, FFN in, FFN out); fp32 packs Q, K, V into Attention
    assert fp32["MatMul"] == 6 and fp32["Attention"] == 2
    assert static["MatMul"] == 12 and static["MultiHeadAttention"] == 2
    # one QuantizeLinear per distinct MatMul input (Q, K and V share theirs), a DequantizeLinear for each
    assert static["QuantizeLinear"] == 8
    assert static["DequantizeLinear"] == 12 + 8
    # LayerNorm, GELU and the attention core (with its Softmax) stay fused fp32 ops
    for op in ("SkipLayerNormalization", "BiasGelu"):
        assert static[op] == fp32[op]
    assert "DynamicQuantizeLinear" not in static and "Softmax" not in static
    info = __import__("json").loads((bert_artifact / "ferry.json").read_text())["variants"]["int8-static"]
    assert info["quantization"]["quantized_nodes"] == 12
    assert "MultiHeadAttention" in info["optimization"]["attention"]


def test_static_int8_runs_integer_kernels(bert_artifact, tmp_path):
    """ONNX Runtime turns the QDQ MatMuls into integer kernels at load time."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "as-loaded.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(bert_artifact / "model_int8_static.onnx"), so, providers=["CPUExecutionProvider"])
    loaded = Counter(n.op_type for n in onnx.load(str(tmp_path / "as-loaded.onnx")).graph.node)
    assert loaded["MatMulIntegerToFloat"] == 12
    assert loaded.get("MatMul", 0) == 0 and loaded.get("MatMulNBits", 0) == 0


def test_fp16_has_fp32_inputs_outputs_and_fp16_weights(bert_artifact):
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(bert_artifact / "model_fp16.onnx"))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.INT64] * 3
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    kinds = Counter(t.data_type for t in model.graph.initializer)
    assert kinds[TensorProto.FLOAT16] > 10 and kinds.get(TensorProto.FLOAT, 0) == 0
