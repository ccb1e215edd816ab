"""What a request may be: the bodies of POST /classify and POST /classify-image, read and checked.

``POST /classify`` takes ``application/json`` ``{"texts": ["...", ...], "return_all_scores": false}``.

``POST /classify-image`` takes either

- ``multipart/form-data`` with one or more image files in the field ``images`` (and an
  optional field ``return_all_scores`` = ``true``/``false``), or
- ``application/json`` ``{"images": ["<base64>", ...], "return_all_scores": false}``.

Both answer ``{"results": [{"label", "score", "scores"?}, ...]}`` in request order (serve/service.py).
A body is read under its endpoint's cap and parsed as it is checked (serve/body.py). Each refusal
is a :class:`~serve.body.RequestError`, which the service answers as a one-line JSON error, never a 500:

- 400: empty request, bad JSON (a number of more than 4300 digits included), a bad key or
  type, a text that is not valid Unicode, bad base64 (whitespace inside base64 is allowed:
  ``base64 FILE`` wraps at 76 columns);
- 413: more than ``max_texts`` texts or ``max_images`` images, a text over ``max_chars``
  characters, an image over ``max_image_bytes`` bytes or over ``max_image_pixels`` pixels (a
  decompression bomb), a body over the limit;
- 415: an image request in a content type other than multipart/form-data or application/json;
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
from http import HTTPStatus
from typing import Any

import numpy as np

from ferry.errors import DataError
from runtime.pixels import TooManyPixels, open_image, preprocess
from serve.body import WHOLE_BYTES, RequestError, Scalar, Strings, json_problem, parse_object, read_body

TEXT_KEYS = ("texts", "return_all_scores")
TEXT_EXAMPLE = '{"texts": ["..."]}'
IMAGE_KEYS = ("images", "return_all_scores")
IMAGE_EXAMPLE = '{"images": ["<base64>", ...]}'
# Whitespace is allowed anywhere in base64 (RFC 2045 line breaks, `base64 FILE`'s 76 columns).
B64_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")
MULTIPART_CHUNK = 1 << 20


def loads(body: bytes, example: str) -> Any:
    """A small body parsed whole by ``json.loads``; 400 naming what is wrong with it."""
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, "body is nested too deeply to be a request") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and a number of more than 4300 digits
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({json_problem(e)}); send {example}") from None


# --- texts ----------------------------------------------------------------------------------


async def read_texts(request: Any, cap: int, max_texts: int, max_chars: int) -> tuple[list[str], bool]:
    """The texts and return_all_scores of a /classify request, its body read under ``cap`` bytes."""
    return await parse_texts(await read_body(request, cap), max_texts, max_chars)


async def parse_texts(body: bytes, max_texts: int, max_chars: int) -> tuple[list[str], bool]:
    """A /classify body: parsed whole when small, else as it is checked (serve/body.py)."""
    if len(body) <= WHOLE_BYTES:
        return check_texts(loads(body, TEXT_EXAMPLE), max_texts, max_chars)
    schema = {
        "texts": Strings(
            max_texts, max_chars * 6,  # every character as a 6-byte \uXXXX escape
            lambda key: f"'{key}' has over {max_texts} items, more than the limit of {max_texts} per request; split it",
            lambda key, i: f"{key}[{i}] has more characters than the limit of {max_chars}",
        ),
        "return_all_scores": Scalar(),
    }
    return check_texts(await parse_object(body, schema, TEXT_EXAMPLE), max_texts, max_chars)


def check_texts(data: Any, max_texts: int, max_chars: int) -> tuple[list[str], bool]:
    """The texts and return_all_scores of a parsed /classify body."""
    if not isinstance(data, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object like {{\"texts\": [...]}}, got {type(data).__name__}")
    unknown = [k for k in data if k not in TEXT_KEYS]
    if "texts" not in data:
        got = f" (got: {', '.join(repr(k[:100]) for k in unknown[:5])})" if unknown else ""
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'texts' is missing{got}; send {{\"texts\": [\"...\"]}}")
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown key {unknown[0][:100]!r}; keys are: {', '.join(TEXT_KEYS)}")
    texts = data["texts"]
    if not isinstance(texts, list):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'texts' must be a list of strings, got {_kind(texts)}")
    if not texts:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'texts' is empty; send at least one text")
    if len(texts) > max_texts:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"'texts' has {len(texts)} items, more than the limit of {max_texts} per request; split it",
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"texts[{i}] must be a string, got {_kind(text)}")
        if len(text) > max_chars:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"texts[{i}] has {len(text)} characters, more than the limit of {max_chars}",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape: the tokenizer would fail the whole batch
            raise RequestError(HTTPStatus.BAD_REQUEST, f"texts[{i}] is not valid Unicode (a lone surrogate such as \\ud800)") from None
    return_all = data.get("return_all_scores", False)
    if not isinstance(return_all, bool):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'return_all_scores' must be true or false, got {_kind(return_all)}")
    return texts, return_all


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# --- images ---------------------------------------------------------------------------------


async def read_images(request: Any, cap: int, max_images: int, max_image_bytes: int) -> tuple[list[bytes], bool]:
    """The image bytes and return_all_scores of a /classify-image request (multipart or JSON), its
    body read under ``cap`` bytes once its content type is one of the two."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"content type '{kind[:100] or 'none'}': send multipart/form-data with 'images' files, or application/json "
            + IMAGE_EXAMPLE,
        )
    body = await read_body(request, cap)
    if kind == "multipart/form-data":
        return await parse_multipart(request.headers, body, max_images, max_image_bytes)
    return await parse_json_body(body, max_images, max_image_bytes)


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise RequestError(HTTPStatus.BAD_REQUEST, f"'{where}' must be true or false, got {value!r}"[:200])


def parse_json(body: bytes, max_images: int, max_image_bytes: int) -> tuple[list[bytes], bool]:
    """The image bytes and return_all_scores of a small JSON body, parsed whole."""
    return images_from(loads(body, IMAGE_EXAMPLE), max_images, max_image_bytes)


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
    return images_from(await parse_object(body, schema, IMAGE_EXAMPLE), max_images, max_image_bytes)


def images_from(data: Any, max_images: int, max_image_bytes: int) -> tuple[list[bytes], bool]:
    """The image bytes and return_all_scores of a parsed JSON body."""
    if not isinstance(data, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object like {IMAGE_EXAMPLE}")
    unknown = [k for k in data if k not in IMAGE_KEYS]
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown key {unknown[0][:100]!r}; keys are: {', '.join(IMAGE_KEYS)}")
    images = data.get("images")
    if not isinstance(images, list):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'images' must be a list of base64 strings")
    check_count(len(images), max_images)
    out = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"images[{i}] must be a base64 string, got {type(item).__name__}")
        if item.startswith("data:") and "," in item:  # a data URL: keep its payload
            item = item.split(",", 1)[1]
        item = item.translate(B64_WHITESPACE)  # `base64 FILE` wraps its output at 76 columns
        if len(item) > (max_image_bytes + 2) // 3 * 4:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"images[{i}] is over the limit of {max_image_bytes} bytes")
        try:
            raw = base64.b64decode(item, validate=True)  # anything but the alphabet and padding is refused
        except (binascii.Error, ValueError):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"images[{i}] is not valid base64") from None
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
        raise RequestError(HTTPStatus.BAD_REQUEST, f"bad multipart body ({e.message})") from None
    except (ValueError, TypeError, LookupError, AssertionError) as e:  # python-multipart on a hostile boundary or header
        raise RequestError(HTTPStatus.BAD_REQUEST, f"bad multipart body ({type(e).__name__}: {str(e)[:100]})") from None
    unknown = [k for k in form.keys() if k not in IMAGE_KEYS]
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0][:100]!r}; fields are: {', '.join(IMAGE_KEYS)}")
    files = form.getlist("images")
    check_count(len(files), max_images)
    out = []
    for i, f in enumerate(files):
        if not isinstance(f, UploadFile):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"images[{i}] must be a file part, not a text field")
        out.append(check_bytes(await f.read(), f"images[{i}] ({f.filename})", max_image_bytes))
    flag = form.get("return_all_scores", "false")
    return out, _bool(flag if isinstance(flag, str) else "", "return_all_scores")


def check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise RequestError(HTTPStatus.BAD_REQUEST, "no images; send at least one in 'images'")
    if n > max_images:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{n} images, more than the limit of {max_images} per request; split it")


def check_bytes(raw: bytes, where: str, max_image_bytes: int) -> bytes:
    if not raw:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{where} is empty")
    if len(raw) > max_image_bytes:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{where} has {len(raw)} bytes, more than the limit of {max_image_bytes}")
    return raw


def decode(raw: bytes, where: str, processor: dict[str, Any], max_pixels: int) -> np.ndarray:
    """One image's pixels ``[3, H, W]``; 413 past ``max_pixels`` (a decompression bomb, refused from
    the header before decoding), 422 for bytes that are not an image in an accepted format."""
    try:
        img = open_image(raw, where, max_pixels)
    except TooManyPixels as e:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e)) from None
    except DataError as e:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
    return preprocess([img], processor)[0]
