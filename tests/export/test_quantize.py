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


def test_static_int8_keeps_the_residual_stream_fp32(bert_artifact):
    """Only the quantized MatMuls read DequantizeLinear outputs: ONNX Runtime's QDQ quantizer
    rewires every reader of a quantized tensor, so without the repair the LayerNorm outputs
    reached the next residual connection (SkipLayerNormalization) rounded to 8 bits."""
    import onnx

    model = onnx.load(str(bert_artifact / "model_int8_static.onnx"))
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    readers = Counter(n.op_type for n in model.graph.node if any(i in dq for i in n.input))
    assert readers == Counter({"MatMul": 12})
    info = __import__("json").loads((bert_artifact / "ferry.json").read_text())["variants"]["int8-static"]["quantization"]
    assert info["smoothing"]["method"] == "SmoothQuant" and info["smoothing"]["tensors"] == 8


def test_smoothing_leaves_the_fp32_function_unchanged(bert_artifact, tmp_path):
    """SmoothQuant divides each MatMul input channel by s and multiplies the weight row by s:
    in fp32 the logits stay what they were, and the scales do move range out of the activations."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(bert_artifact / "model.onnx"))
    linear, _ = quantize._linear_matmuls(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 60, size=(3, 16)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    info = quantize.smooth_matmul_inputs(model, linear, [feed], 0.75, tmp_path)
    assert info["tensors"] > 0
    assert Counter(n.op_type for n in model.graph.node)["Mul"] >= info["tensors"]
    onnx.save(model, str(tmp_path / "smoothed.onnx"))

    def logits(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]

    before, after = logits(bert_artifact / "model.onnx"), logits(tmp_path / "smoothed.onnx")
    assert np.abs(before - after).max() < 1e-4
    inv = [t for t in model.graph.initializer if t.name.endswith("_inv_scale")]
    assert len(inv) == info["tensors"] and any(abs(float(v) - 1) > 0.05 for t in inv for v in onnx.numpy_helper.to_array(t))


def fake_measure(table):
    """measure(k) of a fake try: (agreement, agreement at 2x error, mean |Δlogit|) per k."""
    return lambda k: dict(zip(("agreement", "agreement_at_2x_error", "mean_abs_diff"), table[k]))


@pytest.mark.parametrize("table,n_nodes,want_k,want_tried", [
    # the smallest set that reaches the gate: k=2 agrees, but not with twice its error
    ({0: (0.98, 0.95, 0.2), 2: (0.996, 0.99, 0.1), 4: (0.997, 0.996, 0.05), 8: (1, 1, 0.01)}, 36, 4, [0, 2, 4]),
    ({0: (1.0, 1.0, 0.01)}, 36, 0, [0]),  # nothing kept when plain int8 reaches it
    # none does: the best agreement, then at 2x error, then mean |Δlogit|, then fewer fp32 MatMuls
    ({0: (0.98, 0.9, 0.2), 2: (0.99, 0.95, 0.1), 4: (0.99, 0.97, 0.08), 8: (0.99, 0.97, 0.05), 12: (0.99, 0.97, 0.05)}, 36, 8, [0, 2, 4, 8, 12]),
    ({0: (0.98, 0.9, 0.2), 2: (0.97, 0.9, 0.1)}, 3, 0, [0, 2]),  # never more MatMuls than the graph has
])
def test_choose_fp32_matmuls(table, n_nodes, want_k, want_tried):
    written = []
    ranked = [f"matmul{i}" for i in range(n_nodes)]
    k, tried = quantize.choose_fp32_matmuls(written.append, fake_measure(table), ranked, 0.995)
    assert k == want_k and written == want_tried and [t["fp32_matmuls"] for t in tried] == want_tried
    assert all(t["nodes"] == ranked[: t["fp32_matmuls"]] for t in tried)


def test_compare_logits_counts_near_flips():
    """A try that flips no label can still fail the doubled-error check: its error used more
    than half of a text's margin."""
    import numpy as np

    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.9]])
    close = ref + np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [-0.04, 0.0, 0.04]])  # text 3: margin 0.1 -> 0.02
    m = quantize.compare_logits(ref, close)
    assert m["agreement"] == 1.0 and m["flips"] == 0
    assert m["agreement_at_2x_error"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["mean_abs_diff"] == pytest.approx(0.18 / 9, abs=1e-6)
