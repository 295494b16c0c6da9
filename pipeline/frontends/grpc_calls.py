"""What the gRPC services share: wire status codes from the one table in ``pipeline.errors``,
and a streaming call's life through a ``StreamWindow`` (limits, accounting, the drain)."""

from __future__ import annotations

import grpc

from ..errors import OverloadedError, status_of
from .inference import ServingState
from .stream_window import StreamWindow


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The gRPC code of any error, from the one table in ``pipeline.errors``."""
    return grpc.StatusCode[status_of(error).grpc]


async def serve_stream(state: ServingState, api: str, process, failed, requests,
                       context: grpc.aio.ServicerContext, model_of, **window_options):
    """One streaming RPC through a StreamWindow (``process``/``failed`` per request; see
    ``stream_window``): refused while draining, within the connection's limits, counted, and
    registered so the drain can stop it; the models its requests name (``model_of``) count
    as in use until it ends. A drained stream gets every request it read answered, then
    ends with UNAVAILABLE, so the client knows to reconnect and re-send."""
    if state.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
    peer = context.peer()
    models: set[str] = set()

    async def within_limits(request):
        model = model_of(request)
        if model not in models:
            models.add(model)
            state.model_streams[model] += 1
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
        for model in models:
            state.model_streams[model] -= 1
