"""The outermost layer of ferry's HTTP server: only ferry's routes get past it.

BentoML 1.4 builds its app with its request-metrics middleware outermost, labelled with the raw
request path, so requests to random paths add label sets to ``/metrics`` without bound; and it
serves every ``@bentoml.api`` endpoint over HTTP, the batchable ones included. ferry's batchable
endpoint (``/batch``) is internal: ``/classify`` and ``/classify-image`` validate a request, cap
its body and admit it through the gate (serve/batching.py), then call the endpoint's adaptive
batcher in process (``serve.bento_batcher.batchable_endpoint``), never over HTTP. Reached
directly, it would skip all of that and one malformed call would fail every request merged into
its batch.

So :class:`Front` wraps the app BentoML builds (installed around ``Service.to_asgi``, the call
BentoML's worker makes, by ``wrap_asgi`` in serve/bento_batcher.py) and answers, before any
BentoML middleware sees the request:

- 404 (one-line JSON) for a path that is not a route of the app, and for the internal routes;
- 405 (JSON, with ``Allow``) for a known path asked with a method it does not take.

Those answers are counted in one unlabelled counter, ``ferry_unrouted_requests_total``.

**The fast lane.** ``POST /classify`` (the routes given as ``fast``) is answered here too, by
its handler, without BentoML's per-request middleware stack (request metrics, tracing context,
service context, concurrency limit, timeout, two nested Starlette apps with their exception
middleware). Profiled on a live server (py-spy, near-free model, 64 clients) that stack was the
largest cost of a request; skipping it served 1.4x the requests per second. What the stack gave
is kept here: the concurrency limit (``max_concurrency`` in flight, past it 429 at once), the
timeout (504 after ``timeout_s``), a JSON 500 naming an unexpected error, and a request counter
per status (``ferry_classify_requests_total``). BentoML's adaptive batcher still merges the
texts: the handler feeds the batchable endpoint's dispatcher, as before.

Nothing here touches BentoML's internals: :class:`Front` is plain ASGI around a Starlette app;
the patches that put it in place, and the fix to BentoML's timeout middleware, are in
serve/bento_batcher.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Iterable

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

    def __init__(
        self, app: Any, internal: Iterable[str], public: str,
        fast: dict[str, Callable[[Any], Awaitable[Any]]] | None = None, max_concurrency: int = 256, timeout_s: float = 120.0,
    ):
        self.app = app
        self.internal = frozenset(internal)
        self.public = public  # the routes named in the 404 message
        self.fast = dict(fast or {})  # POST path -> handler(Request) -> Response, answered here
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.in_flight = 0
        self._table: dict[str, frozenset[str] | None] | None = None

    def __getattr__(self, name: str) -> Any:  # whoever holds the app may look at its attributes
        if name == "app":
            raise AttributeError(name)
        return getattr(self.app, name)

    def _count(self) -> None:
        counter("ferry_unrouted_requests", "Requests answered 404/405 before any route (unknown path, internal route, method)").inc()

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
        handler = self.fast.get(path)
        if handler is not None and scope.get("method") == "POST":
            return await self._serve_fast(handler, scope, receive, send)
        await self.app(scope, receive, send)

    async def _serve_fast(self, handler: Callable[[Any], Awaitable[Any]], scope: dict[str, Any], receive: Any, send: Any) -> None:
        """One fast-lane request: the limit, the timeout and the 500 of BentoML's stack, then the handler."""
        from starlette.requests import Request

        if self.in_flight >= self.max_concurrency:
            response: Any = JSONResponse({"error": f"too many requests: {self.max_concurrency} in flight on this worker; retry later",
                                          "status": 429}, status_code=429)
        else:
            self.in_flight += 1
            scope.setdefault("router", getattr(self.app, "router", None))  # the handler finds the batcher through it
            try:
                response = await asyncio.wait_for(handler(Request(scope, receive)), self.timeout_s)
            except asyncio.TimeoutError:
                response = JSONResponse({"error": f"not able to process the request in {self.timeout_s:g} seconds", "status": 504},
                                        status_code=504)
            except Exception as e:  # noqa: BLE001 - the handler answers what it expects; anything else is a one-line 500
                logging.getLogger("bentoml.ferry").error("%s failed: %s: %s", scope["path"], type(e).__name__, str(e).split("\n")[0][:300])
                response = JSONResponse({"error": f"internal error: {type(e).__name__}", "status": 500}, status_code=500)
            finally:
                self.in_flight -= 1
        self._count_request(response.status_code)
        await response(scope, receive, send)

    def _count_request(self, status: int) -> None:
        counter("ferry_classify_requests", "Requests answered on the fast lane, by status", ("status",)).labels(str(status)).inc()


_counters: dict[str, Any] = {}


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    """A Prometheus counter of this process, created on first use: in the worker, after BentoML
    set up multiprocess metrics, and once however many apps are built."""
    if name not in _counters:
        from prometheus_client import Counter

        _counters[name] = Counter(name, doc, list(labels))
    return _counters[name]
