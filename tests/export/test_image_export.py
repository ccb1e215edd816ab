"""`ferry export` and `ferry parity` of image checkpoints: a tiny CNN (ResNet) and a tiny ViT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ferry.cli import main
from ferry.files import read_manifest
from ferry.tasks import IMAGE_TASK
from tests import fixtures, tiny
from tests.cli import run, run_fails

FAST = ["--quiet", "--threads", "1", "--parity-batch-sizes", "1,3"]


@pytest.fixture(scope="module", params=["resnet", "vit"])
def exported(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(architecture, checkpoint, artifact with fp32, int8 and int8-static)."""
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    out = tmp_path_factory.mktemp(f"img-{request.param}") / "artifact"
    assert main(["export", str(ckpt), "--output", str(out), "--variants", "fp32,int8,int8-static,fp16", *FAST]) == 0
    return request.param, ckpt, out


def ort_predict(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": pixels})[0]


def test_artifact_files_and_manifest(exported):
    arch, ckpt, out = exported
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["model.onnx", "model_int8.onnx", "model_int8_static.onnx", "model_fp16.onnx",
                            "config.json", "preprocessor_config.json", "ferry.json"])
    m = read_manifest(out)
    assert m["task"] == IMAGE_TASK
    assert m["inputs"] == ["pixel_values"] and m["outputs"] == ["logits"]
    assert m["image_size"] == {"height": fixtures.IMAGE_SIZE, "width": fixtures.IMAGE_SIZE}
    assert m["exporter"].startswith("torch.onnx.export")
    assert m["labels"] == tiny.IMAGE_LABELS
    assert (out / "preprocessor_config.json").read_bytes() == (ckpt / "preprocessor_config.json").read_bytes()
    v = m["variants"]
    assert v["fp32"]["status"] == "pass" and v["fp32"]["parity"]["max_abs_diff"] <= 1e-4
    assert v["fp32"]["parity"]["random"]["cases"] == [[1, 3, fixtures.IMAGE_SIZE, fixtures.IMAGE_SIZE], [3, 3, fixtures.IMAGE_SIZE, fixtures.IMAGE_SIZE]]
    held = v["fp32"]["parity"]["heldout"]
    n_held = sum(1 for f in (ckpt / "heldout").rglob("*") if f.is_file())
    assert n_held >= 3 and held["examples"] == n_held and held["agreement"] == 1.0
    for name in ("int8", "int8-static"):
        h = v[name]["parity"]["heldout"]
        assert 0 <= h["agreement"] <= 1 and h["examples"] == n_held
        assert v[name]["status"] in ("pass", "fail")
    assert v["fp16"]["status"] == "unverified"  # no CUDA here
    # Static int8 quantizes the convolutions of the CNN (QDQ around Conv), the MatMuls of the ViT.
    ops = v["int8-static"]["graph_ops"]
    assert ops.get("QuantizeLinear", 0) > 0
    if arch == "resnet":
        assert v["int8-static"]["quantization"]["quantized_nodes"] >= 5
    # int8-static chose its fp32 convolutions on the checkpoint's validation/ images, starting with none
    sel = v["int8-static"]["quantization"]["fp32_convs_selection"]
    assert sel["on"].startswith("validation/") and sel["tried"][0]["fp32_convs"] == 0
    assert len(v["int8-static"]["quantization"]["fp32_convs"]) in [t["fp32_convs"] for t in sel["tried"]]
    # Dynamic int8 quantizes MatMul/Gemm only: no ConvInteger (slow and inaccurate on CNNs).
    dyn = v["int8"]["graph_ops"]
    assert "ConvInteger" not in dyn and dyn.get("MatMulInteger", 0) > 0


def test_fp32_dynamic_batch_matches_pytorch(exported):
    """The exported graph takes any batch size; its logits equal PyTorch's on held-out images."""
    import torch
    from transformers import AutoModelForImageClassification

    from finetune.images import read_image_folder
    from runtime.pixels import load_processor, open_image, preprocess

    _, ckpt, out = exported
    files, _ = read_image_folder(ckpt / "heldout")
    pixels = preprocess([open_image(f, str(f)) for f in files], load_processor(ckpt))
    pixels = np.concatenate([pixels, pixels[::-1], pixels[:1]])  # a batch size the export never traced with
    model = AutoModelForImageClassification.from_pretrained(ckpt).eval()
    with torch.inference_mode():
        want = model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    got = ort_predict(out / "model.onnx", pixels)
    assert got.shape == (2 * len(files) + 1, 3)
    assert np.abs(got - want).max() < 1e-4


def test_parity_rechecks_the_artifact(exported, capsys, tmp_path):
    _, ckpt, out = exported
    report = tmp_path / "report.json"
    rc, stdout, _ = run(["parity", str(out), "--variants", "fp32,int8-static", "--report", str(report), *FAST], capsys)
    assert rc in (0, 1)
    results = json.loads(report.read_text())["variants"]
    assert results["fp32"]["status"] == "pass"
    assert results["fp32"]["heldout"]["examples"] == sum(1 for f in (ckpt / "heldout").rglob("*") if f.is_file())
    assert "int8-static" in stdout and "max|Δlogit|" in stdout


def test_export_refuses_bad_image_checkpoints(resnet_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resnet_ckpt, ckpt)
    (ckpt / "calibration" / "red" / "notes.txt").write_text("x")
    run_fails(["export", str(ckpt), "--output", str(tmp_path / "a"), "--variants", "fp32,int8-static", *FAST], capsys,
              "notes.txt", "not an image file")
    (ckpt / "calibration" / "red" / "notes.txt").unlink()
    (ckpt / "heldout" / "cat").mkdir()
    tiny.image("red", seed=0).save(ckpt / "heldout" / "cat" / "0.png")
    run_fails(["export", str(ckpt), "--output", str(tmp_path / "b"), *FAST], capsys, "'cat'", "not one of the model's labels")
    (ckpt / "heldout" / "cat" / "0.png").write_bytes(b"not a png")
    (ckpt / "heldout" / "cat" / "0.png").rename(ckpt / "heldout" / "red" / "bad.png")
    (ckpt / "heldout" / "cat").rmdir()
    run_fails(["export", str(ckpt), "--output", str(tmp_path / "c"), *FAST], capsys, "bad.png", "not an image")
    assert not (tmp_path / "c").exists()


def test_bench_times_pytorch_and_each_variant_on_images(exported, tmp_path, capsys):
    _, ckpt, out = exported
    report = tmp_path / "bench"
    rc, stdout, _ = run(["bench", str(out), "--output", str(report), "--variants", "fp32,int8-static", "--batch-sizes", "1,4",
                         "--images", str(ckpt / "heldout"), "--max-seconds", "0.3", "--window-seconds", "0.05", "--quiet",
                         "--threads", "1"], capsys)
    assert rc == 0
    results = json.loads((report / "bench.json").read_text())["results"]
    cells = sorted((r["engine"], r["batch_size"], r["seq_length"]) for r in results)
    size = f"{fixtures.IMAGE_SIZE}x{fixtures.IMAGE_SIZE}"
    from runtime.hardware import read_cpu

    pytorch = ("pytorch-fp32-cpu", "pytorch-bf16-cpu") if read_cpu().has("bf16") else ("pytorch-fp32-cpu",)
    assert cells == sorted((e, b, size) for e in (*pytorch, "onnx-fp32-cpu", "onnx-int8-static-cpu") for b in (1, 4))
    assert all(r["sequences_per_s"] > 0 for r in results)
    run_fails(["bench", str(out), "--output", str(tmp_path / "b2"), "--texts", str(ckpt / "heldout")], capsys,
              "--texts", f"{IMAGE_TASK} artifact")


@pytest.mark.parametrize("agreements,n_convs,want_k,want_tried", [
    ({0: 0.98, 1: 0.985, 2: 0.995, 4: 1.0}, 49, 2, [0, 1, 2]),  # the first k that reaches the gate
    ({0: 0.95, 1: 0.97, 2: 0.97, 4: 0.96, 8: 0.9}, 49, 1, [0, 1, 2, 4, 8]),  # none does: the best, smallest k
    ({0: 0.5, 1: 0.6}, 1, 1, [0, 1]),  # never more convolutions than the graph has
])
def test_choose_fp32_convs(agreements, n_convs, want_k, want_tried):
    from export.image import choose_fp32_convs

    written = []
    k, tried = choose_fp32_convs(written.append, agreements.__getitem__, [f"conv{i}" for i in range(n_convs)], 0.99)
    assert k == want_k and written == want_tried and [t["fp32_convs"] for t in tried] == want_tried
    assert [t["agreement"] for t in tried] == [agreements[t] for t in want_tried]
