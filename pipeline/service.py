"""The Triton / KServe v2 gRPC service (``inference.GRPCInferenceService``) on grpc.aio.

Built on the messages tritonclient ships, so the official ``tritonclient.grpc`` client works
unmodified. This is the adapter layer: protobuf lives here and in ``streaming``, nowhere
deeper; pipeline errors become gRPC status codes in ``status_of`` and nowhere else.

The pipeline model (``instance_segmentation``) takes ``IMAGE``: BYTES [B, 1] (encoded images)
or UINT8 [B, H, W, 3] (raw RGB), and request parameters ``response_mask_format`` ("rle" or
"polygon"), ``confidence``, ``iou_threshold``, ``max_detections``. It returns ``DETECTIONS``
(BYTES [B, 1], one JSON document per image) and typed tensors padded to the most detections
K in the request: NUM_DETECTIONS INT32 [B, 1], BOXES FP32 [B, K, 4] (x1, y1, x2, y2),
SCORES FP32 [B, K], CLASS_IDS INT32 [B, K], RLE_COUNTS BYTES [B, K], IMAGE_SIZE INT32 [B, 2].
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from . import schema
from .schema import OUTPUTS, output_arrays
from .engine import Pipeline
from .errors import (
    BadInputError,
    ConfigError,
    NotFoundError,
    OverloadedError,
    PipelineError,
    ShuttingDownError,
)
from .images import check_image_size
from .metrics import Metrics
from .postprocess import Detections

LOG = logging.getLogger(__name__)
SERVER_NAME = "rle-serving"
SERVER_VERSION = "0.1.0"
VERSION = "1"
INPUT = "IMAGE"
PARAMETERS = ("response_mask_format", "confidence", "iou_threshold", "max_detections")


def status_of(error: BaseException) -> grpc.StatusCode:
    """The one place where pipeline errors become gRPC status codes."""
    if isinstance(error, BadInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, ShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, ConfigError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def describe(error: BaseException) -> str:
    if isinstance(error, PipelineError):
        return str(error)
    LOG.exception("unexpected error while serving", exc_info=error)
    return f"internal error: {type(error).__name__}: {error}"


@dataclass
class ModelCounters:
    """Per-model totals for ModelStatistics (durations in nanoseconds)."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    inferences: int = 0
    compute_output_ns: int = 0


@dataclass
class ServingState:
    """What the services share: the loaded pipelines, metrics, and whether we are draining."""

    repository_root: str
    pipelines: dict[str, Pipeline]
    unavailable: dict[str, str]  # model name -> why it is not served directly
    metrics: Metrics
    stream_window: int = 8
    stream_policy: str = "wait"
    draining: bool = False
    counters: dict[str, ModelCounters] = field(default_factory=dict)
    active: int = 0  # unary requests and streams in progress, for the drain

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


def parameter(request: pb.ModelInferRequest, key: str):
    if key not in request.parameters:
        return None
    p = request.parameters[key]
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def options_of(request: pb.ModelInferRequest) -> tuple[str, dict]:
    mask_format = parameter(request, "response_mask_format") or "rle"
    schema.check_mask_format(str(mask_format))
    options = {}
    for key, convert in (("confidence", float), ("iou_threshold", float), ("max_detections", int)):
        value = parameter(request, key)
        if value is None:
            continue
        try:
            options[key] = convert(value)
        except (TypeError, ValueError):
            raise BadInputError(f"parameter {key!r} must be a number, got {value!r}") from None
    return str(mask_format), options


def build_response(request: pb.ModelInferRequest, pipe: Pipeline, dets: list[Detections],
                   mask_format: str) -> pb.ModelInferResponse:
    requested = [o.name for o in request.outputs] or list(OUTPUTS)
    unknown = [n for n in requested if n not in OUTPUTS]
    if unknown:
        raise BadInputError(f"unknown output(s) {unknown}; the model offers {list(OUTPUTS)}")
    arrays = output_arrays(dets, requested, lambda d: pipe.document(d, mask_format))
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
            await context.abort(status_of(exc), describe(exc))
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
            await context.abort(status_of(exc), describe(exc))
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
                pipe = self.state.lookup(name, request.version)
            except PipelineError as exc:
                await context.abort(status_of(exc), describe(exc))
            c = self.state.counters.setdefault(name, ModelCounters())
            stats = pipe.batcher.stats
            clock = pipe.clock.seconds
            s = response.model_stats.add(
                name=name, version=VERSION, last_inference=stats.last_inference_ms,
                inference_count=stats.requests, execution_count=stats.batches,
            )
            s.inference_stats.success.count, s.inference_stats.success.ns = c.success, c.success_ns
            s.inference_stats.fail.count, s.inference_stats.fail.ns = c.fail, c.fail_ns
            s.inference_stats.queue.count, s.inference_stats.queue.ns = stats.requests, stats.queue_ns
            s.inference_stats.compute_input.count = c.inferences
            s.inference_stats.compute_input.ns = int(clock.get("preprocess", 0) * 1e9)
            s.inference_stats.compute_infer.count = stats.requests
            s.inference_stats.compute_infer.ns = stats.compute_ns
            s.inference_stats.compute_output.count = c.inferences
            s.inference_stats.compute_output.ns = c.compute_output_ns
            for size, count in sorted(stats.batch_sizes.items()):
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

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One request through the shared batcher; raises PipelineError on bad input."""
        started = time.monotonic_ns()
        name = request.model_name
        labels = (name, VERSION)
        try:
            pipe = self.state.pipeline(name, request.model_version)
            mask_format, options = options_of(request)
            images = images_of(request, pipe.max_batch_size)
            self.state.metrics.pending.labels(*labels).inc(len(images))
            try:
                dets = await asyncio.gather(*(pipe.submit(img, **options) for img in images))
            finally:
                self.state.metrics.pending.labels(*labels).dec(len(images))
            built = time.monotonic_ns()
            response = build_response(request, pipe, list(dets), mask_format)
        except BaseException as exc:
            if name in self.state.pipelines:
                c = self.state.counters.setdefault(name, ModelCounters())
                c.fail += 1
                c.fail_ns += time.monotonic_ns() - started
                reason = status_of(exc).name.lower() if isinstance(exc, Exception) else "cancelled"
                self.state.metrics.request_failure.labels(*labels, reason).inc()
            raise
        done = time.monotonic_ns()
        c = self.state.counters.setdefault(name, ModelCounters())
        c.success += 1
        c.success_ns += done - started
        c.inferences += len(images)
        c.compute_output_ns += done - built
        m = self.state.metrics
        m.request_success.labels(*labels).inc()
        m.inference_count.labels(*labels).inc(len(images))
        m.request_duration_us.labels(*labels).inc((done - started) / 1e3)
        m.compute_output_us.labels(*labels).inc((done - built) / 1e3)
        return response

    async def ModelInfer(self, request, context):
        self.state.active += 1
        try:
            return await self.infer(request)
        except PipelineError as exc:
            await context.abort(status_of(exc), describe(exc))
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            await context.abort(grpc.StatusCode.INTERNAL, describe(exc))
        finally:
            self.state.active -= 1

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional: one response per request, in order, each as soon as it is ready.
        At most ``stream_window`` requests of a stream are in flight; beyond that the stream
        stops reading, and gRPC flow control slows the client down."""
        if self.state.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        self.state.active += 1
        gauge = self.state.metrics.streams_open.labels("kserve")
        gauge.inc()
        window = asyncio.Semaphore(self.state.stream_window)
        ordered: asyncio.Queue = asyncio.Queue()

        async def run(request):
            try:
                return pb.ModelStreamInferResponse(infer_response=await self.infer(request))
            except Exception as exc:  # noqa: BLE001 - reported in-stream; the stream goes on
                return pb.ModelStreamInferResponse(
                    error_message=describe(exc),
                    infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                         id=request.id),
                )
            finally:
                window.release()

        async def read():
            try:
                async for request in request_iterator:
                    await window.acquire()
                    await ordered.put(asyncio.create_task(run(request)))
            finally:
                await ordered.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await ordered.get()) is not None:
                yield await task
        finally:
            reader.cancel()
            gauge.dec()
            self.state.active -= 1
