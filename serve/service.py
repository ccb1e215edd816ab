"""The BentoML service: one class, the model loaded once per worker, adaptive batching.

Routes:
    POST /classify   ``{"texts": [...], "return_all_scores": false}`` -> ``{"results": [...]}``;
                     validates each request (4xx JSON errors), then feeds its texts, in
                     chunks of at most ``max_batch_size``, to the batchable endpoint's
                     adaptive batcher, in process.
    POST /classify-image  the same for images.
    GET  /info       model, labels, max_length or image_size, variant, provider, batch invariance, parity.
    GET  /livez, /readyz (200 only once every worker has run its warm-up inference),
                     /metrics (BentoML's Prometheus metrics plus texts, tokens and padded
                     tokens per batch).

The service is BentoML's usual shape: one class, the model (a runtime/predictor.py ``Runtime``, for
the artifact's task) loaded in ``__init__``, one batchable method taking a list: ``batch``, into
which BentoML's adaptive batcher merges the texts or images of concurrent requests. It is
internal: serve/front.py answers 404 to it over HTTP, as to any path that is not a route, before
BentoML's metrics label it. What a request may be is serve/http.py's.

Where ferry reaches into BentoML's internals (the batcher called in process, the cork cap, the
wrap around the app, the timeout timers), it does so in serve/bento_batcher.py, which checks
the installed BentoML at the import of this module and refuses one it does not know.

Bodies are capped per endpoint by what its largest valid request needs
(``ServeSettings.body_caps``) and parsed as they are checked (serve/http.py). Whatever goes
wrong past validation is a one-line JSON 5xx naming the cause, never a bare 500: an inference
that raises fails only the requests holding the texts it raised on (the merged batch is re-run
one text at a time to find them), and a NaN or infinite score is a 500 naming the text, because
no label can honestly be given for it.

Why /classify is not itself the batchable endpoint: a batchable method only sees merged
batches, so per-request caps and errors must be checked before batching.

Why the texts go in sequential chunks through a gate: left alone, BentoML's dispatcher
answers 503 "process is overloaded" to a 256-text request on an idle server, and to the
oldest requests of a burst it could serve within max_latency_ms; serve/batching.py says
why and how /classify avoids both (and serve/bento_batcher.py how it caps the dispatcher's
hold on a lone request), so that 503 means real overload.

Configured through ``FERRY_*`` environment variables (serve/settings.py), set by
`ferry serve`; without ``FERRY_ARTIFACT`` the model comes from the BentoML model store
(``FERRY_MODEL_TAG``), so a Bento built with bentofile.yaml carries it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from http import HTTPStatus
from typing import Any, Awaitable, Callable, NoReturn

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ferry.errors import FerryError, first_line
from ferry.tasks import IMAGE, TEXT, Task
from runtime.predictor import Runtime, check_startup, resolve_device
from serve import bento_batcher, front, http
from serve.batching import Overloaded, TextGate, in_chunks
from serve.body import RequestError
from serve.readiness import SharedReadiness
from serve.settings import ServeSettings, env_name, worker_split

log = logging.getLogger("bentoml.ferry")  # BentoML configures the "bentoml" logger in its workers

try:
    bento_batcher.check_bentoml()  # before anything reaches into BentoML's internals
    SETTINGS = ServeSettings.from_env()
    DEVICE = resolve_device(SETTINGS.device)
except FerryError as e:  # a bad FERRY_* variable (FERRY_DEVICE=gpu, ...): one line, not a traceback from BentoML's loader
    print(f"ferry: refusing to start: {str(e).replace('--device', 'FERRY_DEVICE')}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
MAX_BATCH_SIZE, MAX_LATENCY_MS = SETTINGS.batching(DEVICE)
MAX_BATCH_TOKENS = SETTINGS.batch_tokens(DEVICE)
WORKERS, THREADS, SPLIT = worker_split(DEVICE, SETTINGS.workers, SETTINGS.threads)
SPLIT = SETTINGS.split or SPLIT
BODY_CAPS = SETTINGS.body_caps()
PUBLIC = f"routes are POST {TEXT.route}, POST {IMAGE.route}, GET /info, /livez, /readyz, /metrics"

_metrics: dict[str, Any] = {}
_infer: Callable[..., Awaitable[Any]] | None = None  # the batchable endpoint's adaptive batcher, once found
_gate: TextGate | None = None


def metrics() -> dict[str, Any]:
    """Per-batch histograms, created in the worker (after BentoML sets up multiprocess metrics)."""
    if not _metrics:
        from prometheus_client import Histogram

        sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
        tokens = [2**k for k in range(4, 18)]
        _metrics["texts"] = Histogram("ferry_batch_texts", "Texts per model batch", buckets=sizes)
        _metrics["tokens"] = Histogram("ferry_batch_tokens", "Real tokens per model batch", buckets=tokens)
        _metrics["padded"] = Histogram(
            "ferry_batch_padded_tokens", "Tokens run per model batch, padding included", buckets=tokens
        )
    return _metrics


def error(status: HTTPStatus, message: str) -> JSONResponse:
    """A one-line JSON error: whatever a message quotes from the request, it stays one line of valid UTF-8."""
    line = " ".join(message.split("\n"))[:1000].encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": line, "status": int(status)}, status_code=int(status))


def describe(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {first_line(e, 300)}" if str(e).strip() else type(e).__name__


def non_finite(probs: Any) -> str | None:
    """"NaN" or "inf" when ``probs`` holds one, else None."""
    a = np.asarray(probs, dtype=np.float64)
    if np.isfinite(a).all():
        return None
    return "NaN" if np.isnan(a).any() else "inf"


def batcher(request: Request) -> Callable[[list[Any]], Awaitable[list[dict[str, Any]]]]:
    """The batchable endpoint's adaptive batcher, called in process; the first call also makes the gate.

    Not ``self.to_async``, BentoML's own way: serve/bento_batcher.py's ``batchable_endpoint``
    says why, and how the dispatcher BentoML built for the batchable endpoint is found through
    the app's router; that endpoint's own HTTP route is closed (serve/front.py).
    """
    global _infer, _gate
    if _infer is None:
        _infer, dispatcher = bento_batcher.batchable_endpoint(request.scope, "batch")
        if dispatcher is not None:
            bento_batcher.cap_cork_wait(dispatcher)
        _gate = TextGate(2 * MAX_BATCH_SIZE)  # one batch running, one forming
    infer = _infer
    return lambda items: infer((items,), {})


OVERLOADED = f"server overloaded: the request would wait more than max_latency_ms={MAX_LATENCY_MS}; retry later"
WARMING_UP = "this worker is still warming up (GET /readyz is 200 once every worker is ready); retry shortly"


async def run_batched(run: Callable[[list[Any]], Awaitable[list[dict[str, Any]]]], items: list[Any], what: str) -> list[dict[str, Any]] | JSONResponse:
    """The batch endpoint's answers for ``items``, or the JSON 5xx that answers the request instead:
    503 overloaded, 500 naming the item an inference failed on or gave a non-finite score for."""
    try:
        raw = await in_chunks(run, items, MAX_BATCH_SIZE, _gate, MAX_LATENCY_MS / 1000)
    except (ServiceUnavailable, Overloaded):
        return error(HTTPStatus.SERVICE_UNAVAILABLE, OVERLOADED)
    except Exception as e:  # noqa: BLE001 - past validation, whatever fails is the server's: a JSON 500 naming it
        log.error("inference failed for a request of %d %s: %s", len(items), what, describe(e))
        return error(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {describe(e)}")
    for i, r in enumerate(raw):
        if "error" in r:
            return error(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed on {what}[{i}]: {r['error']}")
        bad = non_finite(r["probs"])
        if bad:
            log.error("the model gave a %s score for %s[%d]", bad, what, i)
            return error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"the model gave a non-finite score ({bad}) for {what}[{i}]: no label can be given for it; "
                "the model or its variant is broken for this input",
            )
    return raw


def refuse(rt: Runtime, task: Task) -> JSONResponse | None:
    """The answer to a request for ``task`` that this worker cannot serve (nothing of it read yet):
    400 on a server of the other task, 503 while warming up; None when it can."""
    if rt.task is not task:
        return error(HTTPStatus.BAD_REQUEST, f"this server serves a model for {rt.task.name}; POST {rt.task.input}s to {rt.task.route}")
    if not rt.ready:
        return error(HTTPStatus.SERVICE_UNAVAILABLE, WARMING_UP)
    return None


async def answer(request: Request, rt: Runtime, items: list[Any], return_all: bool) -> JSONResponse:
    """The results for a request's checked ``items``, run through the adaptive batcher."""
    raw = await run_batched(batcher(request), items, f"{rt.task.input}s")
    if isinstance(raw, JSONResponse):
        return raw
    return JSONResponse({"results": [rt.format(r["probs"], r["truncated"], return_all) for r in raw]})


async def classify(request: Request) -> JSONResponse:
    """POST /classify: JSON ``texts`` (serve/http.py)."""
    rt = bentoml.get_current_service().runtime
    refused = refuse(rt, TEXT)
    if refused:
        return refused
    try:
        texts, return_all = await http.read_texts(request, BODY_CAPS[TEXT.route], SETTINGS.max_texts, SETTINGS.max_chars)
    except RequestError as e:
        return error(e.status, str(e))
    return await answer(request, rt, texts, return_all)


async def classify_image(request: Request) -> JSONResponse:
    """POST /classify-image: multipart ``images`` files or JSON base64 ``images`` (serve/http.py)."""
    import anyio

    rt = bentoml.get_current_service().runtime
    refused = refuse(rt, IMAGE)
    if refused:
        return refused
    try:
        raws, return_all = await http.read_images(request, BODY_CAPS[IMAGE.route], SETTINGS.max_images, SETTINGS.max_image_bytes)
        # Decoding and resizing are CPU work: off the event loop.
        pixels = await anyio.to_thread.run_sync(
            lambda: [http.decode(raw, f"images[{i}]", rt.inputs.processor, SETTINGS.max_image_pixels) for i, raw in enumerate(raws)]
        )
    except RequestError as e:
        return error(e.status, str(e))
    return await answer(request, rt, pixels, return_all)


async def info(request: Request) -> JSONResponse:
    svc = bentoml.get_current_service()
    body = svc.runtime.info()
    if body.get("choice") is None and SETTINGS.choice:  # made once by `ferry serve`, before the workers
        body["choice"] = json.loads(SETTINGS.choice)
    body["model"]["store_tag"] = svc.model_tag
    body["serving"] = {
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_tokens": MAX_BATCH_TOKENS,
        "max_latency_ms": MAX_LATENCY_MS,
        "max_texts": SETTINGS.max_texts,
        "max_chars": SETTINGS.max_chars,
        "max_images": SETTINGS.max_images,
        "max_image_bytes": SETTINGS.max_image_bytes,
        "max_image_pixels": SETTINGS.max_image_pixels,
        "max_body_bytes": BODY_CAPS[svc.runtime.task.route],
        "max_concurrency": SETTINGS.max_concurrency,
        "workers": WORKERS,
        "threads_per_worker": THREADS,
        "split": SPLIT,
        "ready_workers": _readiness.ready_workers(),
    }
    return JSONResponse(body)


def model_path() -> tuple[str, str | None]:
    """(artifact directory, model store tag or None)."""
    if SETTINGS.artifact:
        return SETTINGS.artifact, None
    try:
        model = bentoml.models.get(SETTINGS.model_tag)
    except bentoml.exceptions.NotFound:
        raise FerryError(
            f"model {SETTINGS.model_tag} is not in the BentoML model store; register it with ferry store ARTIFACT"
        ) from None
    return model.path, str(model.tag)


routes = Starlette(routes=[
    Route(TEXT.route, classify, methods=["POST"]),
    Route(IMAGE.route, classify_image, methods=["POST"]),
    Route("/info", info, methods=["GET"]),
])


@bentoml.service(
    name="ferry",
    workers=WORKERS,
    # BentoML divides max_concurrency among the workers: each worker holds SETTINGS.max_concurrency.
    traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency * WORKERS},
    labels={"project": "ferry"},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": [TEXT.route, IMAGE.route, "/info", "/livez", "/readyz", "/metrics"]},
)
@bentoml.asgi_app(routes, path="/")
class Ferry:
    if not SETTINGS.artifact:
        # Referenced through the model store so that `bentoml build` packs it into the Bento.
        model = bentoml.models.BentoModel(SETTINGS.model_tag)

    @bentoml.on_deployment
    def check_model() -> None:
        """Runs once in the server process before any worker: a bad model stops the server here."""
        try:
            v = check_startup(model_path()[0], SETTINGS.variant, SETTINGS.device)
        except FerryError as e:
            print(f"ferry: refusing to start: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        log.info("model check passed: variant '%s', sha256 %s matches the manifest", v.name, str(v.info.get("sha256"))[:12])
        choose_once()

    def __init__(self) -> None:
        path, self.model_tag = model_path()
        try:
            self.runtime = SETTINGS.open_runtime(path, THREADS, MAX_BATCH_SIZE, MAX_BATCH_TOKENS)
        except FerryError as e:
            stop_server(f"refusing to start: {e}")
        for note in self.runtime.notes:
            log.warning(note)
        if self.runtime.choice is not None:
            for line in self.runtime.choice.log_lines():
                log.info(line)
        log.info(self.runtime.describe())
        log.info("adaptive batching: max_batch_size=%d texts, max_batch_tokens=%d, max_latency_ms=%d", MAX_BATCH_SIZE, MAX_BATCH_TOKENS, MAX_LATENCY_MS)
        # Warm up off the event loop: /livez answers at once, /readyz only after it (in every worker).
        threading.Thread(target=self._warm_up, name="ferry-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self.runtime.warm_up()
        except Exception as e:  # noqa: BLE001 - a worker whose model cannot run a warm-up must not serve
            stop_server(f"refusing to serve: warm-up inference failed ({describe(e)})")
        _readiness.mark_ready()
        log.info("warm-up inference done; this worker is ready")

    @bentoml.on_shutdown
    def _not_ready(self) -> None:
        _readiness.clear()

    def __is_ready__(self) -> bool:
        """Ready when this worker and every other worker of the server have run their warm-up."""
        return self.runtime.ready and _readiness.all_ready()

    def _run(self, items: list[Any]) -> list[dict[str, Any]]:
        """Probabilities per item; when the batch raises, each item again alone, so that only the
        items it raises on get an error (naming the cause), not every request merged with them."""
        try:
            b = self.runtime.run_batch(items)
        except Exception as e:  # noqa: BLE001 - reported per item to the requests that hold it
            if len(items) == 1:
                log.error("inference failed on one %s: %s", self.runtime.task.input, describe(e))
                return [{"error": describe(e)}]
            log.warning("a batch of %d %ss failed (%s); running them one at a time", len(items), self.runtime.task.input, describe(e))
            return [r for i in range(len(items)) for r in self._run(items[i : i + 1])]
        if b.tokens is not None:  # texts: what the model ran, per batch
            m = metrics()
            m["texts"].observe(len(items))
            m["tokens"].observe(sum(b.tokens))
            m["padded"].observe(b.padded_tokens)
        truncated = b.truncated or [None] * len(items)
        return [{"probs": p.tolist(), "truncated": t} for p, t in zip(b.probs, truncated)]

    @bentoml.api(route="/batch", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def batch(self, items: list[Any]) -> list[dict[str, Any]]:
        """Probabilities per item for a merged batch (the checked texts, or preprocessed images
        ``[3, H, W]``, of concurrent requests); internal (serve/front.py)."""
        return self._run(items)


def choose_once() -> None:
    """The start-up variant choice, made once here for every worker (``bentoml serve`` of a Bento;
    `ferry serve` made it already): workers started after this hook inherit the environment, so
    they all serve the same variant instead of each timing the candidates against the others."""
    if SETTINGS.variant or DEVICE != "cpu":
        return
    try:
        rt = SETTINGS.open_runtime(model_path()[0], THREADS)
    except FerryError as e:
        print(f"ferry: refusing to start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if rt.choice is not None:
        for line in rt.choice.log_lines():
            log.info(line)
        os.environ[env_name("choice")] = json.dumps(rt.choice.as_dict())
    os.environ[env_name("variant")] = rt.variant.name


def stop_server(reason: str) -> NoReturn:
    """Stop the whole server with one line, from a worker: BentoML would respawn a worker that
    merely exits, forever, and a worker that stays up unready would leave /readyz flapping.
    Only the first worker to stop the server logs the reason."""
    if _readiness.claim_stop():
        log.error(reason)
    _readiness.clear()
    os.kill(os.getppid(), signal.SIGTERM)
    os._exit(2)


_readiness = SharedReadiness(WORKERS)
bento_batcher.wrap_asgi(Ferry, lambda app, internal: front.Front(
    app, internal, PUBLIC, fast={TEXT.route: classify}, max_concurrency=SETTINGS.max_concurrency, timeout_s=SETTINGS.timeout))
bento_batcher.cancel_timeout_timers()
