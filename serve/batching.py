"""How /classify feeds BentoML's adaptive batcher so that 503 means real overload only.

BentoML's dispatcher (``bentoml._internal.marshal.dispatcher.CorkDispatcher``, 1.4)
refuses or delays work where there is no overload; each case has its counter here:

1. A job bigger than ``max_batch_size`` is split; the remainder stays queued with the
   job's arrival time and is cancelled (503) once that passes ``max_latency_ms`` while
   the first part runs: a 256-text request on an idle server. :func:`in_chunks` queues
   chunks of at most ``max_batch_size`` texts, each once the previous one is answered.
2. Its latency estimate for the oldest queued job is ``its wait + a * n + b`` with ``n``
   the number of queued jobs, as if all of them ran before it, when it runs in the next
   batch. Under steady load (64 clients, batches of 32) that is about twice its real
   latency, so it cancels the oldest requests, the ones about to be served.
   :class:`TextGate` lets at most two batches' worth of texts into the dispatcher (one
   running, one forming), so its estimate stays close to the truth; the others wait at
   the gate in arrival order, and one that waits longer than ``max_latency_ms`` there is
   refused with 503: real overload. A request is then refused only after waiting its
   budget, and one let in takes at most about two batches more.
3. After a burst it holds every lone request open for the burst's queueing delay
   (``cap_cork_wait`` in serve/bento_batcher.py, with ferry's other reaches into BentoML).

Nothing here touches BentoML: the gate and the chunks are plain asyncio around whatever
callable runs a batch.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Awaitable, Callable


class Overloaded(Exception):
    """A request waited longer than the latency budget to enter the batcher."""


class TextGate:
    """At most ``limit`` texts inside the dispatcher at once, admitted in arrival order."""

    def __init__(self, limit: int):
        self.limit = limit
        self.inside = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(n for n, f in self._waiters if not f.done())

    async def enter(self, n: int, timeout: float) -> None:
        """Wait until ``n`` texts fit; raise Overloaded after ``timeout`` seconds."""
        if n > self.limit:
            raise ValueError(f"{n} texts can never enter a gate of {self.limit}")
        if not self._waiters and self.inside + n <= self.limit:
            self.inside += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            if fut.done():  # admitted at the last moment: keep the place
                return
            fut.cancel()
            self._wake()
            raise Overloaded(f"waited {timeout:.1f}s to enter the batcher") from None
        except asyncio.CancelledError:  # the client went away
            if fut.done() and not fut.cancelled():
                self.leave(n)
            else:
                fut.cancel()
                self._wake()
            raise

    def leave(self, n: int) -> None:
        self.inside -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():  # timed out or cancelled
                self._waiters.popleft()
                continue
            if self.inside + n > self.limit:
                return
            self._waiters.popleft()
            self.inside += n
            fut.set_result(None)


async def in_chunks(
    run: Callable[[list[str]], Awaitable[list[Any]]],
    texts: list[str],
    size: int,
    gate: TextGate | None = None,
    budget_s: float = float("inf"),
) -> list[Any]:
    """``run`` over chunks of at most ``size`` texts, each queued once the previous one is answered.

    Raises:
        Overloaded: a chunk waited more than ``budget_s`` at the gate.
    """
    out: list[Any] = []
    for start in range(0, len(texts), size):
        chunk = texts[start : start + size]
        if gate is None:
            out.extend(await run(chunk))
            continue
        await gate.enter(len(chunk), budget_s)
        try:
            out.extend(await run(chunk))
        finally:
            gate.leave(len(chunk))
    return out
