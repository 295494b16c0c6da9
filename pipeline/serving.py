"""What every frontend (gRPC KServe, gRPC video, HTTP) shares: the loaded pipelines and their
state, per-connection limits, and one inference request's life, accounted once.

Protocols live in the adapters (``service``, ``streaming``, ``http``); this module knows
nothing of gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine import Pipeline
from .errors import (
    InvalidOptionError,
    NotFoundError,
    OverloadedError,
    PipelineError,
    ShuttingDownError,
    status_of,
)
from .postprocess import Detections, PostprocessOptions
from .telemetry import Ledger
from .tracking import TrackerOptions, Tracks

LOG = logging.getLogger(__name__)
VERSION = "1"  # every model is served at version 1


def describe(error: BaseException) -> str:
    """The message a client sees: ours verbatim; our own faults logged and summarised."""
    if isinstance(error, PipelineError):
        return str(error)
    LOG.exception("unexpected error while serving", exc_info=error)
    return f"internal error: {type(error).__name__}: {error}"


class ConnectionLimits:
    """Per client connection (gRPC peer, HTTP remote address): streams open and requests in
    flight, each capped so one client cannot take the whole server; beyond a cap,
    OverloadedError (RESOURCE_EXHAUSTED / 503)."""

    def __init__(self, max_streams: int = 32, max_in_flight: int = 256):
        self.limits = {"streams": max_streams, "requests in flight": max_in_flight}
        self.held: dict[str, Counter] = {kind: Counter() for kind in self.limits}

    def acquire(self, kind: str, peer: str) -> None:
        held, limit = self.held[kind], self.limits[kind]
        if held[peer] >= limit:
            raise OverloadedError(f"this connection already has {held[peer]} {kind} (the limit is "
                                  f"{limit}); wait for answers or open another connection")
        held[peer] += 1

    def release(self, kind: str, peer: str) -> None:
        held = self.held[kind]
        held[peer] -= 1
        if held[peer] <= 0:
            del held[peer]

    @contextlib.contextmanager
    def request(self, peer: str):
        self.acquire("requests in flight", peer)
        try:
            yield
        finally:
            self.release("requests in flight", peer)


@dataclass
class ServingState:
    """The loaded pipelines, the telemetry ledger, stream settings, limits, and whether we
    are draining."""

    repository_root: str
    pipelines: dict[str, Pipeline]
    unavailable: dict[str, str]  # model name -> why it is not served directly
    ledger: Ledger
    stream_window: int = 8
    stream_policy: str = "wait"
    draining: bool = False
    active: int = 0  # requests and streams in progress, every frontend's, for the drain
    streams: set = field(default_factory=set)  # open StreamWindows, stopped by the drain
    limits: ConnectionLimits = field(default_factory=lambda: ConnectionLimits())
    tracks: Tracks = field(default_factory=Tracks)  # live trackers of tracked streams

    def pipeline(self, name: str, version: str = "") -> Pipeline:
        """The pipeline that takes new work for ``name``; refuses while draining."""
        if self.draining:
            raise ShuttingDownError("server is shutting down; retry on another replica")
        return self.lookup(name, version)

    def lookup(self, name: str, version: str = "") -> Pipeline:
        if name in self.unavailable:
            raise NotFoundError(f"model {name!r} is not served directly: {self.unavailable[name]}")
        if name not in self.pipelines:
            have = ", ".join(sorted(self.pipelines))
            raise NotFoundError(f"unknown model {name!r}; this server serves: {have}")
        if version not in ("", VERSION):
            raise NotFoundError(f"model {name!r} has no version {version!r} (have: {VERSION})")
        return self.pipelines[name]

    @contextlib.contextmanager
    def in_progress(self):
        """Counts a request or stream for the drain, whichever frontend it came through."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


def queue_timeout(params: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter (int64 microseconds) in seconds; None if unset."""
    value = params.get("timeout")
    if value is None:
        return None
    try:
        micros = float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError("timeout", f"parameter 'timeout' must be microseconds, got {value!r}") from None
    if not micros >= 0:
        raise InvalidOptionError("timeout", f"parameter 'timeout' must be >= 0, got {value!r}")
    return micros / 1e6 or None


@dataclass(frozen=True)
class Tracking:
    """A request on a tracked stream or sequence: its tracker's key, the tracker's knobs (used
    when the key is new), the frame's time in seconds (None: one frame per update)."""

    key: str
    options: TrackerOptions
    timestamp: float | None = None


def sequence_tracking(state: ServingState, name: str, params: dict[str, Any]) -> Tracking | None:
    """Triton's sequence parameters as tracking: requests with one ``sequence_id`` share a
    tracker; ``sequence_start`` begins it afresh, ``sequence_end`` frees it after this request
    (see ``end_sequence``). Without a sequence id (or with 0), None: nothing changes."""
    sequence = params.get("sequence_id")
    if sequence in (None, 0, "", "0"):
        return None
    key = f"sequence/{name}/{sequence}"
    if params.get("sequence_start"):
        state.tracks.end(key)
    timestamp = params.get("timestamp")
    try:
        timestamp = None if timestamp is None else float(timestamp)
    except (TypeError, ValueError):
        raise InvalidOptionError("timestamp", f"parameter 'timestamp' must be seconds, got {timestamp!r}") from None
    return Tracking(key, TrackerOptions.from_params(params), timestamp)


def end_sequence(state: ServingState, tracking: Tracking | None, params: dict[str, Any]) -> None:
    if tracking is not None and params.get("sequence_end"):
        state.tracks.end(tracking.key)


async def infer(state: ServingState, name: str, version: str, params: dict[str, Any],
                read_images: Callable[[Pipeline], Sequence[Any]],
                respond: Callable[[Pipeline, list[Detections], PostprocessOptions], Any],
                deadline: float | None = None, tracking: Tracking | None = None):
    """One inference request through the shared batcher, whatever its protocol.

    params: its parameters (``PostprocessOptions.from_params`` keys, Triton's ``timeout``).
    read_images(pipe): its images, validated (BadInputError). respond(pipe, dets, options):
    the protocol's response, built in a worker thread (JSON, polygons and tensors are CPU
    work). deadline: the caller's absolute monotonic deadline. tracking: the request's place
    in a tracked stream (one image); its detections get tracker ids, in the stream's order
    (call ``infer`` when the request starts, so its place is taken in arrival order). Every
    outcome is recorded in the ledger once; PipelineErrors propagate for the adapter to map.
    """
    started = time.monotonic()
    ledger = state.ledger
    images: Sequence[Any] = []
    try:
        pipe = state.pipeline(name, version)
        options = PostprocessOptions.from_params(params, pipe.defaults)
        timeout_s = queue_timeout(params)
        images = read_images(pipe)
        ticket = None
        if tracking is not None:
            if len(images) != 1:
                raise InvalidOptionError("sequence_id", f"a tracked request carries one image, got {len(images)}")
            ticket = state.tracks.ticket(tracking.key, tracking.options)
        ledger.add_pending(name, len(images))
        try:
            dets = await asyncio.gather(*(
                pipe.submit(image, options, timeout_s=timeout_s, deadline=deadline)
                for image in images))
        except BaseException:
            if ticket is not None:
                state.tracks.skip(tracking.key, ticket)
            raise
        finally:
            ledger.add_pending(name, -len(images))
        if ticket is not None:
            dets = [await state.tracks.assign(tracking.key, ticket, dets[0], tracking.timestamp)]
        built = time.monotonic()
        response = await asyncio.to_thread(respond, pipe, list(dets), options)
    except BaseException as exc:
        if name in state.pipelines:
            reason = status_of(exc).grpc.lower() if isinstance(exc, Exception) else "cancelled"
            ledger.record_request(name, images=len(images), duration_s=time.monotonic() - started,
                                  failure=reason)
        raise
    done = time.monotonic()
    ledger.record_request(name, images=len(images), duration_s=done - started,
                          output_s=done - built)
    return response
