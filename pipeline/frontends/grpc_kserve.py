"""The Triton / KServe v2 gRPC service (``inference.GRPCInferenceService``) on grpc.aio.

A thin adapter, built on the messages tritonclient ships, so the official
``tritonclient.grpc`` client works unmodified: a message is read once into an
``InferRequest`` (``kserve.request_of``), run by ``inference.run``, and its ``Answer`` encoded
as a ``ModelInferResponse``. Errors become gRPC status codes through the one table in
``pipeline.errors``. Protobuf lives in the adapters, nowhere deeper.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ..errors import BadInputError, OverloadedError, describe, status_text
from ..serving.control import ModelControl
from ..serving.life import run
from ..serving.request import Answer, InferRequest
from ..serving.shared_memory import NO_CUDA, SharedMemory
from ..serving.state import VERSION, ServingState, client_of
from . import kserve
from .grpc_calls import answer_or_abort, grpc_status, serve_stream, unary_failure

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


def parameters_of(parameters) -> dict[str, Any]:
    """A message's (or a tensor's) parameters as plain Python values (str, int, float, bool)."""
    out = {}
    for key, p in parameters.items():
        kind = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, kind) if kind else None
    return out


def inputs_of(request: pb.ModelInferRequest, regions: SharedMemory,
              raw: Sequence[bytes | memoryview] | None = None) -> list[kserve.InputTensor]:
    """The message's inputs; raw_input_contents (``raw``, else the message's own), when given,
    holds one entry per input not in shared memory (as Triton requires), else an extra entry
    would be ignored or an input read from the wrong one."""
    params = [parameters_of(t.parameters) for t in request.inputs]
    in_message = [i for i, p in enumerate(params) if "shared_memory_region" not in p]
    raw = request.raw_input_contents if raw is None else raw
    if raw and len(raw) != len(in_message):
        raise BadInputError(f"{len(raw)} raw_input_contents for {len(in_message)} inputs not in shared "
                            "memory; send one per such input, in the inputs' order, or none")
    raw_of = dict(zip(in_message, raw))
    return [kserve.input_tensor(
        t.name, t.datatype, list(t.shape), params[i], regions, raw=raw_of.get(i),
        values=list(t.contents.bytes_contents) if t.datatype == "BYTES" else list(t.contents.uint_contents))
        for i, t in enumerate(request.inputs)]


def shared_outputs_of(message: pb.ModelInferRequest, regions: SharedMemory) -> kserve.SharedOutputs:
    return kserve.SharedOutputs([(o.name, parameters_of(o.parameters)) for o in message.outputs], regions)


def read_request(message: pb.ModelInferRequest, regions: SharedMemory, deadline: float | None = None,
                 raw: Sequence[bytes | memoryview] | None = None) -> InferRequest:
    """The message as the one typed request (BadInputError if unusable); ``raw``: its
    raw_input_contents where they were kept apart (``InferMessage``)."""
    params, inputs = parameters_of(message.parameters), inputs_of(message, regions, raw)
    outputs = [o.name for o in message.outputs]
    return kserve.request_of(message.model_name, message.model_version, params, inputs, outputs,
                             deadline)


def response_of(message: pb.ModelInferRequest, answer: Answer,
                shared: kserve.SharedOutputs | None = None) -> pb.ModelInferResponse:
    """The response message (JSON, polygons, tensors): CPU work, run off the event loop.
    Outputs written to shared memory come last, with no contents, so each other output's
    index still finds its raw_output_contents (tritonclient pairs them by position)."""
    response = pb.ModelInferResponse(model_name=answer.pipe.name, model_version=VERSION,
                                     id=message.id)
    placed = []
    for name, datatype, array in kserve.output_tensors(answer, [o.name for o in message.outputs]):
        if shared is not None and shared.place(name, array):
            placed.append((name, datatype, array.shape))
            continue
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(kserve.raw_contents(array))
    for name, datatype, shape in placed:
        response.outputs.add(name=name, datatype=datatype, shape=list(shape))
    return response


@dataclass(frozen=True)
class InferMessage:
    """A ``ModelInferRequest`` as it arrived (``read_infer_message``): its raw input contents
    as views of the received bytes, the rest of it parsed."""

    message: pb.ModelInferRequest
    raw: list[memoryview]


def read_infer_message(data: bytes) -> InferMessage:
    """The deserializer of ``ModelInfer`` and ``ModelStreamInfer``. Protobuf would copy each
    raw input into the message and again into every ``bytes`` read out of it: a 58 MB frame
    held three times. Here the raw inputs stay where gRPC put them, and only the rest (names,
    shapes, parameters: small) is parsed. A message that is not one raises (MessageGuard
    answers INVALID_ARGUMENT)."""
    rest, raw = split_field(data, RAW_INPUT_CONTENTS)
    return InferMessage(pb.ModelInferRequest.FromString(rest), raw)


# The deserializers that replace protobuf's (``MessageGuard`` applies them), by method.
READERS = {f"/{SERVICE}/ModelInfer": read_infer_message, f"/{SERVICE}/ModelStreamInfer": read_infer_message}


def split_field(data: bytes, number: int) -> tuple[bytes, list[memoryview]]:
    """A serialized message's top-level length-delimited field ``number``, each occurrence a
    view of ``data`` (no copy), and the message's other fields as bytes. ValueError when
    ``data`` is not protobuf's wire format."""
    view, rest, taken, at = memoryview(data), [], [], 0
    while at < len(view):
        key, after = _varint(view, at)
        kind = key & 7
        if kind == 0:
            _, end = _varint(view, after)
        elif kind in (1, 5):
            end = after + (8 if kind == 1 else 4)
        elif kind == 2:
            length, start = _varint(view, after)
            end = start + length
            if key >> 3 == number:
                taken.append(view[start:end])
        else:  # groups: no KServe message has them
            raise ValueError(f"wire type {kind} at byte {at}")
        if end > len(view):
            raise ValueError(f"a field at byte {at} runs past the message's end")
        if kind != 2 or key >> 3 != number:
            rest.append(view[at:end])
        at = end
    return b"".join(rest), taken


def _varint(view: memoryview, at: int) -> tuple[int, int]:
    """(value, where it ends) of the varint at ``at``."""
    value, shift = 0, 0
    while True:
        if at >= len(view) or shift > 63:
            raise ValueError("a varint runs past the message's end")
        byte = view[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


class KServeCall:
    """A ``ModelInferRequest`` as a ``serving.life.Call``: read once (its outputs bound for
    shared memory held from then on), answered as a ``ModelInferResponse``; its failure is
    the unary call's status."""

    api = "kserve_grpc"  # the books' name for the way it came in

    def __init__(self, received: InferMessage, regions: SharedMemory,
                 context: grpc.aio.ServicerContext | None = None, deadline: float | None = None):
        self.message, self.raw = received.message, received.raw
        self.regions, self.context, self.deadline = regions, context, deadline
        self.model = self.message.model_name
        self.shared: kserve.SharedOutputs | None = None

    def read(self) -> InferRequest:
        request = read_request(self.message, self.regions, self.deadline, self.raw)
        self.shared = shared_outputs_of(self.message, self.regions)
        return request

    def respond(self, answer: Answer) -> pb.ModelInferResponse:
        return response_of(self.message, answer, self.shared)

    def fail(self, error: BaseException) -> pb.ModelInferResponse:
        return unary_failure(self.context, error, pb.ModelInferResponse())


class KServeStreamCall(KServeCall):
    """One request of ``ModelStreamInfer``: its answer and its failure are stream messages;
    a failure is "STATUS: message" in ``error_message`` (as the video API's), so clients can
    tell a stale frame (DEADLINE_EXCEEDED) from a draining server (UNAVAILABLE) or bad input."""

    def respond(self, answer: Answer) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(infer_response=super().respond(answer))

    def fail(self, error: BaseException) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(
            error_message=status_text(error),
            infer_response=pb.ModelInferResponse(model_name=self.message.model_name, id=self.message.id))


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServingState, models: ModelControl):
        self.state = state
        self.models = models

    # Health and metadata ------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=kserve.server_ready(self.state))

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=kserve.model_ready(self.state, request.name, request.version))

    async def ServerMetadata(self, request, context):
        return kserve.server_metadata(self.state)

    async def ModelMetadata(self, request, context):
        return await answer_or_abort(context, lambda: kserve.model_metadata(
            self.state, request.name, request.version))

    async def ModelConfig(self, request, context):
        return await answer_or_abort(context, lambda: pb.ModelConfigResponse(
            config=kserve.model_config(self.state, request.name, request.version)))

    async def ModelStatistics(self, request, context):
        return await answer_or_abort(context, lambda: kserve.model_statistics(
            self.state, request.name, request.version))

    async def RepositoryIndex(self, request, context):
        return kserve.repository_index(self.state, request.ready)

    # Model control (Triton's repository extension) -------------------------------------

    async def RepositoryModelLoad(self, request, context):
        await self._control(context, self.models.load, request.model_name, request.parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._control(context, self.models.unload, request.model_name, {})
        return pb.RepositoryModelUnloadResponse()

    async def _control(self, context, change, name: str, parameters) -> None:
        try:
            kserve.no_overrides(parameters)
            await change(name)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving what it served
            await context.abort(grpc_status(exc), describe(exc))

    # Shared memory (Triton's extension; CUDA regions are not offered) ---------------------

    async def SystemSharedMemoryRegister(self, request, context):
        await answer_or_abort(context, lambda: self.state.shared_memory.register(
            client_of(context.peer()), request.name, request.key, request.offset, request.byte_size))
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        await answer_or_abort(context, lambda: self.state.shared_memory.unregister(request.name))
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        regions = await answer_or_abort(context, lambda: self.state.shared_memory.status(request.name))
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            response.regions[region["name"]].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    async def CudaSharedMemoryRegister(self, request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, NO_CUDA)

    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()  # nothing is registered

    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no CUDA shared memory region {request.name!r}")
        return pb.CudaSharedMemoryStatusResponse()

    # Inference ---------------------------------------------------------------------

    async def ModelInfer(self, request: InferMessage, context):
        """One message (as ``read_infer_message`` read it) through the shared request life. A
        gRPC deadline is the request's too: a request still queued then is answered
        DEADLINE_EXCEEDED, never run."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        client = client_of(context.peer())
        call = KServeCall(request, self.state.shared_memory, context, deadline)
        with self.state.in_progress():
            try:
                with self.state.limits.request(client):
                    return await run(self.state, call, client)
            except OverloadedError as exc:  # the client's limit, before the call began
                return call.fail(exc)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional: one response per request, in order, each as soon as it is ready.
        At most ``stream_window`` requests of a stream run at once; beyond that the stream
        stops reading, and gRPC flow control slows the client down (policy ``wait``)."""
        calls = (KServeStreamCall(message, self.state.shared_memory) async for message in request_iterator)
        async for response in serve_stream(self.state, "kserve", calls, context, policy="wait"):
            yield response
