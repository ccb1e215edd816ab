"""Images for serving and for the model: open one image, convert it to RGB, preprocess it.

Torch-free (PIL and numpy only): :func:`preprocess` is THE one implementation of resize +
rescale + normalize that training, evaluation, export parity and serving all use, so they agree,
and :func:`load_pixels` the one way image files become a batch of pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ferry.errors import DataError, first_line
from ferry.files import read_json_object

PROCESSOR_FILE = "preprocessor_config.json"
# A 16-bit image is brought to 8 bits by dividing by 257 (65535 -> 255), the exact inverse of 8 -> 16 bit.
MAX_PIXELS = 50_000_000
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers writes ``resample``


# The formats a served or trained image may be in: PIL opens nothing else, so a PostScript/EPS
# upload never reaches Ghostscript and no rarely used decoder sees untrusted bytes. PIL's "PPM"
# reader is the Netpbm one (PBM, PGM, PPM).
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
ACCEPTED = "PNG, JPEG, BMP, GIF, WebP, TIFF, PPM/PGM"


class TooManyPixels(DataError):
    """An image with more pixels than allowed (a decompression bomb); a server answers 413."""


def open_image(source: str | Path | bytes, where: str, max_pixels: int = MAX_PIXELS) -> Any:
    """Open and fully decode one image, converted to 8-bit RGB.

    Only the :data:`FORMATS` are opened. Conversion, one documented way: grayscale and palette
    are expanded to RGB; an alpha channel (RGBA, LA, or a palette with transparency) is
    composited onto white; CMYK and YCbCr go through PIL's RGB conversion; 16-bit and 32-bit
    integer images are scaled to 8 bits (value / 257, clipped); float images are clipped to 0..255.

    Raises:
        TooManyPixels: more than ``max_pixels`` pixels, or more than PIL itself opens
            (``DecompressionBombError``, which is not an OSError), named by ``where``.
        DataError: naming ``where`` for bytes that are not an image in an accepted format, or a
            truncated or damaged one.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, formats=list(FORMATS))
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image in an accepted format ({ACCEPTED})") from None
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"{where}: too many pixels, refused as a decompression bomb ({e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot open the image ({first_line(e)})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise TooManyPixels(f"{where}: {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    try:
        img.load()
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"{where}: too many pixels, refused as a decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - a decoder fed damaged bytes raises many types (EOFError, struct.error, ...)
        raise DataError(f"{where}: cannot decode the image ({first_line(e)}); the file may be truncated or damaged") from None




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
    return check_processor(read_json_object(p, missing, error=DataError), p)


def processor_from_bytes(data: bytes, where: str | Path) -> dict[str, Any]:
    """The checked preprocessor config whose file content is ``data`` (bytes already read and verified)."""
    import json

    try:
        proc = json.loads(data)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(proc, dict):
        raise DataError(f"{where}: expected a JSON object")
    return check_processor(proc, where)


def check_processor(proc: dict[str, Any], p: str | Path) -> dict[str, Any]:
    """``proc`` (a parsed preprocessor_config.json at ``p``) checked for what :func:`preprocess` needs."""
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


def load_pixels(paths: Sequence[str | Path], processor: dict[str, Any], chunk: int = 256) -> np.ndarray:
    """Decode and preprocess image files into one float32 array ``[N, 3, H, W]``, ``chunk`` images
    at a time (bounded PIL memory: decode, preprocess, drop the images).

    Raises:
        DataError: naming the first file that is not an image in an accepted format.
    """
    parts = [preprocess([open_image(p, str(p)) for p in paths[start : start + chunk]], processor)
             for start in range(0, len(paths), chunk)]
    if not parts:
        size = processor.get("size") or {}
        return np.zeros((0, 3, int(size.get("height", 0)), int(size.get("width", 0))), dtype=np.float32)
    return np.concatenate(parts)
