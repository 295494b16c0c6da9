"""``FrameQueue``: a decoding thread's frames to one consumer on an event loop (see
``pipeline.cameras.sources``). Real threads and a real loop; no media."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pipeline.cameras.sources import CapturedFrame, FrameQueue
from pipeline.errors import BadInputError

from ..conftest import settle, until, wait_until, waiting_in


def frame(index: int) -> CapturedFrame:
    return CapturedFrame(index, index / 10, time.time(), np.zeros((2, 2, 3), np.uint8))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def read_all(queue: FrameQueue) -> list[int]:
    return [f.index async for f in queue]


def test_drop_oldest_never_blocks_keeps_the_newest_and_counts_each_drop():
    drops = []
    queue = FrameQueue(3, drop_oldest=True, on_drop=lambda old: drops.append((old.index, threading.get_ident())))
    assert all(queue.put(frame(i)) for i in range(10))
    queue.close()
    assert run(read_all(queue)) == [7, 8, 9]
    assert [index for index, _ in drops] == list(range(7))  # each dropped frame, oldest first
    assert {thread for _, thread in drops} == {threading.get_ident()}  # told from the putting thread


def test_waiting_put_blocks_while_full_and_goes_on_as_the_consumer_reads():
    queue = FrameQueue(2, drop_oldest=False, on_drop=lambda frame: pytest.fail("a waiting queue drops nothing"))
    put = []

    def producer():
        for i in range(6):
            put.append((i, queue.put(frame(i))))
        queue.close()

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    wait_until(lambda: waiting_in(thread, "put"))  # times out if a put never waits
    assert len(put) == 2  # the third waits for room
    assert run(read_all(queue)) == list(range(6))
    thread.join(5)
    assert [accepted for _, accepted in put] == [True] * 6


def test_close_wakes_a_blocked_put_and_the_reader_still_gets_what_waits():
    queue = FrameQueue(1, drop_oldest=False, on_drop=lambda frame: None)
    assert queue.put(frame(0))
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(queue.put(frame(1))), daemon=True)
    thread.start()
    wait_until(lambda: waiting_in(thread, "put"))  # blocked while full, before the close
    assert outcome == []
    queue.close()
    thread.join(1)
    assert outcome == [False]
    assert queue.put(frame(2)) is False
    assert run(read_all(queue)) == [0]


def test_a_waiting_reader_is_woken_by_a_put_from_another_thread_and_by_close():
    queue = FrameQueue(4, drop_oldest=True, on_drop=lambda frame: None)
    got = []

    async def reader():
        async for f in queue:
            got.append(f.index)

    async def main():
        loop = asyncio.get_running_loop()
        reading = asyncio.ensure_future(reader())
        await settle()
        assert not reading.done() and got == []  # the reader waits on an empty queue
        await loop.run_in_executor(None, queue.put, frame(5))
        await until(lambda: got == [5])  # woken by the put: the queue is still open
        assert not reading.done()
        await loop.run_in_executor(None, queue.close)
        await asyncio.wait_for(reading, 5)  # woken by the close: the loop ends

    run(main())
    assert got == [5]


def test_a_reader_cancelled_while_waiting_leaves_the_queue_usable():
    # The anti-pattern of Ray Serve's batcher: a result set on a future its waiter cancelled.
    queue = FrameQueue(2, drop_oldest=True, on_drop=lambda frame: None)

    async def main():
        waiting = asyncio.ensure_future(queue.__anext__())
        await settle()
        assert not waiting.done()  # the reader waits on an empty queue
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        queue.put(frame(1))  # wakes the cancelled future: must not raise on the loop
        await settle()  # the wake-up (a callback on the loop) has run, and raised nothing
        queue.close()
        return await read_all(queue)

    errors = []

    def record(loop, context):
        errors.append(context)

    async def checked():
        asyncio.get_running_loop().set_exception_handler(record)
        return await main()

    assert run(checked()) == [1]
    assert errors == []


def test_a_put_after_the_readers_loop_closed_is_harmless():
    queue = FrameQueue(2, drop_oldest=True, on_drop=lambda frame: None)
    loop = asyncio.new_event_loop()
    waiting = loop.create_task(queue.__anext__())
    loop.run_until_complete(settle())
    assert not waiting.done()  # the reader now waits
    waiting.cancel()
    loop.run_until_complete(asyncio.gather(waiting, return_exceptions=True))
    assert waiting.cancelled()
    loop.close()
    assert queue.put(frame(0)) is True  # the wake-up has no loop to go to, and is dropped


def test_a_queue_holds_at_least_one_frame():
    with pytest.raises(BadInputError, match="at least one"):
        FrameQueue(0, drop_oldest=True, on_drop=lambda frame: None)
