"""Dynamic batching of read queries (/recommend, /rank), as inference servers do.

The read endpoints run on the event loop. With batching on (`batch_wait_ms` > 0 in conf/serve.yaml), a checked
request (service.recommend_ask / rank_ask) is queued instead of answered at once, and the queue is answered
together: one forward of the history encoder, one index search per fetch size and one forward of the ranking
network for all of them, then each request's own filters, exclusions, reasons and attributes
(engine.answer_many).

When is the queue answered? As soon as every read request the server has started on has joined it (checked at
the end of each turn of the event loop), so a lone request waits for nothing; at most `batch_wait_ms` after its
first request when some are still on their way (a body still arriving); at once when `batch_max` are queued.
While a batch computes, the next requests wait in the socket buffers, so under load batches form by themselves.

A request's 4xx is raised before it is queued, and a failure while answering a batch reaches only the request it
concerns (service.answer answers each alone then).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar


class _Arrival:
    __slots__ = ("queued",)

    def __init__(self):
        self.queued = False


_ARRIVAL: ContextVar[_Arrival | None] = ContextVar("mmrec_batch_arrival", default=None)


class QueryBatcher:
    """answer: checked requests -> their answers, in order (an exception for a request that failed)."""

    def __init__(self, answer: Callable[[list], list], wait_ms: float, max_batch: int = 32):
        if wait_ms <= 0 or max_batch < 1:
            raise ValueError(f"batching needs wait_ms > 0 and max_batch >= 1, got {wait_ms} and {max_batch}")
        self.answer, self.wait_s, self.max_batch = answer, wait_ms / 1000.0, max_batch
        self._queue: list[tuple[object, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._check: asyncio.Handle | None = None
        self.expected = 0  # read requests started (Arrivals) and not yet queued into a batch answered or gone
        self.batches = self.requests = 0  # answered so far (for tests and the bench)

    # ---- the requests the server has started on (Arrivals, below) ----------------------------------------
    def arrived(self) -> _Arrival:
        self.expected += 1
        return _Arrival()

    def left(self, arrival: _Arrival) -> None:
        """A request's answer was sent or it failed before it was queued (a 4xx): it is no longer expected."""
        if not arrival.queued:
            self.expected -= 1
            self._schedule_check()

    # ---- batches ------------------------------------------------------------------------------------------
    async def submit(self, request):
        """The request's answer, computed with those queued with it; raises what answering it raised."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        arrival = _ARRIVAL.get()
        if arrival is not None:
            arrival.queued = True
        self._queue.append((request, future))
        if len(self._queue) >= self.max_batch:
            self._flush()
        else:
            if self._timer is None:
                self._timer = loop.call_later(self.wait_s, self._flush)
            self._schedule_check()
        return await future

    def _schedule_check(self) -> None:
        if self._check is None and self._queue:
            self._check = asyncio.get_running_loop().call_soon(self._all_here)

    def _all_here(self) -> None:
        """At the end of a turn of the loop: answer the queue if no request the server started on is missing."""
        self._check = None
        if self._queue and len(self._queue) >= self.expected:
            self._flush()

    def _flush(self) -> None:
        for handle in (self._timer, self._check):
            if handle is not None:
                handle.cancel()
        self._timer = self._check = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        self.expected = max(0, self.expected - len(batch))
        try:
            results = self.answer([request for request, _ in batch])
        except Exception as error:  # noqa: BLE001 - not the requests' fault: each gets it (a 500)
            results = [error] * len(batch)
        self.batches, self.requests = self.batches + 1, self.requests + len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():  # the client went away meanwhile (its task was cancelled)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class Arrivals:
    """ASGI middleware: tells the batcher which batched requests (`paths`, POST) the server has started on, so
    that a batch is answered as soon as all of them have joined it rather than after the wait."""

    def __init__(self, app, batcher: QueryBatcher, paths: tuple[str, ...]):
        self.app, self.batcher, self.paths = app, batcher, paths

    def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return self.app(scope, receive, send)  # no frame of its own on the other routes' stack
        return self._counted(scope, receive, send)

    async def _counted(self, scope, receive, send):
        arrival = self.batcher.arrived()
        token = _ARRIVAL.set(arrival)
        try:
            await self.app(scope, receive, send)
        finally:
            _ARRIVAL.reset(token)
            self.batcher.left(arrival)
