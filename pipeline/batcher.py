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
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from .errors import ModelError, OverloadedError, ShuttingDownError

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


@dataclass
class BatchStats:
    """Running totals, read by the metrics and ModelStatistics."""

    batches: int = 0
    requests: int = 0
    failures: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    last_inference_ms: int = 0

    def record(self, size: int, queue_ns: int, compute_ns: int, failed: bool) -> None:
        self.batches += 1
        self.requests += size
        self.failures += size if failed else 0
        self.queue_ns += queue_ns
        self.compute_ns += compute_ns
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
        self.last_inference_ms = int(time.time() * 1000)

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


BatchFunction = Callable[[Sequence[tuple[int, Any]]], Sequence[tuple[int, Any]]]


class DynamicBatcher(Generic[Item, Result]):
    """Groups ``submit()`` calls into batches for ``run_batch``.

    run_batch: a plain (blocking) function from ``[(id, item), ...]`` to ``[(id, result), ...]``
    in any order; it runs in a worker thread so the event loop keeps accepting requests.
    max_batch_size: the most items per batch. max_delay_s: how long the first request of a
    batch may wait for company. preferred_sizes: a batch of one of these sizes is sent at
    once. max_queue_size: queued requests beyond this are refused. workers: batches in flight.
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
        on_batch: Callable[[int, list[float], float, bool], None] | None = None,
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
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count(1)
        self._closing = False
        self._in_flight = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> None:
        if self._tasks:
            return
        self._wakeup = asyncio.Event()
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
        for request in self._queue:
            if not request.future.done():
                request.future.set_exception(ShuttingDownError(f"{self.name} stopped"))
        self._queue.clear()

    def _take_live(self) -> _Request | None:
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():  # cancelled while queued: drop it
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
        deadline = first.enqueued + self.max_delay_s
        while len(batch) < self.max_batch_size:
            if len(batch) in self.preferred_sizes and not self._queue:
                break
            request = self._take_live()
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
            try:
                pairs = [(r.id, r.item) for r in batch]
                results = await loop.run_in_executor(None, self.run_batch, pairs)
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
                compute = time.monotonic() - started
                self._in_flight -= len(batch)
                self.stats.record(
                    len(batch),
                    int(sum(started - r.enqueued for r in batch) * 1e9),
                    int(compute * 1e9),
                    failed,
                )
                if self.on_batch is not None:
                    self.on_batch(len(batch), [started - r.enqueued for r in batch], compute, failed)
