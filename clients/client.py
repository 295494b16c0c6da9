"""A small client over both of the server's APIs.

- ``infer(image)``: one image through Triton/KServe v2 (``tritonclient.grpc``), returning the
  response document ``{"image": {...}, "predictions": [...]}``.
- ``stream(frames)``: frames through the typed video API, yielding results in order; if the
  server goes away mid-stream (a pod restarts), it reconnects with back-off and re-sends the
  frames that had no answer yet.

Targets: ``host:port``, or ``dns:///my-service.namespace.svc:8001`` for a Kubernetes headless
Service: the channel uses round-robin load balancing, so each new call or stream goes to the
next pod that DNS lists. Deadlines, TLS and a bearer token are options.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc
from pipeline.schema import record

LOG = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ClientError(Exception):
    """The server refused a request (code names the gRPC status), or retries ran out."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off between reconnects: first, doubling, capped; ``attempts`` tries."""

    first_s: float = 0.2
    max_s: float = 5.0
    attempts: int = 8

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_s)


def to_frame(item: Any, stream_id: str, index: int, options: vpb.InferOptions | None) -> vpb.Frame:
    """Frame from encoded bytes, an (H, W, 3) uint8 RGB array, or a ready Frame."""
    if isinstance(item, vpb.Frame):
        return item
    frame = vpb.Frame(stream_id=stream_id, frame_index=index, timestamp=time.time())
    if options is not None:
        frame.options.CopyFrom(options)
    if isinstance(item, (bytes, bytearray)):
        frame.encoded = bytes(item)
    else:
        rgb = np.ascontiguousarray(item, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"raw frames must be (H, W, 3) uint8 RGB, got {rgb.shape}")
        frame.raw.height, frame.raw.width = rgb.shape[:2]
        frame.raw.rgb = rgb.tobytes()
    return frame


def result_document(result: vpb.FrameResult) -> dict:
    """A typed FrameResult as the JSON schema the server's DETECTIONS use (plus frame ids)."""
    return {
        "stream_id": result.stream_id,
        "frame_index": result.frame_index,
        "timestamp": result.timestamp,
        "image": {"width": result.width, "height": result.height},
        "predictions": [
            record(d.x1, d.y1, d.x2, d.y2, d.score, d.class_id, d.class_name, d.detection_id,
                   d.tracker_id if d.HasField("tracker_id") else None,
                   rle={"size": list(d.rle.size), "counts": d.rle.counts}, mask_format="rle")
            for d in result.detections
        ],
        **({"error": result.error} if result.error else {}),
        **({"dropped": True} if result.dropped else {}),
    }


class SegmentationClient:
    def __init__(
        self,
        target: str = "localhost:8001",
        *,
        model: str = "instance_segmentation",
        timeout_s: float = 60.0,
        tls_root_cert: str | Path | None = None,
        token: str | None = None,
        backoff: Backoff = Backoff(),
        max_message_mb: int = 64,
    ):
        self.target = target
        self.model = model
        self.timeout_s = timeout_s
        self.backoff = backoff
        self.token = token
        self._tls_root = Path(tls_root_cert) if tls_root_cert else None
        limit = max_message_mb * 1024 * 1024
        self._options = [
            ("grpc.lb_policy_name", "round_robin"),  # one call per pod in turn (dns:/// targets)
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
        self._channel = self._open_channel()
        self._kserve = None

    def _open_channel(self) -> grpc.Channel:
        if self._tls_root is None:
            if self.token:
                LOG.warning("sending a bearer token without TLS")
            return grpc.insecure_channel(self.target, options=self._options)
        credentials = grpc.ssl_channel_credentials(root_certificates=self._tls_root.read_bytes())
        return grpc.secure_channel(self.target, credentials, options=self._options)

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def close(self) -> None:
        self._channel.close()
        if self._kserve is not None:
            self._kserve.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ KServe v2

    def _triton(self):
        if self._kserve is None:
            import tritonclient.grpc as triton

            self._kserve = triton.InferenceServerClient(
                self.target, ssl=self._tls_root is not None,
                root_certificates=str(self._tls_root) if self._tls_root else None,
                channel_args=self._options,
            )
        return self._kserve

    def infer(self, image: bytes | np.ndarray, mask_format: str = "rle", **options) -> dict:
        """One image (encoded bytes or (H, W, 3) uint8 RGB) -> the response document.

        options: confidence, iou_threshold, max_detections. Retries UNAVAILABLE and
        RESOURCE_EXHAUSTED with back-off; raises ClientError for anything else.
        """
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException

        if isinstance(image, (bytes, bytearray)):
            tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[bytes(image)]], dtype=object))
        else:
            rgb = np.ascontiguousarray(image, dtype=np.uint8)[None]
            tensor = triton.InferInput("IMAGE", list(rgb.shape), "UINT8")
            tensor.set_data_from_numpy(rgb)
        parameters = {"response_mask_format": mask_format, **options}
        headers = dict(self._metadata)
        delays = self.backoff.delays()
        while True:
            try:
                result = self._triton().infer(
                    self.model, [tensor], parameters=parameters, headers=headers,
                    client_timeout=self.timeout_s,
                    outputs=[triton.InferRequestedOutput("DETECTIONS")],
                )
                return json.loads(result.as_numpy("DETECTIONS")[0, 0])
            except InferenceServerException as exc:
                code = (exc.status() or "").replace("StatusCode.", "")
                delay = next(delays, None) if code in {c.name for c in RETRYABLE} else None
                if delay is None:
                    raise ClientError(code or "UNKNOWN", exc.message()) from None
                LOG.info("infer: %s, retrying in %.1f s", code, delay)
                time.sleep(delay)

    # ------------------------------------------------------------------ video stream

    def stream(
        self,
        frames: Iterable[bytes | np.ndarray | vpb.Frame],
        *,
        stream_id: str | None = None,
        confidence: float | None = None,
        iou_threshold: float | None = None,
        max_detections: int | None = None,
        track: bool = False,
        **tracker_options: float,
    ) -> Iterator[vpb.FrameResult]:
        """Yield one FrameResult per frame, in order. Reconnects on UNAVAILABLE (server
        restart, pod rescheduled) and re-sends frames still unanswered, including those a
        draining server answered UNAVAILABLE; other errors raise.

        track: every detection gets a ``tracker_id`` that stays the same while the object
        stays in view (-1 until confirmed). tracker_options: the tracker's knobs
        (``track_activation_threshold``, ``lost_track_seconds``, ``minimum_iou``,
        ``minimum_consecutive_frames``, ``frame_rate``; see pipeline/proto/video.proto).
        A reconnected stream starts a new tracker."""
        stream_id = stream_id or uuid.uuid4().hex[:12]
        options = vpb.InferOptions(**tracker_options)  # unknown knobs: ValueError here
        if confidence is not None:
            options.confidence = confidence
        if iou_threshold is not None:
            options.iou_threshold = iou_threshold
        if max_detections is not None:
            options.max_detections = max_detections
        if track:
            options.track = True
        source = (to_frame(item, stream_id, i, options) for i, item in zip(itertools.count(), frames))
        unanswered: deque[vpb.Frame] = deque()
        delays = self.backoff.delays()
        source_failure: list[Exception] = []

        def requests(replay: list[vpb.Frame]):
            # gRPC pulls this in its own thread and hides what it raises, so a failing source
            # ends the stream here and its exception is raised to the caller below.
            yield from replay
            while not source_failure:
                try:
                    frame = next(source)
                except StopIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    source_failure.append(exc)
                    return
                unanswered.append(frame)
                yield frame

        while True:
            replay = list(unanswered)
            stub = video_pb2_grpc.VideoSegmentationStub(self._channel)
            unavailable = False
            try:
                for result in stub.StreamFrames(requests(replay), metadata=self._metadata):
                    if unavailable or result.error.startswith("UNAVAILABLE"):
                        # A draining server answers what it cannot run UNAVAILABLE; those frames
                        # (and any after them) stay unanswered and are re-sent on reconnecting.
                        unavailable = True
                        continue
                    if unanswered and unanswered[0].frame_index == result.frame_index:
                        unanswered.popleft()
                    delays = self.backoff.delays()  # healthy again: fresh back-off
                    yield result
                if source_failure:
                    raise source_failure[0]
                if not unavailable:
                    return
                code, details = grpc.StatusCode.UNAVAILABLE, "the server drained the stream"
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            delay = next(delays, None) if code in RETRYABLE else None
            if delay is None:
                raise ClientError(code.name, details) from None
            LOG.warning("stream %s: %s; reconnecting in %.1f s with %d unanswered frames",
                        stream_id, code.name, delay, len(unanswered))
            time.sleep(delay)
