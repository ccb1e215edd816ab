"""Tiny image checkpoints and images made inside the tests (nothing is downloaded).

Three classes a tiny model learns in a few steps: mostly red, mostly green, mostly blue
pictures with noise and a random rectangle.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

LABELS = ["blue", "green", "red"]
SIZE = 16  # the square side the tiny models see


def picture(label: str, seed: int, size: tuple[int, int] = (20, 24), mode: str = "RGB"):
    """One PIL image of class ``label`` (a noisy dominant colour and a rectangle)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    a = rng.integers(0, 90, (h, w, 3))
    a[..., {"red": 0, "green": 1, "blue": 2}[label]] += 150
    x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    a[y : y + h // 3, x : x + w // 3] = rng.integers(0, 255, 3)
    img = Image.fromarray(np.clip(a, 0, 255).astype("uint8"), "RGB")
    return img.convert(mode) if mode != "RGB" else img


def png_bytes(img, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    """A ``<label>/<n>.png`` tree."""
    for i, label in enumerate(LABELS):
        (root / label).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            picture(label, seed * 1000 + i * 100 + n).save(root / label / f"{n}.png")
    return root


def build_model(arch: str, seed: int = 0):
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {y: i for i, y in enumerate(LABELS)}}
    if arch == "resnet":  # the tiny CNN
        config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **labels)
        return ResNetForImageClassification(config)
    if arch == "vit":  # the tiny ViT
        config = ViTConfig(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, **labels)
        return ViTForImageClassification(config)
    raise ValueError(arch)


def make_checkpoint(path: Path, arch: str, steps: int = 40) -> Path:
    """An image checkpoint in the format of the image contract (what `ferry finetune --task
    image-classification` writes): HF model, preprocessor_config.json, ferry.json with the
    task, heldout/ and calibration/ image folders."""
    import torch

    from finetune.images import open_image, preprocess, processor_dict, read_image_folder

    processor = processor_dict(SIZE, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    model = build_model(arch)
    train = write_folder(path.parent / f"{path.name}-train", 8, seed=1)
    files, names = read_image_folder(train)
    x = torch.from_numpy(preprocess([open_image(f, str(f)) for f in files], processor))
    y = torch.tensor([LABELS.index(n) for n in names])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (8,), generator=g)
        model(pixel_values=x[idx], labels=y[idx]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    path.mkdir(parents=True)
    model.save_pretrained(path, safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    manifest = {"stage": "finetune", "task": "image-classification", "labels": LABELS, "settings": {"image_size": SIZE}}
    (path / "ferry.json").write_text(json.dumps(manifest), encoding="utf-8")
    write_folder(path / "heldout", 4, seed=2)
    write_folder(path / "calibration", 3, seed=3)
    return path
