"""The ordered, windowed core every streaming API shares (pure asyncio, no protocol types).

A stream is a sequence of requests, each answered exactly once, in the order it arrived, by
``process(request)``. Requests of one stream run concurrently, at most ``window`` at once; at
most ``window`` more wait behind them. When a client sends faster than the model serves:

- policy ``wait``: reading stops until a slot frees, so the transport's flow control slows
  the sender down. Nothing is dropped.
- policy ``drop_oldest``: the oldest request still waiting (never one running) is answered
  with ``dropped(request)`` to make room. Live video prefers fresh frames to late ones.

``hold(seconds)`` pauses reading (the adapter's answer to a refusal that says when to retry),
so flow control slows the sender down whatever the policy. Either way unanswered results
never pile up: a client that stops reading its results is slowed
down once ``4 * window`` are unanswered, whatever the policy. When the consumer goes away,
nothing more is started and requests still running are cancelled (the batcher drops them if
they have not reached the model yet).

``stop()`` drains a stream (server shutdown): nothing more is read, requests waiting to start
are answered ``failed(request, ShuttingDownError)``, running ones finish, and ``run()`` ends
once every request read has its answer; ``stopped`` then tells the adapter to end the call
with a clear status for whatever the client sent after.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")
POLICIES = ("wait", "drop_oldest")
UNANSWERED_PER_WINDOW = 4


@dataclass
class _Slot(Generic[Request]):
    """One request's place in the output order; ``result`` resolves to its answer."""

    request: Request
    result: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    task: asyncio.Task | None = None


class StreamWindow(Generic[Request, Result]):
    """Answers one stream's requests in order, with at most ``window`` in progress.

    process: the work for one request; should answer errors itself (an exception it raises,
    or its cancellation, becomes ``failed(request, exception)``). dropped: the answer for a
    request dropped by ``drop_oldest``. on_drop: called once per dropped request (metrics).
    """

    def __init__(
        self,
        process: Callable[[Request], Awaitable[Result]],
        failed: Callable[[Request, BaseException], Result],
        *,
        window: int,
        policy: str = "wait",
        dropped: Callable[[Request], Result] | None = None,
        on_drop: Callable[[], None] | None = None,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy == "drop_oldest" and dropped is None:
            raise ValueError("policy drop_oldest needs a 'dropped' answer")
        self.process = process
        self.failed = failed
        self.window = window
        self.policy = policy
        self.dropped = dropped
        self.on_drop = on_drop
        self._order: deque[_Slot] = deque()    # read and not yet answered, in arrival order
        self._waiting: deque[_Slot] = deque()  # read, not yet started
        self._running = 0
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._hold: asyncio.TimerHandle | None = None  # while set, nothing is started or read
        self.stopped = False

    @property
    def in_progress(self) -> int:
        """Requests read and not yet handed to the consumer."""
        return len(self._order)

    async def run(self, requests: AsyncIterator[Request]) -> AsyncIterator[Result]:
        """Yield one result per request of ``requests``, in order. A failing request source
        raises here once every request read before the failure has been answered."""
        reader = self._reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                if self._order:
                    result = await self._order[0].result
                    self._order.popleft()
                    self._changed.set()
                    yield result
                elif reader.done():
                    break
                else:
                    self._changed.clear()
                    await self._changed.wait()
            if not self.stopped:
                await reader  # surfaces a broken request source
        finally:
            reader.cancel()
            self._waiting.clear()  # a consumer that left gets no more work started for it
            for slot in self._order:
                if slot.task is not None:
                    slot.task.cancel()

    def hold(self, seconds: float) -> None:
        """Start and read nothing more for ``seconds`` (requests running go on)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if self._hold is not None:
            if self._hold.when() >= until:
                return
            self._hold.cancel()
        self._hold = loop.call_at(until, self._resume)

    def _resume(self) -> None:
        self._hold = None
        self._start_waiting()

    def stop(self, reason: BaseException) -> None:
        """Drain: read nothing more; answer waiting requests ``failed(request, reason)``;
        let running ones finish. ``run()`` ends when every request read is answered."""
        self.stopped = True
        if self._reader is not None:
            self._reader.cancel()
        while self._waiting:
            slot = self._waiting.popleft()
            slot.result.set_result(self.failed(slot.request, reason))
        self._changed.set()

    async def _read(self, requests: AsyncIterator[Request]) -> None:
        iterator = aiter(requests)
        try:
            while True:
                # Room first, then read: a request is never held in hand where a stop() or
                # a consumer leaving could cancel the reader with it unanswered.
                while self._full() or self._hold is not None:
                    self._changed.clear()
                    await self._changed.wait()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    break
                if self.policy == "drop_oldest" and len(self._waiting) >= self.window:
                    victim = self._waiting.popleft()
                    victim.result.set_result(self.dropped(victim.request))
                    if self.on_drop is not None:
                        self.on_drop()
                slot = _Slot(request)
                self._order.append(slot)
                self._waiting.append(slot)
                self._start_waiting()
        finally:
            self._changed.set()

    def _full(self) -> bool:
        if len(self._order) >= UNANSWERED_PER_WINDOW * self.window:
            return True
        return self.policy == "wait" and len(self._waiting) >= self.window

    def _start_waiting(self) -> None:
        if self._hold is not None:
            return  # ``_resume`` calls again when the hold ends
        while self._waiting and self._running < self.window:
            slot = self._waiting.popleft()
            self._running += 1
            slot.task = asyncio.create_task(self.process(slot.request))
            slot.task.add_done_callback(lambda task, s=slot: self._finish(s, task))
        self._changed.set()

    def _finish(self, slot: _Slot, task: asyncio.Task) -> None:
        self._running -= 1
        if not slot.result.done():
            if task.cancelled():
                slot.result.set_result(self.failed(slot.request, asyncio.CancelledError()))
            elif task.exception() is not None:
                slot.result.set_result(self.failed(slot.request, task.exception()))
            else:
                slot.result.set_result(task.result())
        self._start_waiting()
