"""How /classify feeds BentoML's adaptive batcher (serve/batching.py), tested on BentoML's own dispatcher."""

from __future__ import annotations

import asyncio

import pytest
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from bentoml.exceptions import ServiceUnavailable

from serve.batching import Overloaded, TextGate, in_chunks

MS_PER_TEXT = 0.002  # 32 texts take 64 ms, more than the 50 ms budget below


def dispatcher() -> CorkDispatcher:
    def overloaded():
        raise ServiceUnavailable("process is overloaded")

    return CorkDispatcher(max_latency_in_ms=50, max_batch_size=32, fallback=overloaded, get_batch_size=len, batch_dim=(0, 0))


async def model(jobs):
    """Stands for the batch endpoint: takes time per text, answers each job with its texts."""
    await asyncio.sleep(MS_PER_TEXT * sum(len(j) for j in jobs))
    return [[f"answer:{t}" for t in job] for job in jobs]


def test_one_256_text_job_is_refused_by_bentoml_on_an_idle_dispatcher():
    """The failure the issue reports: the dispatcher splits the job, keeps the rest queued with its
    arrival time, and cancels it once that passes max_latency_ms while the first part runs."""

    async def scenario():
        run = dispatcher()(model)
        return await run([f"t{i}" for i in range(256)])

    with pytest.raises(ServiceUnavailable):
        asyncio.run(scenario())


def test_in_chunks_gets_every_answer_in_order_on_the_same_dispatcher():
    async def scenario():
        run = dispatcher()(model)
        return await in_chunks(run, [f"t{i}" for i in range(256)], 32)

    assert asyncio.run(scenario()) == [f"answer:t{i}" for i in range(256)]


# The cork cap (serve/bento_batcher.py) is tested in test_bento_batcher.py.


# --- the gate: two batches' worth of texts inside the dispatcher, the rest wait in order ---------
def test_gate_admits_in_arrival_order_within_its_limit():
    async def scenario():
        gate, order = TextGate(4), []

        async def job(name, n, hold):
            await gate.enter(n, timeout=5)
            order.append(name)
            await asyncio.sleep(hold)
            gate.leave(n)

        tasks = [asyncio.create_task(job("a3", 3, 0.05))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(job(name, n, 0.01)) for name, n in (("b2", 2), ("c1", 1), ("d1", 1))]
        await asyncio.sleep(0.01)
        assert order == ["a3"] and gate.inside == 3  # c1 would fit, but b2 came first
        await asyncio.gather(*tasks)
        return order, gate.inside

    order, inside = asyncio.run(scenario())
    assert order == ["a3", "b2", "c1", "d1"] and inside == 0


def test_gate_refuses_after_its_timeout_and_keeps_count():
    async def scenario():
        gate = TextGate(2)
        await gate.enter(2, timeout=1)
        with pytest.raises(Overloaded):
            await gate.enter(1, timeout=0.05)
        assert gate.inside == 2 and gate.waiting == 0
        gate.leave(2)
        await gate.enter(2, timeout=0.01)  # free again, at once
        return gate.inside

    assert asyncio.run(scenario()) == 2


async def _clients(gated: bool, clients: int, budget: float = 0.35, rounds: int = 6, size: int = 8):
    """Closed-loop clients, one text each, against a compute-bound model (10 ms a text + 5 ms a batch)."""
    import time

    def overloaded():
        raise ServiceUnavailable("process is overloaded")

    async def model_(jobs):
        await asyncio.sleep(0.005 + 0.010 * sum(len(j) for j in jobs))
        return [list(j) for j in jobs]

    d = CorkDispatcher(max_latency_in_ms=int(budget * 1000), max_batch_size=size, fallback=overloaded, get_batch_size=len, batch_dim=(0, 0))
    run = d(model_)
    for i in range(12):  # BentoML's training calls
        await run([f"w{i}"])
    # what the dispatcher learns of this model, fixed so the scenario does not depend on timer noise
    d.optimizer.o_a, d.optimizer.o_b, d.optimizer.wait = 0.010, 0.005, 0.0
    d.optimizer.trigger_refresh = lambda: None
    gate = TextGate(2 * size) if gated else None
    served, refused = [], 0

    async def client(c):
        nonlocal refused
        for r in range(rounds):
            t0 = time.perf_counter()
            try:
                await in_chunks(run, [f"c{c}r{r}"], size, gate, budget)
                served.append(time.perf_counter() - t0)
            except (ServiceUnavailable, Overloaded):
                refused += 1

    await asyncio.gather(*(client(c) for c in range(clients)))
    return refused, max(served)


@pytest.mark.slow
def test_bentoml_refuses_requests_it_could_serve_in_budget_and_the_gate_does_not():
    """24 clients, batches of 8: every request is answered in ~3 batches (~260 ms), under the 350 ms
    budget. BentoML's estimate for the oldest queued request counts the whole queue after its own
    wait, so alone it refuses some of them; through the gate none is refused."""
    # The control: BentoML alone refuses. Its refusals depend on event-loop timing, and on a
    # loaded machine one run can pass without any (seen once in CI-like conditions): up to 3 runs.
    for _ in range(3):
        refused, slowest = asyncio.run(_clients(gated=False, clients=24))
        assert slowest < 0.35
        if refused:
            break
    else:
        pytest.fail("BentoML's dispatcher alone refused none in 3 runs: the scenario no longer tests the gate")
    refused, slowest = asyncio.run(_clients(gated=True, clients=24))
    assert refused == 0 and slowest < 0.35


@pytest.mark.slow
def test_the_gate_still_refuses_real_overload():
    """64 clients need ~8 batches (~680 ms) per request: over the 350 ms budget, so some are refused."""
    refused, slowest = asyncio.run(_clients(gated=True, clients=64))
    assert refused > 0
    assert slowest < 0.35 + 2 * 0.085 + 0.1  # at most the budget at the gate, then two batches
