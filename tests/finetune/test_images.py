"""Images: the folder/CSV readers, open_image, preprocess, EfficientNet-Lite, the image checkpoint."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferry.errors import CheckpointError, DataError
from ferry.tasks import IMAGE_TASK
from finetune import checkpoint as ck
from finetune import images
from runtime import pixels
from tests import fixtures, tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny.image_folder(tmp_path_factory.mktemp("imgs") / "data", per_class=4)


# --- the image folder and the CSV ----------------------------------------------------------------

def test_read_image_folder(folder):
    files, labels = images.read_image_folder(folder)
    assert len(files) == 12 and labels.count("red") == 4
    assert sorted(set(labels)) == ["blue", "green", "red"]


def test_read_image_folder_errors(tmp_path, folder):
    with pytest.raises(DataError, match="no such directory"):
        images.read_image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        images.read_image_folder(tmp_path / "flat")
    bad = shutil.copytree(folder, tmp_path / "bad")
    (bad / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*empty class folder"):
        images.read_image_folder(bad)
    (bad / "empty").rmdir()
    (bad / "red" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"notes\.txt: not an image file"):
        images.read_image_folder(bad)


def test_load_labelled_images_csv_paths_relative_to_the_csv(tmp_path, folder):
    files, labels = images.read_image_folder(folder)
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{f.relative_to(folder.parent)},{y}\n" for f, y in zip(files, labels)))
    shutil.copytree(folder, tmp_path / folder.name)
    ex = images.load_labelled_images(str(csv), image_column="path")
    assert ex.labels == labels
    assert ex.texts[0] == str((tmp_path / files[0].relative_to(folder.parent)).resolve())
    with pytest.raises(DataError, match="'image' not in list.csv; columns are: path, label"):
        images.load_labelled_images(str(csv))
    csv.write_text("path,label\ndata/red/0.png,red\ndata/red/missing.png,red\n")
    with pytest.raises(DataError, match=r"row 3, column 'path': data/red/missing.png does not exist"):
        images.load_labelled_images(str(csv), image_column="path")
    with pytest.raises(DataError, match="file not found"):
        images.load_labelled_images(str(tmp_path / "none.csv"))


@pytest.mark.parametrize("label", ["../../escaped", "/tmp/abs", "a/b", "a\\b", ".", "..", ".hidden", "nul\x00byte",
                                   "x" * 300])
def test_image_labels_that_are_not_folder_names_are_refused(tmp_path, folder, label):
    """Image labels become folder names in the checkpoint (heldout/<label>/...): nothing may escape it."""
    import csv as csv_mod

    shutil.copytree(folder, tmp_path / folder.name)
    path = tmp_path / "list.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv_mod.writer(f)
        w.writerows([["path", "label"], ["data/red/0.png", "red"], ["data/red/1.png", label]])
    with pytest.raises(DataError, match=r"list\.csv: row 3, column 'label': label .* cannot be a folder name"):
        images.load_labelled_images(str(path), image_column="path")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"image": "data/red/0.png", "label": label}) + "\n")
    with pytest.raises(DataError, match="cannot be a folder name"):
        images.load_labelled_images(str(jsonl))
    # and the writer refuses them too, whatever the caller
    from finetune.data import Examples

    with pytest.raises(DataError, match="cannot be a folder name"):
        images.copy_image_tree(Examples([str(folder / "red" / "0.png")], [label]), tmp_path / "out" / "heldout")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


# --- open_image -------------------------------------------------------------------------------------

def test_open_image_rejects_bad_files(tmp_path):
    with pytest.raises(DataError, match="up.txt: not an image"):
        pixels.open_image(b"plain text", "up.txt")
    data = tiny.png_bytes(tiny.image("red", 64))
    with pytest.raises(DataError, match="cut.png: cannot (decode|open)"):
        pixels.open_image(data[: len(data) // 2], "cut.png")
    with pytest.raises(DataError, match="big.png: 64x64 = 4096 pixels, more than the limit of 1000"):
        pixels.open_image(data, "big.png", max_pixels=1000)


def test_open_image_converts_modes_to_rgb():
    gray = Image.new("L", (2, 1), 100)
    assert pixels.open_image(tiny.png_bytes(gray), "g").getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (1, 1), (0, 0, 0, 0))  # fully transparent black -> white
    assert pixels.open_image(tiny.png_bytes(rgba), "a").getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert pixels.open_image(tiny.png_bytes(half), "h").getpixel((0, 0)) == (127, 127, 127)
    g16 = Image.fromarray(np.array([[65535, 257 * 10]], dtype=np.uint16))
    assert g16.mode.startswith("I")
    out = pixels.open_image(tiny.png_bytes(g16), "w")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 10, 10)
    pal = Image.new("RGB", (1, 1), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert pixels.open_image(tiny.png_bytes(pal), "p").getpixel((0, 0)) == (10, 200, 30)
    buf = io.BytesIO()
    Image.new("CMYK", (1, 1), (0, 0, 0, 0)).save(buf, format="JPEG")
    assert pixels.open_image(buf.getvalue(), "c").getpixel((0, 0))[0] > 240


# --- preprocess ---------------------------------------------------------------------------------------

def test_preprocess_matches_vit_image_processor(tmp_path):
    from transformers import ViTImageProcessor

    proc = pixels.processor_dict(24, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    imgs = [tiny.image("red", 37, 1), tiny.image("blue", 13, 2), tiny.image("green", 24, 3).resize((50, 17))]
    hf = ViTImageProcessor(**{k: v for k, v in proc.items() if k != "image_processor_type"})
    expected = hf(images=imgs, return_tensors="np")["pixel_values"]
    got = pixels.preprocess(imgs, proc)
    assert got.dtype == np.float32 and got.shape == (3, 3, 24, 24)
    assert np.abs(got - expected).max() <= 1e-5
    # The file we write is the one HF writes, and HF opens ours.
    hf.save_pretrained(tmp_path / "hf")
    theirs = json.loads((tmp_path / "hf" / pixels.PROCESSOR_FILE).read_text())
    assert {k: theirs[k] for k in proc} == proc
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / pixels.PROCESSOR_FILE).write_text(json.dumps(proc))
    reopened = ViTImageProcessor.from_pretrained(tmp_path / "ours")
    assert np.abs(reopened(images=imgs, return_tensors="np")["pixel_values"] - got).max() <= 1e-5
    assert pixels.load_processor(tmp_path / "hf")["size"] == {"height": 24, "width": 24}


def test_load_processor_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        pixels.load_processor(tmp_path)
    (tmp_path / pixels.PROCESSOR_FILE).write_text(json.dumps({"size": {"shortest_edge": 4}, "image_mean": [0.5], "image_std": [1, 1, 1]}))
    with pytest.raises(DataError, match=r"size must be .*; image_mean must be 3 numbers"):
        pixels.load_processor(tmp_path)


def test_images_module_imports_no_torch():
    code = "import sys, finetune.images; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_mnist_converter(tmp_path):
    assert images.write_mnist(tmp_path / "m", limit=30) == 30
    files, labels = images.read_image_folder(tmp_path / "m")
    assert len(files) == 30 and set(labels) <= set("0123456789") and set(labels) == set("0123456789")
    img = pixels.open_image(files[0], str(files[0]))
    a = np.asarray(img)
    assert img.size == (28, 28) and a.max() > 200 and a.min() == 0  # a real digit: ink on black


# --- EfficientNet-Lite --------------------------------------------------------------------------------

def test_lite0_pretrained_weights_load_key_for_key():
    import torch

    from finetune.efficientnet_lite import LITE0_WEIGHTS, EfficientNetLiteConfig, EfficientNetLiteForImageClassification, load_lukemelas_weights
    from ferry.files import resolve

    state = torch.load(resolve(LITE0_WEIGHTS), map_location="cpu", weights_only=True)
    model = EfficientNetLiteForImageClassification(EfficientNetLiteConfig(num_labels=1000))
    assert set(model.state_dict()) == set(state) and len(state) == 296
    load_lukemelas_weights(model, LITE0_WEIGHTS, head=True)
    assert torch.equal(model._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"])
    # ImageNet weights respond to an image: not a constant output, and a new 10-class head loads the rest.
    ten = EfficientNetLiteForImageClassification(EfficientNetLiteConfig(num_labels=10, image_size=64))
    load_lukemelas_weights(ten, LITE0_WEIGHTS)
    assert torch.equal(ten._conv_stem.weight, state["_conv_stem.weight"])
    with pytest.raises(CheckpointError, match="do not match"):
        load_lukemelas_weights(EfficientNetLiteForImageClassification(fixtures.effnet_config()), LITE0_WEIGHTS)


def test_same_padding_is_tf_same():
    from finetune.efficientnet_lite import same_pad

    assert same_pad(224, 3, 2) == (0, 1, 112)  # TF pads stride-2 convs at the bottom/right only
    assert same_pad(112, 5, 2) == (1, 2, 56)
    assert same_pad(28, 3, 1) == (1, 1, 28)
    assert same_pad(7, 5, 2) == (2, 2, 4)


def test_effnet_auto_classes_roundtrip_and_onnx(tmp_path):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForImageClassification

    from finetune.efficientnet_lite import register

    register()
    path = fixtures.image_model(tmp_path / "m", "effnet")
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    assert type(model).__name__ == "EfficientNetLiteForImageClassification"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=x).logits.numpy()
    assert ref.shape == (3, 5)
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(
        model, (x,), str(onnx_path), input_names=["pixel_values"], output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n in (3, 1, 5):
        xb = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            want = model(pixel_values=xb).logits.numpy()
        got = sess.run(None, {"pixel_values": xb.numpy()})[0]
        assert np.abs(got - want).max() < 1e-4


# --- the image checkpoint ------------------------------------------------------------------------------

def write_image_checkpoint(tmp_path: Path, folder: Path) -> Path:
    from finetune.data import Examples
    from transformers import AutoModelForImageClassification

    from finetune.efficientnet_lite import register

    register()
    model = AutoModelForImageClassification.from_pretrained(
        fixtures.image_model(tmp_path / "base", "effnet"), num_labels=3, ignore_mismatched_sizes=True,
        id2label={0: "blue", 1: "green", 2: "red"}, label2id={"blue": 0, "green": 1, "red": 2},
    )
    model.config.architectures = [type(model).__name__]
    files, labels = images.read_image_folder(folder)
    ex = Examples([str(f) for f in files], labels)
    out = tmp_path / "ckpt"
    out.mkdir()
    ck.write_checkpoint(
        out, model, pixels.processor_dict(32, [0.5] * 3, [0.5] * 3),
        {"task": ck.IMAGE, "settings": {"image_size": 32}},
        heldout=ex.subset([0, 4, 8], "test"), calibration=ex.subset([1, 5], "train"),
    )
    return out


def test_image_checkpoint_roundtrip(tmp_path, folder):
    out = write_image_checkpoint(tmp_path, folder)
    c = ck.check_valid_checkpoint_dir(out)
    assert c.task == ck.IMAGE and c.image_size == 32 and c.labels == ["blue", "green", "red"]
    assert c.heldout == out / "heldout" and sorted(p.name for p in c.heldout.iterdir()) == ["blue", "green", "red"]
    assert len(images.read_image_folder(c.heldout)[0]) == 3 and len(images.read_image_folder(c.calibration)[0]) == 2
    assert json.loads((out / "ferry.json").read_text())["task"] == IMAGE_TASK
    model = ck.load_model(c)
    assert type(model).__name__ == "EfficientNetLiteForImageClassification"
    # A plain HF image directory (no ferry.json) is an image checkpoint by its architecture.
    (out / "ferry.json").unlink()
    assert ck.check_valid_checkpoint_dir(out).task == ck.IMAGE
    (out / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        ck.check_valid_checkpoint_dir(out)
