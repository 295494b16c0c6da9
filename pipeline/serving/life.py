"""One inference request's life, the same for every way in (gRPC KServe, gRPC video, HTTP,
cameras).

Every adapter holds a request as a ``Call``: ``read()`` reads its protocol's message ONCE into
an ``InferRequest``, ``respond(answer)`` encodes what it got, ``fail(error)`` encodes an error
(a gRPC status, an in-stream error, an HTTP error document, a camera's error result). ``run``
takes a call through the shared batcher and its stream's tracker, accounts for it once in the
telemetry ledger (unreadable requests too), and returns what ``respond`` or ``fail`` made.
This module knows nothing of gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from ..engine import Pipeline
from ..errors import BadInputError, DeadlineError, InvalidOptionError, status_of
from ..tracking import Ticket
from .request import Answer, InferRequest, payload_bytes
from .state import ServingState

Response = TypeVar("Response", covariant=True)


class Call(Protocol[Response]):
    """One request as its adapter holds it.

    model: the model its message names, for the books even when it cannot be read.
    api: the way it came in, for the books (``Ledger.requests_by_api``).
    read(): the request, read from the message (BadInputError if unusable); called once.
    respond(answer): the protocol's response, built in a worker thread (JSON, polygons and
    tensors are CPU work). fail(error): the protocol's answer to ``error``, on the event
    loop: a PipelineError, one of our own faults, or (for a call of a stream that was
    cancelled or stopped before it ran) a CancelledError or ShuttingDownError."""

    model: str
    api: str

    def read(self) -> InferRequest: ...

    def respond(self, answer: Answer) -> Response: ...

    def fail(self, error: BaseException) -> Response: ...


async def run(state: ServingState, call: Call[Response], client: str = "", *,
              hold: Callable[[float], None] | None = None) -> Response:
    """One call through the shared batcher (and its stream's tracker), whatever its protocol:
    its response, or its failure as ``call.fail`` answers it. Only a cancellation propagates.

    client: who sent it (``client_of``), whose trackers it may use. hold(seconds): for a call
    of a stream, pauses the stream's reading when the call is refused because the server is
    behind (a ``DeadlineError`` with ``retry_after_s``), so a client that sends again the
    moment it hears cannot turn refusals into a flood. A tracked request takes its place in
    its stream's order before this first awaits, so call ``run`` when the request arrives.
    Its bytes count against the server's budget until it is answered; its images' pixels
    together against ``MAX_REQUEST_PIXELS``. Every outcome, a request that cannot be read
    included, is recorded in the ledger once.
    """
    model = call.model
    started = time.monotonic()
    ledger, tracks = state.ledger, state.tracks
    images: Sequence[Any] = ()
    ticket: Ticket | None = None
    ending = False
    held: Pipeline | None = None
    try:
        state.pipeline(model)  # an unknown model, or a draining server, is refused before reading
        request = call.read()
        images, tracking = request.images, request.tracking
        pipe = state.lookup(request.model, request.version)
        pipe.held += 1  # this version answers this request, whatever is loaded meanwhile
        held = pipe
        if len(images) > pipe.max_batch_size:
            raise BadInputError(f"batch of {len(images)} exceeds the model's max_batch_size "
                                f"{pipe.max_batch_size}")
        options = replace(pipe.defaults, **request.options)
        with state.limits.holding(payload_bytes(images)):
            if tracking is not None:
                if len(images) != 1:
                    raise InvalidOptionError("sequence_id", f"a tracked request carries one image, got {len(images)}")
                slot, ending = tracking.slot(client), tracking.end
                if tracking.restart:
                    tracks.end(slot)
                ticket = tracks.ticket(slot, tracking.options, client)
            try:
                found = await pipe.submit(images, options, timeout_s=request.timeout_s,
                                          deadline=request.deadline, lane=request.lane)
            except BaseException:
                if ticket is not None:
                    tracks.skip(ticket)
                raise
            if ticket is not None:
                found = [await tracks.assign(ticket, found[0], tracking.timestamp)]
            built = time.monotonic()
            response = await asyncio.to_thread(call.respond, Answer(pipe, list(found), options))
    except BaseException as exc:
        if model in state.pipelines:
            reason = status_of(exc).grpc.lower() if isinstance(exc, Exception) else "cancelled"
            ledger.record_request(model, images=len(images), duration_s=time.monotonic() - started,
                                  failure=reason, api=call.api)
        if not isinstance(exc, Exception):
            raise
        if hold is not None and isinstance(exc, DeadlineError) and exc.retry_after_s:
            hold(exc.retry_after_s)
        return call.fail(exc)  # every error is the call's to answer
    finally:
        if ending and ticket is not None:
            tracks.end_after(ticket)  # frames before it keep their ids, even if it failed
        if held is not None:
            held.held -= 1
    done = time.monotonic()
    ledger.record_request(model, images=len(images), duration_s=done - started,
                          output_s=done - built, api=call.api)
    return response
