"""The typed streaming API for video (``rleserving.v1.VideoSegmentation/StreamFrames``).

A thin adapter: flow control, ordering and "one result per frame" are the shared
``StreamWindow`` core's (see ``stream_window``), with the server's window and policy (``wait``
or ``drop_oldest``). Here a frame is a ``FrameCall``: read once into an ``InferRequest``
(``request_of``), run by ``serving.life.run``, its ``Answer`` a typed ``FrameResult``:
detections, an ``error`` (a bad frame does not end the stream), or ``dropped``.
"""

from __future__ import annotations

import itertools
import time
from typing import Protocol

import numpy as np

from ..errors import BadInputError, status_text
from ..images import check_image_size
from ..proto import video_pb2 as vpb
from ..proto import video_pb2_grpc
from ..repository import DEFAULT_MODEL
from ..schema import rows
from ..serving.request import Answer, InferRequest, Tracking
from ..serving.shared_memory import Reference, SharedMemory
from ..serving.state import ServingState, client_of
from ..tracking import TrackerOptions
from .grpc_calls import serve_stream


def model_of(frame: vpb.Frame) -> str:
    return frame.model or DEFAULT_MODEL


def request_of(frame: vpb.Frame, regions: SharedMemory, call: int = 0) -> InferRequest:
    """The frame as the one typed request (BadInputError if unusable). A tracked stream's
    frame carries its time (the client's timestamp, else its index over the frame rate), so
    dropped frames are gaps. call: the stream call it came in; a stream id names a tracker
    within its call only, so two calls that use one id never share (or end) a tracker.
    regions: the server's shared memory, for a frame that names a region."""
    o = frame.options
    keys = ("confidence", "iou_threshold", "max_detections", *TrackerOptions.KEYS)
    params = {key: getattr(o, key) for key in keys if o.HasField(key)}
    tracking = None
    if o.track:
        options = TrackerOptions.from_params(params)
        timestamp = frame.timestamp or frame.frame_index / options.frame_rate
        tracking = Tracking(f"video/{call}/{model_of(frame)}/{frame.stream_id}", options, timestamp)
    return InferRequest.read(model_of(frame), "", [frame_image(frame, regions)], params, tracking=tracking)


def frame_image(frame: vpb.Frame, regions: SharedMemory):
    kind = frame.WhichOneof("image")
    if kind == "encoded":
        return frame.encoded
    if kind == "raw":
        h, w = frame.raw.height, frame.raw.width
        check_image_size(h, w)
        if len(frame.raw.rgb) != h * w * 3:
            raise BadInputError(f"raw frame of {w}x{h} needs {h * w * 3} bytes, got {len(frame.raw.rgb)}")
        return np.frombuffer(frame.raw.rgb, np.uint8).reshape(h, w, 3)
    if kind == "shared":
        h, w = frame.shared.height, frame.shared.width
        check_image_size(h, w)
        ref = Reference(frame.shared.region, h * w * 3, frame.shared.offset)
        return np.frombuffer(regions.read(ref, "shared frame"), np.uint8).reshape(h, w, 3)
    raise BadInputError("frame carries no image (set 'encoded', 'raw' or 'shared')")


class FramePlace(Protocol):
    """Where a result belongs: a ``Frame``, or a camera's result."""

    stream_id: str
    frame_index: int
    timestamp: float


def answer_of(frame: FramePlace, **fields) -> vpb.FrameResult:
    return vpb.FrameResult(stream_id=frame.stream_id, frame_index=frame.frame_index,
                           timestamp=frame.timestamp, **fields)


def result_of(frame: FramePlace, answer: Answer, arrived: float) -> vpb.FrameResult:
    (det,) = answer.detections
    H, W = det.image_size
    out = answer_of(frame, height=H, width=W)
    for row in rows(det, answer.pipe.class_names):
        x1, y1, x2, y2 = row.box
        out.detections.add(
            x1=x1, y1=y1, x2=x2, y2=y2, score=row.confidence, class_id=row.class_id,
            class_name=row.class_name, detection_id=row.detection_id,
            rle=vpb.Rle(size=[H, W], counts=det.counts[row.i]), tracker_id=row.tracker_id,
        )
    out.server_ms = (time.monotonic() - arrived) * 1e3
    return out


class FrameCall:
    """One ``Frame`` of ``StreamFrames`` as a ``serving.life.Call``: answered as a typed
    ``FrameResult`` (detections, or an ``error``: a bad frame does not end the stream, or
    ``dropped``). arrived: when it was read, so ``server_ms`` includes waiting in the window.
    call: the stream call it came in; tracked: that call's trackers, freed when it ends."""

    api = "video_grpc"  # the books' name for the way it came in

    def __init__(self, frame: vpb.Frame, arrived: float, regions: SharedMemory, call: int, client: str,
                 tracked: set[tuple[str, str]]):
        self.frame, self.arrived, self.regions = frame, arrived, regions
        self.call, self.client, self.tracked = call, client, tracked
        self.model = model_of(frame)

    def read(self) -> InferRequest:
        request = request_of(self.frame, self.regions, self.call)
        if request.tracking is not None:
            self.tracked.add(request.tracking.slot(self.client))
        return request

    def respond(self, answer: Answer) -> vpb.FrameResult:
        return result_of(self.frame, answer, self.arrived)

    def fail(self, error: BaseException) -> vpb.FrameResult:
        return answer_of(self.frame, error=status_text(error))

    def dropped(self) -> vpb.FrameResult:
        return answer_of(self.frame, dropped=True)


class VideoService(video_pb2_grpc.VideoSegmentationServicer):
    def __init__(self, state: ServingState):
        self.state = state
        self._calls = itertools.count(1)

    async def StreamFrames(self, request_iterator, context):
        call, client = next(self._calls), client_of(context.peer())
        tracked: set[tuple[str, str]] = set()  # this call's trackers, freed when it ends
        calls = (FrameCall(frame, time.monotonic(), self.state.shared_memory, call, client, tracked)
                 async for frame in request_iterator)
        try:
            async for result in serve_stream(self.state, "video", calls, context,
                                             policy=self.state.stream_policy, dropped=FrameCall.dropped,
                                             on_drop=self.state.ledger.frames_dropped):
                yield result
        finally:
            for key in tracked:
                self.state.tracks.end(key)
