"""Delivering a camera stream's results to the outside: webhooks, MQTT, Redis Streams and Kafka.

Vocabulary:

- a **message** is one JSON document (utf-8 bytes): the result of one frame;
- a **Sink** is one target (``sink_targets.SinkTarget``) of one stream: a bounded **buffer**
  of messages, one **delivery task** that sends them in order, a **batch** at a time, through
  the kind's **transport** (``transports``), and counters (``status()``). A batch that fails
  is halved for its next attempt (the rest waits again, first in line), so a link too slow to
  carry a whole batch within ``SEND_TIMEOUT_S`` still carries a part; each success doubles
  the size again.

What is retried: a connection that cannot be made or is lost, a send that fails or is not
acknowledged within ``SEND_TIMEOUT_S``, and a webhook answer the transport does not reject.
The batch stays first in line and is sent again (halved) after a pause that doubles from
``BACKOFF_S[0]`` to ``BACKOFF_S[1]`` (a ``Backoff``; reconnecting first), forever: a broker that goes away and
comes back gets the messages that waited for it, in order. Delivery is at least once: a
message whose acknowledgement was lost, or that was in a batch cut short, is sent again.

What is dropped, and counted in ``dropped``: the oldest waiting message when one more arrives
and ``buffer`` are waiting (the batch being sent is kept: it is not waiting, so a sink holds
at most ``buffer`` + ``IN_FLIGHT``; a stream that would rather wait awaits ``room()``); a message a
webhook refuses (``transports.Rejected``; ``last_error`` says so); whatever is still held when
``close(timeout_s)`` runs out of time; and messages offered after ``close``.

``last_error`` and the log lines say what went wrong in our words (``transports.failure``),
never the target's. What can happen per message (a refusal, an overflow, an outage that comes
and goes) is logged through ``Throttled``: a line per interval per sink, with a count, however
many frames a second fail.

A sink reaches the addresses its target was allowed when its stream was added
(``sink_targets.checked``). ``offer``, ``start`` and ``close`` are called on the event loop.
A stream's sinks also count what became of each message in the server's ledger (``start``), by
kind, so Prometheus' totals outlive the stream.

A ``MemorySink`` keeps a stream's messages in the server for a reader to take (an inference
pipeline's ``consume``): the same face, with nothing to connect to and nothing retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..backoff import Backoff
from ..buffers import DropOldest
from ..errors import BadInputError
from ..telemetry import Ledger
from ..throttle import Throttled
from .sink_targets import SinkTarget
from .transports import SEND_TIMEOUT_S, TRANSPORTS, Rejected, failure

log = logging.getLogger(__name__)
DELIVERED, DROPPED = "delivered", "dropped"  # the ledger's outcomes of a message (``Ledger.sink_messages``)

BACKOFF_S = (0.2, 5.0)  # the pause after a failure: first, and the most it doubles to
BATCH_BYTES = 1 << 20  # a batch holds at most this much (and one message at least)
CANCEL_AGAIN_S = 0.1  # close(): how long a cancelled delivery task may take to end before the next cancel


class Sink:
    """One target of one stream: a bounded buffer, one delivery task, retries with backoff,
    counters. ``offer`` never blocks the stream; a stream that would rather wait than drop
    (a file played as fast as possible) awaits ``room()`` first.

    buffer: how many messages may wait (beside the batch being sent); backoff_s: the first and
    the longest pause between attempts after failures; ca_file: see the module's TLS."""

    def __init__(self, target: SinkTarget, stream_id: str, *, buffer: int = 1000,
                 backoff_s: tuple[float, float] = BACKOFF_S, ca_file: str | None = None):
        if buffer < 1:
            raise BadInputError(f"a sink's buffer holds at least 1 message, got {buffer}")
        self.target = target
        self.stream_id = stream_id
        self._transport = TRANSPORTS[target.kind](target, stream_id, ca_file)
        self._backoff = Backoff(*backoff_s, attempts=None)
        self._waiting: DropOldest[bytes] = DropOldest(buffer)
        self._sending: list[bytes] = []  # the batch taken from the buffer, not yet delivered
        self._batch = self._transport.batch  # the most the next batch takes: halved by failures
        self._wake = asyncio.Event()  # a message was offered, or close() was called
        self._room = asyncio.Event()  # a batch was taken from the buffer, or close() was called
        self._closing = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._linked = False  # the transport is connected (connect() succeeded, nothing failed since)
        self._connected = False  # the last attempt reached the target (status: a webhook has no link)
        self._dropping = False  # the buffer overflowed since the last delivery (one log line)
        self._discarded = 0  # messages refused, offered after close, or left at close
        self._ledger: Ledger | None = None  # where its counts go too (``start``)
        # Each kind of line that a failing frame can bring: at most one per interval.
        self._overflow_log, self._refusal_log = Throttled(log), Throttled(log)
        self._outage_log, self._recovery_log = Throttled(log), Throttled(log)
        self.delivered = self.retries = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"{self.target.kind} sink {self.target.redacted} of stream {self.stream_id!r}"

    def start(self, ledger: Ledger | None = None) -> None:
        """Start the delivery task (on the event loop; once), counting what becomes of each
        message in ``ledger`` too (a stream's sinks: the server's; a sink alone needs none)."""
        self._ledger = ledger
        if self._task is None and not self._closing.is_set():
            self._task = asyncio.get_running_loop().create_task(self._deliver(), name=repr(self))

    @property
    def dropped(self) -> int:
        """Messages that will never be delivered: pushed out of the buffer, refused by the
        target, offered after close or left at close."""
        return self._waiting.dropped + self._discarded

    def offer(self, message: bytes) -> None:
        """Queue one message; when ``buffer`` are waiting, the oldest is dropped and counted."""
        if self._closing.is_set():
            self._discard(1)
            return
        if self._waiting.push(message) is not None:
            _book(self._ledger, self.target.kind, DROPPED, 1)
            if not self._dropping:
                self._dropping = True
                self._overflow_log.log(logging.WARNING, "%r: %d messages wait already; dropping the oldest "
                                       "(counted in 'dropped')", self, self._waiting.size)
        self._wake.set()

    def _discard(self, count: int) -> None:
        """``count`` messages that will never be delivered, beside those the buffer pushed out."""
        self._discarded += count
        _book(self._ledger, self.target.kind, DROPPED, count)

    @property
    def full(self) -> bool:
        """``offer`` would drop the oldest waiting message now."""
        return self._waiting.full

    async def room(self) -> None:
        """Return once ``offer`` would drop nothing (fewer than ``buffer`` wait), or the sink
        is closing; while its target is away, that is when it returns."""
        while self.full and not self._closing.is_set():
            self._room.clear()
            await self._room.wait()

    async def close(self, timeout_s: float) -> None:
        """Deliver what is held within ``timeout_s`` (retrying as ever; a pause in progress is
        cut short), then stop: what is left is counted dropped, and the connection closed."""
        self._closing.set()
        self._wake.set()
        self._room.set()
        task = self._task
        if task is not None:
            await asyncio.wait((task,), timeout=max(timeout_s, 0))
            if not task.done():
                task.cancel()
                # Python 3.11's wait_for loses a cancel that comes just as what it waits for
                # ends (a connect refused at once), and the task goes on: cancelled again.
                while not (await asyncio.wait((task,), timeout=CANCEL_AGAIN_S))[0]:
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        left = self._waiting.clear() + len(self._sending)
        if left:
            log.warning("%r: closed with %d messages undelivered (counted in 'dropped')", self, left)
            self._discard(left)
            self._sending = []
        await self._disconnect()

    def status(self) -> dict:
        """The counters; the URL without credentials."""
        return {"url": self.target.redacted, "kind": self.target.kind, "connected": self._connected,
                "delivered": self.delivered, "dropped": self.dropped,
                "buffered": len(self._waiting) + len(self._sending),
                "retries": self.retries, "last_error": self.last_error}

    async def _deliver(self) -> None:
        """The delivery task: a batch at a time, in order, until closed and empty."""
        delays = self._backoff.delays()
        failing = False  # since the last success (one log line per outage)
        while True:
            if not self._sending:
                if not self._waiting:
                    if self._closing.is_set():
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._sending = self._take()
            try:
                if not self._linked:
                    await asyncio.wait_for(self._transport.connect(), SEND_TIMEOUT_S)
                    self._linked = True
                await asyncio.wait_for(self._transport.send(self._sending), SEND_TIMEOUT_S)
            except Rejected as exc:  # a batch of one: a webhook's, or a Kafka record too large
                self._connected = True
                self._discard(len(self._sending))
                self._sending = []
                self.last_error = failure(exc)
                self._refusal_log.log(logging.WARNING, "%r: a message was refused (%s) and dropped "
                                      "(counted in 'dropped')", self, self.last_error)
                continue
            except Exception as exc:  # whatever a transport raises is retried
                self.retries += 1
                if len(self._sending) > 1:  # halved; the rest waits again, first in line
                    keep = len(self._sending) // 2
                    self._waiting.put_back(self._sending[keep:])
                    self._sending = self._sending[:keep]
                self._batch = len(self._sending)
                self.last_error = failure(exc)
                if not failing:
                    failing = True
                    self._outage_log.log(logging.WARNING, "%r: %s; retrying (pauses of %g to %g s), %d "
                                         "messages may wait meanwhile", self, self.last_error,
                                         self._backoff.first_s, self._backoff.max_s, self._waiting.size)
                await self._disconnect()
                await self._pause(next(delays))
                continue
            self._connected = True
            self.delivered += len(self._sending)
            _book(self._ledger, self.target.kind, DELIVERED, len(self._sending))
            self._sending = []
            self._batch = min(self._transport.batch, 2 * self._batch)
            self._dropping = False
            if failing:
                failing = False
                self._recovery_log.log(logging.INFO, "%r: delivering again (after %d retries in all)",
                                       self, self.retries)
                delays = self._backoff.delays()

    def _take(self) -> list[bytes]:
        """The next batch: the oldest waiting messages, up to the batch size and BATCH_BYTES
        (one message at least)."""
        batch = [self._waiting.pop()]
        size = len(batch[0])
        while self._waiting and len(batch) < self._batch and size + len(self._waiting.peek()) <= BATCH_BYTES:
            size += len(self._waiting.peek())
            batch.append(self._waiting.pop())
        self._room.set()
        return batch

    async def _pause(self, delay_s: float) -> None:
        if self._closing.is_set():
            await asyncio.sleep(delay_s)
            return
        # close() cuts the pause short: the flush gets one prompt attempt.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay_s)

    async def _disconnect(self) -> None:
        self._linked = self._connected = False
        try:
            await asyncio.wait_for(self._transport.disconnect(), SEND_TIMEOUT_S)
        except Exception as exc:  # a connection already broken may fail to close
            log.debug("%r: disconnect: %s", self, failure(exc))




class MemorySink:
    """A sink whose target is the server's own memory: the latest ``buffer`` messages wait
    there until their reader ``take``s them (an inference pipeline's ``consume``). Offered,
    started, closed and counted as a ``Sink`` is, so a stream treats both alike: when
    ``buffer`` wait, the oldest is dropped and counted (a live stream), or a file played as
    fast as possible waits for ``room()`` (nothing dropped). ``close`` keeps what waits: a
    stream that ended is still read to its last result."""

    kind = "memory"

    def __init__(self, stream_id: str, buffer: int):
        if buffer < 1:
            raise BadInputError(f"a memory sink holds at least 1 message, got {buffer}")
        self.stream_id = stream_id
        self._waiting: DropOldest[bytes] = DropOldest(buffer)
        self._room = asyncio.Event()  # a message was taken, or close() was called
        self._closed = False
        self._discarded = 0  # offered after close
        self._ledger: Ledger | None = None  # where its counts go too (``start``)
        self.delivered = 0  # taken by the reader

    def __repr__(self) -> str:
        return f"memory sink of stream {self.stream_id!r}"

    def start(self, ledger: Ledger | None = None) -> None:
        """Nothing to connect: counts in ``ledger`` too, as a ``Sink`` does."""
        self._ledger = ledger

    @property
    def dropped(self) -> int:
        return self._waiting.dropped + self._discarded

    @property
    def full(self) -> bool:
        return self._waiting.full

    def offer(self, message: bytes) -> None:
        if self._closed:
            self._discarded += 1
            _book(self._ledger, self.kind, DROPPED, 1)
        elif self._waiting.push(message) is not None:
            _book(self._ledger, self.kind, DROPPED, 1)

    def take(self) -> bytes | None:
        """The oldest waiting message, taken out; None when none waits."""
        if not self._waiting:
            return None
        self.delivered += 1
        _book(self._ledger, self.kind, DELIVERED, 1)
        self._room.set()
        return self._waiting.pop()

    async def room(self) -> None:
        while self.full and not self._closed:
            self._room.clear()
            await self._room.wait()

    async def close(self, timeout_s: float) -> None:
        """Take no more messages; those waiting stay to be taken."""
        self._closed = True
        self._room.set()

    def status(self) -> dict:
        """The same fields as a ``Sink``'s: "delivered" are the messages taken."""
        return {"url": "memory:", "kind": self.kind, "connected": True, "delivered": self.delivered,
                "dropped": self.dropped, "buffered": len(self._waiting), "retries": 0, "last_error": None}


def _book(ledger: Ledger | None, kind: str, outcome: str, count: int) -> None:
    """What became of ``count`` messages of a sink of ``kind``, in the server's ledger."""
    if ledger is not None and count:
        ledger.sink_messages(kind, outcome, count)
