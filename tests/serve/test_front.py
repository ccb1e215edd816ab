"""serve/front.py's fast lane on a plain Starlette app (no server): what BentoML's per-request
stack gave a /classify request is still given there: the concurrency limit (429), the timeout
(504), a one-line JSON 500, a request counter; other routes still go through the app."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve.front import Front


def call(app, path: str, method: str = "POST", body: bytes = b"{}") -> tuple[int, dict]:
    """One request through the ASGI app; (status, JSON body)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"", "root_path": ""}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


async def slow_or_failing(request):
    data = await request.json()
    if data.get("sleep"):
        await asyncio.sleep(data["sleep"])
    if data.get("fail"):
        raise RuntimeError("boom\nsecond line")
    return JSONResponse({"fast": True, "router": request.scope.get("router") is not None})


async def through_app(request):
    return JSONResponse({"fast": False})


def make(fast=True, **kw) -> Front:
    inner = Starlette(routes=[Route("/classify", through_app, methods=["POST"]), Route("/info", through_app, methods=["GET"])])
    return Front(inner, [], "routes are ...", fast={"/classify": slow_or_failing} if fast else None, **kw)


def test_the_fast_lane_answers_classify_and_leaves_the_other_routes_to_the_app():
    front = make()
    assert call(front, "/classify") == (200, {"fast": True, "router": True})
    assert call(front, "/info", "GET") == (200, {"fast": False})
    assert call(make(fast=False), "/classify") == (200, {"fast": False})
    assert call(front, "/nowhere")[0] == 404 and call(front, "/classify", "GET")[0] == 405


def test_a_fast_lane_request_past_the_timeout_is_504():
    status, body = call(make(timeout_s=0.05), "/classify", body=b'{"sleep": 1}')
    assert status == 504 and "0.05 seconds" in body["error"]


def test_an_unexpected_error_on_the_fast_lane_is_a_one_line_json_500():
    status, body = call(make(), "/classify", body=b'{"fail": true}')
    assert status == 500 and body["error"] == "internal error: RuntimeError" and "\n" not in json.dumps(body)


def test_requests_past_max_concurrency_on_the_fast_lane_are_429_and_the_count_goes_back_down():
    front = make(max_concurrency=2)
    sent: list[int] = []

    async def one(body: bytes):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                sent.append(message["status"])

        scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [], "query_string": b"", "root_path": ""}
        await front(scope, receive, send)

    async def burst():
        await asyncio.gather(*(one(b'{"sleep": 0.2}') for _ in range(5)))

    asyncio.run(burst())
    assert sorted(sent) == [200, 200, 429, 429, 429]
    assert front.in_flight == 0
    assert call(front, "/classify")[0] == 200  # the places were given back


@pytest.mark.parametrize("status", [200, 429])
def test_fast_lane_answers_are_counted_by_status(status):
    from prometheus_client import REGISTRY

    front = make(max_concurrency=0 if status == 429 else 4)
    before = REGISTRY.get_sample_value("ferry_classify_requests_total", {"status": str(status)}) or 0.0
    assert call(front, "/classify")[0] == status
    front2 = make(max_concurrency=0 if status == 429 else 4)  # the counter is shared by every Front of the process
    assert call(front2, "/classify")[0] == status
    assert REGISTRY.get_sample_value("ferry_classify_requests_total", {"status": str(status)}) == before + 2
