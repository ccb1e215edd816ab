"""Why /classify feeds BentoML's adaptive batcher in chunks: tested on BentoML's own dispatcher."""

from __future__ import annotations

import asyncio

import pytest
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from bentoml.exceptions import ServiceUnavailable

from serve.service import in_chunks

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
