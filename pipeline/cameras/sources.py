"""Decoding a camera or a file in a thread of its own (PyAV, FFmpeg), sampled, into a small
queue that the event loop reads.

Vocabulary:

- a **source** (``Source``): one location, opened and decoded by one daemon thread, so a
  camera that hangs or fails touches no other. A **network** source is an RTSP camera (over
  TCP) or an HTTP stream (HLS); otherwise a local **file**. Every open and every read has a
  timeout (``timeout_s``, PyAV's ``av.open(timeout=(open_s, read_s))``);
- **live** or **recording**: a network source without a duration (a camera, a live HLS
  playlist) is live: its frame times are the monotonic clock when each is decoded (its own
  timestamps restart on every reconnect), and its end is a lost connection. A file, or a
  network source with a duration (an HLS VOD playlist, whose ``#EXT-X-ENDLIST`` gives it
  one), is a recording: its frame times are its presentation times, and its end is the end;
- **sampling** (``max_fps``): every frame is decoded (H.264 needs the ones between), but only
  sampled frames are converted to RGB and queued: a frame is kept when its time reaches the
  next due time, one ``1 / max_fps`` after the last, so 10 fps sampled at 2 gives 2 fps;
- **bounded memory**: a frame at least twice the size the model needs (``long_side``, its
  input scale) is converted straight to a reduced size by FFmpeg's scaler (as images are
  reduced before any float tensor: ``images.reduced_size``), its full size kept for the
  results; and before frames of a size are decoded, ``admit(height, width)`` may refuse them
  (the stream reserves their memory from the server's budget): the source then fails, saying
  why;
- **realtime pacing**: a recording played ``realtime`` (and any network recording: a
  network source stands for a camera) is delivered at its own frame rate, as a camera would;
  a file not played in real time goes as fast as the queue takes its frames;
- **reconnect / backoff**: a network source that cannot open, stops sending, errs or ends
  is reopened after the pauses of a ``Backoff`` (``backoff_s``: the first and the longest),
  forever; they start again from the first once an open gives a frame. A file gets no retry;
- **states**, told through ``on_state(state, error)`` from the source's thread (``stop`` may
  tell the last one from the caller's): ``starting`` (the first open), ``running`` (the
  first frame after an open), ``reconnecting`` (a network source lost or never connected;
  ``error`` says why, told again when the reason changes), ``failed`` (a file that cannot be
  opened or decoded or has no video, or frames ``admit`` refused: final) and ``stopped`` (the end of a recording, or
  ``stop()``: final). Nothing raises out of the thread: whatever goes wrong becomes a state;
  its ``error`` is a ``source_errors.SourceError``: words for people and a code for programs
  (``CONNECTION_FAILED``, ``AUTH_FAILED``, ``TIMEOUT``, ...), classified from what FFmpeg raised;
- **TLS** (rtsps://, https://): the certificate must chain to a CA the system trusts or to one
  in ``ca_file`` (the server's ``--stream-ca-file``: a camera's own self-signed certificate
  may be one) and name the URL's host; FFmpeg checks neither unless told (``tls_verify``).
  FFmpeg's HLS reader fetches segments without passing these on: a playlist's segments on
  another host than the playlist's are not verified;
- **pause**: a file waits where it is and goes on from the same frame; a network source
  closes its connection and reopens it on resume (a fresh live view, not a backlog);
- **stop**: the source's waits (pacing, backoff, pause, a full queue) end at once. FFmpeg
  cannot be interrupted from another thread, so an open or a read it is inside of (a camera
  that accepts and then says nothing) ends within the source's ``timeout_s``; ``stop``
  waits at most its own ``timeout_s``, then leaves the thread to end by itself, delivering
  and telling nothing more.

``frames_decoded`` and ``reconnects`` count for the stream's status; ``CapturedFrame.index``
numbers every decoded frame from 0, sampled or not, across reconnects.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..backoff import Backoff
from ..buffers import DropOldest
from ..errors import BadInputError
from ..images import Picture, reduced_size
from .source_errors import CODEC_UNSUPPORTED, CONNECTION_FAILED, TIMEOUT, SourceError, classify

if TYPE_CHECKING:  # PyAV is imported where it decodes, in the sources' threads
    from av.container import InputContainer

LOG = logging.getLogger(__name__)
# FFmpeg's own decoding threads per source: slice threads, not frame threads. Frame threading
# hands each frame out one frame per thread later (100 ms at 10 fps with two), a delay a live
# camera's results would carry, and it cost more CPU per 720p frame here (1.46 ms against
# 1.31 ms decoding alone). Slices help streams encoded in several; cameras run side by side,
# eight or more on a few cores, so each gets few.
DECODE_THREADS = 2
# How much of a network stream FFmpeg reads to learn its parameters before the first frame
# (microseconds). Its default (5 s) holds a camera's start for seconds; RTSP's SDP and HLS's
# first segment say enough within one.
ANALYZE_US = 1_000_000
# A frame this close before its due time is taken as on time: times are floats, and 30 fps
# sampled at 10 puts the third frame at 0.09999... of a 0.1 s period.
SAMPLING_SLACK_S = 0.001
FINAL_STATES = ("failed", "stopped")
# What FFmpeg may open for a source, the source's own reads and what they lead to (an HLS
# playlist's segments, a redirect): a file only files, so a playlist or .sdp file in the
# source folder cannot reach the network; a URL only its own kind of network, never a file.
PROTOCOLS = {"rtsp": "rtsp,rtsps,rtp,tcp,udp,tls", "http": "http,https,tcp,tls,crypto",
             "file": "file"}
# The demuxers a file source may use: each reads its one file and nothing else. The protocols
# alone cannot keep a file in the folder: a playlist (hls), a list (concat), a manifest (dash),
# an image sequence (image2) or a session (sdp) names other files, and "file" reaches them all.
# FFmpeg checks the probed format against this list before the demuxer opens anything, and
# answers EINVAL; mov's references to other files (drefs) stay off, FFmpeg's default.
FILE_FORMATS = "mov,matroska,avi,mpegts,flv,h264,hevc"
NOT_ONE_FILE = SourceError("cannot open: not one video file (a file source plays mp4, mov, mkv, avi, ts, flv or "
                           "raw H.264/H.265, never a playlist or a list of other files)", CODEC_UNSUPPORTED)


def _keep_ffmpeg_errors() -> None:
    """Have PyAV keep FFmpeg's last error line for its exceptions (``exc.log``): which TLS
    failure it was is said there only (``source_errors.classify``). PyAV ignores FFmpeg's log
    unless a level is set; PANIC passes error lines to PyAV to keep and logs nothing else. An
    application that set a level itself keeps it. The line kept is the process's last, from
    whichever thread: a TLS line is read only for an EIO of a TLS open, which makes a line
    from another source's failure at that very moment the one mix-up left."""
    import av.logging

    if av.logging.get_level() is None:
        av.logging.set_level(av.logging.PANIC)


def _protocols(location: str, network: bool) -> str:
    if not network:
        return PROTOCOLS["file"]
    return PROTOCOLS["rtsp" if location.lower().startswith("rtsp") else "http"]


@dataclass(frozen=True)
class CapturedFrame:
    """One sampled frame of a source.

    ``index``: the source's frame number, the frames it decoded before this one (0 first),
    sampled or not, across reconnects. ``media_s``: seconds for tracking, rising: a
    recording's presentation time, a live source's ``time.monotonic()`` when decoded.
    ``captured``: ``time.time()`` when decoded (a paced recording: when its time came), epoch
    seconds for capture-to-sink latency. ``rgb``: (h, w, 3) uint8, reduced as it was converted
    where the frame is far larger than the model needs; ``size``: the frame's full (height,
    width) then (None: ``rgb`` is the whole frame)."""

    index: int
    media_s: float
    captured: float
    rgb: np.ndarray
    size: tuple[int, int] | None = None

    @property
    def picture(self) -> Picture:
        """The frame as the engine takes it: its pixels, and the size results are given in."""
        return Picture(self.rgb, self.size or self.rgb.shape[:2])


@dataclass(frozen=True)
class SourceProperties:
    """What the latest open of a source found: its frames' full size in pixels, the frame rate
    its container declares (0.0: none) and its frame count (0: unknown, as for a live source)."""

    width: int
    height: int
    fps: float
    total_frames: int


class FrameQueue:
    """Frames from a decoding thread to one consumer on an event loop, at most ``size`` waiting.

    ``put`` (the thread): with ``drop_oldest`` it never blocks: when full, the oldest waiting
    frame is dropped and ``on_drop(frame)`` called (from the thread) for each; without, it blocks
    while full. It returns False once the queue is closed. ``close()`` (any thread) wakes a
    blocked ``put``; ``async for frame in queue`` ends after the frames already waiting."""

    def __init__(self, size: int, *, drop_oldest: bool, on_drop: Callable[[CapturedFrame], None]):
        if size < 1:
            raise BadInputError(f"a frame queue holds at least one frame, not {size}")
        self._drop_oldest = drop_oldest
        self._on_drop = on_drop
        self._frames: DropOldest[CapturedFrame] = DropOldest(size)
        self._changed = threading.Condition()
        self._closed = False
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def put(self, frame: CapturedFrame) -> bool:
        with self._changed:
            while not self._closed and not self._drop_oldest and self._frames.full:
                self._changed.wait()
            if self._closed:
                return False
            dropped = self._frames.push(frame)
            waiter, self._waiter = self._waiter, None
        if dropped is not None:  # outside the lock: on_drop may do what it likes
            self._on_drop(dropped)
        _wake(waiter)
        return True

    @property
    def size(self) -> int:
        """The most frames that wait in it."""
        return self._frames.size

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            waiter, self._waiter = self._waiter, None
        _wake(waiter)

    def take_nowait(self) -> CapturedFrame | None:
        """The oldest waiting frame, or None when none waits (never waits itself)."""
        with self._changed:
            if not self._frames:
                return None
            frame = self._frames.pop()
            self._changed.notify_all()  # room for a blocked put
            return frame

    def __aiter__(self) -> FrameQueue:
        return self

    async def __anext__(self) -> CapturedFrame:
        while True:
            with self._changed:
                if self._frames:
                    frame = self._frames.pop()
                    self._changed.notify_all()  # room for a blocked put
                    return frame
                if self._closed:
                    raise StopAsyncIteration
                loop = asyncio.get_running_loop()
                waiter = loop.create_future()
                self._waiter = (loop, waiter)
            await waiter


def _wake(waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None) -> None:
    if waiter is None:
        return
    loop, future = waiter
    try:
        loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:  # the loop is closed: nobody is left to wake
        pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():  # a consumer cancelled while waiting has a cancelled future
        future.set_result(None)


class _Sampler:
    """Keeps a frame when its time reaches the next due time (see the module's sampling)."""

    def __init__(self, max_fps: float | None):
        self.period = None if max_fps is None else 1.0 / max_fps
        self.due: float | None = None

    def keep(self, media_s: float) -> bool:
        if self.period is None:
            return True
        if self.due is not None and media_s < self.due - SAMPLING_SLACK_S:
            return False
        # Due times advance by whole periods, so the rate holds whatever the source's own;
        # after a gap (a reconnect, a pause) they start again from this frame.
        on_time = self.due is not None and media_s < self.due + self.period
        self.due = (self.due if on_time else media_s) + self.period
        return True


class _Timeline:
    """``CapturedFrame.media_s`` across the opens of one source: rising, whatever restarts."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.step = 0.1  # a frame's duration, for frames without a timestamp
        self.shift: float | None = None

    def opened(self, frame_rate: float | None) -> None:
        self.shift = None
        if frame_rate:
            self.step = 1.0 / frame_rate

    def time_of(self, presentation_s: float | None, live: bool) -> float:
        if live:
            now = time.monotonic()
        elif presentation_s is None:
            now = 0.0 if self.last is None else self.last + self.step
        else:
            if self.shift is None:
                # A recording opened again (a network one after an error) starts over: its
                # times continue from where the last open left them.
                behind = self.last is not None and presentation_s <= self.last
                self.shift = self.last + self.step - presentation_s if behind else 0.0
            now = presentation_s + self.shift
        self.last = now
        return now


class Source:
    """One camera or file decoded in its own daemon thread (see the module's vocabulary).

    ``location``: a path or a URL (rtsp://, rtsps://, http(s):// for HLS). ``on_state`` is
    called from the thread. ``timeout_s`` bounds every open and every read; ``backoff_s`` is
    the first and the longest wait between reconnects; ``ca_file``: PEM certificates a TLS
    source may chain to besides the system's."""

    def __init__(self, location: str, *, network: bool, max_fps: float | None, realtime: bool, queue: FrameQueue,
                 on_state: Callable[[str, SourceError | None], None], name: str = "",
                 backoff_s: tuple[float, float] = (0.5, 10.0), timeout_s: float = 5.0,
                 long_side: int | None = None, admit: Callable[[int, int], str | None] | None = None,
                 ca_file: str | None = None):
        if max_fps is not None and not max_fps > 0:
            raise BadInputError(f"max_fps must be above 0 (or none for every frame), not {max_fps}")
        if not 0 < backoff_s[0] <= backoff_s[1]:
            raise BadInputError(f"backoff_s must be (first, longest) with 0 < first <= longest, not {backoff_s}")
        self.backoff = Backoff(*backoff_s, attempts=None)
        if not timeout_s > 0:
            raise BadInputError(f"timeout_s must be above 0, not {timeout_s}")
        self.location = location
        self.network = network
        self.realtime = realtime
        self.name = name or ("camera" if network else location)
        self.timeout_s = timeout_s
        self.long_side = long_side
        self.ca_file = ca_file
        self._admit = admit
        self._admitted: tuple[int, int] | None = None  # the frame size ``admit`` said yes to
        self.frames_decoded = 0
        self.reconnects = 0  # opens tried again after a network source failed or was lost
        self.properties: SourceProperties | None = None  # each open's (``_decode``); None before
        self._queue = queue
        self._on_state = on_state
        self._sampler = _Sampler(max_fps)
        self._timeline = _Timeline()
        self._changed = threading.Condition()  # stop, pause, resume
        self._stopping = False
        self._paused = False
        self._pace_anchor: tuple[float, float] | None = None  # (monotonic, media_s) of a paced frame
        self._delays = self.backoff.delays()  # from first_s again once an open gives a frame
        self._told = threading.Lock()
        self._last_told: tuple[str, SourceError | None] | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"source {self.name} was started already")
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        with self._changed:
            self._paused = True
            self._changed.notify_all()

    def resume(self) -> None:
        with self._changed:
            self._paused = False
            self._changed.notify_all()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread and close the queue. Waits (sleeps, a full queue, a pause) end at
        once; an open or a read inside FFmpeg ends within its own timeout (``timeout_s`` of
        the constructor). If the thread has not ended after ``timeout_s`` here, it is left to
        end by itself, told nothing more, and ``stopped`` is told from here."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._queue.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                LOG.warning("source %s: still inside FFmpeg %.1f s after stop; left to end by itself",
                            self.name, timeout_s)
        self._tell("stopped", None)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        final: tuple[str, SourceError | None] = ("stopped", None)
        try:
            self._tell("starting", None)
            final = self._play()
        except Exception as exc:  # noqa: BLE001 - our own fault: this source fails, the server goes on
            LOG.exception("source %s failed", self.name)
            final = ("failed", SourceError(f"internal error: {type(exc).__name__}: {exc}", None))
        finally:
            self._tell(*final)  # before the queue ends: its reader learns why it ended
            self._queue.close()

    def _play(self) -> tuple[str, SourceError | None]:
        """Open, decode, reopen as the module says, until a final state; returns it."""
        while True:
            if not self._wait_while_paused():
                return ("stopped", None)
            container, error = self._open()
            if container is not None:
                with container:
                    how, error = self._decode(container)
                if how == "stopped" or how == "ended":
                    return ("stopped", None)
                if how == "paused":
                    continue
                if how == "refused":  # its frames do not fit the server: a retry would not either
                    return ("failed", error)
            if self._stopping:  # an open or a read that stop() outlasted: no retry to tell of
                return ("stopped", None)
            if not self.network:
                return ("failed", error)
            self._tell("reconnecting", error)
            if not self._sleep(next(self._delays)):
                return ("stopped", None)
            self.reconnects += 1

    def _open(self) -> tuple[InputContainer | None, SourceError | None]:
        """(container, None), or (None, why it could not be opened)."""
        import av

        _keep_ffmpeg_errors()
        options = {"protocol_whitelist": _protocols(self.location, self.network)}
        if self.network:
            options["analyzeduration"] = str(ANALYZE_US)
            # Every TLS connection it makes (rtsps, https, an http playlist's redirect to https).
            options["tls_verify"] = "1"
            if self.ca_file:
                options["ca_file"] = self.ca_file
        else:
            options["format_whitelist"] = FILE_FORMATS
        if self.location.lower().startswith(("rtsp://", "rtsps://")):
            options["rtsp_transport"] = "tcp"  # UDP loses packets (grey smears) and passes few firewalls
        started = time.monotonic()
        try:
            return av.open(self.location, options=options, timeout=(self.timeout_s, self.timeout_s)), None
        except (av.FFmpegError, OSError) as exc:
            timed_out = time.monotonic() - started >= self.timeout_s
            if not timed_out and not self.network and exc.errno == errno.EINVAL:  # a format off FILE_FORMATS
                return None, NOT_ONE_FILE
            code, words = classify(exc, timed_out=timed_out)
            if timed_out:
                return None, SourceError(f"cannot open: no answer within {self.timeout_s:g} s ({words})", code)
            return None, SourceError(f"cannot open: {words}", code)

    def _decode(self, container: InputContainer) -> tuple[str, SourceError | None]:
        """Decode one open container: ("stopped" | "ended" | "paused" | "error" | "refused", why)."""
        import av

        if not container.streams.video:
            return "error", SourceError("no video stream", CODEC_UNSUPPORTED)
        if self._stopping:
            return "stopped", None
        stream = container.streams.video[0]
        if stream.codec_context is None:  # PyAV makes none where FFmpeg has no decoder for the codec
            return "error", SourceError("cannot decode: no decoder for its codec", CODEC_UNSUPPORTED)
        stream.thread_type = "SLICE"
        stream.codec_context.thread_count = DECODE_THREADS
        live = self.network and container.duration is None
        paced = not live and (self.realtime or self.network)
        rate = stream.average_rate or stream.guessed_rate
        self._timeline.opened(float(rate) if rate else None)
        self._pace_anchor = None
        frames = 0
        known = (stream.codec_context.height, stream.codec_context.width)
        self.properties = SourceProperties(known[1], known[0], float(rate) if rate else 0.0, stream.frames or 0)
        refused = self._refusal(known) if all(known) else None  # before a frame takes memory
        if refused:
            return "refused", SourceError(refused, None)
        try:
            for frame in container.decode(stream):
                if self._stopping:
                    return "stopped", None
                if self.network and self._paused:
                    return "paused", None
                refused = self._refusal((frame.height, frame.width))
                if refused:
                    return "refused", SourceError(refused, None)
                index, self.frames_decoded = self.frames_decoded, self.frames_decoded + 1
                frames += 1
                if frames == 1:
                    self._delays = self.backoff.delays()
                    self._tell("running", None)
                media_s = self._timeline.time_of(frame.time, live)
                if not self._sampler.keep(media_s):
                    continue
                if not self._hold(media_s, paced):
                    return "stopped", None
                if not self._queue.put(self._captured(frame, index, media_s)):
                    return "stopped", None
        except (av.FFmpegError, OSError) as exc:
            if isinstance(exc, av.ExitError):  # PyAV's timeout interrupted a read
                return "error", SourceError(f"no frame within {self.timeout_s:g} s", TIMEOUT)
            code, words = classify(exc, opening=False)
            return "error", SourceError(f"cannot decode: {words}", code)
        if live:
            return "error", SourceError("the stream ended", CONNECTION_FAILED)
        return "ended", None

    def _refusal(self, size: tuple[int, int]) -> str | None:
        """Why frames of ``size`` (height, width) may not be decoded (``admit``'s answer, asked
        again only when the size changes), or None."""
        if self._admit is None or size == self._admitted:
            return None
        refused = self._admit(*size)
        if refused is None:
            self._admitted = size
        return refused

    def _captured(self, frame, index: int, media_s: float) -> CapturedFrame:
        """The frame converted to RGB, by FFmpeg's scaler straight to the reduced size where it
        is far larger than the model needs (``images.reduced_size``): no full-size RGB copy of
        an 8K frame is ever made."""
        size = (frame.height, frame.width)
        target = reduced_size(size, self.long_side)
        if target is None:
            return CapturedFrame(index, media_s, time.time(), frame.to_ndarray(format="rgb24"))
        rgb = frame.reformat(width=target[1], height=target[0], format="rgb24",
                             interpolation="AREA").to_ndarray()
        return CapturedFrame(index, media_s, time.time(), rgb, size)

    def _hold(self, media_s: float, paced: bool) -> bool:
        """Wait while a file is paused and, when ``paced``, until the frame's time comes.
        False when the source stops meanwhile."""
        with self._changed:
            while True:
                if self._stopping:
                    return False
                if self._paused and not self.network:  # a network source closes instead (_decode)
                    self._pace_anchor = None  # on resume the pace starts again: no rush to catch up
                    self._changed.wait()
                    continue
                if not paced:
                    return True
                now = time.monotonic()
                if self._pace_anchor is None:
                    self._pace_anchor = (now, media_s)
                due = self._pace_anchor[0] + (media_s - self._pace_anchor[1])
                if due <= now:
                    return True
                self._changed.wait(due - now)

    def _wait_while_paused(self) -> bool:
        """False when the source stops meanwhile."""
        with self._changed:
            self._changed.wait_for(lambda: self._stopping or not self._paused)
            return not self._stopping

    def _sleep(self, seconds: float) -> bool:
        """Sleep (a backoff) unless the source stops meanwhile: False then."""
        with self._changed:
            return not self._changed.wait_for(lambda: self._stopping, seconds)

    def _tell(self, state: str, error: SourceError | None) -> None:
        """``on_state``, once per change, never after a final state; its errors are logged."""
        with self._told:
            last = self._last_told
            if (state, error) == last or (last is not None and last[0] in FINAL_STATES):
                return
            self._last_told = (state, error)
            if state == "reconnecting":
                LOG.warning("source %s reconnecting: %s (%s)", self.name, error.text, error.code)
            else:
                LOG.info("source %s %s%s", self.name, state, f": {error.text} ({error.code})" if error else "")
            try:
                self._on_state(state, error)
            except Exception:  # noqa: BLE001 - the listener's fault must not end the source
                LOG.exception("source %s: on_state failed", self.name)

