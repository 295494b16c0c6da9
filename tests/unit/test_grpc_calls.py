"""A streaming RPC's calls (``grpc_calls.serve_stream`` over ``serving.life.run``) with a fake
call context: a call refused because the server is behind pauses the stream's reading for its
retry-after; every call is answered by its own ``fail`` when it fails, in order."""

from __future__ import annotations

import asyncio
import time

from pipeline.errors import BadInputError, DeadlineError
from pipeline.frontends.grpc_calls import serve_stream
from pipeline.serving.state import ServingState
from pipeline.telemetry import Ledger


class FakeContext:
    def peer(self) -> str:
        return "ipv4:10.1.2.3:5555"

    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


class FakeCall:
    """A call whose reading fails with ``error`` (the window reads it when it starts it)."""

    model = "model"
    api = "fake"

    def __init__(self, i: int, error: Exception, started: list[float]):
        self.i, self.error, self.started = i, error, started

    def read(self):
        self.started.append(time.monotonic())
        raise self.error

    def respond(self, answer):
        raise AssertionError("never read, never answered")

    def fail(self, error: BaseException):
        return (type(error).__name__, self.i)


def serve(errors: list[Exception]) -> tuple[list, list[float]]:
    """One call per error through ``serve_stream`` (window 1): the answers, the start times."""
    started: list[float] = []

    async def calls():
        for i, error in enumerate(errors):
            yield FakeCall(i, error, started)

    async def main():
        state = ServingState({"model": object()}, {}, Ledger(), stream_window=1)
        return [answer async for answer in serve_stream(state, "kserve", calls(), FakeContext())]

    return asyncio.run(asyncio.wait_for(main(), 10)), started


def test_a_refusal_with_a_retry_after_pauses_the_stream_then_it_goes_on():
    answers, started = serve([DeadlineError("refused at once: the server is behind", retry_after_s=0.3),
                              BadInputError("a bad frame"), BadInputError("another")])
    assert answers == [("DeadlineError", 0), ("BadInputError", 1), ("BadInputError", 2)]  # in order
    assert started[1] - started[0] >= 0.28  # the stream waited out the retry-after
    assert started[2] - started[1] < 0.1  # and then went on


def test_other_errors_do_not_pause_the_stream():
    answers, started = serve([DeadlineError("waited 2.0 s in the queue"), BadInputError("bad")])
    assert answers == [("DeadlineError", 0), ("BadInputError", 1)]  # no retry-after: nothing to wait for
    assert started[1] - started[0] < 0.1
