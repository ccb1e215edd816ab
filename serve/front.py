"""The outermost layer of ferry's HTTP server: only ferry's routes get past it.

BentoML 1.4 builds its app with its request-metrics middleware outermost, labelled with the raw
request path, so requests to random paths add label sets to ``/metrics`` without bound; and it
serves every ``@bentoml.api`` endpoint over HTTP, the batchable ones included. ferry's batchable
endpoints (``/batch``, ``/batch-image``) are internal: ``/classify`` and ``/classify-image``
validate a request, cap its body and admit it through the gate (serve/batching.py), then call the
endpoint's adaptive batcher in process (``serve.service._endpoint``), never over HTTP. Reached
directly, they would skip all of that and one malformed call would fail every request merged
into its batch.

So :class:`Front` wraps the app BentoML builds (installed by :func:`install`, around
``Service.to_asgi``, the call BentoML's worker makes) and answers, before any BentoML middleware
sees the request:

- 404 (one-line JSON) for a path that is not a route of the app, and for the internal routes;
- 405 (JSON, with ``Allow``) for a known path asked with a method it does not take.

Those answers are counted in one unlabelled counter, ``ferry_unrouted_requests_total``.

:func:`cancel_timeout_timers` fixes a second cost of BentoML's HTTP layer: its
``TimeoutMiddleware`` schedules a timer per request (``loop.call_later(timeout, ...)``) and never
cancels it, so each request's timer, with the context it captured, stays in memory for the
whole timeout (120 s by default) after the answer: about 5 KB a request, 600 MB at 1,000
requests/s. The patched middleware cancels the timer once the request is done.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Iterable

from starlette.responses import JSONResponse


def _route_table(app: Any, prefix: str = "") -> dict[str, frozenset[str] | None]:
    """{exact path: methods it takes (None: any)} of a Starlette app, mounted apps and static files included."""
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    table: dict[str, frozenset[str] | None] = {}
    for route in getattr(getattr(app, "router", app), "routes", []):
        if isinstance(route, Route):
            if "{" not in route.path:
                table[prefix + route.path] = frozenset(route.methods) if route.methods else None
        elif isinstance(route, Mount):
            inner = route.app
            if isinstance(inner, StaticFiles):
                for directory in inner.all_directories:
                    for root, _, files in os.walk(directory):
                        rel = os.path.relpath(root, directory)
                        for f in files:
                            path = "/".join(p for p in (prefix + route.path, "" if rel == "." else rel, f) if p)
                            table[path if path.startswith("/") else "/" + path] = frozenset({"GET", "HEAD"})
            elif hasattr(inner, "routes") or hasattr(inner, "router"):
                table.update(_route_table(inner, prefix + route.path))
    return table


class Front:
    """ASGI wrapper answering 404/405 for what is not one of the app's routes, or is internal."""

    def __init__(self, app: Any, internal: Iterable[str], public: str):
        self.app = app
        self.internal = frozenset(internal)
        self.public = public  # the routes named in the 404 message
        self._table: dict[str, frozenset[str] | None] | None = None
        self._counter: Any = None

    def __getattr__(self, name: str) -> Any:  # whoever holds the app may look at its attributes
        if name == "app":
            raise AttributeError(name)
        return getattr(self.app, name)

    def _count(self) -> None:
        if self._counter is None:  # created in the worker, after BentoML set up multiprocess metrics
            from prometheus_client import Counter

            self._counter = Counter("ferry_unrouted_requests", "Requests answered 404/405 before any route (unknown path, internal route, method)")
        self._counter.inc()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._table is None:
            self._table = {p: m for p, m in _route_table(self.app).items() if p not in self.internal}
        path = scope["path"]
        if path not in self._table:
            shown = path if len(path) <= 100 else path[:100] + "..."
            self._count()
            response = JSONResponse({"error": f"no route {shown!r}; {self.public}", "status": 404}, status_code=404)
            return await response(scope, receive, send)
        methods = self._table[path]
        if methods is not None and scope.get("method", "GET") not in methods | {"OPTIONS"}:  # OPTIONS: CORS preflight, when enabled
            allow = ", ".join(sorted(methods - {"HEAD"}) or sorted(methods))
            self._count()
            response = JSONResponse({"error": f"{path} takes {allow}, not {scope.get('method')}", "status": 405},
                                    status_code=405, headers={"allow": allow})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def install(service: Any, public: str) -> None:
    """Wrap what ``service.to_asgi()`` returns in :class:`Front`; the batchable endpoints' routes become internal."""
    cls = type(service)
    original = cls.to_asgi
    if getattr(original, "__ferry_front__", False):
        return

    def to_asgi(self: Any, *args: Any, **kwargs: Any) -> Any:
        app = original(self, *args, **kwargs)
        if self is not service:
            return app
        internal = [m.route for m in self.apis.values() if m.batchable]
        return Front(app, internal, public)

    to_asgi.__ferry_front__ = True  # type: ignore[attr-defined]
    cls.to_asgi = to_asgi


def cancel_timeout_timers() -> None:
    """BentoML 1.4's ``TimeoutMiddleware.__call__``, the same but for a timer cancelled once the request is done."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    if getattr(TimeoutMiddleware.__call__, "__ferry_patched__", False):
        return

    async def call(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            try:
                await waiter
            except asyncio.TimeoutError:
                if fut.cancel():
                    response = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504)
                    await response(scope, receive, send)
            else:
                await fut
        finally:
            timer.cancel()

    call.__ferry_patched__ = True  # type: ignore[attr-defined]
    TimeoutMiddleware.__call__ = call
