"""A small client over both of the server's APIs, on one gRPC channel.

- ``infer(image)``: one image through Triton/KServe v2 (``ModelInfer``, the messages
  ``tritonclient`` ships), returning the response document ``{"image": {...}, "predictions": [...]}``.
- ``stream(frames)``: frames through the typed video API, yielding results in order; if the
  server goes away mid-stream (a pod restarts), it reconnects with back-off and re-sends the
  frames that had no answer yet.
- cameras on the server: ``add_stream(source, ...)`` has the server pull a camera or file
  itself; ``streams()``, ``get_stream``, ``pause_stream``, ``resume_stream``,
  ``remove_stream``; ``subscribe()`` yields the results of one stream or of all.

Targets: ``host:port``; several replicas as a list or ``"host1:8001,host2:8001"``; or
``dns:///my-service.namespace.svc:8001`` for a Kubernetes headless Service. Every call, KServe,
video and cameras alike, goes over the one channel, which uses round-robin load balancing
among the replicas whose health says SERVING, so each new call or stream goes to the next.
Deadlines, TLS and a bearer token are options.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from pipeline.backoff import Backoff
from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc
from pipeline.repository import DEFAULT_MODEL
from pipeline.schema import record

from .frame_ring import FrameRing

LOG = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# Targets gRPC reads itself; any other text is host:port, or several of them comma-separated.
SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")
# A listed replica that is down, or not up yet, is tried again at least this often (gRPC's
# default backs off to 120 s), so one that joins late gets work soon after it serves.
MAX_RECONNECT_BACKOFF_S = 5
# Raw frames a shared-memory stream keeps in flight (the server's --stream-window is 8).
SHARED_MEMORY_SLOTS = 8


class ClientError(Exception):
    """The server refused a request (code names the gRPC status), or retries ran out."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def to_frame(item: Any, stream_id: str, index: int, options: vpb.InferOptions | None,
             ring: FrameRing | None = None) -> vpb.Frame:
    """Frame from encoded bytes, an (H, W, 3) uint8 RGB array, or a ready Frame; a raw frame
    goes through ``ring`` (shared memory) when one is given and it fits."""
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
        shared = ring.place(rgb, index) if ring is not None else None
        if shared is not None:
            frame.shared.CopyFrom(shared)
        else:
            frame.raw.height, frame.raw.width = rgb.shape[:2]
            frame.raw.rgb = rgb.tobytes()
    return frame


def infer_request(model: str, image: bytes | np.ndarray, parameters: dict[str, Any]):
    """A KServe v2 ``ModelInferRequest`` for one image: ``IMAGE`` as BYTES [1, 1] (encoded) or
    UINT8 [1, H, W, 3] (RGB), the parameters typed as Triton types them, ``DETECTIONS`` asked for."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    if isinstance(image, (bytes, bytearray)):
        request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(struct.pack("<I", len(image)) + bytes(image))
    else:
        rgb = np.ascontiguousarray(image, dtype=np.uint8)
        request.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, *rgb.shape])
        request.raw_input_contents.append(rgb.tobytes())
    for key, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", float: "double_param"}.get(type(value), "string_param")
        setattr(request.parameters[key], kind, value if kind != "string_param" else str(value))
    request.outputs.add(name="DETECTIONS")
    return request


def bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor on the wire: each a 4-byte little-endian length, then
    its bytes."""
    out, at = [], 0
    while at < len(raw):
        (length,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4 : at + 4 + length])
        at += 4 + length
    return out


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


def _split(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError without a port."""
    host, colon, port = address.strip().rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"server address {address!r} is not host:port (the server's gRPC port "
                         "is 8001 by default)")
    return host.strip("[]"), int(port)


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` has; ValueError naming it if it has none."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"server name {host!r} does not resolve ({exc.strerror})") from None
    return list(dict.fromkeys(info[4][0] for info in found))  # in order, once each


def channel_target(target: str | Sequence[str]) -> tuple[str, str | None]:
    """The gRPC target for one server or several replicas, checked now rather than mid-stream,
    and the authority the channel names (None: gRPC's own, from the target).

    - one ``host:port``: used as given (gRPC balances over every address the name has);
    - several, as a list or ``"a:8001,b:8001"``: each name resolved once, here, into one
      ``ipv4:``/``ipv6:`` target of every address, so calls round-robin over all of them. The
      list is fixed: a fleet whose members change is named by DNS instead. The authority is
      the first name, so with TLS every replica's certificate must be valid for it;
    - a gRPC target (``dns:///name:port``, ``ipv4:...``, ``unix:...``): used as given; a
      ``dns:`` name is re-resolved by gRPC whenever a connection is re-made (the server's
      max connection age), so replicas that join are found.

    Raises ValueError for no address, an address without a port, or a name that does not
    resolve (no replica behind a DNS name either)."""
    entries = [target] if isinstance(target, str) else list(target)
    scheme, _, path = entries[0].strip().partition(":") if len(entries) == 1 else ("", "", "")
    if scheme in SCHEMES:
        if scheme == "dns" and (path.startswith("///") or not path.startswith("//")):
            _resolve(*_split(path.lstrip("/")))  # dns://server/name asks a DNS server of its own
        return entries[0].strip(), None
    addresses = [a.strip() for entry in entries for a in entry.split(",") if a.strip()]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        _resolve(*_split(addresses[0]))
        return addresses[0], None
    found = [_resolve(*_split(a)) for a in addresses]
    ports = [_split(a)[1] for a in addresses]
    for family, version in (("ipv4", 4), ("ipv6", 6)):
        if all(any(ipaddress.ip_address(ip).version == version for ip in ips) for ips in found):
            bracket = "[{}]:{}" if version == 6 else "{}:{}"
            listed = (bracket.format(ip, port) for ips, port in zip(found, ports)
                      for ip in ips if ipaddress.ip_address(ip).version == version)
            return f"{family}:{','.join(dict.fromkeys(listed))}", addresses[0]
    raise ValueError(f"servers {addresses} mix IPv4-only and IPv6-only names: one channel "
                     "needs one family (list them by address, or use one dns:/// name)")


class SegmentationClient:
    """Both APIs over one channel. target: one server, several replicas or a DNS name (see
    channel_target; a bad one is a ValueError here, not an error mid-stream).

    keepalive_s: ping the server after this long without news and give up on a connection
    whose ping is not answered within as long again, so a replica that hangs or vanishes
    without closing its connections (a node lost) costs its streams about twice this, not
    TCP's 15 minutes: they fail UNAVAILABLE and move on. Servers accept pings every half
    their --grpc-keepalive-s (default 20 s) or slower."""

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:8001",
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float = 60.0,
        tls_root_cert: str | Path | None = None,
        token: str | None = None,
        backoff: Backoff = Backoff(),
        max_message_mb: int = 64,
        keepalive_s: float = 20.0,
    ):
        self.target, authority = channel_target(target)
        self.model = model
        self.timeout_s = timeout_s
        self.backoff = backoff
        self.token = token
        self._tls_root = Path(tls_root_cert) if tls_root_cert else None
        limit = max_message_mb * 1024 * 1024
        keepalive_ms = round(keepalive_s * 1000)
        self._options = [
            # One call per replica in turn, among those whose health says SERVING (watched on
            # each connection): a replica that listens while it loads, or drains, gets none.
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                                                "healthCheckConfig": {"serviceName": ""}})),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", keepalive_ms),
            # gRPC gives up on a ping after ping_timeout (default 60 s), not keepalive_timeout.
            ("grpc.keepalive_timeout_ms", keepalive_ms),
            ("grpc.http2.ping_timeout_ms", keepalive_ms),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging while a stream waits
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_S * 1000),
            *([("grpc.default_authority", authority)] if authority else []),
        ]
        self._channel = self._open_channel()

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

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ KServe v2

    def _kserve(self, method: str, request):
        """One call of Triton's KServe v2 service on the client's channel; a refusal as a
        ClientError naming the gRPC status."""
        from tritonclient.grpc import service_pb2_grpc

        try:
            return getattr(service_pb2_grpc.GRPCInferenceServiceStub(self._channel), method)(
                request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None

    def infer(self, image: bytes | np.ndarray, mask_format: str = "rle", **options) -> dict:
        """One image (encoded bytes or (H, W, 3) uint8 RGB) -> the response document.

        options: confidence, iou_threshold, max_detections. Retries UNAVAILABLE and
        RESOURCE_EXHAUSTED with back-off; raises ClientError for anything else.
        """
        request = infer_request(self.model, image, {"response_mask_format": mask_format, **options})
        delays = self.backoff.delays()
        while True:
            try:
                response = self._kserve("ModelInfer", request)
                (document,) = bytes_elements(response.raw_output_contents[0])
                return json.loads(document)
            except ClientError as exc:
                delay = next(delays, None) if exc.code in {c.name for c in RETRYABLE} else None
                if delay is None:
                    raise
                LOG.info("infer: %s, retrying in %.1f s", exc.code, delay)
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
        shared_memory: bool = False,
        **tracker_options: float,
    ) -> Iterator[vpb.FrameResult]:
        """Yield one FrameResult per frame, in order. Reconnects on UNAVAILABLE (server
        restart, pod rescheduled) and re-sends frames still unanswered, including those a
        draining server answered UNAVAILABLE; other errors raise.

        track: every detection gets a ``tracker_id`` that stays the same while the object
        stays in view (-1 until confirmed). tracker_options: the tracker's knobs
        (``track_activation_threshold``, ``lost_track_seconds``, ``minimum_iou``,
        ``minimum_consecutive_frames``, ``frame_rate``; see pipeline/proto/video.proto).
        A reconnected stream starts a new tracker.

        shared_memory: raw frames reach the server through shared memory (``FrameRing``:
        ``SHARED_MEMORY_SLOTS`` frames in flight), not in the messages; for one server on this
        host started with --allow-shared-memory (else ClientError from the first frame)."""
        if shared_memory and ("," in self.target or self.target.startswith("dns:")):
            raise ValueError("shared memory needs one server on this host, not several replicas")
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
        ring = FrameRing(SHARED_MEMORY_SLOTS, self._register_region,
                         self._unregister_region) if shared_memory else None
        source = (to_frame(item, stream_id, i, options, ring) for i, item in zip(itertools.count(), frames))
        # (number, frame) of each frame sent and not yet answered, in order: a reconnected
        # stream sends these first. The results loop pops; the calls' request threads append.
        unanswered: deque[tuple[int, vpb.Frame]] = deque()
        books = threading.Lock()  # guards unanswered
        # One reader of the source at a time: a call that ended may still be inside next()
        # (a live camera waits there for its next frame) when the next call wants a frame.
        reading = threading.Lock()
        delays = self.backoff.delays()
        source_failure: list[Exception] = []
        pulled = answered = 0  # frames taken from the source, and answered, so far

        def unsent(after: int) -> tuple[int, vpb.Frame] | None:
            with books:
                return next(((n, f) for n, f in unanswered if n >= after), None)

        def requests(call_over: threading.Event):
            # gRPC pulls this in its own thread and hides what it raises, so a failing source
            # ends the stream here and its exception is raised to the caller below. A frame
            # read after this call ended stays in ``unanswered``: the next call sends it.
            nonlocal pulled
            after = 0  # every unanswered frame numbered below this went out on this call
            while not source_failure:
                entry = unsent(after)  # before waiting to read: the reader may wait on these
                if entry is None:
                    with reading:
                        entry = unsent(after)  # what an ended call's reader got meanwhile
                        if entry is None:
                            if ring is not None and not ring.wait_turn(pulled, call_over):
                                return
                            try:
                                frame = next(source)
                            except StopIteration:
                                return
                            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                                source_failure.append(exc)
                                return
                            entry = (pulled, frame)
                            pulled += 1
                            with books:
                                unanswered.append(entry)
                if call_over.is_set():
                    return
                after = entry[0] + 1
                yield entry[1]

        try:
            while True:
                call_over = threading.Event()
                stub = video_pb2_grpc.VideoSegmentationStub(self._channel)
                unavailable = False
                try:
                    for result in stub.StreamFrames(requests(call_over), metadata=self._metadata):
                        if unavailable or result.error.startswith("UNAVAILABLE"):
                            # A draining server answers what it cannot run UNAVAILABLE; those frames
                            # (and any after them) stay unanswered and are re-sent on reconnecting.
                            unavailable = True
                            continue
                        with books:
                            done = bool(unanswered) and unanswered[0][1].frame_index == result.frame_index
                            if done:
                                unanswered.popleft()
                        if done:
                            answered += 1
                            if ring is not None:
                                ring.answered(answered)
                        delays = self.backoff.delays()  # healthy again: fresh back-off
                        yield result
                    if source_failure:
                        raise source_failure[0]
                    if not unavailable:
                        return
                    code, details = grpc.StatusCode.UNAVAILABLE, "the server drained the stream"
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                finally:
                    call_over.set()
                delay = next(delays, None) if code in RETRYABLE else None
                if delay is None:
                    raise ClientError(code.name, details) from None
                LOG.warning("stream %s: %s; reconnecting in %.1f s with %d unanswered frames",
                            stream_id, code.name, delay, len(unanswered))
                time.sleep(delay)
        finally:
            if ring is not None:
                ring.close()

    def _register_region(self, name: str, key: str, byte_size: int) -> None:
        from tritonclient.grpc import service_pb2 as pb

        self._kserve("SystemSharedMemoryRegister",
                     pb.SystemSharedMemoryRegisterRequest(name=name, key=key, byte_size=byte_size))

    def _unregister_region(self, name: str) -> None:
        from tritonclient.grpc import service_pb2 as pb

        self._kserve("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest(name=name))

    # ------------------------------------------------------------------ cameras on the server

    def _camera_call(self, method: str, request):
        try:
            return getattr(video_pb2_grpc.CameraStreamsStub(self._channel), method)(
                request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None

    def add_stream(self, source: str, *, max_fps: float | None = None, track: bool = False,
                   sinks: Sequence[str] = (), realtime: bool | None = None, stream_id: str = "",
                   model: str | None = None, **parameters: float) -> dict:
        """Have the server pull ``source`` itself (rtsp://, rtsps://, http(s):// HLS, or a file
        in its --stream-source-dir) and deliver each frame's document to ``sinks``
        (http(s):// webhooks, mqtt(s)://host/topic, redis(s)://host/key) and to ``subscribe``.
        parameters: confidence, iou_threshold, max_detections and the tracker's knobs.
        Returns the stream's status (as HTTP's ``GET /v1/streams/{id}``); ClientError if
        refused (INVALID_ARGUMENT, NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED, ...)."""
        spec = vpb.StreamSpec(source=source, model=model or self.model, track=track,
                              sinks=list(sinks), stream_id=stream_id)
        if max_fps is not None:
            spec.max_fps = max_fps
        if realtime is not None:
            spec.realtime = realtime
        if parameters:
            spec.parameters.update(parameters)
        return stream_status(self._camera_call("AddStream", spec))

    def streams(self) -> list[dict]:
        """Every camera stream of the server, with its state and counts."""
        return [stream_status(s) for s in self._camera_call("ListStreams", vpb.ListStreamsRequest()).streams]

    def get_stream(self, stream_id: str) -> dict:
        return stream_status(self._camera_call("GetStream", vpb.StreamRef(stream_id=stream_id)))

    def pause_stream(self, stream_id: str) -> dict:
        return stream_status(self._camera_call("PauseStream", vpb.StreamRef(stream_id=stream_id)))

    def resume_stream(self, stream_id: str) -> dict:
        return stream_status(self._camera_call("ResumeStream", vpb.StreamRef(stream_id=stream_id)))

    def remove_stream(self, stream_id: str) -> dict:
        """Stop and forget a stream; its last status."""
        return stream_status(self._camera_call("RemoveStream", vpb.StreamRef(stream_id=stream_id)))

    def subscribe(self, stream_id: str = "", *, frames: bool = False,
                  seconds: float | None = None) -> Iterator[vpb.FrameResult]:
        """Results of one camera stream ("" = every stream) as they come, until the stream's
        frames end (it is removed, or its file ended), the server drains, or ``seconds``
        pass; ``frames``: each with its frame as JPEG (``frame_jpeg``). Close the iterator to
        stop sooner."""
        call = video_pb2_grpc.CameraStreamsStub(self._channel).Subscribe(
            vpb.SubscribeRequest(stream_id=stream_id, frames=frames), metadata=self._metadata,
            timeout=seconds)
        try:
            yield from call
        except grpc.RpcError as exc:
            over = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and seconds is not None
            if exc.code() != grpc.StatusCode.CANCELLED and not over:
                raise ClientError(exc.code().name, exc.details() or "") from None
        finally:
            call.cancel()


def stream_status(info: vpb.StreamInfo) -> dict:
    """A camera stream's status as a dict, the same fields and types HTTP's /v1/streams gives
    (protobuf's JSON writes 64-bit counts as strings: they are numbers again here)."""
    status = json_format.MessageToDict(info, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    counts = [(status, vpb.StreamInfo.DESCRIPTOR), *((sink, vpb.SinkInfo.DESCRIPTOR) for sink in status["sinks"])]
    for fields, descriptor in counts:
        for field in descriptor.fields:
            if field.cpp_type == field.CPPTYPE_UINT64:
                fields[field.name] = int(fields[field.name])
    return status
