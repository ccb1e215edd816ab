"""Every reach of ferry into BentoML's internals, in one place, checked at start.

ferry serves through BentoML's adaptive batching (its ``CorkDispatcher``) and BentoML's HTTP
server, but four things it needs are not public API:

1. :func:`batchable_endpoint`: /classify and /classify-image call a batchable endpoint's adaptive
   batcher in process, found through the app's router (``ServiceAppFactory.batch_infer`` and
   ``ServiceAppFactory.dispatchers``); BentoML's own way (``self.to_async``) goes over HTTP.
2. :func:`cap_cork_wait`: bounds how long the dispatcher holds a lone request open after a
   burst (patches ``Optimizer.trigger_refresh`` and ``wait``).
3. :func:`wrap_asgi`: wraps the app BentoML builds (``Service.to_asgi``, the call BentoML's
   worker makes) in ferry's outermost layer (serve/front.py).
4. :func:`cancel_timeout_timers`: replaces ``TimeoutMiddleware.__call__`` by the same code with
   its timer cancelled once the request is done.

Private code changes without notice, so :func:`check_bentoml` runs before anything is served
(at the import of serve/service.py, in every BentoML process, and in `ferry serve` before it
starts the server): it refuses, in one line, a BentoML version outside :data:`KNOWN`, or one
where an attribute these reaches use is missing.

:data:`KNOWN` is ``>=1.4.39,<1.5``. This code was written against and checked on 1.4.39, the
version constraints.txt pins (the serving tests run on it). Later 1.4 patch releases are
accepted, unchecked: a patch release is the least likely to restructure these internals, a
renamed or removed attribute is still refused by the attribute check at start (a changed
behaviour is not: the tests on the new version are), and refusing each one would fail every
install made without constraints.txt (pyproject.toml's serve extra asks for the same range).
Earlier 1.4 releases were never checked, and 1.5 or later may restructure the new-SDK server
(``_bentoml_impl``) at will: refused, as are pre-releases (the specifier excludes them).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable

from ferry.errors import FerryError, one_line

KNOWN = ">=1.4.39,<1.5"  # a PEP 440 specifier; the module docstring says why
CHECKED = "1.4.39"  # the version these reaches were checked on (pinned in constraints.txt)
FIX = f"pip install -c constraints.txt 'bentoml=={CHECKED}'"
MIN_CORK_S = 0.001


class UnknownBentoML(FerryError):
    """The installed BentoML is not one whose internals ferry knows."""


def installed_version() -> str | None:
    """The installed BentoML's version, read without importing it; None when it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("bentoml")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_bentoml_version(version: str | None = None) -> str:
    """``version`` (default: the installed one) when ferry knows it.

    Raises:
        UnknownBentoML: one line naming the version, the ones ferry knows, and the fix.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = installed_version() if version is None else version
    if version is None:
        raise UnknownBentoML(f"BentoML is not installed; ferry serves with bentoml{KNOWN} (checked on {CHECKED}): {FIX}")
    try:
        known = SpecifierSet(KNOWN).contains(Version(version), prereleases=False)
    except InvalidVersion:
        known = False
    if not known:
        raise UnknownBentoML(
            f"BentoML {one_line(version[:100])} is installed, but ferry reaches into BentoML internals it knows only in "
            f"bentoml{KNOWN} (checked on {CHECKED}); install that: {FIX}"
        )
    return version


def _reaches() -> list[tuple[str, Any, str]]:
    """(where, object, attribute) for each internal attribute ferry patches or calls."""
    import attrs
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_sdk import Service
    from _bentoml_sdk.method import APIMethod
    from bentoml._internal.marshal.dispatcher import CorkDispatcher
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    dispatcher = CorkDispatcher(1000, 2, fallback=lambda: None, get_batch_size=len)
    optimizer = getattr(dispatcher, "optimizer", None)
    middleware = TimeoutMiddleware(app=None, timeout=1)  # type: ignore[arg-type]
    methods = attrs.fields_dict(APIMethod) if attrs.has(APIMethod) else {}
    return [
        ("_bentoml_impl.server.app.ServiceAppFactory", ServiceAppFactory, "batch_infer"),
        ("bentoml._internal.marshal.dispatcher.CorkDispatcher()", dispatcher, "optimizer"),
        *(("bentoml._internal.marshal.dispatcher.CorkDispatcher().optimizer", optimizer, a)
          for a in ("trigger_refresh", "wait", "o_b")),
        ("_bentoml_sdk.Service", Service, "to_asgi"),
        *(("_bentoml_sdk.method.APIMethod", methods, a) for a in ("route", "batchable")),
        # __call__ on an instance: every class has one (it makes instances)
        *(("bentoml._internal.server.http.traffic.TimeoutMiddleware()", middleware, a)
          for a in ("__call__", "_set_timer_out", "app", "timeout")),
    ]


def check_internals() -> None:
    """Refuse, in one line, a BentoML where an internal attribute ferry uses is missing.

    Raises:
        UnknownBentoML: naming the first missing attribute.
    """
    for where, obj, attr in _reaches():
        present = attr in obj if isinstance(obj, dict) else obj is not None and hasattr(obj, attr)
        if not present:
            raise UnknownBentoML(
                f"BentoML {installed_version()} has no {where}.{attr}, a BentoML internal ferry relies on; "
                f"ferry knows bentoml{KNOWN} (checked on {CHECKED}): {FIX}"
            )


def check_bentoml() -> None:
    """The check at start: the installed version first (nothing of BentoML imported), then the internals."""
    check_bentoml_version()
    check_internals()


# --- 1. the batchable endpoint's adaptive batcher, called in process ---------------------------


def batchable_endpoint(scope: dict[str, Any], name: str) -> tuple[Callable[..., Awaitable[Any]], Any]:
    """(the adaptive batcher of the batchable endpoint ``name``, its ``CorkDispatcher`` or None),
    found through the app's router in the request's ``scope``.

    BentoML's own way to call an endpoint from inside the service (``self.to_async``) goes
    through an aiohttp session that BentoML closes and replaces every 100 requests, failing the
    requests still in flight on it; and it serializes every call to JSON. So ferry feeds the
    dispatcher BentoML built for the batchable endpoint (one queue, one batching policy,
    BentoML's adaptive-batch-size metric included): the route named ``name`` holds a partial
    of ``ServiceAppFactory.api_endpoint_wrapper``, whose factory has ``batch_infer(name, args,
    kwargs)`` and ``dispatchers[name]``. Call the batcher as ``infer((batch,), {})``.

    Raises:
        RuntimeError: no such endpoint among the app's routes.
    """
    for route in getattr(scope.get("router"), "routes", []):
        factory = getattr(getattr(getattr(route, "endpoint", None), "func", None), "__self__", None)
        if getattr(route, "name", None) == name and hasattr(factory, "batch_infer"):
            return functools.partial(factory.batch_infer, name), getattr(factory, "dispatchers", {}).get(name)
    raise RuntimeError(f"BentoML's {name} endpoint was not found in the app's routes; is bentoml{KNOWN} installed?")


# --- 2. the cork cap ---------------------------------------------------------------------------


def cap_cork_wait(dispatcher: Any) -> None:
    """Bound how long BentoML's dispatcher holds a lone request open for others to join.

    The dispatcher learns that hold time (``dispatcher.optimizer.wait``) from the waits of past
    batches, queueing behind the running batch included. After a burst it has learned
    the burst's queueing delay (seconds on CPU), and it then holds every request on an
    idle server that long, unlearning it by 5% per 5 s. Capped at the dispatcher's own
    estimate of a batch's fixed cost (``o_b``): waiting longer than a separate batch
    would cost never pays. Under load nothing changes: requests queue while a batch
    runs and the next batch takes them all.
    """
    optimizer = dispatcher.optimizer
    refresh = optimizer.trigger_refresh

    def refresh_capped() -> None:
        refresh()
        optimizer.wait = min(optimizer.wait, max(optimizer.o_b, MIN_CORK_S))

    optimizer.trigger_refresh = refresh_capped
    optimizer.wait = min(optimizer.wait, max(optimizer.o_b, MIN_CORK_S))


# --- 3. ferry's outermost layer around the app BentoML builds -----------------------------------


def wrap_asgi(service: Any, wrap: Callable[[Any, list[str]], Any]) -> None:
    """Make ``service.to_asgi()`` (the call BentoML's worker makes to build the app) return
    ``wrap(app, internal)``, ``internal`` being the routes of the batchable endpoints.

    BentoML 1.4 builds its app with its request-metrics middleware outermost and serves every
    ``@bentoml.api`` endpoint over HTTP, the batchable ones included; patching the service
    class's ``to_asgi`` is the one place to put a layer outside all of it (serve/front.py).
    """
    cls = type(service)
    original = cls.to_asgi
    if getattr(original, "__ferry_front__", False):
        return

    def to_asgi(self: Any, *args: Any, **kwargs: Any) -> Any:
        app = original(self, *args, **kwargs)
        if self is not service:
            return app
        internal = [m.route for m in self.apis.values() if m.batchable]
        return wrap(app, internal)

    to_asgi.__ferry_front__ = True  # type: ignore[attr-defined]
    cls.to_asgi = to_asgi


# --- 4. the timeout middleware's timers ----------------------------------------------------------


def cancel_timeout_timers() -> None:
    """BentoML 1.4's ``TimeoutMiddleware.__call__``, the same but for a timer cancelled once the request is done.

    Its ``TimeoutMiddleware`` schedules a timer per request (``loop.call_later(timeout, ...)``)
    and never cancels it, so each request's timer, with the context it captured, stays in memory
    for the whole timeout (120 s by default) after the answer: about 5 KB a request, 600 MB at
    1,000 requests/s.
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

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
