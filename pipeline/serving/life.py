"""One inference request's life, the same for every way in (gRPC KServe, gRPC video, HTTP,
cameras).

Each adapter reads its protocol's message ONCE into an ``InferRequest``; ``run`` reads it,
takes it through the shared batcher and the tracker, accounts for it once in the telemetry
ledger (unreadable requests too), and hands an ``Answer`` to the adapter's ``respond`` to
encode. This module knows nothing of gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from ..engine import Pipeline
from ..errors import BadInputError, InvalidOptionError, status_of
from ..tracking import Ticket
from .request import Answer, InferRequest, payload_bytes
from .state import ServingState

Response = TypeVar("Response")


async def run(state: ServingState, model: str, read: Callable[[], InferRequest],
              respond: Callable[[Answer], Response], client: str = "") -> Response:
    """One request through the shared batcher (and its stream's tracker), whatever its protocol.

    model: the model the message names, for the books even when it cannot be read.
    read(): the request, read from its protocol's message (BadInputError if unusable).
    respond(answer): the protocol's response, built in a worker thread (JSON, polygons and
    tensors are CPU work). client: who sent it (``client_of``), whose trackers it may use.
    A tracked request takes its place in its stream's order before this first awaits, so
    call ``run`` when the request arrives. Its bytes count against the server's budget
    until it is answered; its images' pixels together against ``MAX_REQUEST_PIXELS``.
    Every outcome, a request that cannot be read included, is recorded in the ledger once;
    PipelineErrors propagate for the frontend to map.
    """
    started = time.monotonic()
    ledger, tracks = state.ledger, state.tracks
    images: Sequence[Any] = ()
    ticket: Ticket | None = None
    ending = False
    held: Pipeline | None = None
    try:
        state.pipeline(model)  # an unknown model, or a draining server, is refused before reading
        request = read()
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
                                          deadline=request.deadline)
            except BaseException:
                if ticket is not None:
                    tracks.skip(ticket)
                raise
            if ticket is not None:
                found = [await tracks.assign(ticket, found[0], tracking.timestamp)]
            built = time.monotonic()
            response = await asyncio.to_thread(respond, Answer(pipe, list(found), options))
    except BaseException as exc:
        if model in state.pipelines:
            reason = status_of(exc).grpc.lower() if isinstance(exc, Exception) else "cancelled"
            ledger.record_request(model, images=len(images), duration_s=time.monotonic() - started,
                                  failure=reason)
        raise
    finally:
        if ending and ticket is not None:
            tracks.end_after(ticket)  # frames before it keep their ids, even if it failed
        if held is not None:
            held.held -= 1
    done = time.monotonic()
    ledger.record_request(model, images=len(images), duration_s=done - started,
                          output_s=done - built)
    return response
