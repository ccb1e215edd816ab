"""Serving an image-classification artifact: request parsing, validation and the runtime.

``POST /classify-image`` takes either

- ``multipart/form-data`` with one or more image files in the field ``images`` (and an
  optional field ``return_all_scores`` = ``true``/``false``), or
- ``application/json`` ``{"images": ["<base64>", ...], "return_all_scores": false}``;

and answers ``{"results": [{"label", "score", "scores"?}, ...]}`` in request order.

Validation, each a one-line JSON error, never a 500:

- 400: empty request, bad JSON (a number of more than 4300 digits included), a bad key or
  type, bad base64 (whitespace inside base64 is allowed: ``base64 FILE`` wraps at 76 columns);
- 413: more than ``max_images`` images, an image over ``max_image_bytes`` bytes or over
  ``max_image_pixels`` pixels (a decompression bomb), a body over the limit;
- 415: a content type other than multipart/form-data or application/json;
- 422: bytes that are not a decodable image in an accepted format (PNG, JPEG, BMP, GIF,
  WebP, TIFF, PPM/PGM: ``runtime.pixels.FORMATS``; EPS and the rest are never opened), truncated
  or corrupt: the request is well formed, its content cannot be processed.

Images are opened and preprocessed by ``runtime.pixels.open_image`` and ``preprocess``
(the implementation training and export parity use); no PyTorch on this path.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import Artifact, check_valid_artifact_dir
from runtime.engines import available_providers
from ferry.errors import ArtifactError, DataError
from runtime.predictor import VariantSession, softmax

TASK = "image-classification"
KEYS = ("images", "return_all_scores")
# Whitespace is allowed anywhere in base64 (RFC 2045 line breaks, `base64 FILE`'s 76 columns).
B64_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")


def json_problem(e: ValueError) -> str:
    """What is wrong with a body ``json.loads`` refused, in a few words without a traceback."""
    if isinstance(e, json.JSONDecodeError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8: byte {e.start}"
    if "digits" in str(e):  # Python refuses integers of more than 4300 digits (sys.int_info)
        return "a number has more than 4300 digits"
    return type(e).__name__


class ImageRequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"'{where}' must be true or false, got {value!r}"[:200])


def parse_json(body: bytes, max_images: int, max_image_bytes: int) -> tuple[list[bytes], bool]:
    """The image bytes and return_all_scores of a JSON body."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, "body is nested too deeply to be a request") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and a number of more than 4300 digits
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f'body is not valid JSON ({json_problem(e)}); send {{"images": ["<base64>", ...]}}') from None
    if not isinstance(data, dict):
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, 'body must be a JSON object like {"images": ["<base64>", ...]}')
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"unknown key '{unknown[0]}'; keys are: {', '.join(KEYS)}")
    images = data.get("images")
    if not isinstance(images, list):
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, "'images' must be a list of base64 strings")
    check_count(len(images), max_images)
    out = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"images[{i}] must be a base64 string, got {type(item).__name__}")
        if item.startswith("data:") and "," in item:  # a data URL: keep its payload
            item = item.split(",", 1)[1]
        item = item.translate(B64_WHITESPACE)  # `base64 FILE` wraps its output at 76 columns
        if len(item) > (max_image_bytes + 2) // 3 * 4:
            raise ImageRequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"images[{i}] is over the limit of {max_image_bytes} bytes")
        try:
            raw = base64.b64decode(item, validate=True)  # anything but the alphabet and padding is refused
        except (binascii.Error, ValueError):
            raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"images[{i}] is not valid base64") from None
        out.append(check_bytes(raw, f"images[{i}]", max_image_bytes))
    return out, _bool(data.get("return_all_scores", False), "return_all_scores")


async def parse_multipart(headers: Any, body: bytes, max_images: int, max_image_bytes: int) -> tuple[list[bytes], bool]:
    """The files of the ``images`` field and return_all_scores of a multipart body."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=max_images + 1, max_fields=16).parse()
    except MultiPartException as e:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"bad multipart body ({e.message})") from None
    unknown = [k for k in form.keys() if k not in KEYS]
    if unknown:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"unknown field '{unknown[0]}'; fields are: {', '.join(KEYS)}")
    files = form.getlist("images")
    check_count(len(files), max_images)
    out = []
    for i, f in enumerate(files):
        if not isinstance(f, UploadFile):
            raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"images[{i}] must be a file part, not a text field")
        out.append(check_bytes(await f.read(), f"images[{i}] ({f.filename})", max_image_bytes))
    flag = form.get("return_all_scores", "false")
    return out, _bool(flag if isinstance(flag, str) else "", "return_all_scores")


def check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, "no images; send at least one in 'images'")
    if n > max_images:
        raise ImageRequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{n} images, more than the limit of {max_images} per request; split it")


def check_bytes(raw: bytes, where: str, max_image_bytes: int) -> bytes:
    if not raw:
        raise ImageRequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{where} is empty")
    if len(raw) > max_image_bytes:
        raise ImageRequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{where} has {len(raw)} bytes, more than the limit of {max_image_bytes}")
    return raw


def decode(raw: bytes, where: str, processor: dict[str, Any], max_pixels: int) -> np.ndarray:
    """One image's pixels ``[3, H, W]``; 413 past ``max_pixels`` (a decompression bomb, refused from
    the header before decoding), 422 for bytes that are not an image in an accepted format."""
    from runtime.pixels import TooManyPixels, open_image, preprocess

    try:
        img = open_image(raw, where, max_pixels)
    except TooManyPixels as e:
        raise ImageRequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e)) from None
    except DataError as e:
        raise ImageRequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
    return preprocess([img], processor)[0]


class ImageRuntime(VariantSession):
    """preprocessor_config.json + an engine for one image artifact variant.

    The same roles as :class:`runtime.predictor.Runtime` (variant choice, sha256 check, device
    fallback, batch invariance, /info) for ``pixel_values`` inputs.
    """

    def __init__(
        self, artifact: str | Path | Artifact, variant: str | None = None, device: str = "auto", threads: int | None = None,
        optimization: str = "all", max_group: int | None = None, enforce_invariance: bool = True,
    ):
        from runtime.pixels import load_processor

        self.artifact = artifact if isinstance(artifact, Artifact) else check_valid_artifact_dir(artifact)
        if self.artifact.task != TASK:
            raise ArtifactError(f"{self.artifact.path}: a {self.artifact.task} artifact, not an image-classification one")
        self.threads, self.optimization, self.max_group = threads, optimization, max_group
        self.labels = self.artifact.labels
        try:
            self.processor = load_processor(self.artifact.path)
        except DataError as e:
            raise ArtifactError(str(e)) from None
        self._open_variant(variant, device, available_providers(), None)
        names = list(self.engine.input_names)
        if names != ["pixel_values"]:
            raise ArtifactError(f"{self.variant.path}: model inputs {names} are not ['pixel_values']")
        self.batch_invariant_variant: bool | None = self.variant.info.get("batch_invariant")
        self.one_per_run = enforce_invariance and self.batch_invariant_variant is False
        self._ready = threading.Event()

    def decode(self, raw: bytes, where: str, max_pixels: int) -> np.ndarray:
        return decode(raw, where, self.processor, max_pixels)

    def run_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, labels]`` for ``pixels`` ``[N, 3, H, W]``."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        step = 1 if self.one_per_run else (self.max_group or len(pixels))
        out = []
        for start in range(0, len(pixels), step):
            out.append(softmax(self.engine.run({"pixel_values": pixels[start : start + step]})))
        return np.concatenate(out)

    def format(self, probs: np.ndarray, return_all_scores: bool = False) -> dict[str, Any]:
        best = int(np.argmax(probs))
        out: dict[str, Any] = {"label": self.labels[best], "score": float(probs[best])}
        if return_all_scores:
            out["scores"] = {label: float(p) for label, p in zip(self.labels, probs)}
        return out

    @property
    def batch_invariance(self) -> str:
        if self.batch_invariant_variant is False:
            return "enforced: one image per inference call" if self.one_per_run else "not guaranteed (batch-dependent variant served batched)"
        return "variant is batch-invariant" if self.batch_invariant_variant else "not measured"

    def describe(self) -> str:
        fb = f" ({self.fallback})" if self.fallback else ""
        return (f"serving {self.artifact.path} (image-classification) variant '{self.variant.name}' "
                f"({self.variant.info.get('precision', '?')}, parity {self.variant.status}) on {self.provider}{fb}")

    def info(self) -> dict[str, Any]:
        m = self.artifact.manifest
        return {
            "model": {"artifact": str(self.artifact.path), "model_type": (m.get("source") or {}).get("model_type"),
                      "source_checkpoint": (m.get("source") or {}).get("checkpoint"), "task": TASK},
            "labels": self.labels,
            "image_size": m.get("image_size"),
            **self.variant_info(),
            "batch_invariance": self.batch_invariance,
            "ready": self.ready,
        }

    def warm_up(self) -> None:
        size = self.artifact.manifest.get("image_size") or {}
        self.run_pixels(np.zeros((2, 3, int(size.get("height", 224)), int(size.get("width", 224))), dtype=np.float32))
        self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()
