"""A request as every way in reads it: ``InferRequest`` (read once from its protocol's message,
its parameters by their wire names), its place in a tracked stream (``Tracking``), and what it
got (``Answer``). No protocol types here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine import Pipeline
from ..errors import InvalidOptionError
from ..postprocess import Detections, PostprocessOptions
from ..tracking import TrackerOptions

# The batcher's lanes (``batcher``: they share each model equally): what clients push, and
# the frames of the cameras the server pulls itself, so neither can starve the other.
PUSHED, CAMERAS = "pushed", "cameras"


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
    lane: str = PUSHED

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



def payload_bytes(images: Sequence[Any]) -> int:
    """What a request's images hold in memory until it is answered (encoded bytes, raw
    pixels); a PIL image or a path counts as nothing (in-process callers only)."""
    return sum(len(i) if isinstance(i, (bytes, bytearray, memoryview)) else getattr(i, "nbytes", 0)
               for i in images)

