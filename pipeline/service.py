"""The Triton / KServe v2 gRPC service (``inference.GRPCInferenceService``) on grpc.aio.

Built on the messages tritonclient ships, so the official ``tritonclient.grpc`` client works
unmodified. This is the adapter layer: protobuf lives here and in ``streaming``, nowhere
deeper; pipeline errors become gRPC status codes through the one table in ``pipeline.errors``.

The pipeline model (``instance_segmentation``) takes ``IMAGE``: BYTES [B, 1] (encoded images)
or UINT8 [B, H, W, 3] (raw RGB), and request parameters ``response_mask_format`` ("rle" or
"polygon"), ``confidence``, ``iou_threshold``, ``max_detections``. It returns ``DETECTIONS``
(BYTES [B, 1], one JSON document per image) and typed tensors padded to the most detections
K in the request: NUM_DETECTIONS INT32 [B, 1], BOXES FP32 [B, K, 4] (x1, y1, x2, y2),
SCORES FP32 [B, K], CLASS_IDS INT32 [B, K], RLE_COUNTS BYTES [B, K], IMAGE_SIZE INT32 [B, 2].
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from .engine import Pipeline
from .errors import (
    BadInputError,
    InvalidOptionError,
    NotFoundError,
    OverloadedError,
    PipelineError,
    ShuttingDownError,
    status_of,
)
from .images import check_image_size
from .postprocess import Detections, PostprocessOptions
from .schema import OUTPUTS, output_arrays
from .stream_window import StreamWindow
from .telemetry import Ledger

LOG = logging.getLogger(__name__)
SERVER_NAME = "rle-serving"
SERVER_VERSION = "0.1.0"
VERSION = "1"
INPUT = "IMAGE"
PARAMETERS = ("response_mask_format", "confidence", "iou_threshold", "max_detections")


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The gRPC code of any error, from the one table in ``pipeline.errors``."""
    return grpc.StatusCode[status_of(error).grpc]


def describe(error: BaseException) -> str:
    if isinstance(error, PipelineError):
        return str(error)
    LOG.exception("unexpected error while serving", exc_info=error)
    return f"internal error: {type(error).__name__}: {error}"


class ConnectionLimits:
    """Per client connection (gRPC peer): streams open and requests in flight, each capped so
    one client cannot take the whole server; beyond a cap, OverloadedError (RESOURCE_EXHAUSTED)."""

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
    """What the frontends share: the loaded pipelines, the telemetry ledger, stream settings,
    and whether we are draining."""

    repository_root: str
    pipelines: dict[str, Pipeline]
    unavailable: dict[str, str]  # model name -> why it is not served directly
    ledger: Ledger
    stream_window: int = 8
    stream_policy: str = "wait"
    draining: bool = False
    active: int = 0  # unary requests and streams in progress, for the drain
    streams: set = field(default_factory=set)  # open StreamWindows, stopped by the drain
    limits: ConnectionLimits = field(default_factory=lambda: ConnectionLimits())

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


# ----------------------------------------------------------------------- tensor codecs


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: each element is a 4-byte little-endian length + bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadInputError("BYTES tensor is truncated (a length prefix is cut off)")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise BadInputError(
                f"BYTES tensor is truncated (element claims {length} bytes, {len(raw) - pos} left)"
            )
        out.append(raw[pos : pos + length])
        pos += length
    return out


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def images_of(request: pb.ModelInferRequest, max_batch: int) -> list[Any]:
    """The request's images: encoded bytes or (H, W, 3) uint8 arrays; BadInputError else."""
    names = [t.name for t in request.inputs]
    if INPUT not in names:
        raise BadInputError(f"missing input {INPUT!r} (got {names or 'none'})")
    extra = [n for n in names if n != INPUT]
    if extra:
        raise BadInputError(f"unexpected input(s) {extra}; the model takes only {INPUT!r}")
    index = names.index(INPUT)
    tensor = request.inputs[index]
    shape = list(tensor.shape)
    raw = request.raw_input_contents[index] if len(request.raw_input_contents) > index else None
    if tensor.datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
            raise BadInputError(f"{INPUT} as BYTES must have shape [B, 1], got {shape}")
        items = decode_bytes_tensor(raw) if raw is not None else list(tensor.contents.bytes_contents)
        if len(items) != shape[0]:
            raise BadInputError(f"{INPUT} shape {shape} promises {shape[0]} images, got {len(items)}")
        images: list[Any] = items
    elif tensor.datatype == "UINT8":
        if len(shape) == 3:
            shape = [1, *shape]
        if len(shape) != 4 or shape[3] != 3 or min(shape) < 0:
            raise BadInputError(f"{INPUT} as UINT8 must have shape [B, H, W, 3], got {list(tensor.shape)}")
        check_image_size(shape[1], shape[2])
        data = raw if raw is not None else bytes(tensor.contents.uint_contents)
        if len(data) != int(np.prod(shape)):
            raise BadInputError(
                f"{INPUT} shape {shape} needs {int(np.prod(shape))} bytes, got {len(data)}"
            )
        pixels = np.frombuffer(data, np.uint8).reshape(shape)
        images = [pixels[i] for i in range(shape[0])]
    else:
        raise BadInputError(
            f"{INPUT} must be BYTES (encoded images) or UINT8 [B, H, W, 3], got {tensor.datatype}"
        )
    if len(images) > max_batch:
        raise BadInputError(f"batch of {len(images)} exceeds the model's max_batch_size {max_batch}")
    return images


def parameters_of(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The request's parameters as plain Python values (str, int, float, bool)."""
    out = {}
    for key, p in request.parameters.items():
        kind = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, kind) if kind else None
    return out


def _microseconds(value: Any) -> float | None:
    """Triton's ``timeout`` request parameter (int64 microseconds) in seconds; None if unset."""
    if value is None:
        return None
    try:
        micros = float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError("timeout", f"parameter 'timeout' must be microseconds, got {value!r}") from None
    if not micros >= 0:
        raise InvalidOptionError("timeout", f"parameter 'timeout' must be >= 0, got {value!r}")
    return micros / 1e6 or None


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    requested = [o.name for o in request.outputs] or list(OUTPUTS)
    unknown = [n for n in requested if n not in OUTPUTS]
    if unknown:
        raise BadInputError(f"unknown output(s) {unknown}; the model offers {list(OUTPUTS)}")
    return requested


def build_response(request: pb.ModelInferRequest, pipe: Pipeline, dets: list[Detections],
                   options: PostprocessOptions) -> pb.ModelInferResponse:
    """The response message (JSON, polygons, tensors): CPU work, run off the event loop."""
    arrays = output_arrays(dets, requested_outputs(request), pipe.class_names,
                           options.mask_format)
    response = pb.ModelInferResponse(model_name=pipe.name, model_version=VERSION, id=request.id)
    for name, array in arrays.items():
        response.outputs.add(name=name, datatype=OUTPUTS[name][0], shape=list(array.shape))
        if array.dtype == object:
            response.raw_output_contents.append(encode_bytes_tensor(list(array.reshape(-1))))
        else:
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response


# ----------------------------------------------------------------------------- service


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    # Health and metadata ------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.state.pipelines) and not self.state.draining)

    async def ModelReady(self, request, context):
        ready = (request.name in self.state.pipelines and request.version in ("", VERSION)
                 and not self.state.draining)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION,
            extensions=["model_configuration", "statistics", "binary_tensor_data", "parameters"],
        )

    async def ModelMetadata(self, request, context):
        try:
            pipe = self.state.lookup(request.name, request.version)
        except PipelineError as exc:
            await context.abort(grpc_status(exc), describe(exc))
        response = pb.ModelMetadataResponse(name=pipe.name, versions=[VERSION],
                                            platform=pipe.entry.platform)
        response.inputs.add(name=INPUT, datatype="BYTES", shape=[-1, 1])
        for name, (datatype, dims) in OUTPUTS.items():
            response.outputs.add(name=name, datatype=datatype, shape=[-1, *dims])
        return response

    async def ModelConfig(self, request, context):
        try:
            pipe = self.state.lookup(request.name, request.version)
        except PipelineError as exc:
            await context.abort(grpc_status(exc), describe(exc))
        config = mc.ModelConfig()
        config.CopyFrom(pipe.entry.config)
        declared = {o.name for o in config.output}
        for name, (datatype, dims) in OUTPUTS.items():
            if name not in declared:
                config.output.add(name=name, data_type=mc.DataType.Value(
                    "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"), dims=dims)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else sorted(self.state.pipelines)
        response = pb.ModelStatisticsResponse()
        for name in names:
            try:
                self.state.lookup(name, request.version)
            except PipelineError as exc:
                await context.abort(grpc_status(exc), describe(exc))
            t = self.state.ledger.totals(name)
            s = response.model_stats.add(
                name=name, version=VERSION, last_inference=t.last_inference_ms,
                inference_count=t.images, execution_count=t.batches,
            )
            stats = s.inference_stats
            stats.success.count, stats.success.ns = t.requests_ok, t.requests_ok_ns
            stats.fail.count = sum(t.requests_failed.values())
            stats.fail.ns = t.requests_failed_ns
            stats.queue.count, stats.queue.ns = t.images, t.queue_ns
            stats.compute_input.count = t.images
            stats.compute_input.ns = t.stage_ns["preprocess"]
            stats.compute_infer.count, stats.compute_infer.ns = t.images, t.compute_ns
            stats.compute_output.count, stats.compute_output.ns = t.answered_images, t.output_ns
            for size, count in sorted(t.batch_sizes.items()):
                s.batch_stats.add(batch_size=size).compute_infer.count = count
        return response

    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for name in sorted(set(self.state.pipelines) | set(self.state.unavailable)):
            if name in self.state.pipelines:
                response.models.add(name=name, version=VERSION, state="READY")
            elif not request.ready:
                response.models.add(name=name, version=VERSION, state="UNAVAILABLE",
                                    reason=self.state.unavailable[name])
        return response

    # Inference ---------------------------------------------------------------------

    async def infer(self, request: pb.ModelInferRequest,
                    context: grpc.aio.ServicerContext | None = None) -> pb.ModelInferResponse:
        """One request through the shared batcher; raises PipelineError on bad input.

        Triton's ``timeout`` parameter (microseconds) asks for a shorter queue timeout where
        the model's queue policy allows overrides; a gRPC deadline (``context``) is honoured
        too: a request still queued then is answered DEADLINE_EXCEEDED, never run."""
        started = time.monotonic()
        name = request.model_name
        ledger = self.state.ledger
        images: list = []
        try:
            pipe = self.state.pipeline(name, request.model_version)
            params = parameters_of(request)
            options = PostprocessOptions.from_params(params, pipe.defaults)
            timeout_s = _microseconds(params.get("timeout"))
            remaining = context.time_remaining() if context is not None else None
            deadline = started + remaining if remaining is not None else None
            requested_outputs(request)  # refuse unknown outputs before any work
            images = images_of(request, pipe.max_batch_size)
            ledger.add_pending(name, len(images))
            try:
                dets = await asyncio.gather(*(
                    pipe.submit(img, options, timeout_s=timeout_s, deadline=deadline)
                    for img in images))
            finally:
                ledger.add_pending(name, -len(images))
            built = time.monotonic()
            response = await asyncio.to_thread(build_response, request, pipe, list(dets), options)
        except BaseException as exc:
            if name in self.state.pipelines:
                reason = status_of(exc).grpc.lower() if isinstance(exc, Exception) else "cancelled"
                ledger.record_request(name, images=len(images),
                                      duration_s=time.monotonic() - started, failure=reason)
            raise
        done = time.monotonic()
        ledger.record_request(name, images=len(images), duration_s=done - started,
                              output_s=done - built)
        return response

    async def ModelInfer(self, request, context):
        self.state.active += 1
        try:
            with self.state.limits.request(context.peer()):
                return await self.infer(request, context)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            await context.abort(grpc_status(exc), describe(exc))
        finally:
            self.state.active -= 1

    async def _stream_answer(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self.infer(request))
        except Exception as exc:  # noqa: BLE001 - reported in-stream; the stream goes on
            return self._stream_error(request, exc)

    @staticmethod
    def _stream_error(request: pb.ModelInferRequest, exc: BaseException) -> pb.ModelStreamInferResponse:
        """An in-stream error, "STATUS: message" (as the video API's), so clients can tell a
        stale frame (DEADLINE_EXCEEDED) from a draining server (UNAVAILABLE) or bad input."""
        if isinstance(exc, asyncio.CancelledError):
            message = "CANCELLED: stream closed"
        else:
            message = f"{grpc_status(exc).name}: {describe(exc)}"
        return pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional: one response per request, in order, each as soon as it is ready.
        At most ``stream_window`` requests of a stream run at once; beyond that the stream
        stops reading, and gRPC flow control slows the client down (policy ``wait``)."""
        async for response in serve_stream(self.state, "kserve", self._stream_answer,
                                           self._stream_error, request_iterator, context,
                                           policy="wait"):
            yield response


async def serve_stream(state: ServingState, api: str, process, failed, requests,
                       context: grpc.aio.ServicerContext, **window_options):
    """One streaming RPC through a StreamWindow (``process``/``failed`` per request; see
    ``pipeline.stream_window``): refused while draining, within the connection's limits,
    counted, and registered so the drain can stop it. A drained stream gets every request it
    read answered, then ends with UNAVAILABLE, so the client knows to reconnect and re-send."""
    if state.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
    peer = context.peer()

    async def within_limits(request):
        with state.limits.request(peer):
            return await process(request)

    window = StreamWindow(within_limits, failed, window=state.stream_window, **window_options)
    try:
        state.limits.acquire("streams", peer)
    except OverloadedError as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    state.ledger.stream_opened(api)
    state.active += 1
    state.streams.add(window)
    try:
        async for answer in window.run(requests):
            yield answer
        if window.stopped:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "server is shutting down: every request it read was answered; "
                                "reconnect (to another replica) and send the rest")
    finally:
        state.limits.release("streams", peer)
        state.streams.discard(window)
        state.ledger.stream_opened(api, -1)
        state.active -= 1
