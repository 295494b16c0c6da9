"""Object tracking across a stream's frames: each detection gets a ``tracker_id`` that stays
the same while the object stays in view (Roboflow's ``trackers`` package, ByteTrack: its
Kalman filter and matching, not ours).

State lives per key in ``Tracks``, a bounded registry. The frontends make keys no other
client can name (a KServe sequence id within its client's address, a video stream id within
its call). At most ``max_tracks`` live trackers, and ``max_per_client`` of one client's
(beyond that, OverloadedError); a tracker is made on a request's first update, after its
image was read, so requests that fail never hold a place. A key unused for ``idle_s`` is
freed, as is one whose stream or sequence ends. Per frame the work is bounded by its
detections, never by the stream's length.

Order: requests of one key may be detected concurrently (a stream's window), but a tracker
must see frames in order. Each request takes a ticket when it starts (in arrival order, so
frames a ``drop_oldest`` window dropped take none) and updates the tracker only on its turn,
in a worker thread (the event loop only hands turns on).
Gaps are seen through timestamps: the tracker predicts motion across the skipped time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import InvalidOptionError, OverloadedError
from .postprocess import Detections

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackerOptions:
    """ByteTrack's few knobs. activation: the confidence a detection needs to start a track
    or to be matched first; detections below it (when a request lowers ``confidence`` under
    it) only continue tracks, in ByteTrack's second association.
    lost_s: how long a track lost from view is kept for re-association. minimum_iou: box
    overlap to associate. confirm_frames: frames before a new track gets an id (until then
    -1). frame_rate: frames per second, for streams without timestamps."""

    activation: float = 0.25
    lost_s: float = 1.0
    minimum_iou: float = 0.1
    confirm_frames: int = 1
    frame_rate: float = 30.0

    KEYS = {"track_activation_threshold": "activation", "lost_track_seconds": "lost_s",
            "minimum_iou": "minimum_iou", "minimum_consecutive_frames": "confirm_frames",
            "frame_rate": "frame_rate"}

    def __post_init__(self):
        checks = (("track_activation_threshold", 0 <= self.activation <= 1, "in [0, 1]"),
                  ("lost_track_seconds", 0 <= self.lost_s <= 3600, "in [0, 3600]"),
                  ("minimum_iou", 0 <= self.minimum_iou <= 1, "in [0, 1]"),
                  ("minimum_consecutive_frames", 1 <= self.confirm_frames <= 100, "in [1, 100]"),
                  ("frame_rate", 0 < self.frame_rate <= 1000, "in (0, 1000]"))
        for key, ok, allowed in checks:
            if not ok:
                raise InvalidOptionError(key, f"{key} must be {allowed}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrackerOptions:
        """From request parameters by their wire names (``KEYS``); others are ignored."""
        values = {}
        for key, name in cls.KEYS.items():
            if params.get(key) is None:
                continue
            try:
                number = float(params[key])
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise InvalidOptionError(key, f"parameter {key!r} must be a finite number, got {params[key]!r}")
            values[name] = int(number) if name == "confirm_frames" else number
        return cls(**values)


class _ClassAware:
    """ByteTrack kept within classes. ByteTrack associates boxes by overlap alone, so a
    person's track could continue as the chair that took its place; each class's boxes are
    moved ``SEPARATION`` pixels apart (the class-offset trick of batched NMS), so only boxes
    of one class can overlap. One tracker, so ids are unique across the stream and a frame
    costs one update, however many classes are in view (measured: one tracker per class
    cost 1.3x this at 100 detections of 4 classes)."""

    SEPARATION = 1e6  # beyond any image and any drift a lost track's prediction makes

    def __init__(self, options: TrackerOptions):
        self.tracker = _new_tracker(options)

    def update(self, det: Detections, timestamp: float | None) -> np.ndarray:
        sv, _ = _library()
        apart = det.boxes.astype(np.float64) + det.class_ids.astype(np.float64)[:, None] * self.SEPARATION
        found = sv.Detections(xyxy=apart.reshape(-1, 4), confidence=det.scores,
                              class_id=det.class_ids.astype(int), data={"index": np.arange(len(det))})
        tracked = self.tracker.update(found, timestamp=timestamp)
        ids = np.full(len(det), -1, np.int64)
        ids[tracked.data["index"]] = tracked.tracker_id
        return ids

    def __len__(self) -> int:
        """Tracks held (in view, or lost and waiting to be seen again)."""
        return len(self.tracker.tracks)


@dataclass
class _Track:
    """One key's tracker and its order of tickets. The tracker itself is made on the first
    update, so a request whose image is refused never holds a place in the table."""

    key: Hashable
    client: str
    options: TrackerOptions
    tracker: _ClassAware | None = None
    last_used: float = field(default_factory=time.monotonic)
    tickets_taken: int = 0
    turn: int = 0  # the ticket whose turn it is
    skipped: set[int] = field(default_factory=set)  # tickets that will not update
    waiting: dict[int, asyncio.Future] = field(default_factory=dict)
    ended: bool = False  # freed (ended, restarted or idle): its tickets get no ids
    last_ticket: int | None = None  # freed once the turn passes this one (``end_after``)


@dataclass(frozen=True)
class Ticket:
    """A request's place in one tracker's order. It holds the tracker it was issued on, not
    the key: when a key is restarted or ended, tickets of the old tracker are answered
    without ids at once, never left waiting for a turn on the tracker that replaced it."""

    track: _Track
    number: int


class Tracks:
    """Live trackers by key, bounded in number (in all, and per client) and idle time."""

    def __init__(self, max_tracks: int = 256, idle_s: float = 60.0,
                 max_per_client: int | None = None):
        _library()  # imported at start-up (~0.6 s, more from a cold disk), never in a request
        self.max_tracks = max_tracks
        self.max_per_client = min(max_per_client or max_tracks, max_tracks)
        self.idle_s = idle_s
        self._tracks: dict[Hashable, _Track] = {}

    def __len__(self) -> int:
        """Live trackers (keys whose requests only wait or failed hold none)."""
        return sum(track.tracker is not None for track in self._tracks.values())

    def ticket(self, key: Hashable, options: TrackerOptions, client: str = "") -> Ticket:
        """A place in ``key``'s order (call when the request starts, in arrival order).
        ``options`` and ``client`` are used when the key is new; the tracker is made, and
        the limits checked, on the first update."""
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track(key, client, options)
        track.last_used = time.monotonic()
        track.tickets_taken += 1
        return Ticket(track, track.tickets_taken - 1)

    async def assign(self, ticket: Ticket, det: Detections, timestamp: float | None) -> Detections:
        """On ``ticket``'s turn: ``det`` with ``tracker_ids`` (K,) int64, -1 where a track is
        not yet confirmed; ``det`` unchanged if its tracker was freed meanwhile.
        OverloadedError when a new tracker would pass a limit. Every ticket must end in
        ``assign`` or ``skip``."""
        track = ticket.track
        if track.turn != ticket.number and not track.ended:
            waiter = track.waiting[ticket.number] = asyncio.get_running_loop().create_future()
            try:
                await waiter
            except asyncio.CancelledError:
                track.waiting.pop(ticket.number, None)
                self.skip(ticket)
                raise
        if track.ended:
            return det
        try:
            if track.tracker is None:
                self._admit(track)
                track.tracker = _ClassAware(track.options)
            # The update (~3 ms at 100 detections) runs in a worker thread, off the event
            # loop. The turn passes when it is done, not before, even if this request is
            # cancelled meanwhile: a tracker is never updated by two threads at once.
            update = asyncio.get_running_loop().run_in_executor(None, track.tracker.update, det, timestamp)
        except BaseException:  # refused (a limit), or the tracker could not start: turn over
            self._advance(track)
            raise
        update.add_done_callback(lambda _: self._advance(track))
        return replace(det, tracker_ids=await asyncio.shield(update))

    def skip(self, ticket: Ticket) -> None:
        """``ticket``'s request will not update the tracker (it failed): its turn passes."""
        track = ticket.track
        if track.ended:
            return
        if track.turn == ticket.number:
            self._advance(track)
        else:
            track.skipped.add(ticket.number)

    def end(self, key: Hashable) -> None:
        """Free a key's tracker now (its stream ended, or its sequence restarts)."""
        track = self._tracks.pop(key, None)
        if track is not None:
            self._retire(track)

    def end_after(self, ticket: Ticket) -> None:
        """Free ``ticket``'s tracker once its turn has passed (a sequence's last request):
        frames before it still get their ids, even if this one failed early."""
        track = ticket.track
        if track.turn > ticket.number:
            self._forget(track)
        elif track.last_ticket is None or ticket.number < track.last_ticket:
            track.last_ticket = ticket.number

    def sweep(self, now: float | None = None) -> int:
        """Free trackers idle for ``idle_s``; returns how many."""
        now = time.monotonic() if now is None else now
        idle = [k for k, t in self._tracks.items() if now - t.last_used > self.idle_s]
        for key in idle:
            self.end(key)
        return len(idle)

    def _admit(self, track: _Track) -> None:
        """OverloadedError unless a new tracker fits in the table and in its client's share."""
        self.sweep()
        live = [t for t in self._tracks.values() if t.tracker is not None]
        if len(live) >= self.max_tracks:
            raise OverloadedError(f"{len(live)} tracked streams are live (the limit is "
                                  f"{self.max_tracks}); end a stream or sequence, or retry later")
        mine = sum(t.client == track.client for t in live)
        if mine >= self.max_per_client:
            raise OverloadedError(f"this client has {mine} tracked streams live (the limit per client "
                                  f"is {self.max_per_client}); end a stream or sequence first")

    def _advance(self, track: _Track) -> None:
        """The current turn is over: move to the next ticket that will update and wake it.
        A key that never made a tracker is forgotten once all its tickets are settled."""
        track.last_used = time.monotonic()
        track.turn += 1
        while track.turn in track.skipped:
            track.skipped.discard(track.turn)
            track.turn += 1
        waiter = track.waiting.pop(track.turn, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if track.last_ticket is not None and track.turn > track.last_ticket:
            self._forget(track)
        elif track.tracker is None and track.turn >= track.tickets_taken:
            self._forget(track)

    def _forget(self, track: _Track) -> None:
        if self._tracks.get(track.key) is track:
            del self._tracks[track.key]
        self._retire(track)

    @staticmethod
    def _retire(track: _Track) -> None:
        """Its waiting tickets are answered (without ids) now; an update already running
        finishes on the old tracker, which nothing uses afterwards."""
        track.ended = True
        for waiter in track.waiting.values():
            if not waiter.done():
                waiter.set_result(None)
        track.waiting.clear()


@functools.cache
def _library():
    """(supervision, trackers.ByteTrackTracker): imported on first use, once."""
    import supervision
    from trackers import ByteTrackTracker

    return supervision, ByteTrackTracker


def _new_tracker(options: TrackerOptions):
    _, ByteTrackTracker = _library()
    return ByteTrackTracker(
        lost_track_buffer=max(0, round(options.lost_s * 30)),  # counted in 30 fps frames
        frame_rate=options.frame_rate,
        track_activation_threshold=options.activation,
        minimum_consecutive_frames=options.confirm_frames,
        minimum_iou_threshold=options.minimum_iou,
        high_conf_det_threshold=options.activation,  # as ultralytics' ByteTrack: 0.25 both
    )

