"""Tiny models and data built inside the tests: nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
VOCAB = ASSETS / "vocab.txt"

TOPICS = {
    "sport": "match team goal player score win league coach game".split(),
    "tech": "computer software chip phone internet code data network cloud robot app".split(),
    "food": "pasta bread soup cheese recipe kitchen cook flavor dinner salad pizza".split(),
}
FILLER = "the a an of to and in is was it on for with by at this that from good bad new old great small big very really today yesterday".split()


def tokenizer():
    """A WordPiece tokenizer over the committed tiny vocabulary."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(VOCAB), do_lower_case=True, model_max_length=64)


def base_model(path: Path, arch: str = "bert", layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random base model and its tokenizer to ``path`` (a local HF directory)."""
    import torch
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    tok = tokenizer()
    if arch == "bert":
        config = BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )
        model = BertModel(config)
    elif arch == "distilbert":
        config = DistilBertConfig(
            vocab_size=tok.vocab_size, dim=32, n_layers=layers, n_heads=2, hidden_dim=64, max_position_embeddings=128
        )
        model = DistilBertModel(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def texts(n_per_class: int = 20, seed: int = 0, topics: dict[str, list[str]] = TOPICS) -> list[tuple[str, str]]:
    """(text, label) pairs that a tiny model can learn: each text mixes its topic's words with filler."""
    rng = random.Random(seed)
    rows = []
    for label, words in topics.items():
        for _ in range(n_per_class):
            n = rng.randint(4, 14)
            tokens = [rng.choice(words) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(n)]
            tokens[rng.randrange(n)] = rng.choice(words)
            rows.append((" ".join(tokens), label))
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], text_column: str = "text", label_column: str = "label") -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([text_column, label_column])
        w.writerows(rows)
    return path


# Images: three classes a tiny model tells apart (a dominant colour and a stripe direction each).
IMAGE_CLASSES = {"red": ((200, 40, 40), "h"), "green": ((40, 180, 60), "v"), "blue": ((40, 60, 200), "d")}


def image(label: str, size: int = 20, seed: int = 0):
    """One noisy PIL image of class ``label``."""
    import numpy as np
    from PIL import Image

    colour, stripes = IMAGE_CLASSES[label]
    rng = np.random.default_rng(seed)
    a = np.empty((size, size, 3), dtype=np.float64)
    a[:] = colour
    y, x = np.mgrid[0:size, 0:size]
    mask = {"h": y % 4 < 2, "v": x % 4 < 2, "d": (x + y) % 4 < 2}[stripes]
    a[mask] *= 0.5
    a += rng.normal(0, 12, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def image_folder(path: Path, per_class: int = 12, size: int = 20, seed: int = 0) -> Path:
    """Write ``path/<label>/<n>.png`` for the three image classes."""
    for k, label in enumerate(IMAGE_CLASSES):
        d = path / label
        d.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            image(label, size, seed * 1000 + k * 100 + n).save(d / f"{n}.png")
    return path


def image_model(path: Path, arch: str = "effnet", seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random image-classification base model (resnet, vit or effnet) to ``path``."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    from finetune.efficientnet_lite import EfficientNetLiteForImageClassification

    torch.manual_seed(seed)
    if arch == "resnet":
        model = ResNetForImageClassification(ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5))
    elif arch == "vit":
        model = ViTForImageClassification(ViTConfig(
            image_size=image_size, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=5))
    elif arch == "effnet":
        model = EfficientNetLiteForImageClassification(tiny_effnet_config(image_size))
    else:
        raise ValueError(arch)
    model.save_pretrained(path, safe_serialization=True)
    return path


def tiny_effnet_config(image_size: int = 32, num_labels: int = 5):
    from finetune.efficientnet_lite import EfficientNetLiteConfig

    return EfficientNetLiteConfig(
        image_size=image_size, stem_channels=8, head_channels=32, channels=(8, 12, 16), repeats=(1, 2, 1),
        kernels=(3, 5, 3), strides=(1, 2, 2), expand_ratios=(1, 2, 2), num_labels=num_labels)
