"""Server settings, passed from `ferry serve` to the BentoML service through environment variables.

The service module reads them when BentoML imports it (in the server process and in
every worker), so the same variables configure a Bento at ``bentoml serve`` or
``docker run -e`` time. Defaults depend on the device: a CPU batch is small and slow, a
GPU batch large and fast.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from ferry.errors import ConfigError

PREFIX = "FERRY_"
DEFAULT_MODEL = "ferry-classifier"
DEFAULT_TAG = f"{DEFAULT_MODEL}:latest"
BATCH_INVARIANCE = ("enforce", "variant")
BODY_SLACK = 65_536
# BentoML's dispatcher (max_batch_size is counted in texts) and the refusal budget per device.
# max_batch_tokens: the padded tokens of one model batch (benchmarks/batch_tokens.py measures
# the engine per batch shape). CPU (AMD EPYC, AVX2, demo fp32, 1 thread as a worker runs it):
# tokens/s is flat from about 128 padded tokens up (84-100% of the best from 8 x 16 to
# 128 x 128; 512-token texts 74-90%), so a bigger group buys no throughput, only memory and
# the wait of every text in it: 4,096 runs a full 32-text batch of texts up to 128 tokens as
# one call and 512-token texts by 8. GPU: text-embeddings-inference's default, not measured here.
DEVICE_DEFAULTS = {
    "cpu": {"max_batch_size": 32, "max_latency_ms": 10_000, "max_batch_tokens": 4096},
    "cuda": {"max_batch_size": 128, "max_latency_ms": 2_000, "max_batch_tokens": 16_384},
}
# Worker processes on GPU: one process's HTTP and tokenizing work, not the model, is the limit
# (H100, demo fp16 artifact, 64 concurrent clients: 325 req/s with 1 worker, 883 with 4).
GPU_WORKERS = 4
# On CPU the HTTP work and the engine share the cores, and one worker's Python (HTTP, JSON,
# batching) runs on one core at a time (the GIL). Measured on 2 cores (AMD EPYC, AVX2; demo
# artifact fp32, BBC headlines, 64 clients, benchmarks/serve_load.py): 2 workers x 1 engine
# thread served 1.7-2.3x the texts/s of 1 worker x 2 threads. So: one worker per physical core
# up to CPU_MAX_WORKERS, the cores divided among them as engine threads.
CPU_MAX_WORKERS = 4


def physical_cores() -> int:
    import psutil  # a BentoML dependency

    return int(psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)


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


@dataclasses.dataclass
class ServeSettings:
    """What the service needs to start; every field maps to ``FERRY_<FIELD>``."""

    artifact: str | None = None  # an artifact directory; None: the model store tag below
    model_tag: str = DEFAULT_TAG  # the BentoML model store tag (`ferry store` registers one)
    variant: str | None = None
    device: str = "auto"
    threads: int | None = None
    optimization: str = "all"
    workers: int | None = None  # None: per device (worker_split)
    split: str | None = None  # why that many workers and threads (`ferry serve` decides; /info reports it)
    max_batch_size: int | None = None  # None: the device's default
    max_latency_ms: int | None = None
    max_batch_tokens: int | None = None
    max_texts: int = 256
    max_chars: int = 50_000
    max_images: int = 64  # images per /classify-image request
    max_image_bytes: int = 10_000_000  # encoded bytes of one image
    max_image_pixels: int = 40_000_000  # width x height of one image (a decompression bomb is refused)
    timeout_s: int = 120
    # Requests in flight per worker; past it BentoML answers 429 at once (its traffic max_concurrency).
    # 256 is 8 batches of 32 (CPU) or 2 of 128 (GPU) of one-text requests waiting behind the gate,
    # which refuses with 503 whatever waits longer than max_latency_ms anyway; past that, a request
    # only holds memory (up to its body cap) and a connection.
    max_concurrency: int = 256
    batch_invariance: str = "enforce"  # or "variant": serve a batch-dependent variant batched anyway
    choice: str | None = None  # `ferry serve`'s start-up variant choice (JSON), reported by /info

    def to_env(self) -> dict[str, str]:
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[PREFIX + f.name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServeSettings":
        """Read ``FERRY_*`` variables; an invalid value raises ConfigError naming it."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems = []
        for f in dataclasses.fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name in ("artifact", "model_tag", "variant", "device", "optimization", "batch_invariance", "choice", "split"):
                values[f.name] = raw
                continue
            try:
                number = int(raw)
            except ValueError:
                problems.append(f"{PREFIX}{f.name.upper()}={raw!r} must be an integer")
                continue
            if number < 1 and f.name != "threads" or number < 0:
                problems.append(f"{PREFIX}{f.name.upper()}={raw!r} must be >= 1")
                continue
            values[f.name] = number
        if values.get("batch_invariance", "enforce") not in BATCH_INVARIANCE:
            problems.append(f"{PREFIX}BATCH_INVARIANCE={values['batch_invariance']!r} is not one of: {', '.join(BATCH_INVARIANCE)}")
        if problems:
            raise ConfigError(problems)
        return cls(**values)

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
            "/classify": self.max_texts * self.max_chars * 6 + BODY_SLACK,
            "/classify-image": self.max_images * (b64 * 80 // 76 + 1024) + BODY_SLACK,
        }

    def batch_tokens(self, device: str) -> int:
        """The token budget of one model batch for a resolved device ("cpu" or "cuda")."""
        return self.max_batch_tokens or DEVICE_DEFAULTS["cuda" if device == "cuda" else "cpu"]["max_batch_tokens"]

    def batching(self, device: str) -> tuple[int, int]:
        """(max_batch_size, max_latency_ms) for a resolved device ("cpu" or "cuda")."""
        d = DEVICE_DEFAULTS["cuda" if device == "cuda" else "cpu"]
        return (self.max_batch_size or d["max_batch_size"], self.max_latency_ms or d["max_latency_ms"])
