"""What every way in shares: the loaded pipelines, the per-client limits and the bytes budget,
the live trackers, the registered shared memory regions, and the drain (``ServingState``)."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import Counter
from dataclasses import dataclass, field

from ..engine import Pipeline
from ..errors import NotFoundError, OverloadedError, PipelineError, ShuttingDownError
from ..telemetry import Ledger
from ..tracking import Tracks
from .shared_memory import SharedMemory

VERSION = "1"  # every model is served at version 1


def client_of(peer: str) -> str:
    """The client a gRPC peer (``ipv4:10.0.0.7:52114``, ``ipv6:[::1]:52114``) or an HTTP
    remote address stands for: its address without the port, so a client that opens more
    connections gets no larger share. Behind a proxy every client is the proxy's address."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rsplit(":", 1)[0].strip("[]")
    return peer



class ClientLimits:
    """Per client (``client_of``): streams open and requests in flight; server-wide: the bytes
    of the requests in flight (``payload_bytes``), so memory is bounded in bytes, not only
    in requests. Beyond a cap, OverloadedError (RESOURCE_EXHAUSTED / 503)."""

    def __init__(self, max_streams: int = 128, max_in_flight: int = 512, max_bytes: int = 1 << 30):
        self.limits = {"streams": max_streams, "requests in flight": max_in_flight}
        self.held: dict[str, Counter] = {kind: Counter() for kind in self.limits}
        self.max_bytes = max_bytes
        self.bytes_held = 0  # requests in flight and cameras' frames, in bytes
        self._bytes_lock = threading.Lock()

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
        if not self.reserve(nbytes):
            raise OverloadedError(
                f"the server holds {self.bytes_held / 2**20:.0f} MB of requests in flight and this one "
                f"brings {nbytes / 2**20:.1f} MB (the limit is {self.max_bytes / 2**20:.0f} MB); retry later")
        try:
            yield
        finally:
            self.unreserve(nbytes)

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` of the budget until ``unreserve``; False (nothing taken) when they do
        not fit. Thread-safe: a camera's decoding thread reserves its frames (``CameraStream``)."""
        with self._bytes_lock:
            if self.bytes_held + nbytes > self.max_bytes:
                return False
            self.bytes_held += nbytes
            return True

    def unreserve(self, nbytes: int) -> None:
        with self._bytes_lock:
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
            # A copy: raising the one stored object again would grow its traceback by each
            # request's frames, and keep their locals (the request's images) alive.
            raise copy.copy(self.unavailable[name])
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

