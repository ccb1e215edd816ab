"""`ferry serve`'s options and the service's FERRY_* settings: each defined once, the variables a Bento reads kept."""

from __future__ import annotations

import dataclasses

import pytest

from ferry.config import build_parser
from ferry.errors import ConfigError
from serve.cli import ServeArgs
from serve.settings import ServeSettings, env_name

# What a Bento (and `ferry serve`'s server) reads: renaming one breaks deployed containers.
BENTO_VARIABLES = {
    "FERRY_ARTIFACT", "FERRY_VARIANT", "FERRY_DEVICE", "FERRY_THREADS", "FERRY_OPTIMIZATION", "FERRY_WORKERS",
    "FERRY_MAX_BATCH_SIZE", "FERRY_MAX_LATENCY_MS", "FERRY_MAX_BATCH_TOKENS", "FERRY_MAX_TEXTS", "FERRY_MAX_CHARS",
    "FERRY_MAX_IMAGES", "FERRY_MAX_IMAGE_BYTES", "FERRY_MAX_IMAGE_PIXELS", "FERRY_TIMEOUT_S", "FERRY_MAX_CONCURRENCY",
    "FERRY_BATCH_INVARIANCE", "FERRY_MODEL_TAG", "FERRY_SPLIT", "FERRY_CHOICE",
}


def test_the_settings_are_the_bentos_variables():
    assert {env_name(f.name) for f in dataclasses.fields(ServeSettings)} == BENTO_VARIABLES


def test_the_options_keep_the_order_of_ferry_serve_help():
    parser = build_parser(ServeArgs, "ferry serve", "")
    flags = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
    assert flags == ["artifact", "variant", "host", "port", "device", "threads", "optimization", "workers",
                     "max_batch_size", "max_latency_ms", "max_batch_tokens", "max_texts", "max_chars", "max_images",
                     "max_image_bytes", "max_image_pixels", "timeout", "max_concurrency", "batch_invariance",
                     "import_model", "name"]


def test_the_settings_of_ferry_serves_defaults_are_the_services_defaults():
    """`ferry serve` with no option configures a worker exactly as a Bento with no FERRY_* variable."""
    assert ServeSettings.of(ServeArgs()) == ServeSettings() == ServeSettings.from_env({})
    args = ServeArgs(artifact="/a", variant="fp32", threads=3, timeout=7, max_images=2, port=4000)
    settings = ServeSettings.of(args)
    assert (settings.artifact, settings.variant, settings.threads, settings.timeout, settings.max_images) == ("/a", "fp32", 3, 7, 2)
    assert settings.to_env()["FERRY_TIMEOUT_S"] == "7" and "FERRY_PORT" not in settings.to_env()
    assert ServeSettings.from_env(settings.to_env()) == settings


def test_bad_variables_are_one_error_naming_each():
    with pytest.raises(ConfigError) as e:
        ServeSettings.from_env({"FERRY_OPTIMIZATION": "most", "FERRY_BATCH_INVARIANCE": "never", "FERRY_TIMEOUT_S": "soon"})
    assert e.value.problems == [
        "FERRY_OPTIMIZATION 'most' is not one of: disable, basic, extended, all",
        "FERRY_TIMEOUT_S='soon' must be an integer",
        "FERRY_BATCH_INVARIANCE 'never' is not one of: enforce, variant",
    ]
