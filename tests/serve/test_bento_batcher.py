"""ferry's reaches into BentoML's internals (serve/bento_batcher.py): the version check at start, the
attribute check, the cork cap, the wrap around the app; no server."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from serve import bento_batcher
from serve.bento_batcher import MIN_CORK_S, UnknownBentoML, cap_cork_wait, check_bentoml_version

ROOT = Path(__file__).resolve().parents[2]


def assert_one_line_refusal(message: str, *names: str) -> None:
    assert "\n" not in message and "\r" not in message
    for name in ("bentoml>=1.4.39,<1.5", "checked on 1.4.39", "pip install -c constraints.txt 'bentoml==1.4.39'", *names):
        assert name in message, f"{name!r} not in: {message}"


# --- the version check ---------------------------------------------------------------------------


def test_the_installed_bentoml_is_known_and_has_every_internal_ferry_uses():
    installed = importlib.metadata.version("bentoml")
    assert check_bentoml_version() == installed == bento_batcher.installed_version()
    bento_batcher.check_bentoml()  # no raise


@pytest.mark.parametrize("version", ["1.4.39", "1.4.40", "1.4.39.post1"])
def test_known_versions_pass(version):
    assert check_bentoml_version(version) == version


@pytest.mark.parametrize("version", ["1.3.0", "1.4.38", "1.4.0", "1.5.0", "1.5.0rc1", "1.4.40rc1", "2.0.0", "0.13.1"])
def test_unknown_versions_are_refused_in_one_line(version):
    with pytest.raises(UnknownBentoML) as e:
        check_bentoml_version(version)
    assert_one_line_refusal(str(e.value), f"BentoML {version} is installed")
    assert e.value.exit_code == 2


def test_a_garbage_version_is_refused_and_stays_one_line():
    with pytest.raises(UnknownBentoML) as e:
        check_bentoml_version("not a version\nat all")
    assert_one_line_refusal(str(e.value), "BentoML not a version\\nat all is installed")


def test_the_installed_version_is_what_is_checked(monkeypatch):
    monkeypatch.setattr(bento_batcher, "installed_version", lambda: "1.5.0")
    with pytest.raises(UnknownBentoML, match="BentoML 1.5.0 is installed"):
        bento_batcher.check_bentoml()
    monkeypatch.setattr(bento_batcher, "installed_version", lambda: None)
    with pytest.raises(UnknownBentoML) as e:
        bento_batcher.check_bentoml()
    assert_one_line_refusal(str(e.value), "BentoML is not installed")


# --- the attribute check ----------------------------------------------------------------------------


def _internal(module: str, name: str):
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(
    "module, cls, attr, named",
    [
        ("_bentoml_impl.server.app", "ServiceAppFactory", "batch_infer", "_bentoml_impl.server.app.ServiceAppFactory.batch_infer"),
        ("bentoml._internal.marshal.dispatcher", "Optimizer", "trigger_refresh",
         "bentoml._internal.marshal.dispatcher.CorkDispatcher().optimizer.trigger_refresh"),
        ("_bentoml_sdk", "Service", "to_asgi", "_bentoml_sdk.Service.to_asgi"),
        ("bentoml._internal.server.http.traffic", "TimeoutMiddleware", "__call__",
         "bentoml._internal.server.http.traffic.TimeoutMiddleware().__call__"),
        ("bentoml._internal.server.http.traffic", "TimeoutMiddleware", "_set_timer_out",
         "bentoml._internal.server.http.traffic.TimeoutMiddleware()._set_timer_out"),
    ],
)
def test_a_missing_internal_is_refused_naming_it(monkeypatch, module, cls, attr, named):
    monkeypatch.delattr(_internal(module, cls), attr)
    with pytest.raises(UnknownBentoML) as e:
        bento_batcher.check_bentoml()
    assert_one_line_refusal(str(e.value), f"has no {named}, a BentoML internal ferry relies on")


def test_a_missing_instance_attribute_is_refused_naming_it(monkeypatch):
    """``wait`` and ``o_b`` are set in Optimizer.__init__: checked on a fresh dispatcher's optimizer."""
    Optimizer = _internal("bentoml._internal.marshal.dispatcher", "Optimizer")
    init = Optimizer.__init__

    def init_without_wait(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self.wait

    monkeypatch.setattr(Optimizer, "__init__", init_without_wait)
    with pytest.raises(UnknownBentoML, match=r"has no bentoml\._internal\.marshal\.dispatcher\.CorkDispatcher\(\)\.optimizer\.wait,"):
        bento_batcher.check_internals()


def test_a_missing_api_method_field_is_refused_naming_it(monkeypatch):
    import attrs

    fields = dict(attrs.fields_dict(_internal("_bentoml_sdk.method", "APIMethod")))
    del fields["batchable"]
    monkeypatch.setattr(attrs, "fields_dict", lambda cls: fields)
    with pytest.raises(UnknownBentoML, match=r"has no _bentoml_sdk\.method\.APIMethod\.batchable,"):
        bento_batcher.check_internals()


# --- the check at start -------------------------------------------------------------------------------


def test_ferry_serve_refuses_an_unknown_bentoml_in_one_line_before_starting_anything(monkeypatch, capsys, served_artifact):
    from ferry.cli import main
    import runtime.predictor
    import serve.cli

    started = []
    monkeypatch.setattr(bento_batcher, "installed_version", lambda: "1.5.0")
    monkeypatch.setattr(runtime.predictor, "Runtime", lambda *a, **k: started.append("runtime"))
    monkeypatch.setattr(serve.cli, "run_server", lambda *a, **k: started.append("server") or 0)
    rc = main(["serve", str(served_artifact), "--variant", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and started == []
    assert len(err.splitlines()) == 1 and err.startswith("ferry serve: error: BentoML 1.5.0 is installed"), err
    assert_one_line_refusal(err.strip())


def test_the_service_refuses_an_unknown_bentoml_at_import():
    """What `bentoml serve serve.service:Ferry` (a Bento, without ferry serve) does: one line, exit 2."""
    code = "import serve.bento_batcher as b; b.installed_version = lambda: '2.0.0'; import serve.service"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env.update(PYTHONPATH=str(ROOT), BENTOML_DO_NOT_TRACK="True")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferry: refusing to start: BentoML 2.0.0 is installed"), p.stderr
    assert_one_line_refusal(lines[0])


# --- the cork cap ----------------------------------------------------------------------------------------


class FakeOptimizer:
    """What the cap uses of BentoML's Optimizer: ``wait``, ``o_b`` and ``trigger_refresh`` (which relearns ``wait``)."""

    def __init__(self, wait: float, o_b: float, learned: float):
        self.wait, self.o_b, self.learned, self.refreshes = wait, o_b, learned, 0

    def trigger_refresh(self) -> None:
        self.refreshes += 1
        self.wait = self.learned


def test_the_cork_cap_bounds_the_learned_wait_at_a_batchs_fixed_cost():
    opt = FakeOptimizer(wait=2.0, o_b=0.03, learned=5.0)
    cap_cork_wait(SimpleNamespace(optimizer=opt))
    assert opt.wait == 0.03  # capped at once
    opt.trigger_refresh()
    assert opt.refreshes == 1 and opt.wait == 0.03  # BentoML's refresh still runs, then the cap
    opt.learned = 0.01
    opt.trigger_refresh()
    assert opt.wait == 0.01  # under the cap: left as learned


def test_the_cork_cap_has_a_floor_when_the_fixed_cost_is_zero():
    opt = FakeOptimizer(wait=1.0, o_b=0.0, learned=1.0)
    cap_cork_wait(SimpleNamespace(optimizer=opt))
    assert opt.wait == MIN_CORK_S
    opt.trigger_refresh()
    assert opt.wait == MIN_CORK_S


def _lone_latency_after_burst(capped: bool) -> float:
    """Train BentoML's own dispatcher, queue a burst behind running batches, then time one lone request."""
    import time

    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    async def model_(jobs):
        await asyncio.sleep(0.04 + 0.002 * sum(len(j) for j in jobs))
        return [list(j) for j in jobs]

    async def scenario():
        d = CorkDispatcher(max_latency_in_ms=60_000, max_batch_size=8, fallback=lambda: None, get_batch_size=len, batch_dim=(0, 0))
        run = d(model_)
        if capped:
            cap_cork_wait(d)
        for i in range(12):  # BentoML's warm-up/training calls
            await run([f"w{i}"])
        for _ in range(3):  # bursts: each job waits behind the batches before it
            await asyncio.gather(*(run([f"b{i}"]) for i in range(64)))
        d.optimizer.trigger_refresh()  # what the dispatcher does every 5 s, without waiting for it
        assert d.optimizer.wait > 0.1 or capped
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await run(["alone"])
        return time.perf_counter() - t0

    return asyncio.run(scenario())


@pytest.mark.slow
def test_a_lone_request_after_a_burst_is_not_held_for_the_bursts_queueing_delay():
    uncapped, capped = _lone_latency_after_burst(False), _lone_latency_after_burst(True)
    # BentoML alone holds it open for the >100 ms it learned during the bursts, then runs it (~42 ms);
    # capped, it waits at most the dispatcher's estimate of a batch's fixed cost (~40 ms)
    assert uncapped > 0.14
    assert capped < uncapped - 0.04


# --- the wrap around the app ------------------------------------------------------------------------------


def test_wrap_asgi_wraps_only_the_given_service_once():
    class FakeService:
        def __init__(self, apis):
            self.apis = apis

        def to_asgi(self, is_main=True):
            return ("app", self, is_main)

    api = lambda route, batchable: SimpleNamespace(route=route, batchable=batchable)  # noqa: E731
    svc = FakeService({"classify": api("/classify", False), "batch": api("/batch", True)})
    other = FakeService({})
    wrapped = []
    bento_batcher.wrap_asgi(svc, lambda app, internal: wrapped.append((app, internal)) or "front")
    bento_batcher.wrap_asgi(svc, lambda app, internal: "twice")  # installed once
    assert svc.to_asgi(is_main=False) == "front"
    assert wrapped == [(("app", svc, False), ["/batch"])]
    assert other.to_asgi() == ("app", other, True)
