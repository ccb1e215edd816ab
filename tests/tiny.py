"""Tiny data built inside the tests (texts, CSV files, images): nothing is downloaded. The tiny
models and checkpoints that learn from it are built in tests/fixtures.py."""

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
LABELS = sorted(TOPICS)
FILLER = "the a an of to and in is was it on for with by at this that from good bad new old great small big very really today yesterday".split()


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
IMAGE_LABELS = sorted(IMAGE_CLASSES)


def image(label: str, size: int = 20, seed: int = 0, mode: str = "RGB"):
    """One noisy PIL image of class ``label``, converted to ``mode``."""
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
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB").convert(mode)


def png_bytes(img, fmt: str = "PNG") -> bytes:
    """``img`` encoded as ``fmt``."""
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def image_folder(path: Path, per_class: int = 12, size: int = 20, seed: int = 0) -> Path:
    """Write ``path/<label>/<n>.png`` for the three image classes."""
    for k, label in enumerate(IMAGE_CLASSES):
        d = path / label
        d.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            image(label, size, seed * 1000 + k * 100 + n).save(d / f"{n}.png")
    return path
