"""Server settings, passed from `ferry serve` to the BentoML service through environment variables.

Each setting is defined once, with its default and its help: :class:`ServedModel` and
:class:`RunOptions` are both options of `ferry serve` (serve/cli.py's ``ServeArgs``) and fields
of :class:`ServeSettings`, which `ferry serve` writes as ``FERRY_*`` variables. The service module
reads them when BentoML imports it (in the server process and in every worker), so the same
variables configure a Bento at ``bentoml serve`` or ``docker run -e`` time. Defaults depend on the
device: a CPU batch is small and slow, a GPU batch large and fast.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping

from ferry.config import opt, positive
from ferry.errors import ConfigError
from ferry.tasks import IMAGE, TEXT
from runtime.engines import OPT_LEVELS
from runtime import predictor
from runtime.predictor import DEVICE_DEFAULTS
from runtime.artifact import Artifact
from runtime.hardware import physical_cores

PREFIX = "FERRY_"
DEFAULT_MODEL = "ferry-classifier"
DEFAULT_TAG = f"{DEFAULT_MODEL}:latest"
BATCH_INVARIANCE = ("enforce", "variant")
BODY_SLACK = 65_536
# Worker processes on GPU: one process's HTTP and tokenizing work, not the model, is the limit
# (H100, demo fp16 artifact, 64 concurrent clients: 325 req/s with 1 worker, 883 with 4).
GPU_WORKERS = 4
# On CPU the HTTP work and the engine share the cores, and one worker's Python (HTTP, JSON,
# batching) runs on one core at a time (the GIL). Measured on 2 cores (AMD EPYC, AVX2; demo
# artifact fp32, BBC headlines, 64 clients, benchmarks/serve_load.py): 2 workers x 1 engine
# thread served 1.7-2.3x the texts/s of 1 worker x 2 threads. So: one worker per physical core
# up to CPU_MAX_WORKERS, the cores divided among them as engine threads.
CPU_MAX_WORKERS = 4


def worker_split(device: str, workers: int | None, threads: int | None, cores: int | None = None) -> tuple[int, int | None, str]:
    """(worker processes, engine threads per worker or None for the engine's own default, why).

    What is given is kept; what is not comes from the device and the physical cores.
    """
    cores = cores or physical_cores()
    if device == "cuda":
        w = workers or GPU_WORKERS
        return w, threads, "given" if workers else f"{GPU_WORKERS} workers sharing the GPU (the model is not the limit there)"
    w = workers or min(cores, CPU_MAX_WORKERS)
    t = threads or max(1, cores // w)
    if workers and threads:
        why = "given"
    else:
        why = f"{cores} physical cores: {w} worker{'s' if w > 1 else ''} x {t} engine thread{'s' if t > 1 else ''}"
        why += " (one worker per core up to 4; each worker's Python runs on one core at a time)" if not workers else ""
    return w, t, why


def at_least_two(value: Any) -> str | None:
    return None if value is None or value >= 2 else "must be >= 2 (BentoML batches at least two texts)"


@dataclasses.dataclass
class ServedModel:
    """Which model is served."""

    artifact: str | None = opt(None, "the artifact directory written by ferry export", positional=True)
    variant: str | None = opt(None, "the variant to serve (default on CPU: the fastest variant that passes its gate on this machine, timed and re-checked at start within 15 s; on GPU: the artifact's GPU default)")


@dataclasses.dataclass
class RunOptions:
    """How the server runs it."""

    device: str = opt("auto", "where to run: auto (CUDA when ONNX Runtime can use a GPU), cpu or cuda", choices=predictor.DEVICES)
    threads: int | None = opt(None, "engine threads per worker (default on CPU: the physical cores divided among the workers; on GPU: the engine's own)", check=positive)
    optimization: str = opt("all", "ONNX Runtime graph optimization level", choices=OPT_LEVELS)
    workers: int | None = opt(
        None,
        f"server worker processes, each loading the model once (default: one per physical core, at most {CPU_MAX_WORKERS}, "
        f"on CPU; {GPU_WORKERS} on GPU)",
        check=positive,
    )
    max_batch_size: int | None = opt(
        None,
        f"most texts the adaptive batcher merges into one model batch (default: {DEVICE_DEFAULTS['cpu']['max_batch_size']} "
        f"on CPU, {DEVICE_DEFAULTS['cuda']['max_batch_size']} on GPU)",
        check=at_least_two,
    )
    max_latency_ms: int | None = opt(
        None,
        "queueing budget: a batch whose estimated latency passes it is refused with 503 (overload) "
        f"(default: {DEVICE_DEFAULTS['cpu']['max_latency_ms']} on CPU, {DEVICE_DEFAULTS['cuda']['max_latency_ms']} on GPU)",
        check=positive,
    )
    max_batch_tokens: int | None = opt(
        None,
        "token budget of one model batch: the merged texts, sorted by length, run in groups whose padded tokens stay "
        "within it (a longer text runs alone) "
        f"(default: {DEVICE_DEFAULTS['cpu']['max_batch_tokens']} on CPU, {DEVICE_DEFAULTS['cuda']['max_batch_tokens']} on GPU)",
        check=positive,
    )
    max_texts: int = opt(256, "most texts in one request (more: 413)", check=positive)
    max_chars: int = opt(50_000, "most characters in one text (more: 413); texts over max_length tokens are truncated", check=positive)
    max_images: int = opt(64, "image artifacts: most images in one /classify-image request (more: 413)", check=positive)
    max_image_bytes: int = opt(10_000_000, "image artifacts: most encoded bytes of one image (more: 413)", check=positive)
    # A decompression bomb is refused from the image's header.
    max_image_pixels: int = opt(40_000_000, "image artifacts: most pixels (width x height) of one image (more: 413)", check=positive)
    timeout: int = opt(120, "seconds before a request is abandoned", check=positive)  # FERRY_TIMEOUT_S
    # Past it BentoML answers 429 at once (its traffic max_concurrency). 256 is 8 batches of 32 (CPU)
    # or 2 of 128 (GPU) of one-text requests waiting behind the gate, which refuses with 503 whatever
    # waits longer than max_latency_ms anyway; past that, a request only holds memory (up to its
    # body cap) and a connection.
    max_concurrency: int = opt(
        256,
        "most requests in flight per worker; more are answered 429 at once (the admission gate already refuses "
        "with 503 what would wait past max_latency_ms; past this, a request only holds memory and a connection)",
        check=positive,
    )
    batch_invariance: str = opt(
        "enforce",
        "enforce: a variant whose answers depend on its batch (dynamic int8) runs one text per call, so every answer "
        "equals the answer alone; variant: batch it anyway, faster",
        choices=BATCH_INVARIANCE,
    )


# The variable of a field whose name differs from FERRY_<FIELD>: Bentos read FERRY_TIMEOUT_S.
ENV_NAMES = {"timeout": PREFIX + "TIMEOUT_S"}


def env_name(field: str) -> str:
    return ENV_NAMES.get(field, PREFIX + field.upper())


@dataclasses.dataclass
class ServeSettings(RunOptions, ServedModel):
    """What the service needs to start: the served model and how it runs (the options of `ferry serve`,
    with their defaults), and what `ferry serve` decides; every field maps to :func:`env_name`.

    ``artifact`` None: the model comes from the model store, ``model_tag``.
    """

    model_tag: str = DEFAULT_TAG  # the BentoML model store tag (`ferry store` registers one)
    split: str | None = None  # why that many workers and threads (`ferry serve` decides; /info reports it)
    choice: str | None = None  # `ferry serve`'s start-up variant choice (JSON), reported by /info

    @classmethod
    def of(cls, options: Any) -> ServeSettings:
        """The settings of ``options`` (a :class:`ServeArgs`): its ServedModel and RunOptions fields."""
        shared = [f.name for f in dataclasses.fields(ServedModel) + dataclasses.fields(RunOptions)]
        return cls(**{name: getattr(options, name) for name in shared})

    def to_env(self) -> dict[str, str]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {env_name(name): str(value) for name, value in values.items() if value is not None}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        """Read ``FERRY_*`` variables; invalid values raise one ConfigError naming each."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        problems = []
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            if int not in (hints[f.name], *typing.get_args(hints[f.name])):
                choices = f.metadata.get("choices")
                if choices and raw not in choices:
                    problems.append(f"{name} {raw!r} is not one of: {', '.join(choices)}")
                values[f.name] = raw
                continue
            try:
                number = int(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} must be an integer")
                continue
            if number < 1 and f.name != "threads" or number < 0:
                problems.append(f"{name}={raw!r} must be >= 1")
                continue
            values[f.name] = number
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    def open_runtime(
        self, artifact: str | Path | Artifact, threads: int | None, max_group: int | None = None, max_tokens: int | None = None,
    ) -> predictor.Runtime:
        """The runtime these settings serve from ``artifact``, with ``threads`` engine threads (worker_split's)
        and, in a worker, its batching caps (None: the checks at start, which run no batches): the one
        place `ferry serve`, the server's start-up choice and every worker open one.

        Raises:
            FerryError: the artifact, its variant or the device cannot be served.
        """
        return predictor.Runtime(artifact, self.variant, self.device, threads, self.optimization, max_group=max_group,
                                 max_tokens=max_tokens, enforce_invariance=self.batch_invariance == "enforce")

    def body_caps(self) -> dict[str, int]:
        """The most body bytes each endpoint reads: what its largest valid request takes, plus
        :data:`BODY_SLACK` (keys, separators, whitespace, multipart headers).

        /classify: ``max_texts`` texts of ``max_chars`` characters each written as a 6-byte
        ``\\uXXXX`` escape. /classify-image: ``max_images`` images of ``max_image_bytes`` bytes as
        base64 (4 bytes per 3), with room for ``base64 FILE``'s line breaks written as escaped
        CRLFs in JSON (4 bytes per 76) and 1 KiB per image for a data URL prefix or a part's headers.
        """
        b64 = (self.max_image_bytes + 2) // 3 * 4
        return {
            TEXT.route: self.max_texts * self.max_chars * 6 + BODY_SLACK,
            IMAGE.route: self.max_images * (b64 * 80 // 76 + 1024) + BODY_SLACK,
        }

    def batch_tokens(self, device: str) -> int:
        """The token budget of one model batch for a resolved device ("cpu" or "cuda")."""
        return self.max_batch_tokens or DEVICE_DEFAULTS["cuda" if device == "cuda" else "cpu"]["max_batch_tokens"]

    def batching(self, device: str) -> tuple[int, int]:
        """(max_batch_size, max_latency_ms) for a resolved device ("cpu" or "cuda")."""
        d = DEVICE_DEFAULTS["cuda" if device == "cuda" else "cpu"]
        return (self.max_batch_size or d["max_batch_size"], self.max_latency_ms or d["max_latency_ms"])
