"""The BentoML service: one class, the model loaded once per worker, adaptive batching.

Routes:
    POST /classify   ``{"texts": [...], "return_all_scores": false}`` -> ``{"results": [...]}``;
                     validates each request (4xx JSON errors), then feeds its texts, in
                     chunks of at most ``max_batch_size``, to the batchable endpoint's
                     adaptive batcher, in process.
    POST /classify-image  the same for images (serve/image.py).
    GET  /info       model, labels, variant, provider, max_length, batch invariance, parity.
    GET  /livez, /readyz (200 only once every worker has run its warm-up inference),
                     /metrics (BentoML's Prometheus metrics plus texts, tokens and padded
                     tokens per batch).

The batchable endpoints ``batch`` and ``batch_image`` (BentoML's adaptive batcher merges the
texts or images of concurrent requests into one list) are internal: serve/front.py answers 404
to them over HTTP, as to any path that is not a route, before BentoML's metrics label it.

Where ferry reaches into BentoML's internals (the batcher called in process, the cork cap, the
wrap around the app, the timeout timers), it does so in serve/bento_batcher.py, which checks
the installed BentoML at the import of this module and refuses one it does not know.

Bodies are capped per endpoint by what its largest valid request needs
(``ServeSettings.body_caps``) and parsed as they are checked (serve/body.py). Whatever goes
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
from typing import Annotated, Any, Awaitable, Callable, NoReturn

import bentoml
from annotated_types import Len, MaxLen
import numpy as np
from bentoml.exceptions import InvalidArgument, ServiceUnavailable
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ferry.tasks import IMAGE_TASK
from ferry.errors import FerryError
from serve import bento_batcher, front
from serve.batching import Overloaded, TextGate, in_chunks
from serve.body import WHOLE_BYTES, RequestError, Scalar, Strings, json_problem, parse_object, read_body
from serve.readiness import SharedReadiness
from runtime.predictor import Runtime, check_startup, resolve_device
from serve.settings import ServeSettings, worker_split

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
KEYS = ("texts", "return_all_scores")
EXAMPLE = '{"texts": ["..."]}'
TEXT_SCHEMA = {
    "texts": Strings(
        SETTINGS.max_texts, SETTINGS.max_chars * 6,
        lambda key: f"'{key}' has over {SETTINGS.max_texts} items, more than the limit of {SETTINGS.max_texts} per request; split it",
        lambda key, i: f"{key}[{i}] has more characters than the limit of {SETTINGS.max_chars}",
    ),
    "return_all_scores": Scalar(),
}
PUBLIC = "routes are POST /classify, POST /classify-image, GET /info, /livez, /readyz, /metrics"

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


def error(status: HTTPStatus, message: str) -> JSONResponse:
    """A one-line JSON error: whatever a message quotes from the request, it stays one line of valid UTF-8."""
    line = " ".join(message.split("\n"))[:1000].encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": line, "status": int(status)}, status_code=int(status))


def describe(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(e).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def non_finite(probs: Any) -> str | None:
    """"NaN" or "inf" when ``probs`` holds one, else None."""
    a = np.asarray(probs, dtype=np.float64)
    if np.isfinite(a).all():
        return None
    return "NaN" if np.isnan(a).any() else "inf"


def parse_request(body: bytes) -> tuple[list[str], bool]:
    """The texts and return_all_scores of a small /classify body; RequestError names what is wrong."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, "body is nested too deeply to be a request") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and a number of more than 4300 digits
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({json_problem(e)}); send {EXAMPLE}") from None
    return check_request(data)


async def parse_text_body(body: bytes) -> tuple[list[str], bool]:
    """A /classify body: parsed whole when small, else as it is checked (serve/body.py)."""
    if len(body) <= WHOLE_BYTES:
        return parse_request(body)
    return check_request(await parse_object(body, TEXT_SCHEMA, EXAMPLE))


def check_request(data: Any) -> tuple[list[str], bool]:
    """The texts and return_all_scores of a parsed /classify body."""
    if not isinstance(data, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body must be a JSON object like {{\"texts\": [...]}}, got {type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if "texts" not in data:
        got = f" (got: {', '.join(repr(k[:100]) for k in unknown[:5])})" if unknown else ""
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'texts' is missing{got}; send {{\"texts\": [\"...\"]}}")
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown key {unknown[0][:100]!r}; keys are: {', '.join(KEYS)}")
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
    (serve/bento_batcher.py; see :func:`batcher`); the first one found also makes the gate."""
    global _gate
    if name not in _infer:
        infer, dispatcher = bento_batcher.batchable_endpoint(request.scope, name)
        if dispatcher is not None:
            bento_batcher.cap_cork_wait(dispatcher)
        _infer[name] = infer
        _gate = _gate or TextGate(2 * MAX_BATCH_SIZE)  # one batch running, one forming
    return _infer[name]


def batcher(request: Request) -> Callable[[list[str]], Awaitable[list[dict[str, Any]]]]:
    """The batchable endpoint's adaptive batcher, called in process.

    Not ``self.to_async``, BentoML's own way: serve/bento_batcher.py's ``batchable_endpoint``
    says why, and how the dispatcher BentoML built for the batchable endpoint is found through
    the app's router; that endpoint's own HTTP route is closed (serve/front.py).
    """
    infer = _endpoint(request, "batch")
    return lambda texts: infer((texts,), {})


def is_image_server() -> bool:
    from serve.image import ImageRuntime

    return isinstance(bentoml.get_current_service().runtime, ImageRuntime)


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


async def classify(request: Request) -> JSONResponse:
    if is_image_server():
        return error(HTTPStatus.BAD_REQUEST, "this server serves an image-classification model; POST images to /classify-image")
    rt = bentoml.get_current_service().runtime
    if not rt.ready:
        return error(HTTPStatus.SERVICE_UNAVAILABLE, WARMING_UP)
    try:
        texts, return_all = await parse_text_body(await read_body(request, BODY_CAPS["/classify"]))
    except RequestError as e:
        return error(e.status, str(e))
    raw = await run_batched(batcher(request), texts, "texts")
    if isinstance(raw, JSONResponse):
        return raw
    return JSONResponse({"results": [rt.format(r["probs"], r["truncated"], return_all) for r in raw]})


def image_batcher(request: Request) -> Callable[[list[Any]], Awaitable[Any]]:
    """The batch_image endpoint's adaptive batcher, called in process (see :func:`batcher`)."""
    infer = _endpoint(request, "batch_image")
    return lambda pixels: infer((np.stack(pixels),), {})


async def classify_image(request: Request) -> JSONResponse:
    """POST /classify-image: multipart ``images`` files or JSON base64 ``images`` (serve/image.py)."""
    import anyio

    from serve.image import parse_json_body, parse_multipart

    if not is_image_server():
        return error(HTTPStatus.BAD_REQUEST, "this server serves a text-classification model; POST texts to /classify")
    rt = bentoml.get_current_service().runtime
    if not rt.ready:
        return error(HTTPStatus.SERVICE_UNAVAILABLE, WARMING_UP)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if kind not in ("multipart/form-data", "application/json"):
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"content type '{kind[:100] or 'none'}': send multipart/form-data with 'images' files, or application/json "
                '{"images": ["<base64>", ...]}',
            )
        body = await read_body(request, BODY_CAPS["/classify-image"])
        limits = (SETTINGS.max_images, SETTINGS.max_image_bytes)
        if kind == "multipart/form-data":
            raws, return_all = await parse_multipart(request.headers, body, *limits)
        else:
            raws, return_all = await parse_json_body(body, *limits)
        del body
        # Decoding and resizing are CPU work: off the event loop.
        pixels = await anyio.to_thread.run_sync(
            lambda: [rt.decode(raw, f"images[{i}]", SETTINGS.max_image_pixels) for i, raw in enumerate(raws)]
        )
    except RequestError as e:
        return error(e.status, str(e))
    raw = await run_batched(image_batcher(request), pixels, "images")
    if isinstance(raw, JSONResponse):
        return raw
    return JSONResponse({"results": [rt.format(r["probs"], return_all) for r in raw]})


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
        "max_body_bytes": BODY_CAPS["/classify-image" if is_image_server() else "/classify"],
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
    Route("/classify", classify, methods=["POST"]),
    Route("/classify-image", classify_image, methods=["POST"]),
    Route("/info", info, methods=["GET"]),
])


@bentoml.service(
    name="ferry",
    workers=WORKERS,
    # BentoML divides max_concurrency among the workers: each worker holds SETTINGS.max_concurrency.
    traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency * WORKERS},
    labels={"project": "ferry"},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/classify", "/classify-image", "/info", "/livez", "/readyz", "/metrics"]},
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
            from runtime.artifact import check_valid_artifact_dir
            from serve.image import ImageRuntime

            image = check_valid_artifact_dir(path).task == IMAGE_TASK
            extra = {} if image else {"max_tokens": MAX_BATCH_TOKENS}
            self.runtime = (ImageRuntime if image else Runtime)(
                path,
                variant=SETTINGS.variant,
                device=SETTINGS.device,
                threads=THREADS,
                optimization=SETTINGS.optimization,
                max_group=MAX_BATCH_SIZE,
                enforce_invariance=SETTINGS.batch_invariance == "enforce",
                **extra,
            )
        except FerryError as e:
            stop_server(f"refusing to start: {e}")
        for note in self.runtime.notes:
            log.warning(note)
        if getattr(self.runtime, "choice", None) is not None:
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

    def _run_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        """Probabilities per text; when the batch raises, each text again alone, so that only the
        texts it raises on get an error (naming the cause), not every request merged with them."""
        try:
            b = self.runtime.run_batch(texts)
        except Exception as e:  # noqa: BLE001 - reported per text to the requests that hold it
            if len(texts) == 1:
                log.error("inference failed on one text: %s", describe(e))
                return [{"error": describe(e)}]
            log.warning("a batch of %d texts failed (%s); running them one at a time", len(texts), describe(e))
            return [r for t in texts for r in self._run_texts([t])]
        m = metrics()
        m["texts"].observe(len(texts))
        m["tokens"].observe(sum(b.tokens))
        m["padded"].observe(b.padded_tokens)
        return [{"probs": p.tolist(), "truncated": t} for p, t in zip(b.probs, b.truncated)]

    @bentoml.api(route="/batch", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def batch(
        self, texts: Annotated[list[Annotated[str, MaxLen(SETTINGS.max_chars)]], Len(1, MAX_BATCH_SIZE)]
    ) -> list[dict[str, Any]]:
        """Probabilities per text for a merged batch (texts of concurrent requests); internal (serve/front.py)."""
        if not hasattr(self.runtime, "run_batch"):
            raise InvalidArgument("this server serves an image-classification model; POST images to /classify-image")
        return self._run_texts(texts)

    def _run_pixels(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """Probabilities per image, isolating the images an inference raises on (see :meth:`_run_texts`)."""
        try:
            return [{"probs": p} for p in self.runtime.run_pixels(pixels)]
        except Exception as e:  # noqa: BLE001 - reported per image to the requests that hold it
            if len(pixels) == 1:
                log.error("inference failed on one image: %s", describe(e))
                return [{"error": describe(e)}]
            log.warning("a batch of %d images failed (%s); running them one at a time", len(pixels), describe(e))
            return [r for i in range(len(pixels)) for r in self._run_pixels(pixels[i : i + 1])]

    @bentoml.api(route="/batch-image", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def batch_image(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """Probabilities per image for a merged batch of preprocessed pixels ``[N, 3, H, W]``; internal (serve/front.py)."""
        if not hasattr(self.runtime, "run_pixels"):
            raise InvalidArgument("this server serves a text-classification model; POST texts to /classify")
        return self._run_pixels(pixels)


def choose_once() -> None:
    """The start-up variant choice, made once here for every worker (``bentoml serve`` of a Bento;
    `ferry serve` made it already): workers started after this hook inherit the environment, so
    they all serve the same variant instead of each timing the candidates against the others."""
    if SETTINGS.variant or DEVICE != "cpu":
        return
    path = model_path()[0]
    from runtime.artifact import check_valid_artifact_dir

    if check_valid_artifact_dir(path).task == IMAGE_TASK:
        return
    try:
        rt = Runtime(path, device="cpu", threads=THREADS, optimization=SETTINGS.optimization,
                     enforce_invariance=SETTINGS.batch_invariance == "enforce")
    except FerryError as e:
        print(f"ferry: refusing to start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if rt.choice is not None:
        for line in rt.choice.log_lines():
            log.info(line)
        os.environ["FERRY_CHOICE"] = json.dumps(rt.choice.as_dict())
    os.environ["FERRY_VARIANT"] = rt.variant.name


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
    app, internal, PUBLIC, fast={"/classify": classify}, max_concurrency=SETTINGS.max_concurrency, timeout_s=SETTINGS.timeout))
bento_batcher.cancel_timeout_timers()
