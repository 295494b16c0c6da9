"""Dynamic batching on asyncio: many callers and streams, one model, batches up to a size or a
delay, then every caller gets exactly its own result back.

Habits from the peers' bug trackers, kept on purpose:
- each request carries an id; after a batch runs, results are matched by id (not by count),
  and a batch that returns the wrong ids fails every request in it loudly;
- requests cancelled while queued are dropped before the batch runs, and a result is never
  set on a future its caller already cancelled (that once killed Ray Serve's batching loop);
- an exception raised by the batch function reaches every request of that batch;
- the queue is bounded: a full queue is an immediate OverloadedError, not unbounded memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import ModelError, OverloadedError, ShuttingDownError
from .telemetry import BatchReport

LOG = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")

# Triton treats max_queue_size 0 as unbounded; we never are.
DEFAULT_MAX_QUEUE = 1024


@dataclass
class _Request(Generic[Item]):
    id: int
    item: Item
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


# (pairs, stages) -> results: ``[(id, item), ...]`` in, ``[(id, result), ...]`` out in any
# order; ``stages`` is a dict the function may add seconds per pipeline stage to.
BatchFunction = Callable[[Sequence[tuple[int, Any]], dict], Sequence[tuple[int, Any]]]


class DynamicBatcher(Generic[Item, Result]):
    """Groups ``submit()`` calls into batches for ``run_batch``.

    run_batch: a plain (blocking) ``BatchFunction``; it runs in the batcher's own threads
    (one per worker), so the event loop keeps accepting requests and batches never wait
    behind other work in the loop's default executor.
    max_batch_size: the most items per batch. max_delay_s: how long the first request of a
    batch may wait for company. preferred_sizes: a batch of one of these sizes is sent at
    once. max_queue_size: queued requests beyond this are refused. workers: batches in flight.
    report: called on the event loop with one ``BatchReport`` per executed batch.
    key: items batch together only when their keys are equal (e.g. tensor shapes). A batch
    is led by the oldest waiting item; items with other keys keep their place in the queue.
    """

    def __init__(
        self,
        run_batch: BatchFunction,
        *,
        max_batch_size: int,
        max_delay_s: float,
        preferred_sizes: Sequence[int] = (),
        max_queue_size: int = 0,
        workers: int = 1,
        name: str = "model",
        report: Callable[[BatchReport], None] | None = None,
        key: Callable[[Any], Hashable] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max(0.0, max_delay_s)
        self.preferred_sizes = frozenset(s for s in preferred_sizes if s <= max_batch_size)
        self.max_queue_size = max_queue_size or DEFAULT_MAX_QUEUE
        self.workers = max(1, workers)
        self.name = name
        self.report = report
        self.key = key
        self._queue: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None
        self._ids = itertools.count(1)
        self._closing = False
        self._in_flight = 0

    def start(self) -> None:
        if self._tasks:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=f"batch-{self.name}")
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"batcher-{self.name}-{i}")
            for i in range(self.workers)
        ]

    async def submit(self, item: Item) -> Result:
        """Queue one item and wait for its own result (or its batch's exception)."""
        if self._closing:
            raise ShuttingDownError(f"{self.name} is shutting down; no new requests")
        if not self._tasks:
            self.start()
        live = sum(1 for r in self._queue if not r.future.done())
        if live >= self.max_queue_size:
            raise OverloadedError(
                f"{self.name} is overloaded: {live} requests already queued "
                f"(max_queue_size {self.max_queue_size}); retry with back-off"
            )
        request = _Request(next(self._ids), item, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._wakeup.set()
        return await request.future

    async def close(self, drain: bool = True) -> None:
        """Stop taking requests; with drain, finish what is queued first."""
        self._closing = True
        if drain:
            while self._tasks and (self._queue or self._in_flight):
                await asyncio.sleep(0.005)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        for request in self._queue:
            if not request.future.done():
                request.future.set_exception(ShuttingDownError(f"{self.name} stopped"))
        self._queue.clear()

    def _take_live(self, key: Hashable = None) -> _Request | None:
        """The oldest live request (with this key, if the batcher has a key function)."""
        for request in list(self._queue):
            if request.future.done():  # cancelled while queued: drop it
                self._queue.remove(request)
            elif key is None or self.key(request.item) == key:
                self._queue.remove(request)
                return request
        return None

    async def _collect(self) -> list[_Request]:
        while True:
            first = self._take_live()
            if first is not None:
                break
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [first]
        key = self.key(first.item) if self.key is not None else None
        deadline = first.enqueued + self.max_delay_s
        while len(batch) < self.max_batch_size:
            if len(batch) in self.preferred_sizes and not self._queue:
                break
            request = self._take_live(key)
            if request is not None:
                batch.append(request)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [r for r in batch if not r.future.done()]
            if not batch:
                continue
            self._in_flight += len(batch)
            started = time.monotonic()
            failed = False
            stages: dict[str, float] = {}
            try:
                pairs = [(r.id, r.item) for r in batch]
                results = await loop.run_in_executor(self._executor, self.run_batch, pairs, stages)
                by_id = dict(results)
                expected = {r.id for r in batch}
                if set(by_id) != expected or len(results) != len(batch):
                    raise ModelError(
                        f"{self.name}: batch returned results for ids {sorted(by_id)} "
                        f"but was asked for {sorted(expected)}"
                    )
                for r in batch:
                    if not r.future.done():
                        r.future.set_result(by_id[r.id])
            except BaseException as exc:  # noqa: BLE001 - every request must hear of it
                failed = True
                cancelled = isinstance(exc, asyncio.CancelledError)
                error = ShuttingDownError(f"{self.name} stopped mid-batch") if cancelled else exc
                LOG.warning("%s: batch of %d failed: %s", self.name, len(batch), error)
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(error)
                if cancelled:
                    raise
            finally:
                self._in_flight -= len(batch)
                if self.report is not None:
                    self.report(BatchReport(
                        size=len(batch), waits_s=tuple(started - r.enqueued for r in batch),
                        compute_s=time.monotonic() - started, stages=stages, failed=failed))
