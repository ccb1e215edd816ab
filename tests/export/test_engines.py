"""The engine layer at export: OpenVINO variants of the tiny BERT through the same gates,
bf16 and missing engines unverified with their reason, the TensorRT provider list faked."""

from __future__ import annotations

import os

import numpy as np
import pytest

from export.export import default_variants
from runtime import engines
from runtime.hardware import Cpu, read_cpu
from ferry.cli import main
from ferry.files import read_manifest
from tests.cli import EXPORT_FAST
from tests.export.reference import reference

AVX2 = Cpu("AMD EPYC", "x86_64", frozenset({"avx2", "fma"}))
AMX = Cpu("Intel Xeon", "x86_64", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}))


def test_default_variants_follow_calibration_and_the_installed_engines():
    assert default_variants(calibration=True, openvino=True) == ["fp32", "int8-static", "openvino-fp32", "openvino-bf16"]
    assert default_variants(calibration=False, openvino=True) == ["fp32", "openvino-fp32", "openvino-bf16"]
    assert default_variants(calibration=True, openvino=False) == ["fp32", "int8-static"]


def test_cpu_features_from_cpuinfo_text():
    amd = read_cpu("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n", "x86_64")
    assert amd.model == "AMD EPYC 7B13" and amd.features == {
        "avx2": True, "avx512": False, "vnni": False, "bf16": False, "amx": False, "fp16": False}
    assert amd.isa == "avx2"
    xeon = read_cpu("model name\t: Intel Xeon\nflags\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile\n", "x86_64")
    assert xeon.has("bf16") and xeon.has("amx") and xeon.has("vnni") and xeon.isa == "avx512_vnni"
    assert xeon.as_dict()["flags"] == sorted(["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"])


@pytest.fixture(scope="module")
def ov_artifact(tmp_path_factory, bert_ckpt):
    out = tmp_path_factory.mktemp("ov") / "artifact"
    variants = "fp32,int8-static,openvino-fp32,openvino-bf16,openvino-int8-static"
    rc = main(["export", str(bert_ckpt), "--output", str(out), "--variants", variants, *EXPORT_FAST])
    assert rc == 0
    return out


def test_openvino_variants_go_through_the_same_gate(ov_artifact):
    m = read_manifest(ov_artifact)
    v = m["variants"]
    assert list(v) == ["fp32", "int8-static", "openvino-fp32", "openvino-bf16", "openvino-int8-static"]
    ov32, ovbf, ov8 = v["openvino-fp32"], v["openvino-bf16"], v["openvino-int8-static"]
    assert (ov32["engine"], ov32["provider"], ov32["precision"], ov32["file"]) == ("openvino", "OpenVINO CPU", "fp32", "model.onnx")
    assert ov32["sha256"] == v["fp32"]["sha256"] and ov8["sha256"] == v["int8-static"]["sha256"]
    # fp32 in OpenVINO is held to the fp32 gate, on random tokens and the held-out texts.
    assert ov32["status"] == "pass" and ov32["parity"]["max_abs_diff"] <= 1e-4 and ov32["parity"]["heldout"]["examples"] == 36
    assert ov32["batch_invariant"] is True
    # int8 in OpenVINO is judged by labels, like ONNX Runtime's.
    assert set(ov8["parity"]["gates"]) == {"min_agreement", "max_accuracy_drop_points"} and "heldout" in ov8["parity"]
    if read_cpu().has("bf16"):
        assert ovbf["status"] in ("pass", "fail") and "agreement" in ovbf["parity"]["heldout"]
    else:  # OpenVINO would run "bf16" in f32 here: never called a pass
        assert ovbf["status"] == "unverified" and "bf16" in ovbf["parity"]["reason"] and ovbf["batch_invariant"] is None


def test_openvino_gate_can_fail(ov_artifact, bert_ckpt, tmp_path):
    """A perturbed classifier weight read by OpenVINO fails the fp32 gate."""
    import onnx
    from onnx import numpy_helper

    from export.parity import check_variant

    model = onnx.load(str(ov_artifact / "model.onnx"))
    target = max(model.graph.initializer, key=lambda t: t.name.startswith("classifier"))
    w = numpy_helper.to_array(target).copy()
    target.CopyFrom(numpy_helper.from_array(w + 0.05, target.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    ref, args = reference(bert_ckpt)
    res = check_variant("openvino-fp32", tmp_path / "model.onnx", ref, args.gates(), threads=args.threads)
    assert res["engine"] == "openvino" and res["status"] == "fail" and "max |Δlogit|" in res["reason"]
    ok = check_variant("openvino-fp32", ov_artifact / "model.onnx", ref, args.gates(), threads=args.threads)
    assert ok["status"] == "pass"


def test_bf16_is_unverified_on_a_cpu_without_bf16(ov_artifact, bert_ckpt):
    from export.parity import check_variant

    ref, args = reference(bert_ckpt)
    res = check_variant("openvino-bf16", ov_artifact / "model.onnx", ref, args.gates(), threads=args.threads, cpu=AVX2)
    assert res["status"] == "unverified" and "no bf16 instructions" in res["reason"]
    # A CPU that claims bf16: judged by the label gates, unless OpenVINO itself says it runs f32.
    res = check_variant("openvino-bf16", ov_artifact / "model.onnx", ref, args.gates(), threads=args.threads, cpu=AMX)
    if read_cpu().has("bf16"):
        assert res["status"] in ("pass", "fail") and res["gates"]["min_agreement"] == args.int8_min_agreement
    else:
        assert res["status"] == "unverified" and "runs it in f32" in res["reason"]


def test_a_missing_engine_or_a_graph_that_does_not_compile_is_named(ov_artifact, bert_ckpt, tmp_path, monkeypatch):
    from export.parity import check_variant

    ref, args = reference(bert_ckpt)
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not an onnx graph")
    with pytest.raises(engines.EngineUnavailable, match="OpenVINO cannot compile it on this CPU"):
        engines.open_engine(garbage, "openvino", "fp32")
    res = check_variant("openvino-fp32", garbage, ref, args.gates(), threads=args.threads)
    assert res["status"] == "unverified" and "cannot compile" in res["reason"]
    monkeypatch.setattr(engines, "engine_installed", lambda name: name != "openvino")
    with pytest.raises(engines.EngineUnavailable, match=r"openvino package is not installed \(pip install openvino\)"):
        engines.open_engine(ov_artifact / "model.onnx", "openvino", "fp32")
    res = check_variant("openvino-fp32", ov_artifact / "model.onnx", ref, args.gates(), threads=args.threads)
    assert res["status"] == "unverified" and "not installed" in res["reason"]


def test_openvino_engine_pins_its_precision(ov_artifact):
    e = engines.open_engine(ov_artifact / "model.onnx", "openvino", "fp32", threads=1)
    assert e.inference_precision == "f32"  # never OpenVINO's own bf16 default on an AMX CPU
    feed = {"input_ids": np.array([[2, 5, 6, 3]], dtype=np.int64), "attention_mask": np.ones((1, 4), dtype=np.int64),
            "token_type_ids": np.zeros((1, 4), dtype=np.int64)}
    ort = engines.open_engine(ov_artifact / "model.onnx", "onnxruntime", "fp32", threads=1)
    assert np.abs(e.run({k: feed[k] for k in e.input_names}) - ort.run({k: feed[k] for k in ort.input_names})).max() < 1e-4


def test_openvino_pins_no_thread_of_a_process_that_shares_the_cores(ov_artifact, monkeypatch):
    """ferry serve's workers and ferry predict --ray's actors each get a share of the cores:
    OpenVINO pinning each one's threads would put them all on the same first cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    shared = engines.open_engine(ov_artifact / "model.onnx", "openvino", "fp32", threads=1)
    assert shared.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert shared.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    whole = engines.open_engine(ov_artifact / "model.onnx", "openvino", "fp32", threads=4)  # all cores its own
    own = engines.open_engine(ov_artifact / "model.onnx", "openvino", "fp32", threads=None)
    assert whole.compiled.get_property("ENABLE_CPU_PINNING") == own.compiled.get_property("ENABLE_CPU_PINNING")


def test_tensorrt_provider_list_with_faked_providers():
    trt, cuda, cpu = engines.TENSORRT, engines.CUDA, engines.CPU
    providers = engines.tensorrt_providers("fp16", [trt, cuda, cpu])
    assert providers[0][0] == trt and providers[0][1]["trt_fp16_enable"] is True and providers[1:] == [cuda, cpu]
    assert engines.tensorrt_providers("fp32", [trt, cuda, cpu])[0][1]["trt_fp16_enable"] is False
    with pytest.raises(engines.EngineUnavailable, match="no TensorrtExecutionProvider"):
        engines.tensorrt_providers("fp16", [cuda, cpu])


def test_tensorrt_variant_is_unverified_without_a_gpu(bert_ckpt, tmp_path):
    from export.parity import check_variant

    ref, args = reference(bert_ckpt)
    res = check_variant("fp16-tensorrt", tmp_path / "model_plain.onnx", ref, args.gates(), threads=args.threads, available=[engines.CUDA, engines.CPU])
    assert res["status"] == "unverified" and engines.TENSORRT in res["reason"]
