"""What the gRPC services share: wire status codes from the one table in ``pipeline.errors``,
a streaming RPC's calls through a ``StreamWindow`` (limits, accounting, the drain), and the
``MessageGuard`` that answers unreadable messages and missing methods with a status."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from ..errors import OverloadedError, PipelineError, describe, status_of
from ..serving.life import Call, run
from ..serving.state import ServingState, client_of
from ..serving.stream_window import StreamWindow


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The gRPC code of any error, from the one table in ``pipeline.errors``."""
    return grpc.StatusCode[status_of(error).grpc]


def unary_failure(context: grpc.aio.ServicerContext, error: BaseException, empty):
    """A unary call's ``fail``: the error's status and message set on the call, ``empty`` (the
    method's response message, which the client never sees) returned."""
    context.set_code(grpc_status(error))
    context.set_details(describe(error))
    return empty


async def answer_or_abort(context: grpc.aio.ServicerContext, build):
    """``build()``'s answer (awaited when it is a coroutine); a PipelineError ends the call
    with its status and message."""
    try:
        answer = build()
        return await answer if inspect.isawaitable(answer) else answer
    except PipelineError as exc:
        await context.abort(grpc_status(exc), describe(exc))


async def serve_stream(state: ServingState, api: str, calls: AsyncIterator[Call],
                       context: grpc.aio.ServicerContext, **window_options):
    """One streaming RPC through a StreamWindow, each of its calls by ``serving.life.run``:
    refused while draining, within the client's limits, counted, and registered so the drain
    can stop it; the models its calls name count as in use until it ends. A call refused
    because the server is behind is answered at once and pauses the stream's reading for its
    retry-after (``run``'s ``hold``). A drained stream gets every call it read answered,
    then ends with UNAVAILABLE, so the client knows to reconnect and re-send."""
    if state.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
    client = client_of(context.peer())
    models: set[str] = set()

    async def within_limits(call: Call):
        if call.model not in models:
            models.add(call.model)
            state.ledger.model_stream_opened(call.model)
        with state.limits.request(client):
            return await run(state, call, client, hold=window.hold)

    window = StreamWindow(within_limits, _failed, window=state.stream_window, **window_options)
    try:
        state.limits.acquire("streams", client)
    except OverloadedError as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    state.ledger.stream_opened(api)
    state.streams.add(window)
    try:
        with state.in_progress():
            async for answer in window.run(calls):
                yield answer
            if window.stopped:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "server is shutting down: every request it read was answered; "
                                    "reconnect (to another replica) and send the rest")
    finally:
        state.limits.release("streams", client)
        state.streams.discard(window)
        state.ledger.stream_opened(api, -1)
        for model in models:
            state.ledger.model_stream_opened(model, -1)


def _failed(call: Call, error: BaseException):
    """A call the window answers itself (cancelled, refused by the limits, or stopped)."""
    return call.fail(error)


class _Unreadable:
    """What an undecodable message deserializes to: the handler answers INVALID_ARGUMENT."""

    def __init__(self, method: str, error: Exception):
        self.details = f"the message is not a valid request for {method} ({type(error).__name__})"


class MessageGuard(grpc.aio.ServerInterceptor):
    """A client's mistakes answered with a status and no traceback (grpc would log one per
    call, so a client could grow the log at will): an undecodable message is
    INVALID_ARGUMENT, a method of Triton's protocol this server does not implement (the
    generated servicer's NotImplementedError) is UNIMPLEMENTED. readers: deserializers that
    replace the generated ones, by method name (``grpc_kserve.READERS``)."""

    def __init__(self, readers: Mapping[str, Callable[[bytes], Any]] | None = None):
        self.readers = dict(readers or {})

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        read = self.readers.get(method, handler.request_deserializer)

        def deserialize(data: bytes):
            try:
                return read(data) if read is not None else data
            except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
                return _Unreadable(method, exc)

        async def checked(request, context):
            if isinstance(request, _Unreadable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            return request

        async def requests_of(iterator, context):
            async for request in iterator:
                yield await checked(request, context)

        async def unimplemented(context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")

        streaming_in = handler.request_streaming
        behavior = {(False, False): handler.unary_unary, (True, False): handler.stream_unary,
                    (False, True): handler.unary_stream, (True, True): handler.stream_stream}[
            (streaming_in, handler.response_streaming)]

        async def unary(request, context):
            request = requests_of(request, context) if streaming_in else await checked(request, context)
            try:
                answer = behavior(request, context)
                return await answer if inspect.isawaitable(answer) else answer
            except NotImplementedError:
                await unimplemented(context)

        async def streaming(request, context):
            request = requests_of(request, context) if streaming_in else await checked(request, context)
            try:
                answers = behavior(request, context)
                if inspect.isawaitable(answers):  # writes its answers itself (health's Watch)
                    await answers
                elif inspect.isasyncgen(answers):
                    try:
                        async for answer in answers:
                            yield answer
                    finally:
                        await answers.aclose()  # its own clean-up (limits, trackers) at once
                else:
                    for answer in answers:
                        yield answer
            except NotImplementedError:
                await unimplemented(context)

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(streaming_in, handler.response_streaming)]
        return make(streaming if handler.response_streaming else unary,
                    request_deserializer=deserialize, response_serializer=handler.response_serializer)
