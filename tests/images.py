"""Tiny image checkpoints written by the real `ferry finetune --task image-classification`
(tiny models and images from tests/tiny.py; nothing is downloaded)."""

from __future__ import annotations

import io
from pathlib import Path

from tests import tiny

LABELS = sorted(tiny.IMAGE_CLASSES)
SIZE = 32  # the square side the tiny models are trained at
FINETUNE = ["--task", "image-classification", "--epochs", "3", "--batch-size", "8", "--learning-rate", "1e-2",
            "--image-size", str(SIZE), "--calibration-samples", "6", "--patience", "0", "--freeze", "none", "--quiet"]


def picture(label: str, seed: int, size: int = 20, mode: str = "RGB"):
    """One PIL image of class ``label`` (tests/tiny.py's), converted to ``mode``."""
    img = tiny.image(label, size, seed)
    return img.convert(mode) if mode != "RGB" else img


def png_bytes(img, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_checkpoint(path: Path, arch: str) -> Path:
    """`ferry finetune --task image-classification` of a tiny ``arch`` (resnet: the tiny CNN; vit) on tiny images."""
    from ferry.cli import main

    base = tiny.image_model(path.parent / f"{path.name}-base", arch, image_size=SIZE)
    data = tiny.image_folder(path.parent / f"{path.name}-data", per_class=12)
    rc = main(["finetune", "--model", str(base), "--train", str(data), "--output", str(path), *FINETUNE])
    assert rc == 0, "ferry finetune failed on the tiny image data"
    return path
