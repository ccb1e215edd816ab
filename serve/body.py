"""Request bodies: read under a cap, parse JSON without letting a hostile body cost more than its checks.

A body is read only up to its endpoint's cap (413 at once when Content-Length passes it, and as
soon as the bytes read pass it when there is no Content-Length). A small body (up to
:data:`WHOLE_BYTES`) is parsed whole by ``json.loads``; a larger one is parsed as it is checked
(:func:`parse_object`), because ``json.loads`` holds the GIL for the whole parse: 60 MB of ``[],``
under an unknown key takes seconds and gigabytes before the key can be refused, and a thread does
not help. The incremental parser takes the one shape ferry accepts, an object of known keys whose
list values hold strings, and stops at the first problem: an unknown or repeated key, an item that
is not a string (never parsed), a list or a string past its limit. Strings are parsed by the
``json`` module's own C scanner, so a valid body gives exactly what ``json.loads`` gives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import json.decoder
import re
from http import HTTPStatus
from typing import Any, Callable

WHOLE_BYTES = 65_536
_WS = re.compile(r"[ \t\n\r]*")
_DEEP = re.compile(r"(?:\[[ \t\n\r]*){1000}")  # json.loads recurses once per '[' and stops near 1000
_scanstring = json.decoder.scanstring  # the C scanner where the interpreter has it
_scan_once = json.JSONDecoder().scan_once
KINDS = {"[": "a list", "{": "an object", '"': "a string", "t": "a boolean", "f": "a boolean", "n": "null"}


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and a one-line reason."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def json_problem(e: ValueError) -> str:
    """What is wrong with a body ``json.loads`` refused, in a few words without a traceback."""
    if isinstance(e, json.JSONDecodeError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8: byte {e.start}"
    if "digits" in str(e):  # Python refuses integers of more than 4300 digits (sys.int_info)
        return "a number has more than 4300 digits"
    return type(e).__name__


def too_big(cap: int) -> RequestError:
    return RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over the limit of {cap} bytes for this endpoint")


async def read_body(request: Any, cap: int) -> bytes:
    """The body, refused with 413 past ``cap`` bytes without reading the rest of it."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > cap:
        raise too_big(cap)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_big(cap)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclasses.dataclass(frozen=True)
class Strings:
    """A list of at most ``max_items`` strings, each at most ``max_raw`` characters as written in JSON."""

    max_items: int
    max_raw: int
    too_many: Callable[[str], str]  # key -> the 413 message
    too_long: Callable[[str, int], str]  # key, index -> the 413 message


@dataclasses.dataclass(frozen=True)
class Scalar:
    """A short JSON scalar (true, false, "true", 0, ...); anything longer than ``max_raw`` is refused."""

    max_raw: int = 64
    refused: str = "must be true or false"


def decode_text(body: bytes) -> str:
    """The body as ``json.loads`` would decode it (UTF-8, or UTF-16/32 told by its first bytes)."""
    try:
        return body.decode(json.detect_encoding(body), "surrogatepass")
    except UnicodeDecodeError as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({json_problem(e)})") from None


async def parse_object(body: bytes, schema: dict[str, Strings | Scalar], example: str) -> dict[str, Any]:
    """The top-level JSON object of ``body``, checked against ``schema`` as it is parsed.

    Raises:
        RequestError: 400 for what is not valid JSON or not the schema (naming the first
            problem), 413 for a list or string past its limit.
    """
    s = decode_text(body)
    if s.startswith("\ufeff"):
        raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid JSON (it starts with a byte order mark)")

    def invalid(at: int, what: str) -> RequestError:
        return RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({what.rstrip(': at')}: char {at}); send {example}")

    n = len(s)
    i = _WS.match(s, 0).end()
    if i >= n or s[i] != "{":
        if _DEEP.match(s, i):  # what json.loads refuses with a RecursionError
            raise RequestError(HTTPStatus.BAD_REQUEST, "body is nested too deeply to be a request")
        kind = _kind_at(s, i) or "not JSON"
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object like {example}, got {kind}")
    out: dict[str, Any] = {}
    i = _WS.match(s, i + 1).end()
    if s[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if s[i : i + 1] != '"':
                raise invalid(i, "expected a key")
            try:
                key, i = _scanstring(s, i + 1)
            except json.JSONDecodeError as e:
                raise invalid(e.pos, e.msg) from None
            if key not in schema:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown key {key[:100]!r}; keys are: {', '.join(schema)}")
            if key in out:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}' appears twice in the body")
            i = _WS.match(s, i).end()
            if s[i : i + 1] != ":":
                raise invalid(i, "expected ':'")
            i = _WS.match(s, i + 1).end()
            spec = schema[key]
            if isinstance(spec, Strings):
                out[key], i = await _strings(s, i, key, spec, invalid)
            else:
                out[key], i = _scalar(s, i, key, spec, invalid)
            i = _WS.match(s, i).end()
            if s[i : i + 1] == ",":
                i = _WS.match(s, i + 1).end()
                continue
            if s[i : i + 1] == "}":
                i += 1
                break
            raise invalid(i, "expected ',' or '}'")
    if _WS.match(s, i).end() != n:
        raise invalid(i, "extra data after the object")
    return out


async def _strings(s: str, i: int, key: str, spec: Strings, invalid: Callable[[int, str], RequestError]) -> tuple[Any, int]:
    if s[i : i + 1] != "[":
        kind = _kind_at(s, i)
        if kind is None:
            raise invalid(i, "expected a value")
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}' must be a list of strings, got {kind}")
    items: list[str] = []
    i = _WS.match(s, i + 1).end()
    if s[i : i + 1] == "]":
        return items, i + 1
    while True:
        if len(items) >= spec.max_items:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, spec.too_many(key))
        if s[i : i + 1] != '"':
            kind = _kind_at(s, i)  # named from its first character: never parsed
            if kind is None:
                raise invalid(i, "expected a value")
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{key}[{len(items)}] must be a string, got {kind}")
        # A bounded slice: a string longer than any valid one is refused without scanning all of it.
        window = s[i : i + spec.max_raw + 2]
        try:
            text, end = _scanstring(window, 1)
        except json.JSONDecodeError as e:
            if len(window) == spec.max_raw + 2 and e.msg.startswith("Unterminated string"):
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, spec.too_long(key, len(items))) from None
            raise invalid(i + e.pos, e.msg) from None
        items.append(text)
        i = _WS.match(s, i + end).end()
        if len(items) % 16 == 0:
            await asyncio.sleep(0)  # let the event loop serve others between strings
        if s[i : i + 1] == ",":
            i = _WS.match(s, i + 1).end()
            continue
        if s[i : i + 1] == "]":
            return items, i + 1
        raise invalid(i, "expected ',' or ']'")


def _scalar(s: str, i: int, key: str, spec: Scalar, invalid: Callable[[int, str], RequestError]) -> tuple[Any, int]:
    window = s[i : i + spec.max_raw]
    truncated = len(window) == spec.max_raw and i + spec.max_raw < len(s)
    try:
        value, end = _scan_once(window, 0)
    except (StopIteration, ValueError, RecursionError):
        if truncated:  # longer than any valid value: refused unparsed
            raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}' {spec.refused}") from None
        raise invalid(i, f"no valid value for '{key}'") from None
    if truncated and end == len(window) and s[i + end] not in " \t\n\r,}":
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}' {spec.refused}")  # a number longer than the window
    return value, i + end


def _kind_at(s: str, i: int) -> str | None:
    """The JSON type of the value starting at ``s[i]``, from that character alone (None: no value starts there)."""
    c = s[i : i + 1]
    return KINDS.get(c) or ("a number" if c and c in "-0123456789IN" else None)
