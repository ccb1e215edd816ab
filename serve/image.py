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

import asyncio
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
from ferry.tasks import IMAGE_TASK
from ferry.errors import ArtifactError, DataError
from serve.body import WHOLE_BYTES, RequestError, Scalar, Strings, json_problem, parse_object
from runtime.engines import softmax
from runtime.predictor import VariantSession

TASK = IMAGE_TASK
KEYS = ("images", "return_all_scores")
EXAMPLE = '{"images": ["<base64>", ...]}'
# Whitespace is allowed anywhere in base64 (RFC 2045 line breaks, `base64 FILE`'s 76 columns).
B64_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")


ImageRequestError = RequestError  # a request the server refuses, with its HTTP status
MULTIPART_CHUNK = 1 << 20


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"'{where}' must be true or false, got {value!r}"[:200])


def parse_json(body: bytes, max_images: int, max_image_bytes: int) -> tuple[list[bytes], bool]:
    """The image bytes and return_all_scores of a small JSON body, parsed whole."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, "body is nested too deeply to be a request") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and a number of more than 4300 digits
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({json_problem(e)}); send {EXAMPLE}") from None
    return images_from(data, max_images, max_image_bytes)


async def parse_json_body(body: bytes, max_images: int, max_image_bytes: int) -> tuple[list[bytes], bool]:
    """A JSON body: parsed whole when small, else as it is checked (serve/body.py)."""
    if len(body) <= WHOLE_BYTES:
        return parse_json(body, max_images, max_image_bytes)
    b64 = (max_image_bytes + 2) // 3 * 4
    schema = {
        # room for line breaks and escapes in the JSON string; the exact 413 comes after whitespace is dropped
        "images": Strings(max_images, 2 * b64 + 1024,
                          lambda key: f"over {max_images} images, more than the limit of {max_images} per request; split it",
                          lambda key, i: f"images[{i}] is over the limit of {max_image_bytes} bytes"),
        "return_all_scores": Scalar(),
    }
    return images_from(await parse_object(body, schema, EXAMPLE), max_images, max_image_bytes)


def images_from(data: Any, max_images: int, max_image_bytes: int) -> tuple[list[bytes], bool]:
    """The image bytes and return_all_scores of a parsed JSON body."""
    if not isinstance(data, dict):
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, 'body must be a JSON object like {"images": ["<base64>", ...]}')
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"unknown key {unknown[0][:100]!r}; keys are: {', '.join(KEYS)}")
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
        # in slices, letting the event loop serve others between them: the parser is pure Python
        for start in range(0, len(body), MULTIPART_CHUNK):
            yield body[start : start + MULTIPART_CHUNK]
            await asyncio.sleep(0)

    try:
        form = await MultiPartParser(headers, stream(), max_files=max_images + 1, max_fields=16).parse()
    except MultiPartException as e:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"bad multipart body ({e.message})") from None
    except (ValueError, TypeError, LookupError, AssertionError) as e:  # python-multipart on a hostile boundary or header
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"bad multipart body ({type(e).__name__}: {str(e)[:100]})") from None
    unknown = [k for k in form.keys() if k not in KEYS]
    if unknown:
        raise ImageRequestError(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0][:100]!r}; fields are: {', '.join(KEYS)}")
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
        from runtime.pixels import PROCESSOR_FILE, processor_from_bytes

        self.artifact = artifact if isinstance(artifact, Artifact) else check_valid_artifact_dir(artifact)
        if self.artifact.task != TASK:
            raise ArtifactError(f"{self.artifact.path}: a {self.artifact.task} artifact, not an image-classification one")
        self.threads, self.optimization, self.max_group = threads, optimization, max_group
        self.labels = self.artifact.labels
        if not (self.artifact.path / PROCESSOR_FILE).is_file():
            raise ArtifactError(f"{self.artifact.path / PROCESSOR_FILE}: no such file; an image artifact needs its {PROCESSOR_FILE}")
        try:  # from the bytes checked against the manifest's files map
            self.processor = processor_from_bytes(self.artifact.read_verified(PROCESSOR_FILE), self.artifact.path / PROCESSOR_FILE)
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
