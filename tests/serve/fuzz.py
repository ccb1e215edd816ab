"""Seeded generators of malformed requests for the fuzz tests of a live server (test_service.py,
test_image_service.py), and the checks every answer must pass.

Every case is a (name, content bytes, headers) triple for ``POST path``; the same seed gives the
same cases. ``FERRY_FUZZ_N`` sets how many cases a fuzz test sends (default 1,000).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
from typing import Any, Callable, Iterator

DEFAULT_N = 1000
# A header block past h11's 16 KiB limit is refused by the HTTP layer before ferry sees it.
BIG_HEADER = 20_000


def fuzz_n() -> int:
    return int(os.environ.get("FERRY_FUZZ_N") or DEFAULT_N)


@dataclasses.dataclass
class Case:
    name: str
    content: bytes
    headers: dict[str, str]

    @property
    def protocol_level(self) -> bool:
        """A case the HTTP layer (uvicorn) answers itself, in plain text, before any route runs."""
        return self.name == "oversized-header"


JSON = {"content-type": "application/json"}


def _random_scalar(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 2**63, 1e308, -0.0, 3.5, "", "x" * rng.randint(1, 50), "\u0000", "\ud800", "é",
        float("nan"), float("inf"),
    ])


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.5:
        return _random_scalar(rng)
    if r < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["texts", "images", "return_all_scores", "x", ""]): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _mutate(rng: random.Random, body: Any) -> Any:
    """``body`` with one node, at any level, replaced by a value of a random type."""
    if isinstance(body, dict) and body and rng.random() < 0.7:
        key = rng.choice(list(body))
        return {**body, key: _mutate(rng, body[key])}
    if isinstance(body, list) and body and rng.random() < 0.7:
        i = rng.randrange(len(body))
        return body[:i] + [_mutate(rng, body[i])] + body[i + 1 :]
    return _random_value(rng)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def huge_number(rng: random.Random) -> bytes:
    digits = "9" * rng.randint(4301, 60_000)
    return rng.choice([digits, "-" + digits, "1" + "0" * rng.randint(4301, 20_000) + ".5", "1e999999", "-1e400", digits + "e5"]).encode()


def deep(rng: random.Random) -> bytes:
    n = rng.choice([1_000, 10_000, 100_000])
    if rng.random() < 0.5:
        return b"[" * n + b"]" * n
    return b'{"a":' * n + b"1" + b"}" * n


def json_cases(rng: random.Random, valid: Callable[[random.Random], Any], key: str) -> Iterator[Case]:
    """Malformed JSON bodies around a valid one made by ``valid``; ``key`` is the list's key."""
    kinds = ["truncated", "garbage", "mutated", "huge-number", "deep", "encoding", "wrong-top", "keys", "content-type", "oversized-header"]
    while True:
        kind = rng.choice(kinds)
        body = _dumps(valid(rng))
        if kind == "truncated":
            yield Case(kind, body[: rng.randrange(max(1, len(body)))], JSON)
        elif kind == "garbage":
            yield Case(kind, rng.randbytes(rng.randint(0, 3000)), JSON)
        elif kind == "mutated":
            yield Case(kind, _dumps(_mutate(rng, valid(rng))), JSON)
        elif kind == "huge-number":
            where = rng.choice([b"%s", b'{"%k": %s}', b'{"%k": [%s]}', b'{"%k": ["a"], "return_all_scores": %s}'])
            yield Case(kind, where.replace(b"%k", key.encode()).replace(b"%s", huge_number(rng)), JSON)
        elif kind == "deep":
            inner = deep(rng)
            yield Case(kind, rng.choice([inner, b'{"' + key.encode() + b'": ' + inner + b"}"]), JSON)
        elif kind == "encoding":
            variants = [
                body.decode().encode("utf-16"), b"\xef\xbb\xbf" + body, body.replace(b'"', b"\xff", 1),
                b'{"' + key.encode() + b'": ["\\ud800"]}', b'{"' + key.encode() + b'": [NaN, Infinity]}', b"\x00" * rng.randint(1, 100),
                b'{"' + key.encode() + b'": ["a\x00b"]}', body + b"\x00",
            ]
            yield Case(kind, rng.choice(variants), JSON)
        elif kind == "wrong-top":
            yield Case(kind, rng.choice([b"null", b"1", b'"texts"', b"[]", b"{}", b"true", b" ", b""]), JSON)
        elif kind == "keys":
            obj = json.loads(body)
            obj[rng.choice(["\ud800", "x" * rng.randint(1, 5000), "", key.upper(), "return_all_scores "])] = 1
            yield Case(kind, json.dumps(obj).encode(), JSON)
        elif kind == "content-type":
            ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "application/json; charset=utf-16",
                                "multipart/form-data", "multipart/form-data; boundary=", "image/png", "\x7f"])
            yield Case(kind, body, {"content-type": ctype} if ctype else {})
        else:
            yield Case(kind, body, {**JSON, "x-fuzz": "h" * rng.randint(BIG_HEADER, 4 * BIG_HEADER)})


def text_cases(seed: int) -> Iterator[Case]:
    """Malformed /classify bodies."""
    words = "the match team goal pizza pasta chip code".split()

    def valid(rng: random.Random) -> Any:
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 4))]
        return {"texts": texts, "return_all_scores": rng.random() < 0.5}

    return json_cases(random.Random(seed), valid, "texts")


def _multipart(rng: random.Random, parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def image_cases(seed: int, png: bytes) -> Iterator[Case]:
    """Malformed /classify-image bodies (JSON and multipart); ``png`` is one valid small image."""
    rng = random.Random(seed)
    magics = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBP", b"II*\0", b"P6\n", b"%!PS-Adobe-3.0 EPSF-3.0\n"]

    def junk_image(r: random.Random) -> bytes:
        choice = r.random()
        if choice < 0.3:
            return r.randbytes(r.randint(1, 2000))
        if choice < 0.6:
            return r.choice(magics) + r.randbytes(r.randint(0, 500))
        if choice < 0.8:
            return png[: r.randrange(1, len(png))]
        flipped = bytearray(png)
        for _ in range(r.randint(1, 20)):
            flipped[r.randrange(len(flipped))] = r.randrange(256)
        return bytes(flipped)

    def valid(r: random.Random) -> Any:
        return {"images": [base64.b64encode(png).decode() for _ in range(r.randint(1, 2))], "return_all_scores": r.random() < 0.5}

    json_gen = json_cases(random.Random(seed + 1), valid, "images")
    while True:
        kind = rng.random()
        if kind < 0.4:
            yield next(json_gen)
        elif kind < 0.6:
            images = [base64.b64encode(junk_image(rng)).decode() for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.3:  # base64 itself damaged
                images = [s[: rng.randrange(len(s) + 1)] + rng.choice(["!", "\u00e9", "=", "==a", " ", "\n"]) for s in images]
            yield Case("junk-base64", json.dumps({"images": images}).encode(), JSON)
        else:
            boundary = "fuzz" + str(rng.randrange(10**9))
            parts = [("images", f"{i}.png", junk_image(rng)) for i in range(rng.randint(1, 3))]
            if rng.random() < 0.2:
                parts.append((rng.choice(["images", "return_all_scores", "other"]), None, rng.randbytes(rng.randint(0, 50))))
            body = _multipart(rng, parts, boundary)
            ctype = f"multipart/form-data; boundary={boundary}"
            r = rng.random()
            if r < 0.15:
                body = body[: rng.randrange(len(body))]
            elif r < 0.25:
                ctype = "multipart/form-data; boundary=" + rng.choice(["", "other", "x" * 300])
            elif r < 0.3:
                body = body.replace(b"\r\n", b"\n")
            yield Case("multipart", body, {"content-type": ctype})


def check_answer(case: Case, status: int, headers: Any, content: bytes) -> str | None:
    """Why an answer to ``case`` is wrong, or None: never 5xx; ferry's refusals are one-line JSON errors."""
    if status >= 500:
        return f"{case.name}: status {status}: {content[:300]!r}"
    if case.protocol_level or status < 400:
        return None
    try:
        body = json.loads(content)
    except ValueError:
        return f"{case.name}: status {status} without a JSON body: {content[:300]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, str) or "\n" in error:
        return f"{case.name}: status {status}, error is not one line: {content[:300]!r}"
    return None


def process_tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_fuzz(url: str, cases: Iterator[Case], n: int) -> dict[str, Any]:
    """Send ``n`` cases one after another; returns {"failures": [...], "statuses": {status: count}}."""
    import httpx

    failures, statuses = [], {}
    with httpx.Client(timeout=60) as client:
        for _, case in zip(range(n), cases):
            try:
                r = client.post(url, content=case.content, headers=case.headers)
            except httpx.HTTPError as e:  # the server may close a connection it refused
                if case.protocol_level:
                    statuses["closed"] = statuses.get("closed", 0) + 1
                    continue
                failures.append(f"{case.name}: no answer ({type(e).__name__}: {e})")
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            why = check_answer(case, r.status_code, r.headers, r.content)
            if why:
                failures.append(why)
    return {"failures": failures, "statuses": statuses}
