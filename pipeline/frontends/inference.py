"""One inference request's life, the same for every frontend (gRPC KServe, gRPC video, HTTP).

Each frontend reads its protocol's message ONCE into an ``InferRequest`` (the images, the
options, its place in a tracked stream, its deadline, the outputs it wants); ``run`` reads it,
takes it through the shared batcher and the tracker, accounts for it once in the telemetry
ledger (unreadable requests too), and hands an ``Answer`` to the frontend's ``respond`` to
encode. ``ServingState`` is what the
frontends share: the loaded pipelines, the per-client limits, the live trackers and the
drain.

This module knows nothing of gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..engine import Pipeline
from ..errors import (
    BadInputError,
    InvalidOptionError,
    NotFoundError,
    OverloadedError,
    PipelineError,
    ShuttingDownError,
    status_of,
)
from ..postprocess import Detections, PostprocessOptions
from ..telemetry import Ledger
from ..tracking import Ticket, TrackerOptions, Tracks
from .shared_memory import SharedMemory

LOG = logging.getLogger(__name__)
VERSION = "1"  # every model is served at version 1
Response = TypeVar("Response")


def describe(error: BaseException) -> str:
    """The message a client sees: ours verbatim; our own faults logged and summarised."""
    if isinstance(error, PipelineError):
        return str(error)
    LOG.exception("unexpected error while serving", exc_info=error)
    return f"internal error: {type(error).__name__}: {error}"


# ----------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class Tracking:
    """A request's place in a tracked stream or sequence: its tracker's key, the tracker's
    knobs (used when the key is new), the frame's time in seconds (None: one frame per
    update), and whether the request starts the tracker afresh or ends it after itself."""

    key: str
    options: TrackerOptions
    timestamp: float | None = None
    restart: bool = False
    end: bool = False

    def __post_init__(self):
        if self.timestamp is not None and not math.isfinite(self.timestamp):
            raise InvalidOptionError("timestamp", f"the frame's timestamp must be finite seconds, got {self.timestamp}")

    def slot(self, client: str) -> tuple[str, str]:
        """The tracker's key in the server's table: ids are the client's own, so no client
        can restart or end another's tracker."""
        return (client, self.key)


@dataclass(frozen=True)
class InferRequest:
    """One inference request, read once from its protocol.

    images: encoded bytes or (H, W, 3) uint8 arrays. options: overrides of the model's
    post-processing defaults (``PostprocessOptions`` fields). timeout_s: the request's own
    queue timeout (Triton's ``timeout``). deadline: the caller's absolute monotonic deadline
    (gRPC's). tracking: its place in a tracked stream, or None. outputs: the tensor outputs
    it names (KServe; empty: the defaults).
    """

    model: str
    version: str
    images: Sequence[Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    deadline: float | None = None
    tracking: Tracking | None = None
    outputs: tuple[str, ...] = ()

    @classmethod
    def read(cls, model: str, version: str, images: Sequence[Any], params: Mapping[str, Any], *,
             deadline: float | None = None, outputs: Sequence[str] = (),
             tracking: Tracking | None = None) -> InferRequest:
        """From a protocol's parameters by their wire names (strings or numbers): the
        post-processing overrides, Triton's ``timeout`` and, unless ``tracking`` is given,
        Triton's sequence parameters. Raises BadInputError naming the parameter."""
        timeout_s = queue_timeout(params)
        if tracking is None:
            tracking = sequence_tracking(model, params)
        options = PostprocessOptions.overrides(params)
        return cls(model, version, tuple(images), options, timeout_s, deadline, tracking,
                   tuple(outputs))


def queue_timeout(params: Mapping[str, Any]) -> float | None:
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


def sequence_tracking(model: str, params: Mapping[str, Any]) -> Tracking | None:
    """Triton's sequence parameters as tracking: requests with one ``sequence_id`` share a
    tracker; ``sequence_start`` begins it afresh, ``sequence_end`` frees it after the request.
    Without a sequence id (or with 0), None: nothing changes."""
    sequence = params.get("sequence_id")
    if sequence in (None, 0, "", "0"):
        return None
    timestamp = params.get("timestamp")
    try:
        timestamp = None if timestamp is None else float(timestamp)
    except (TypeError, ValueError):
        raise InvalidOptionError("timestamp", f"parameter 'timestamp' must be seconds, got {timestamp!r}") from None
    return Tracking(f"sequence/{model}/{sequence}", TrackerOptions.from_params(params), timestamp,
                    restart=bool(params.get("sequence_start")), end=bool(params.get("sequence_end")))


@dataclass(frozen=True)
class Answer:
    """What a request got: the pipeline that served it, Detections per image (in request
    order), and the options they were made with."""

    pipe: Pipeline
    detections: list[Detections]
    options: PostprocessOptions


# ----------------------------------------------------------------------------- shared state


def client_of(peer: str) -> str:
    """The client a gRPC peer (``ipv4:10.0.0.7:52114``, ``ipv6:[::1]:52114``) or an HTTP
    remote address stands for: its address without the port, so a client that opens more
    connections gets no larger share. Behind a proxy every client is the proxy's address."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rsplit(":", 1)[0].strip("[]")
    return peer


def payload_bytes(images: Sequence[Any]) -> int:
    """What a request's images hold in memory until it is answered (encoded bytes, raw
    pixels); a PIL image or a path counts as nothing (in-process callers only)."""
    return sum(len(i) if isinstance(i, (bytes, bytearray, memoryview)) else getattr(i, "nbytes", 0)
               for i in images)


class ClientLimits:
    """Per client (``client_of``): streams open and requests in flight; server-wide: the bytes
    of the requests in flight (``payload_bytes``), so memory is bounded in bytes, not only
    in requests. Beyond a cap, OverloadedError (RESOURCE_EXHAUSTED / 503)."""

    def __init__(self, max_streams: int = 128, max_in_flight: int = 512, max_bytes: int = 1 << 30):
        self.limits = {"streams": max_streams, "requests in flight": max_in_flight}
        self.held: dict[str, Counter] = {kind: Counter() for kind in self.limits}
        self.max_bytes = max_bytes
        self.bytes_held = 0

    def acquire(self, kind: str, client: str) -> None:
        held, limit = self.held[kind], self.limits[kind]
        if held[client] >= limit:
            raise OverloadedError(f"this client already has {held[client]} {kind} (the limit per client "
                                  f"is {limit}); wait for answers, then send more")
        held[client] += 1

    def release(self, kind: str, client: str) -> None:
        held = self.held[kind]
        held[client] -= 1
        if held[client] <= 0:
            del held[client]

    @contextlib.contextmanager
    def request(self, client: str):
        self.acquire("requests in flight", client)
        try:
            yield
        finally:
            self.release("requests in flight", client)

    @contextlib.contextmanager
    def holding(self, nbytes: int):
        """Counts a request's bytes while it is in flight; refuses it if they do not fit."""
        if self.bytes_held + nbytes > self.max_bytes:
            raise OverloadedError(
                f"the server holds {self.bytes_held / 2**20:.0f} MB of requests in flight and this one "
                f"brings {nbytes / 2**20:.1f} MB (the limit is {self.max_bytes / 2**20:.0f} MB); retry later")
        self.bytes_held += nbytes
        try:
            yield
        finally:
            self.bytes_held -= nbytes


@dataclass
class ServingState:
    """The loaded pipelines, the telemetry ledger, stream settings, limits, the live trackers,
    the registered shared memory regions, and whether we are draining."""

    pipelines: dict[str, Pipeline]
    unavailable: dict[str, PipelineError]  # model name -> what a request for it is answered
    ledger: Ledger
    stream_window: int = 8
    stream_policy: str = "wait"
    draining: bool = False
    active: int = 0  # requests and streams in progress, every frontend's, for the drain
    streams: set = field(default_factory=set)  # open StreamWindows, stopped by the drain
    limits: ClientLimits = field(default_factory=lambda: ClientLimits())
    tracks: Tracks = field(default_factory=Tracks)  # live trackers of tracked streams
    shared_memory: SharedMemory = field(default_factory=SharedMemory)  # off unless configured

    def pipeline(self, name: str, version: str = "") -> Pipeline:
        """The pipeline that takes new work for ``name``; refuses while draining."""
        if self.draining:
            raise ShuttingDownError("server is shutting down; retry on another replica")
        return self.lookup(name, version)

    def lookup(self, name: str, version: str = "") -> Pipeline:
        if name in self.unavailable:
            raise self.unavailable[name]
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


# ----------------------------------------------------------------------------- the life


async def run(state: ServingState, model: str, read: Callable[[], InferRequest],
              respond: Callable[[Answer], Response], client: str = "") -> Response:
    """One request through the shared batcher (and its stream's tracker), whatever its protocol.

    model: the model the message names, for the books even when it cannot be read.
    read(): the request, read from its protocol's message (BadInputError if unusable).
    respond(answer): the protocol's response, built in a worker thread (JSON, polygons and
    tensors are CPU work). client: who sent it (``client_of``), whose trackers it may use.
    A tracked request takes its place in its stream's order before this first awaits, so
    call ``run`` when the request arrives. Its bytes count against the server's budget
    until it is answered; its images' pixels together against ``MAX_REQUEST_PIXELS``.
    Every outcome, a request that cannot be read included, is recorded in the ledger once;
    PipelineErrors propagate for the frontend to map.
    """
    started = time.monotonic()
    ledger, tracks = state.ledger, state.tracks
    images: Sequence[Any] = ()
    ticket: Ticket | None = None
    ending = False
    held: Pipeline | None = None
    try:
        state.pipeline(model)  # an unknown model, or a draining server, is refused before reading
        request = read()
        images, tracking = request.images, request.tracking
        pipe = state.lookup(request.model, request.version)
        pipe.held += 1  # this version answers this request, whatever is loaded meanwhile
        held = pipe
        if len(images) > pipe.max_batch_size:
            raise BadInputError(f"batch of {len(images)} exceeds the model's max_batch_size "
                                f"{pipe.max_batch_size}")
        options = replace(pipe.defaults, **request.options)
        with state.limits.holding(payload_bytes(images)):
            if tracking is not None:
                if len(images) != 1:
                    raise InvalidOptionError("sequence_id", f"a tracked request carries one image, got {len(images)}")
                slot, ending = tracking.slot(client), tracking.end
                if tracking.restart:
                    tracks.end(slot)
                ticket = tracks.ticket(slot, tracking.options, client)
            try:
                found = await pipe.submit(images, options, timeout_s=request.timeout_s,
                                          deadline=request.deadline)
            except BaseException:
                if ticket is not None:
                    tracks.skip(ticket)
                raise
            if ticket is not None:
                found = [await tracks.assign(ticket, found[0], tracking.timestamp)]
            built = time.monotonic()
            response = await asyncio.to_thread(respond, Answer(pipe, list(found), options))
    except BaseException as exc:
        if model in state.pipelines:
            reason = status_of(exc).grpc.lower() if isinstance(exc, Exception) else "cancelled"
            ledger.record_request(model, images=len(images), duration_s=time.monotonic() - started,
                                  failure=reason)
        raise
    finally:
        if ending and ticket is not None:
            tracks.end_after(ticket)  # frames before it keep their ids, even if it failed
        if held is not None:
            held.held -= 1
    done = time.monotonic()
    ledger.record_request(model, images=len(images), duration_s=done - started,
                          output_s=done - built)
    return response
