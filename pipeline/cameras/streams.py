"""The camera streams a server runs now, and where their results go.

Vocabulary:

- a **stream** (``CameraStream``): one source the server pulls (``StreamSpec``), decoded in
  its own thread (``sources.Source``) into a small ``FrameQueue``; its frames go, in order,
  through a ``StreamWindow`` and ``serving.life.run`` (one ``CameraCall`` each), like any request, so frames of every
  camera and every client share batches;
- **live** streams (cameras, and files played in real time) have one frame in the batcher at
  most, and take it when their **turn** comes: the cameras of one model may have two batches'
  worth of frames in its batcher (``CameraStreams.turns``), served first come, first served. Until then the
  stream's newest frame waits in a queue of one, replaced by each newer frame, so a frame is
  as fresh as it can be when it is run, and the model never idles while a camera has a frame.
  A frame replaced is dropped: counted in ``frames_dropped`` and in Prometheus' dropped
  frames, and told to subscribers as a ``dropped`` result, never skipped silently. A file
  played with ``realtime: false`` waits instead (nothing is dropped), a few frames at once,
  and waits for its sinks too: a result goes to them once none has a full buffer;
- a **result** (``CameraResult``): a frame's document (Roboflow's ``rle`` document plus
  ``stream_id``, ``frame_index``: the source's frame number, ``timestamp``: epoch seconds
  when it was decoded), or its error, or that it was dropped;
- **sinks** (``sinks.Sink``, the stream's own) get each document as one JSON message;
  **subscribers** (``Subscription``, gRPC ``Subscribe``) get every result of one stream or
  of all, each through a bounded buffer whose overflow is counted.

One stream's failure touches no other: each decodes in its own thread, and a source that
fails or reconnects shows it in its ``state``, ``last_error`` (words) and ``error_code`` (one
of ``source_errors.CODES``, for programs; null again once it runs), each failure counted in
Prometheus by code, and every stream counted there by its state and code until removed.
Removing a stream stops its source, lets frames already in the batcher finish and reach the
sinks, flushes them briefly and frees its tracker; a drain (``close``) does the same for
every stream within the grace period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from .. import memory, schema
from ..buffers import DropOldest
from ..errors import AlreadyExistsError, LimitError, NotFoundError, ShuttingDownError, status_text
from ..images import reduced_size
from ..serving.life import run
from ..serving.request import CAMERAS, Answer, InferRequest, Tracking
from ..serving.state import ServingState
from ..serving.stream_window import StreamWindow
from ..serving.url_policy import AllowList
from .sink_targets import checked
from .sinks import MemorySink, Sink
from .source_errors import SourceError
from .sources import CapturedFrame, FrameQueue, Source
from .spec import SourceRules, StreamSpec

LOG = logging.getLogger(__name__)
API = "camera"  # the streams_open gauge's label for these streams
# A file played as fast as possible: a few frames in the batcher at once, so one file fills
# batches by itself; its queue waits (nothing dropped). A live stream has one frame in the
# batcher at most, taken when its turn comes (``CameraStreams.turns``), and a queue of one: the newest.
FILE_WINDOW, FILE_QUEUE = 4, 2
# Live frames of every camera of one model in its batcher at once, in batches of its batch
# limit: one batch running, one forming.
BATCHES_IN_TURN = 2
SUBSCRIBER_BUFFER = 64
MAX_SUBSCRIPTIONS = 64
REMOVE_FLUSH_S = 2.0  # how long a removed stream's sinks may take to deliver what they hold
# What a decoder holds per pixel of its frames, for the budget: about five YUV 4:2:0 frames
# (the one decoded, its references, the scaler's). Measured with PyAV, two slice threads:
# 3840x2160 H.264 6.8 bytes a pixel above the start, 8000x8000 MJPEG 3.2.
DECODER_BYTES_PER_PIXEL = 8
# Joining a source's thread can take its timeout (FFmpeg inside a read): threads of their own,
# so stopping hung cameras never holds the workers that answer requests.
_STOPPERS = ThreadPoolExecutor(4, thread_name_prefix="camera-stop")
RATE_SPAN_S = 5.0
STATE_CHANGES = FRAME_TIMES = 64  # the latest kept of each, for a stream's history and latencies
COUNTS = ("frames_sampled", "frames_out", "frames_dropped", "frame_errors", "subscriber_dropped")


@dataclass(frozen=True)
class CameraResult:
    """What one sampled frame came to: its ``answer`` (None if it failed or was dropped), or
    ``error``, or ``dropped``. ``message``: the document as JSON, made once for the sinks;
    ``rgb``: the frame, for subscribers that asked for frames."""

    stream_id: str
    frame_index: int
    timestamp: float
    answer: Answer | None = None
    message: bytes = b""
    error: str = ""
    dropped: bool = False
    rgb: np.ndarray | None = None


@dataclass(frozen=True)
class StateChange:
    """One change of a stream's state: when (epoch seconds), to what, and why (an error)."""

    timestamp: float
    state: str
    error: str | None = None
    code: str | None = None  # the error's (``source_errors.CODES``)


@dataclass(frozen=True)
class FrameTimes:
    """When one answered frame was decoded, went into the batcher and was answered (epoch s):
    a stream's one record of its latency, read by the dashboard (lag p50/p99) and by Roboflow's
    latency reports (means), over the latest ``FRAME_TIMES`` frames."""

    decoded: float
    started: float
    answered: float


class RateMeter:
    """Events per second over the last ``RATE_SPAN_S`` (or since the start, if shorter)."""

    def __init__(self):
        self.started = time.monotonic()
        self._events: deque[tuple[float, int]] = deque()

    def add(self, count: int = 1) -> None:
        self._events.append((time.monotonic(), count))

    def rate(self) -> float:
        now = time.monotonic()
        while self._events and self._events[0][0] < now - RATE_SPAN_S:
            self._events.popleft()
        elapsed = min(RATE_SPAN_S, now - self.started)
        return round(sum(n for _, n in self._events) / elapsed, 2) if elapsed > 0 else 0.0


class Turn:
    """A live frame's place among the frames the cameras may have in the batcher at once;
    given back when the frame is answered (or never started)."""

    def __init__(self, turns: asyncio.Semaphore):
        self._turns: asyncio.Semaphore | None = turns

    def release(self) -> bool:
        """Give the turn back; False if it was given back already."""
        if self._turns is None:
            return False
        self._turns.release()
        self._turns = None
        return True


class Subscription:
    """One subscriber's results (one stream's, or every stream's for ``stream_id`` ""), at
    most ``SUBSCRIBER_BUFFER`` waiting: a subscriber that reads too slowly loses the oldest,
    counted in its streams' ``subscriber_dropped``. ``end()`` ends it once what waits is read."""

    def __init__(self, stream_id: str, frames: bool):
        self.stream_id = stream_id
        self.frames = frames
        self._results: DropOldest[CameraResult] = DropOldest(SUBSCRIBER_BUFFER)
        self._changed = asyncio.Event()
        self._ended = False

    def offer(self, result: CameraResult) -> bool:
        """False when an older result had to make room."""
        kept = self._results.push(result) is None
        self._changed.set()
        return kept

    def end(self) -> None:
        self._ended = True
        self._changed.set()

    async def __aiter__(self) -> AsyncIterator[CameraResult]:
        while True:
            while self._results:
                yield self._results.pop()
            if self._ended:
                return
            self._changed.clear()
            await self._changed.wait()


class CameraCall:
    """One sampled frame as a ``serving.life.Call``: its request made from the stream's spec
    (its parameters read once, when the stream was added), answered as a ``CameraResult``,
    its failure one too. A live frame holds its ``turn`` until it is answered."""

    api = API  # the books' name for the way it came in

    def __init__(self, stream: CameraStream, frame: CapturedFrame, turn: Turn | None):
        self.stream, self.frame, self.turn = stream, frame, turn
        self.model = stream.spec.model

    def read(self) -> InferRequest:
        spec, tracking = self.stream.spec, self.stream.tracking
        now = None if tracking is None else replace(tracking, timestamp=self.frame.media_s)
        return InferRequest(spec.model, "", (self.frame.picture,), spec.options, tracking=now, lane=CAMERAS)

    def respond(self, answer: Answer) -> CameraResult:  # a worker thread
        stream, frame = self.stream, self.frame
        message = b""
        if stream.sinks:
            (det,) = answer.detections
            doc = {"stream_id": stream.id, "frame_index": frame.index, "timestamp": frame.captured,
                   **schema.document(det, answer.pipe.class_names, "rle")}
            message = json.dumps(doc, separators=(",", ":")).encode()
        return CameraResult(stream.id, frame.index, frame.captured, answer, message,
                            rgb=stream.frame_for_subscribers(frame))

    def fail(self, error: BaseException) -> CameraResult:
        stream, frame = self.stream, self.frame
        stream.answer_given(self.turn)  # a frame never started gives its turn back here
        return CameraResult(stream.id, frame.index, frame.captured,
                            error=status_text(error, cancelled="the stream was stopped"),
                            rgb=stream.frame_for_subscribers(frame))


class CameraStream:
    """One stream: its source, queue, window, sinks and counts (see the module's vocabulary)."""

    def __init__(self, stream_id: str, spec: StreamSpec, owner: CameraStreams,
                 own_sinks: Sequence[Sink | MemorySink] = ()):
        self.id = stream_id
        self.spec = spec
        self.owner = owner
        self.created = time.time()
        self.client = f"{API}/{stream_id}"  # its share of the server's limits and its tracker's owner
        self.state = "starting"
        self.last_error: str | None = None
        self.error_code: str | None = None  # why the source is not delivering now (source_errors.CODES)
        self.paused = False
        self.counts: Counter = Counter()
        self.rate_in, self.rate_out = RateMeter(), RateMeter()
        self.changes: DropOldest[StateChange] = DropOldest(STATE_CHANGES)
        self.times: DropOldest[FrameTimes] = DropOldest(FRAME_TIMES)
        self._booked: tuple[str, str] | None = None  # (state, code) the ledger counts it under
        self._forgotten = False  # removed: counted no more, whatever a late callback says
        self._last_index = -1
        self.live = live = spec.network or spec.realtime
        loop = asyncio.get_running_loop()
        self.queue = FrameQueue(1 if live else FILE_QUEUE, drop_oldest=live,
                                on_drop=lambda frame: loop.call_soon_threadsafe(self._dropped_waiting, frame))
        self.long_side = owner.state.lookup(spec.model).info.preprocess.decode_side()
        self._reserved = 0  # bytes of the server's budget its frames hold (``_admit_frames``)
        self._budget_lock = threading.Lock()  # the source's thread reserves, the loop releases
        self.source = Source(spec.location, network=spec.network, max_fps=spec.max_fps,
                             realtime=spec.realtime, queue=self.queue, name=stream_id,
                             on_state=lambda state, error: loop.call_soon_threadsafe(
                                 self._source_state, state, error),
                             long_side=self.long_side, admit=self._admit_frames, ca_file=owner.rules.ca_file)
        self.sinks = [Sink(target, stream_id, buffer=owner.sink_buffer, ca_file=owner.sink_ca_file)
                      for target in spec.sinks] + list(own_sinks)
        self.window: StreamWindow[CameraCall, CameraResult] = StreamWindow(
            self._process, CameraCall.fail, window=1 if live else FILE_WINDOW)
        self._answered = asyncio.Event()  # a live stream's frame in the batcher is answered
        self._answered.set()
        self._turn: Turn | None = None  # a live stream's frame's turn (one at a time)
        # The tracker's key names this stream object, not only its id: a stream added again
        # under the same id gets a tracker of its own.
        self.tracking = (Tracking(f"{API}/{stream_id}/{uuid.uuid4().hex[:8]}", spec.tracker)
                         if spec.track else None)
        self._task: asyncio.Task | None = None
        self._stop_asked = asyncio.Event()  # stop_reading() was called
        self._stopping: asyncio.Task | None = None
        self._released = False

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        ledger = self.owner.state.ledger
        ledger.stream_opened(API)
        ledger.model_stream_opened(self.spec.model)
        for sink in self.sinks:
            sink.start(ledger)
        self._book_state()
        self.source.start()
        self._task = asyncio.create_task(self._run(), name=f"camera-{self.id}")

    async def _run(self) -> None:
        try:
            async for result in self.window.run(self._sampled()):
                if not self.live and result.answer is not None:
                    await self._room_in_sinks()
                self._deliver(result)
        except Exception as exc:  # noqa: BLE001 - a stream's fault must not reach the others
            LOG.exception("camera stream %s failed", self.id)
            self.state, self.last_error = "failed", f"internal error: {exc}"
            self.changes.push(StateChange(time.time(), self.state, self.last_error))
            self._book_state()
            asyncio.get_running_loop().run_in_executor(_STOPPERS, self.source.stop)
        finally:
            self._release()

    def _release(self) -> None:
        """What a stream holds while it runs: its tracker, its place in the gauges and the
        model's in-use count, its subscribers. Given back when its frames end (a file's
        end, a failure, a stop); its sinks go on delivering what they hold until removed."""
        if self._released:
            return
        with self._budget_lock:
            self._released = True
            self.owner.state.limits.unreserve(self._reserved)
            self._reserved = 0
        if self._turn is not None:  # a frame the window let go unanswered holds none
            self._turn.release()
        state = self.owner.state
        if self.tracking is not None:
            state.tracks.end(self.tracking.slot(self.client))
        state.ledger.stream_opened(API, -1)
        state.ledger.model_stream_opened(self.spec.model, -1)
        self.owner.end_subscriptions(self.id)

    def stop(self, deadline: float | None = None) -> asyncio.Future:
        """Stop the source, answer the frames already read, flush the sinks until
        ``deadline`` (monotonic; None: ``REMOVE_FLUSH_S`` once the frames are answered).
        Runs once, to the end even if a caller is cancelled."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(deadline))
        return asyncio.shield(self._stopping)

    def stop_reading(self) -> None:
        """Start no more frames (the drain's first step; ``stop`` finishes)."""
        self._stop_asked.set()
        self.window.stop(ShuttingDownError("the stream was stopped"))
        self.queue.close()

    async def _stop(self, deadline: float | None) -> None:
        try:
            self.stop_reading()
            await asyncio.get_running_loop().run_in_executor(_STOPPERS, self.source.stop)
            if self._task is not None:
                await self._task
        finally:
            self._release()
            # What its frames held goes back to the OS now, not at the next idle batcher.
            await asyncio.get_running_loop().run_in_executor(_STOPPERS, memory.trim)
            if deadline is None:
                deadline = time.monotonic() + REMOVE_FLUSH_S
            await asyncio.gather(*(sink.close(max(0.0, deadline - time.monotonic())) for sink in self.sinks))
            if self.state not in ("failed", "stopped"):
                self.state = "stopped"
                self._book_state()
            sinks = [sink.status() for sink in self.sinks]
            LOG.info("camera stream %s stopped: %d results; sinks: %d delivered, %d dropped, %d left",
                     self.id, self.counts["frames_out"], sum(x["delivered"] for x in sinks),
                     sum(x["dropped"] for x in sinks), sum(x["buffered"] for x in sinks))

    def _admit_frames(self, height: int, width: int) -> str | None:
        """(The source's thread, before frames of this size are decoded.) Reserve from the
        server's bytes budget what they hold: the decoder's full-size frames
        (``DECODER_BYTES_PER_PIXEL``) and the converted frames its queue may hold (the one in
        the batcher counts as any request's). None, or why they do not fit."""
        reduced = reduced_size((height, width), self.long_side) or (height, width)
        need = height * width * DECODER_BYTES_PER_PIXEL + self.queue.size * reduced[0] * reduced[1] * 3
        limits = self.owner.state.limits
        with self._budget_lock:
            if self._released:
                return "the stream was stopped"
            limits.unreserve(self._reserved)
            if limits.reserve(need):
                self._reserved = need
                return None
            self._reserved = self._reserved if limits.reserve(self._reserved) else 0
            free = limits.max_bytes - limits.bytes_held
        return (f"frames of {width}x{height} need about {need / 2**20:.0f} MB of the server's memory "
                f"budget (--max-bytes-in-flight-mb, {limits.max_bytes / 2**20:.0f} MB), and "
                f"{max(free, 0) / 2**20:.0f} MB of it are free")

    def pause(self) -> None:
        self.paused = True
        self.source.pause()
        self.changes.push(StateChange(time.time(), "paused"))
        self._book_state()

    def resume(self) -> None:
        self.paused = False
        self.source.resume()
        self.changes.push(StateChange(time.time(), self.state))
        self._book_state()

    # ------------------------------------------------------------------ frames

    async def _sampled(self) -> AsyncIterator[CameraCall]:
        """The frames to run, in order. A live stream's: one at a time, each the newest when
        its turn comes, so a frame waits where a newer one replaces it (the queue of one),
        not in the batcher, where it would only age; older ones are dropped and told."""
        async for frame in self.queue:
            if not self.live:
                self._sampled_one(frame)
                yield CameraCall(self, frame, None)
                continue
            await self._answered.wait()
            turns = self.owner.turns(self.spec.model)
            await turns.acquire()
            turn = Turn(turns)
            newer = self.queue.take_nowait()
            if newer is not None:
                self._dropped_waiting(frame)
                frame = newer
            self._answered.clear()
            self._sampled_one(frame)
            self._turn = turn
            try:
                yield CameraCall(self, frame, turn)
            except GeneratorExit:
                turn.release()
                raise

    def _sampled_one(self, frame: CapturedFrame) -> None:
        self.counts["frames_sampled"] += 1
        self.rate_in.add(frame.index - self._last_index if self._last_index >= 0 else 1)
        self._last_index = frame.index

    def answer_given(self, turn: Turn | None) -> None:
        if turn is not None and turn.release():
            self._answered.set()

    async def _process(self, call: CameraCall) -> CameraResult:
        started = time.time()
        try:
            result = await run(self.owner.state, call, self.client)
        finally:
            self.answer_given(call.turn)
        if result.answer is not None:
            self.times.push(FrameTimes(call.frame.captured, started, time.time()))
        return result

    def frame_for_subscribers(self, frame: CapturedFrame) -> np.ndarray | None:
        """The frame, kept with its result only while a subscriber asked for frames."""
        return frame.rgb if self.owner.wants_frames(self.id) else None

    def _dropped_result(self, frame: CapturedFrame) -> CameraResult:
        return CameraResult(self.id, frame.index, frame.captured, dropped=True)

    def _dropped_waiting(self, frame: CapturedFrame) -> None:
        """A sampled frame that a newer one replaced while the model was behind: counted
        (here and in Prometheus) and told to subscribers."""
        self.counts["frames_sampled"] += 1
        self.counts["frames_dropped"] += 1
        self.owner.state.ledger.frames_dropped()
        self.owner.publish(self, self._dropped_result(frame))

    async def _room_in_sinks(self) -> None:
        """A file played as fast as possible waits for its sinks as it waits for the model,
        so they drop nothing: while a sink's target is away, the file waits with it. A stop
        ends the wait (what is then offered to a full sink pushes out its oldest, counted)."""
        full = [sink.room() for sink in self.sinks if sink.full]
        if not full:
            return
        room = asyncio.ensure_future(asyncio.gather(*full))
        stop = asyncio.ensure_future(self._stop_asked.wait())
        try:
            await asyncio.wait((room, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()
            stop.cancel()
            await asyncio.gather(room, stop, return_exceptions=True)

    def _deliver(self, result: CameraResult) -> None:
        if result.answer is not None:
            self.counts["frames_out"] += 1
            self.rate_out.add()
            for sink in self.sinks:
                sink.offer(result.message)
        elif result.error:
            self.counts["frame_errors"] += 1
            self.last_error = f"frame {result.frame_index}: {result.error}"
        self.owner.publish(self, result)

    def _source_state(self, state: str, error: SourceError | None) -> None:
        if self.state == "failed":  # our own failure (``_run``) is final too
            return
        self.state = state
        # The code is the present state's reason (none while it starts, runs or has stopped);
        # last_error stays, the last thing that went wrong.
        self.error_code = error.code if error else None
        if error:
            self.last_error = error.text
            if error.code:  # told once per failure and per change of reason, not per retry
                self.owner.state.ledger.stream_error(self.spec.model, error.code)
        self.changes.push(StateChange(time.time(), state, error.text if error else None, self.error_code))
        self._book_state()

    def _book_state(self) -> None:
        """Move this stream in the ledger's count of streams by state and code (Prometheus'
        ``rle_serving_camera_streams``) to where its status shows it now; called wherever
        either changes, so the count needs no walk over the streams at scrape time."""
        now = (self.shown_state, self.error_code or "")
        if now != self._booked and not self._forgotten:
            self.owner.state.ledger.camera_stream_moved(self.spec.model, self._booked, now)
            self._booked = now

    def forget(self) -> None:
        """Out of the ledger's count of streams by state (the stream was removed)."""
        if not self._forgotten:
            self._forgotten = True
            self.owner.state.ledger.camera_stream_moved(self.spec.model, self._booked, None)

    @property
    def shown_state(self) -> str:
        """The state its status shows: "paused" while paused and neither failed nor stopped."""
        return "paused" if self.paused and self.state not in ("failed", "stopped") else self.state

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        spec = self.spec
        return {
            "stream_id": self.id, "source": spec.display, "model": spec.model,
            "state": self.shown_state,
            "last_error": self.last_error, "error_code": self.error_code, "max_fps": spec.max_fps,
            "track": spec.track,
            "realtime": spec.realtime, "parameters": dict(spec.parameters),
            "sinks": [sink.status() for sink in self.sinks],
            "frames_decoded": self.source.frames_decoded,
            **{name: self.counts[name] for name in COUNTS},
            "fps_in": self.rate_in.rate(), "fps_out": self.rate_out.rate(),
            "reconnects": self.source.reconnects, "created": self.created,
        }


class CameraStreams:
    """The streams a server runs, at most ``max_streams`` (stopped and failed ones count until
    removed, so their state stays visible), and the subscribers to their results."""

    def __init__(self, state: ServingState, rules: SourceRules, *, max_streams: int = 16,
                 sink_buffer: int = 1000, sink_ca_file: str | None = None, sink_allow: AllowList = AllowList()):
        self.state = state
        self.rules = rules
        self.max_streams = max_streams
        self.sink_buffer = sink_buffer
        self.sink_ca_file = sink_ca_file
        self.sink_allow = sink_allow  # --sink-url-allow
        self._streams: dict[str, CameraStream] = {}
        self._removing: set[str] = set()  # ids whose removal is under way
        self._subscribers: set[Subscription] = set()
        self._turns: dict[str, asyncio.Semaphore] = {}

    def turns(self, model: str) -> asyncio.Semaphore:
        """The **turns** of live camera frames in ``model``'s batcher: ``BATCHES_IN_TURN``
        batches of its batch limit. Waiters are served first come, first served, so every
        camera gets its turn."""
        if model not in self._turns:
            limit = self.state.lookup(model).batch_limit
            self._turns[model] = asyncio.Semaphore(BATCHES_IN_TURN * limit)
        return self._turns[model]

    async def add(self, spec: StreamSpec, own_sinks: Sequence[Sink | MemorySink] = ()) -> CameraStream:
        """Start a stream, once its source's host and every sink's are allowed (each looked up
        once: the sinks connect to the addresses checked here). ``own_sinks``: sinks the server
        made itself, beside the spec's (an inference pipeline's ``MemorySink``)."""
        stream_id = self._admit(spec)
        if spec.network:
            await self.rules.check(spec.location)
        sinks = await asyncio.gather(*(checked(target, stream_id, self.sink_allow) for target in spec.sinks))
        stream_id = self._admit(spec, stream_id)  # again: the server may have changed meanwhile
        stream = self._streams[stream_id] = CameraStream(stream_id, replace(spec, sinks=tuple(sinks)), self,
                                                          own_sinks)
        stream.start()
        LOG.info("camera stream %s: %s -> %s", stream_id, spec.display, spec.model)
        return stream

    def _admit(self, spec: StreamSpec, stream_id: str = "") -> str:
        """The new stream's id, if it may start now."""
        self.state.pipeline(spec.model)  # an unknown model, or a draining server
        if len(self._streams) >= self.max_streams:
            raise LimitError(f"this server runs {len(self._streams)} camera streams, its limit "
                             "(--max-ingest-streams); remove one first")
        stream_id = stream_id or spec.stream_id or uuid.uuid4().hex[:12]
        if stream_id in self._streams:
            raise AlreadyExistsError(f"a stream {stream_id!r} exists already")
        return stream_id

    def get(self, stream_id: str) -> CameraStream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise NotFoundError(f"no camera stream {stream_id!r}") from None

    def all(self) -> list[CameraStream]:
        return list(self._streams.values())

    async def remove(self, stream_id: str) -> CameraStream:
        """Stop a stream and forget it. Its id stays taken until it has stopped. One caller
        removes it: another that asks while the removal is under way gets NotFoundError at once,
        as it would a moment later, so each stream added is removed OK once."""
        stream = self.get(stream_id)
        if stream_id in self._removing:
            raise NotFoundError(f"camera stream {stream_id!r} is being removed already")
        self._removing.add(stream_id)
        try:
            await stream.stop()
        finally:
            self._removing.discard(stream_id)
            if self._streams.get(stream_id) is stream:
                del self._streams[stream_id]
                stream.forget()
        LOG.info("camera stream %s removed", stream_id)
        return stream

    def subscribe(self, stream_id: str = "", frames: bool = False) -> Subscription:
        """A subscription to ``stream_id``'s results ("": every stream's); ``unsubscribe``
        it when done."""
        if stream_id:
            self.get(stream_id)
        if len(self._subscribers) >= MAX_SUBSCRIPTIONS:
            raise LimitError(f"{len(self._subscribers)} subscriptions are open, the most this server "
                             "keeps; end one first")
        subscription = Subscription(stream_id, frames)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def wants_frames(self, stream_id: str) -> bool:
        return any(s.frames and s.stream_id in ("", stream_id) for s in list(self._subscribers))

    def end_subscriptions(self, stream_id: str) -> None:
        """End the subscriptions to one stream (whose frames ended)."""
        for subscription in [s for s in self._subscribers if s.stream_id == stream_id]:
            subscription.end()

    def publish(self, stream: CameraStream, result: CameraResult) -> None:
        for subscription in self._subscribers:
            if subscription.stream_id in ("", stream.id) and not subscription.offer(result):
                stream.counts["subscriber_dropped"] += 1

    def stop_reading(self) -> None:
        """The drain's first step, before the server refuses new work: no stream starts
        another frame, so none is refused for the drain; frames in the batcher go on."""
        for stream in self._streams.values():
            stream.stop_reading()

    async def close(self, deadline: float) -> None:
        """The drain: every stream stopped (frames in the batcher answered, sinks flushed
        until ``deadline``, monotonic), every subscription ended."""
        streams = list(self._streams.values())
        await asyncio.gather(*(stream.stop(deadline) for stream in streams))
        self._streams.clear()
        for stream in streams:
            stream.forget()
        for subscription in self._subscribers:
            subscription.end()
