"""A streaming call's life (``grpc_calls.serve_stream``) with a fake call context: a request
refused because the server is behind pauses the stream's reading for its retry-after."""

from __future__ import annotations

import asyncio
import time

from pipeline.errors import DeadlineError
from pipeline.frontends.grpc_calls import serve_stream
from pipeline.serving.state import ServingState
from pipeline.telemetry import Ledger


class FakeContext:
    def peer(self) -> str:
        return "ipv4:10.1.2.3:5555"

    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


async def requests(n):
    for i in range(n):
        yield i


def serve(process, n: int) -> list:
    """``n`` requests through ``serve_stream`` (window 1); refusals answered ("refused", i)."""
    async def main():
        state = ServingState({}, {}, Ledger(), stream_window=1)
        return [answer async for answer in serve_stream(
            state, "kserve", process, lambda r, e: ("refused", r), requests(n), FakeContext(),
            lambda r: "model")]

    return asyncio.run(asyncio.wait_for(main(), 10))


def test_a_refusal_with_a_retry_after_pauses_the_stream_then_it_goes_on():
    started: list[float] = []

    async def process(i):
        started.append(time.monotonic())
        if i == 0:
            raise DeadlineError("refused at once: the server is behind", retry_after_s=0.3)
        return i

    assert serve(process, 3) == [("refused", 0), 1, 2]  # every request answered, in order
    assert started[1] - started[0] >= 0.28  # the stream waited out the retry-after
    assert started[2] - started[1] < 0.1  # and then went on


def test_other_errors_do_not_pause_the_stream():
    started: list[float] = []

    async def process(i):
        started.append(time.monotonic())
        if i == 0:
            raise DeadlineError("waited 2.0 s in the queue")  # no retry-after: nothing to wait for
        return i

    assert serve(process, 2) == [("refused", 0), 1]
    assert started[1] - started[0] < 0.1
