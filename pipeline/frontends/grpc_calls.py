"""What the gRPC services share: wire status codes from the one table in ``pipeline.errors``,
a streaming call's life through a ``StreamWindow`` (limits, accounting, the drain), and the
``MessageGuard`` that answers unreadable messages and missing methods with a status."""

from __future__ import annotations

import inspect

import grpc

from ..errors import DeadlineError, OverloadedError, PipelineError, describe, status_of
from ..serving.state import ServingState, client_of
from ..serving.stream_window import StreamWindow


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The gRPC code of any error, from the one table in ``pipeline.errors``."""
    return grpc.StatusCode[status_of(error).grpc]


async def answer_or_abort(context: grpc.aio.ServicerContext, build):
    """``build()``'s answer (awaited when it is a coroutine); a PipelineError ends the call
    with its status and message."""
    try:
        answer = build()
        return await answer if inspect.isawaitable(answer) else answer
    except PipelineError as exc:
        await context.abort(grpc_status(exc), describe(exc))


async def serve_stream(state: ServingState, api: str, process, failed, requests,
                       context: grpc.aio.ServicerContext, model_of, **window_options):
    """One streaming RPC through a StreamWindow (``process``/``failed`` per request; see
    ``stream_window``): refused while draining, within the client's limits, counted, and
    registered so the drain can stop it; the models its requests name (``model_of``) count
    as in use until it ends. A request refused because the server is behind answers at
    once and pauses the stream's reading for its retry-after, so a client that sends again
    the moment it hears cannot turn refusals into a flood that starves the network. A
    drained stream gets every request it read answered, then ends with UNAVAILABLE, so the
    client knows to reconnect and re-send."""
    if state.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
    client = client_of(context.peer())
    models: set[str] = set()

    async def within_limits(request):
        model = model_of(request)
        if model not in models:
            models.add(model)
            state.ledger.model_stream_opened(model)
        with state.limits.request(client):
            try:
                return await process(request)
            except DeadlineError as exc:
                if exc.retry_after_s:
                    window.hold(exc.retry_after_s)
                raise

    window = StreamWindow(within_limits, failed, window=state.stream_window, **window_options)
    try:
        state.limits.acquire("streams", client)
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
        state.limits.release("streams", client)
        state.streams.discard(window)
        state.ledger.stream_opened(api, -1)
        for model in models:
            state.ledger.model_stream_opened(model, -1)


class _Unreadable:
    """What an undecodable message deserializes to: the handler answers INVALID_ARGUMENT."""

    def __init__(self, method: str, error: Exception):
        self.details = f"the message is not a valid request for {method} ({type(error).__name__})"


class MessageGuard(grpc.aio.ServerInterceptor):
    """A client's mistakes answered with a status and no traceback (grpc would log one per
    call, so a client could grow the log at will): an undecodable message is
    INVALID_ARGUMENT, a method of Triton's protocol this server does not implement (the
    generated servicer's NotImplementedError) is UNIMPLEMENTED."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method, read = details.method, handler.request_deserializer

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
