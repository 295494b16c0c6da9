"""The Triton / KServe v2 gRPC service (``inference.GRPCInferenceService``) on grpc.aio.

A thin adapter: built on the messages tritonclient ships, so the official
``tritonclient.grpc`` client works unmodified. What the protocol carries is in
``pipeline.kserve`` (shared with the HTTP transport); a request's life is
``pipeline.serving.infer``; errors become gRPC status codes through the one table in
``pipeline.errors``. Protobuf lives in the adapters, nowhere deeper.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from . import kserve
from .errors import OverloadedError, PipelineError, status_of
from .postprocess import Detections, PostprocessOptions
from .serving import VERSION, ServingState, describe, end_sequence, infer, sequence_tracking
from .stream_window import StreamWindow

LOG = logging.getLogger(__name__)


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The gRPC code of any error, from the one table in ``pipeline.errors``."""
    return grpc.StatusCode[status_of(error).grpc]


def parameters_of(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The request's parameters as plain Python values (str, int, float, bool)."""
    out = {}
    for key, p in request.parameters.items():
        kind = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, kind) if kind else None
    return out


def inputs_of(request: pb.ModelInferRequest) -> list[kserve.InputTensor]:
    raw = request.raw_input_contents
    return [kserve.InputTensor(
        t.name, t.datatype, list(t.shape), raw=raw[i] if i < len(raw) else None,
        values=list(t.contents.bytes_contents) if t.datatype == "BYTES" else list(t.contents.uint_contents))
        for i, t in enumerate(request.inputs)]


def build_response(request: pb.ModelInferRequest, pipe, dets: list[Detections],
                   options: PostprocessOptions) -> pb.ModelInferResponse:
    """The response message (JSON, polygons, tensors): CPU work, run off the event loop."""
    response = pb.ModelInferResponse(model_name=pipe.name, model_version=VERSION, id=request.id)
    names = [o.name for o in request.outputs]
    for name, datatype, array in kserve.output_tensors(dets, names, pipe.class_names,
                                                       options.mask_format):
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(kserve.raw_contents(array))
    return response


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    async def _answer(self, context, build):
        try:
            return build()
        except PipelineError as exc:
            await context.abort(grpc_status(exc), describe(exc))

    # Health and metadata ------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=kserve.server_ready(self.state))

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=kserve.model_ready(self.state, request.name, request.version))

    async def ServerMetadata(self, request, context):
        return kserve.server_metadata()

    async def ModelMetadata(self, request, context):
        return await self._answer(context, lambda: kserve.model_metadata(
            self.state, request.name, request.version))

    async def ModelConfig(self, request, context):
        return await self._answer(context, lambda: pb.ModelConfigResponse(
            config=kserve.model_config(self.state, request.name, request.version)))

    async def ModelStatistics(self, request, context):
        return await self._answer(context, lambda: kserve.model_statistics(
            self.state, request.name, request.version))

    async def RepositoryIndex(self, request, context):
        return kserve.repository_index(self.state, request.ready)

    # Inference ---------------------------------------------------------------------

    async def infer(self, request: pb.ModelInferRequest,
                    context: grpc.aio.ServicerContext | None = None) -> pb.ModelInferResponse:
        """One request through the shared batcher; raises PipelineError on bad input.

        Triton's ``timeout`` parameter (microseconds) asks for a shorter queue timeout where
        the model's queue policy allows overrides; a gRPC deadline (``context``) is honoured
        too: a request still queued then is answered DEADLINE_EXCEEDED, never run."""
        remaining = context.time_remaining() if context is not None else None
        deadline = time.monotonic() + remaining if remaining is not None else None

        def read_images(pipe):
            kserve.requested_outputs([o.name for o in request.outputs])  # refuse before any work
            return kserve.images_of(inputs_of(request), pipe.max_batch_size)

        params = parameters_of(request)
        tracking = sequence_tracking(self.state, request.model_name, params)
        try:
            return await infer(self.state, request.model_name, request.model_version, params,
                               read_images,
                               lambda pipe, dets, options: build_response(request, pipe, dets, options),
                               deadline, tracking)
        finally:
            end_sequence(self.state, tracking, params)

    async def ModelInfer(self, request, context):
        with self.state.in_progress():
            try:
                with self.state.limits.request(context.peer()):
                    return await self.infer(request, context)
            except Exception as exc:  # noqa: BLE001 - the server keeps serving
                await context.abort(grpc_status(exc), describe(exc))

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
    state.streams.add(window)
    try:
        with state.in_progress():
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
