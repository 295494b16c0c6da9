"""The typed streaming API for video (``rleserving.v1.VideoSegmentation/StreamFrames``).

Flow control per stream: at most ``window`` frames are in the batcher at once, and at most
``window`` more wait behind them. When a client sends faster than the model serves:

- policy ``wait``: the server stops reading the stream until a slot frees; gRPC's own flow
  control then slows the sender. Nothing is dropped.
- policy ``drop_oldest``: the oldest frame still waiting (not yet running) is dropped to make
  room, and its result says ``dropped: true``. Live video prefers fresh frames to late ones.

Either way every frame gets exactly one result, in the order sent: detections, an ``error``
(a bad frame does not end the stream), or ``dropped``. Memory per stream stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import grpc
import numpy as np

from .errors import BadInputError, PipelineError
from .images import check_image_size
from .postprocess import Detections
from .proto import video_pb2 as vpb
from .proto import video_pb2_grpc
from .service import ServingState, describe, status_of

LOG = logging.getLogger(__name__)
DEFAULT_MODEL = "instance_segmentation"
POLICIES = ("wait", "drop_oldest")


@dataclass
class _Slot:
    """One frame's place in the output order; ``result`` resolves to its FrameResult."""

    frame: vpb.Frame
    arrived: float = field(default_factory=time.monotonic)
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def frame_image(frame: vpb.Frame):
    kind = frame.WhichOneof("image")
    if kind == "encoded":
        return frame.encoded
    if kind == "raw":
        h, w = frame.raw.height, frame.raw.width
        check_image_size(h, w)
        if len(frame.raw.rgb) != h * w * 3:
            raise BadInputError(f"raw frame of {w}x{h} needs {h * w * 3} bytes, got {len(frame.raw.rgb)}")
        return np.frombuffer(frame.raw.rgb, np.uint8).reshape(h, w, 3)
    raise BadInputError("frame carries no image (set 'encoded' or 'raw')")


def frame_options(frame: vpb.Frame) -> dict:
    o = frame.options
    out = {}
    if o.HasField("confidence"):
        out["confidence"] = o.confidence
    if o.HasField("iou_threshold"):
        out["iou_threshold"] = o.iou_threshold
    if o.HasField("max_detections"):
        out["max_detections"] = o.max_detections
    return out


def result_of(frame: vpb.Frame, det: Detections, names, arrived: float) -> vpb.FrameResult:
    H, W = det.image_size
    out = vpb.FrameResult(stream_id=frame.stream_id, frame_index=frame.frame_index,
                          timestamp=frame.timestamp, height=H, width=W)
    for i, text in enumerate(det.counts):
        x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
        class_id = int(det.class_ids[i])
        out.detections.add(
            x1=x1, y1=y1, x2=x2, y2=y2, score=float(det.scores[i]), class_id=class_id,
            class_name=names[class_id] if class_id < len(names) else str(class_id),
            detection_id=str(uuid.uuid4()), rle=vpb.Rle(size=[H, W], counts=text),
        )
    out.server_ms = (time.monotonic() - arrived) * 1e3
    return out


class VideoService(video_pb2_grpc.VideoSegmentationServicer):
    def __init__(self, state: ServingState):
        self.state = state
        if state.stream_policy not in POLICIES:
            raise ValueError(f"stream policy must be one of {POLICIES}, got {state.stream_policy!r}")

    async def _process(self, slot: _Slot) -> vpb.FrameResult:
        frame = slot.frame
        try:
            pipe = self.state.pipeline(frame.model or DEFAULT_MODEL)
            det = await pipe.submit(frame_image(frame), **frame_options(frame))
            return result_of(frame, det, pipe.class_names, slot.arrived)
        except Exception as exc:  # noqa: BLE001 - one bad frame must not end the stream
            code = status_of(exc).name if isinstance(exc, PipelineError) else "INTERNAL"
            return vpb.FrameResult(stream_id=frame.stream_id, frame_index=frame.frame_index,
                                   timestamp=frame.timestamp, error=f"{code}: {describe(exc)}")

    async def StreamFrames(self, request_iterator, context):
        if self.state.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        window = self.state.stream_window
        policy = self.state.stream_policy
        metrics = self.state.metrics
        order: deque[_Slot] = deque()  # every frame read and not yet answered, in order
        waiting: deque[_Slot] = deque()  # read, not yet handed to the batcher
        running = 0
        changed = asyncio.Event()
        done_reading = False

        def start_waiting():
            nonlocal running
            while waiting and running < window:
                slot = waiting.popleft()
                running += 1
                task = asyncio.create_task(self._process(slot))
                task.add_done_callback(lambda t, s=slot: finish(s, t))

        def finish(slot: _Slot, task: asyncio.Task):
            nonlocal running
            running -= 1
            if not slot.result.done():
                slot.result.set_result(task.result() if not task.cancelled() else vpb.FrameResult(
                    stream_id=slot.frame.stream_id, frame_index=slot.frame.frame_index,
                    error="CANCELLED: stream closed"))
            start_waiting()
            changed.set()

        async def read():
            nonlocal done_reading
            try:
                async for frame in request_iterator:
                    slot = _Slot(frame)
                    # Never let unanswered results pile up: a client that does not read its
                    # results is slowed down here, whatever the policy.
                    while len(order) >= 4 * window or (policy == "wait" and len(waiting) >= window):
                        changed.clear()
                        await changed.wait()
                    if policy == "drop_oldest" and len(waiting) >= window:
                        victim = waiting.popleft()
                        victim.result.set_result(vpb.FrameResult(
                            stream_id=victim.frame.stream_id, frame_index=victim.frame.frame_index,
                            timestamp=victim.frame.timestamp, dropped=True))
                        metrics.frames_dropped.inc()
                    order.append(slot)
                    waiting.append(slot)
                    start_waiting()
                    changed.set()
            finally:
                done_reading = True
                changed.set()

        metrics.streams_open.labels("video").inc()
        self.state.active += 1
        reader = asyncio.create_task(read())
        try:
            while True:
                if order:
                    slot = order[0]
                    result = await slot.result
                    order.popleft()
                    changed.set()
                    yield result
                elif done_reading:
                    break
                else:
                    changed.clear()
                    await changed.wait()
            await reader  # surfaces a broken request stream as an error
        finally:
            reader.cancel()
            waiting.clear()  # a client that left gets no more work started on its behalf
            metrics.streams_open.labels("video").dec()
            self.state.active -= 1
