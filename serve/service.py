"""The BentoML service: one class, the model loaded once per worker, adaptive batching.

Routes:
    POST /classify   ``{"texts": [...], "return_all_scores": false}`` -> ``{"results": [...]}``;
                     validates each request (4xx JSON errors), then feeds its texts, in
                     chunks of at most ``max_batch_size``, to the batchable endpoint's
                     adaptive batcher (in process: the same queue as POST /batch).
    POST /batch      the batchable endpoint: BentoML's adaptive batcher merges the texts of
                     concurrent requests into one list; returns probabilities per text.
    GET  /info       model, labels, variant, provider, max_length, batch invariance, parity.
    GET  /livez, /readyz (ready only after a warm-up inference), /metrics (BentoML's
                     Prometheus metrics plus texts, tokens and padded tokens per batch).

Why /classify is not itself the batchable endpoint: a batchable method only sees merged
batches, so per-request caps and errors must be checked before batching.

Why the texts go in sequential chunks through a gate: left alone, BentoML's dispatcher
answers 503 "process is overloaded" to a 256-text request on an idle server, and to the
oldest requests of a burst it could serve within max_latency_ms; serve/batching.py says
why and how /classify avoids both, so that 503 means real overload.

Configured through ``FERRY_*`` environment variables (serve/settings.py), set by
`ferry serve`; without ``FERRY_ARTIFACT`` the model comes from the BentoML model store
(``FERRY_MODEL_TAG``), so a Bento built with bentofile.yaml carries it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from http import HTTPStatus
from typing import Annotated, Any, Awaitable, Callable

import bentoml
from annotated_types import Len, MaxLen
import numpy as np
from bentoml.exceptions import InvalidArgument, ServiceUnavailable
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ferry.errors import FerryError
from serve.batching import Overloaded, TextGate, cap_cork_wait, in_chunks
from runtime.predictor import Runtime, check_startup, resolve_device
from serve.settings import ServeSettings

log = logging.getLogger("bentoml.ferry")  # BentoML configures the "bentoml" logger in its workers

try:
    SETTINGS = ServeSettings.from_env()
except FerryError as e:  # a bad FERRY_* variable: one line, not a traceback from BentoML's loader
    print(f"ferry: refusing to start: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
DEVICE = resolve_device(SETTINGS.device)
MAX_BATCH_SIZE, MAX_LATENCY_MS = SETTINGS.batching(DEVICE)
# \uXXXX escapes take 6 bytes a char; base64 4 bytes per 3
MAX_BODY_BYTES = max(SETTINGS.max_texts * SETTINGS.max_chars * 6, SETTINGS.max_images * SETTINGS.max_image_bytes * 4 // 3) + 65536
KEYS = ("texts", "return_all_scores")

_metrics: dict[str, Any] = {}
_infer: dict[str, Callable[..., Awaitable[Any]]] = {}  # batchable endpoint name -> its adaptive batcher
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


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def error(status: HTTPStatus, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": int(status)}, status_code=int(status))


def parse_request(body: bytes) -> tuple[list[str], bool]:
    """The texts and return_all_scores of a /classify body; RequestError names what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({e}); send {{\"texts\": [\"...\"]}}") from None
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, "body is nested too deeply to be a request") from None
    if not isinstance(data, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object like {{\"texts\": [...]}}, got {type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if "texts" not in data:
        got = f" (got: {', '.join(map(str, unknown))})" if unknown else ""
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'texts' is missing{got}; send {{\"texts\": [\"...\"]}}")
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown key '{unknown[0]}'; keys are: {', '.join(KEYS)}")
    texts = data["texts"]
    if not isinstance(texts, list):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'texts' must be a list of strings, got {_kind(texts)}")
    if not texts:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'texts' is empty; send at least one text")
    if len(texts) > SETTINGS.max_texts:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"'texts' has {len(texts)} items, more than the limit of {SETTINGS.max_texts} per request; split it",
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"texts[{i}] must be a string, got {_kind(text)}")
        if len(text) > SETTINGS.max_chars:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"texts[{i}] has {len(text)} characters, more than the limit of {SETTINGS.max_chars}",
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


def _endpoint(request: Request, name: str) -> Callable[..., Awaitable[Any]]:
    """The adaptive batcher of the batchable endpoint ``name``, found once through the app's router
    (see :func:`batcher`); the first one found also makes the gate."""
    global _gate
    if name not in _infer:
        for route in getattr(request.scope.get("router"), "routes", []):
            factory = getattr(getattr(getattr(route, "endpoint", None), "func", None), "__self__", None)
            if getattr(route, "name", None) == name and hasattr(factory, "batch_infer"):
                _infer[name] = functools.partial(factory.batch_infer, name)
                if name in getattr(factory, "dispatchers", {}):
                    cap_cork_wait(factory.dispatchers[name].optimizer)
                _gate = _gate or TextGate(2 * MAX_BATCH_SIZE)  # one batch running, one forming
                break
        else:
            raise RuntimeError(f"BentoML's {name} endpoint was not found in the app's routes; is bentoml < 1.5?")
    return _infer[name]


def batcher(request: Request) -> Callable[[list[str]], Awaitable[list[dict[str, Any]]]]:
    """The batchable endpoint's adaptive batcher, called in process.

    BentoML's own way to call an endpoint from inside the service (``self.to_async``)
    goes through an aiohttp session that BentoML closes and replaces every 100 requests,
    failing the requests still in flight on it; and it serializes every call to JSON. So
    /classify feeds the same dispatcher that serves POST /batch (one queue, one batching
    policy, BentoML's adaptive-batch-size metric included), found through the app's router.
    """
    infer = _endpoint(request, "batch")
    return lambda texts: infer((texts,), {})


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES without reading the rest of it."""
    length = request.headers.get("content-length")
    too_big = RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over the limit of {MAX_BODY_BYTES} bytes")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def is_image_server() -> bool:
    from serve.image import ImageRuntime

    return isinstance(bentoml.get_current_service().runtime, ImageRuntime)


async def classify(request: Request) -> JSONResponse:
    if is_image_server():
        return error(HTTPStatus.BAD_REQUEST, "this server serves an image-classification model; POST images to /classify-image")
    try:
        texts, return_all = parse_request(await read_body(request))
    except RequestError as e:
        return error(e.status, str(e))
    run = batcher(request)
    try:
        raw = await in_chunks(run, texts, MAX_BATCH_SIZE, _gate, MAX_LATENCY_MS / 1000)
    except (ServiceUnavailable, Overloaded):
        return error(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"server overloaded: the request would wait more than max_latency_ms={MAX_LATENCY_MS}; retry later",
        )
    rt = bentoml.get_current_service().runtime
    results = [rt.format(r["probs"], r["truncated"], return_all) for r in raw]
    return JSONResponse({"results": results})


def image_batcher(request: Request) -> Callable[[list[Any]], Awaitable[Any]]:
    """The batch_image endpoint's adaptive batcher, called in process (see :func:`batcher`)."""
    infer = _endpoint(request, "batch_image")
    return lambda pixels: infer((np.stack(pixels),), {})


async def classify_image(request: Request) -> JSONResponse:
    """POST /classify-image: multipart ``images`` files or JSON base64 ``images`` (serve/image.py)."""
    import anyio

    from serve.image import ImageRequestError, parse_json, parse_multipart

    if not is_image_server():
        return error(HTTPStatus.BAD_REQUEST, "this server serves a text-classification model; POST texts to /classify")
    rt = bentoml.get_current_service().runtime
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if kind not in ("multipart/form-data", "application/json"):
            raise ImageRequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"content type '{kind or 'none'}': send multipart/form-data with 'images' files, or application/json "
                '{"images": ["<base64>", ...]}',
            )
        body = await read_body(request)
        limits = (SETTINGS.max_images, SETTINGS.max_image_bytes)
        raws, return_all = await parse_multipart(request.headers, body, *limits) if kind == "multipart/form-data" else parse_json(body, *limits)
        # Decoding and resizing are CPU work: off the event loop.
        pixels = await anyio.to_thread.run_sync(
            lambda: [rt.decode(raw, f"images[{i}]", SETTINGS.max_image_pixels) for i, raw in enumerate(raws)]
        )
    except RequestError as e:
        return error(e.status, str(e))
    except ImageRequestError as e:
        return error(e.status, str(e))
    try:
        probs = await in_chunks(image_batcher(request), pixels, MAX_BATCH_SIZE, _gate, MAX_LATENCY_MS / 1000)
    except (ServiceUnavailable, Overloaded):
        return error(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"server overloaded: the request would wait more than max_latency_ms={MAX_LATENCY_MS}; retry later",
        )
    return JSONResponse({"results": [rt.format(p, return_all) for p in probs]})


async def info(request: Request) -> JSONResponse:
    svc = bentoml.get_current_service()
    body = svc.runtime.info()
    if body.get("choice") is None and SETTINGS.choice:  # made once by `ferry serve`, before the workers
        body["choice"] = json.loads(SETTINGS.choice)
    body["model"]["store_tag"] = svc.model_tag
    body["serving"] = {
        "max_batch_size": MAX_BATCH_SIZE,
        "max_latency_ms": MAX_LATENCY_MS,
        "max_texts": SETTINGS.max_texts,
        "max_chars": SETTINGS.max_chars,
        "max_images": SETTINGS.max_images,
        "max_image_bytes": SETTINGS.max_image_bytes,
        "max_image_pixels": SETTINGS.max_image_pixels,
        "workers": SETTINGS.workers,
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
    Route("/classify", classify, methods=["POST"]),
    Route("/classify-image", classify_image, methods=["POST"]),
    Route("/info", info, methods=["GET"]),
])


@bentoml.service(
    name="ferry",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},
    labels={"project": "ferry"},
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

    def __init__(self) -> None:
        path, self.model_tag = model_path()
        try:
            from runtime.artifact import check_valid_artifact_dir
            from serve.image import ImageRuntime

            image = check_valid_artifact_dir(path).task == "image-classification"
            self.runtime = (ImageRuntime if image else Runtime)(
                path,
                variant=SETTINGS.variant,
                device=SETTINGS.device,
                threads=SETTINGS.threads,
                optimization=SETTINGS.optimization,
                max_group=MAX_BATCH_SIZE,
                enforce_invariance=SETTINGS.batch_invariance == "enforce",
            )
        except FerryError as e:
            # A worker that cannot load its model stops the server instead of being respawned forever.
            log.error("refusing to start: %s", e)
            os.kill(os.getppid(), signal.SIGTERM)
            os._exit(2)
        for note in self.runtime.notes:
            log.warning(note)
        if getattr(self.runtime, "choice", None) is not None:
            for line in self.runtime.choice.log_lines():
                log.info(line)
        log.info(self.runtime.describe())
        log.info("adaptive batching: max_batch_size=%d texts, max_latency_ms=%d", MAX_BATCH_SIZE, MAX_LATENCY_MS)
        # Warm up off the event loop: /livez answers at once, /readyz only after it.
        threading.Thread(target=self._warm_up, name="ferry-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self.runtime.warm_up()
            log.info("warm-up inference done; ready")
        except Exception:  # a model that cannot run a warm-up is not ready, and says why
            log.exception("warm-up inference failed; /readyz stays 503")

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    @bentoml.api(route="/batch", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def batch(
        self, texts: Annotated[list[Annotated[str, MaxLen(SETTINGS.max_chars)]], Len(1, MAX_BATCH_SIZE)]
    ) -> list[dict[str, Any]]:
        """Probabilities per text for a merged batch (texts of concurrent requests)."""
        if not hasattr(self.runtime, "run_batch"):
            raise InvalidArgument("this server serves an image-classification model; POST images to /classify-image")
        b = self.runtime.run_batch(texts)
        m = metrics()
        m["texts"].observe(len(texts))
        m["tokens"].observe(sum(b.tokens))
        m["padded"].observe(b.padded_tokens)
        return [{"probs": p.tolist(), "truncated": t} for p, t in zip(b.probs, b.truncated)]

    @bentoml.api(route="/batch-image", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def batch_image(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities per image for a merged batch of preprocessed pixels ``[N, 3, H, W]``."""
        if not hasattr(self.runtime, "run_pixels"):
            raise InvalidArgument("this server serves a text-classification model; POST texts to /classify")
        return self.runtime.run_pixels(pixels)
