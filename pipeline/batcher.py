"""Dynamic batching on asyncio: many callers and streams, one model, batches up to a size or a
delay, then every caller gets exactly its own result back.

Habits from the peers' bug trackers, kept on purpose:
- each request carries an id; after a batch runs, results are matched by id (not by count),
  and a batch that returns the wrong ids fails every request in it loudly;
- requests cancelled while queued are dropped before the batch runs, and a result is never
  set on a future its caller already cancelled (that once killed Ray Serve's batching loop);
- an exception raised by the batch function reaches every request of that batch;
- the queue is bounded: a full queue is an immediate OverloadedError, not unbounded memory;
- a request that cannot start before its deadline (the work queued ahead of it at the
  measured pace) is refused on arrival, not after waiting the whole deadline out.

**Lanes**: a request comes in a lane (the server's: requests clients push, and the frames of
the cameras it pulls itself). Lanes share the model equally: each image batched is taken from
the waiting lane that has had the fewest images batched while it waited (the oldest request
first within a lane, and between lanes on a tie), so a queue full of one lane's work cannot
starve another: with two lanes waiting, each gets every other image. A lane that was idle
comes back level with the others, not owed what it did not ask for. Each lane's queue is
bounded by ``max_queue_size`` on its own, and a request's expected wait counts the other
lanes' images that will be interleaved with its own lane's.
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

from .errors import DeadlineError, ModelError, OverloadedError, ShuttingDownError
from .telemetry import BatchReport

LOG = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")

# Triton treats max_queue_size 0 as unbounded; we never are.
DEFAULT_MAX_QUEUE = 1024
# How long the queue must stay empty before ``on_idle`` runs.
IDLE_S = 1.0
# Weight of the newest batch in the measured seconds per item (an exponential average:
# follows a changing load within a few batches, ignores one slow batch).
PACE_WEIGHT = 0.2
# Bounds of a refusal's retry-after, which also pauses a refused stream. The floor trades
# refusal latency for CPU: a closed-loop client comes back once per pause, and every refusal
# costs CPU the network could use (soak 32x2 on 2 cores: 30 ms -> refusal p50 76-87 ms,
# 6.4-7.4 frames/s served; 50 ms -> 112-116 ms, 7.5-7.7; no pause -> 27-42 ms, 2.2-3.1).
RETRY_AFTER_S = (0.03, 1.0)


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ``ModelQueuePolicy`` for the requests waiting in the queue.

    timeout_s: how long a request may wait to start (None: no limit). action "reject": a
    request past its timeout is answered at once with DeadlineError and never run; "delay":
    it stays queued behind every request still within its timeout. allow_override: a
    request may ask for a shorter timeout (never a longer one).
    """

    timeout_s: float | None = None
    action: str = "reject"
    allow_override: bool = False

    def deadline(self, now: float, requested_s: float | None = None) -> float | None:
        """The absolute (monotonic) time a request arriving ``now`` times out."""
        timeout = self.timeout_s
        if requested_s is not None and self.allow_override and requested_s > 0:
            timeout = requested_s if timeout is None else min(timeout, requested_s)
        return None if timeout is None else now + timeout


@dataclass(eq=False)  # identity: requests are found in the queue by who they are
class _Request(Generic[Item]):
    id: int
    item: Item
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)  # when it arrived (monotonic)
    deadline: float | None = None  # queue policy's: past it, rejected or delayed
    hard_deadline: float | None = None  # the caller's own (e.g. gRPC): past it, always rejected
    delayed: bool = False
    timer: asyncio.TimerHandle | None = None
    waiting: bool = True  # not yet started, answered from the queue or withdrawn (``on_load``)
    lane: Hashable = ""  # its share of the model (see the module's lanes)


# (pairs, stages) -> results: ``[(id, item), ...]`` in, ``[(id, result), ...]`` out in any
# order; a result that is an exception fails that request alone. ``stages`` is a dict the
# function may add seconds per pipeline stage to.
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
    policy: the queue policy (timeouts). on_timeout: called once per request the queue
    answered with DeadlineError (metrics). on_idle: run in the batch thread once the queue
    has stayed empty for ``IDLE_S`` after a batch (e.g. giving freed memory back to the OS):
    never under sustained load, never between the frames of a steady stream.
    on_load: called on the event loop with (change in items waiting, change in items
    executing) whenever either moves (live gauges). Waiting counts an item from its queueing
    to its batch starting, the time gathering a batch included; each item leaves it once.
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
        policy: QueuePolicy = QueuePolicy(),
        on_timeout: Callable[[], None] | None = None,
        on_idle: Callable[[], object] | None = None,
        on_load: Callable[[int, int], None] | None = None,
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
        self.policy = policy
        self.on_timeout = on_timeout
        self.on_idle = on_idle
        self.on_load = on_load
        self._queue: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None
        self._ids = itertools.count(1)
        self._closing = False
        self._in_flight = 0
        self._gathering = 0  # workers gathering a batch (its requests out of the queue)
        self._item_s: float | None = None  # measured seconds per item (PACE_WEIGHT)
        self._served: dict[Hashable, int] = {}  # images batched per lane while it has waited

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not those cancelled while waiting)."""
        return sum(1 for r in self._queue if not r.future.done())

    def _queued_by_lane(self) -> dict[Hashable, int]:
        counts: dict[Hashable, int] = {}
        for r in self._queue:
            if not r.future.done():
                counts[r.lane] = counts.get(r.lane, 0) + 1
        return counts

    def expected_wait_s(self, queued: int | None = None, lane: Hashable = "") -> float:
        """How long a request queued now in ``lane`` would wait to start: the items queued
        ahead in its lane (``queued``, else those there now), as many of each other lane's
        as will be interleaved with them (see the module's lanes), and half of those
        running, at the measured seconds per item; 0 until a batch has been measured. Per
        item, not per full batch: batches are as large as the queue's input shapes and
        timing make them (a mean of ~2 of 8 under the soak's mixed photos and frames, where
        counting full batches admitted frames that then timed out). Right after light load
        the pace is that of small batches, so a sudden burst can be judged slower than
        batching will make it, until a few batches have been measured."""
        if self._item_s is None:
            return 0.0
        lanes = self._queued_by_lane()
        own = lanes.pop(lane, 0) if queued is None else queued
        lanes.pop(lane, None)
        ahead = own + sum(min(count, own + 1) for count in lanes.values()) + self._in_flight / 2
        return ahead * self._item_s / self.workers

    def start(self) -> None:
        if self._tasks:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=f"batch-{self.name}")
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"batcher-{self.name}-{i}")
            for i in range(self.workers)
        ]

    async def submit(self, item: Item, *, arrived: float | None = None,
                     timeout_s: float | None = None, deadline: float | None = None,
                     lane: Hashable = "") -> Result:
        """Queue one item and wait for its own result (or its batch's exception).

        arrived: when the request reached the server (monotonic; default now): its queue
        timeout counts from then. timeout_s: the request's own queue timeout, honoured when
        the policy allows overrides. deadline: the caller's absolute monotonic deadline (a
        gRPC deadline): a request still queued then is rejected whatever the policy. lane:
        its share of the model (see the module's lanes).
        """
        (result,) = await self.submit_all([item], arrived=arrived, timeout_s=timeout_s,
                                          deadline=deadline, lane=lane)
        return result

    async def submit_all(self, items: Sequence[Item], *, arrived: float | None = None,
                         timeout_s: float | None = None, deadline: float | None = None,
                         lane: Hashable = "") -> list[Result]:
        """``submit`` for one request's items: admitted together (all queued, or none), and
        when one fails the rest are withdrawn (dropped if they have not started)."""
        if self._closing:
            raise ShuttingDownError(f"{self.name} is shutting down; no new requests")
        if not self._tasks:
            self.start()
        loop = asyncio.get_running_loop()
        arrived = time.monotonic() if arrived is None else arrived
        policy = self.admit(arrived, timeout_s, deadline, count=len(items), lane=lane)
        requests = [_Request(next(self._ids), item, loop.create_future(), arrived, policy, deadline,
                             lane=lane) for item in items]
        for request in requests:
            self._queue.append(request)
            self._arm_timer(request)
        self._wakeup.set()
        self._load(len(requests), 0)
        try:
            return list(await asyncio.gather(*(r.future for r in requests)))
        except BaseException:
            for request in requests:
                request.future.cancel()
            self._load(-self._leave(requests), 0)
            raise
        finally:
            for request in requests:
                if request.timer is not None:
                    request.timer.cancel()

    def _load(self, waiting: int, executing: int) -> None:
        if self.on_load is not None and (waiting or executing):
            self.on_load(waiting, executing)

    @staticmethod
    def _leave(requests: Sequence[_Request]) -> int:
        """Marks requests as no longer waiting; how many were (each leaves once: a request
        withdrawn while its batch gathers must not leave again when the batch starts)."""
        left = 0
        for request in requests:
            left += request.waiting
            request.waiting = False
        return left

    def _arm_timer(self, request: _Request) -> None:
        due = [d for d in (request.hard_deadline, None if request.delayed else request.deadline)
               if d is not None]
        if due:
            loop = asyncio.get_running_loop()
            request.timer = loop.call_at(loop.time() + max(0.0, min(due) - time.monotonic()),
                                         self._expire, request)

    def admit(self, arrived: float, timeout_s: float | None = None,
              deadline: float | None = None, count: int = 1, lane: Hashable = "") -> float | None:
        """Whether a request of ``count`` items that arrived at ``arrived`` may queue now in
        ``lane``; returns its queue policy's deadline. OverloadedError when its lane's queue
        is full; DeadlineError when the work ahead of its last item cannot be done before its
        deadline (the caller's, or the policy's where it rejects): waiting it out would only
        delay the same answer and hold the request's memory meanwhile. Cheap, so callers ask
        before reading a request further."""
        queued = self._queued_by_lane().get(lane, 0) + count - 1
        if queued >= self.max_queue_size:
            raise OverloadedError(
                f"{self.name} is overloaded: {queued} requests already queued "
                f"(max_queue_size {self.max_queue_size}); retry with back-off"
            )
        policy = self.policy.deadline(arrived, timeout_s)
        rejecting = policy if self.policy.action == "reject" else None
        deadlines = [(d, why) for d, why in ((deadline, "the caller's deadline"),
                                             (rejecting, f"{self.name}'s queue timeout")) if d is not None]
        if not deadlines:
            return policy
        wait, now = self.expected_wait_s(queued, lane), time.monotonic()
        due, why = min(deadlines)
        if now + wait <= due:
            return policy
        if self.on_timeout is not None:
            self.on_timeout()
        low, high = RETRY_AFTER_S
        retry_after = min(high, max(low, now + wait - due))
        raise DeadlineError(
            f"{self.name}: {queued} requests are queued ahead, about {wait:.2f} s of work at the "
            f"measured pace, past {why} of {due - arrived:.2f} s; refused at once, not run (the "
            f"server is behind: retry in {retry_after:.2f} s, lower the frame rate or add replicas)",
            retry_after)

    def _expire(self, request: _Request) -> None:
        """A queued request reached a deadline: answer it now, or move it behind the rest."""
        if request.future.done() or request not in self._queue:
            return  # already answered, or already running: it finishes normally
        now = time.monotonic()
        hard = request.hard_deadline is not None and now >= request.hard_deadline
        if not hard and self.policy.action == "delay":
            request.delayed = True
            self._arm_timer(request)  # the caller's own deadline may still come
            return
        self._queue.remove(request)
        waited = now - request.enqueued
        limit = (request.hard_deadline if hard else request.deadline) - request.enqueued
        why = "the caller's deadline" if hard else f"{self.name}'s queue timeout"
        request.future.set_exception(DeadlineError(
            f"{self.name}: waited {waited:.2f} s in the queue, past {why} of {limit:.2f} s; "
            "it was not run (the server is behind: lower the frame rate or add replicas)"))
        self._load(-self._leave([request]), 0)
        if self.on_timeout is not None:
            self.on_timeout()

    async def close(self, drain: bool = True) -> None:
        """Stop taking requests; with drain, finish what is queued first."""
        self._closing = True
        if drain:
            while self._tasks and (self._queue or self._gathering or self._in_flight):
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
        self._load(-self._leave(self._queue), 0)
        self._queue.clear()

    def _take_live(self, key: Hashable = None) -> _Request | None:
        """The next live request (with this key, if the batcher has a key function): the
        oldest of the lane served least (see the module's lanes); requests delayed past their
        timeout only when no other one is waiting."""
        for request in [r for r in self._queue if r.future.done()]:  # cancelled while queued
            self._queue.remove(request)
        fitting = [r for r in self._queue if key is None or self.key(r.item) == key]
        candidates = [r for r in fitting if not r.delayed] or fitting
        if not candidates:
            return None
        oldest: dict[Hashable, _Request] = {}
        for request in candidates:
            oldest.setdefault(request.lane, request)
        waiting = {r.lane for r in self._queue}
        for lane in list(self._served):
            if lane not in waiting:
                del self._served[lane]  # idle: it comes back level, owed nothing
        level = min(self._served.values(), default=0)
        for lane in oldest:
            self._served.setdefault(lane, level)
        chosen = min(oldest.values(), key=lambda r: (self._served[r.lane], r.id))
        self._queue.remove(chosen)
        self._served[chosen.lane] += 1
        return chosen

    async def _collect(self) -> list[_Request]:
        idle_reported = self.on_idle is None
        while True:
            first = self._take_live()
            if first is not None:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), None if idle_reported else IDLE_S)
            except asyncio.TimeoutError:
                idle_reported = True
                await asyncio.get_running_loop().run_in_executor(self._executor, self.on_idle)
        batch = [first]
        key = self.key(first.item) if self.key is not None else None
        deadline = first.enqueued + self.max_delay_s
        self._gathering += 1  # out of the queue, not yet in flight: a drain waits for these too
        try:
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
        except asyncio.CancelledError:
            self._queue.extendleft(reversed(batch))  # back in line, where close() answers them
            raise
        finally:
            self._gathering -= 1
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [r for r in batch if not r.future.done()]
            if not batch:
                continue
            self._in_flight += len(batch)
            self._load(-self._leave(batch), len(batch))
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
                        outcome = by_id[r.id]
                        if isinstance(outcome, BaseException):  # this item alone failed
                            r.future.set_exception(outcome)
                        else:
                            r.future.set_result(outcome)
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
                self._load(0, -len(batch))
                if not failed:
                    pace = (time.monotonic() - started) / len(batch)
                    self._item_s = pace if self._item_s is None else (
                        PACE_WEIGHT * pace + (1 - PACE_WEIGHT) * self._item_s)
                if self.report is not None:
                    self.report(BatchReport(
                        size=len(batch), waits_s=tuple(started - r.enqueued for r in batch),
                        compute_s=time.monotonic() - started, stages=stages, failed=failed))
