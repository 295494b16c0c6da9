"""StreamWindow with fake work: order, the window, wait / drop_oldest, errors, cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.serving.stream_window import StreamWindow

from ..conftest import settle, until


class Work:
    """Fake per-request work: each request waits until released; records what ran."""

    def __init__(self, fail_on=None):
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.fail_on = fail_on
        self.running = 0
        self.most_running = 0

    def gate(self, request: int) -> asyncio.Event:
        return self.gates.setdefault(request, asyncio.Event())

    async def __call__(self, request: int) -> str:
        self.started.append(request)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate(request).wait()
            if request == self.fail_on:
                raise RuntimeError(f"broke on {request}")
            return f"done {request}"
        except asyncio.CancelledError:
            self.cancelled.append(request)
            raise
        finally:
            self.running -= 1


def failed(request, exc):
    return f"failed {request}: {type(exc).__name__}"


def dropped(request):
    return f"dropped {request}"


async def source(items, pause=None):
    for item in items:
        if pause is not None:
            await pause(item)
        yield item


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_every_request_answered_once_in_arrival_order_even_when_finished_out_of_order():
    async def main():
        work = Work()
        window = StreamWindow(work, failed, window=4)
        for r in (3, 1, 2, 0):  # finish in reverse-ish order
            work.gate(r).set()
        return [x async for x in window.run(source(range(4)))]

    assert run(main()) == ["done 0", "done 1", "done 2", "done 3"]


def test_at_most_window_run_at_once_and_wait_never_drops():
    async def main():
        work = Work()
        window = StreamWindow(work, failed, window=2, policy="wait")
        results = []

        async def release_all():
            for r in range(6):
                await until(lambda r=r: r in work.started)
                work.gate(r).set()

        releaser = asyncio.create_task(release_all())
        async for x in window.run(source(range(6))):
            results.append(x)
        await releaser
        return results, work

    results, work = run(main())
    assert results == [f"done {r}" for r in range(6)]
    assert work.most_running == 2


def test_wait_stops_reading_when_window_and_queue_are_full():
    async def main():
        work = Work()
        window = StreamWindow(work, failed, window=2, policy="wait")
        read = []

        async def note(item):
            read.append(item)

        results = window.run(source(range(10), pause=note))
        consumer = asyncio.create_task(results.__anext__())
        await until(lambda: len(read) == 4)
        await settle()  # ... and no more is read
        # 2 running + 2 waiting; the 5th is not read until there is room for it (a request in
        # hand could be lost if the stream were stopped meanwhile).
        state = (list(work.started), len(read), window.in_progress)
        work.gate(0).set()
        first = await consumer
        await results.aclose()
        return state, first

    (started, read, in_progress), first = run(main())
    assert started == [0, 1] and in_progress == 4 and read == 4
    assert first == "done 0"


def test_drop_oldest_drops_waiting_requests_never_running_ones_and_reports_each():
    async def main():
        work = Work()
        drops = []
        window = StreamWindow(work, failed, window=2, policy="drop_oldest", dropped=dropped,
                              on_drop=lambda: drops.append(1))
        all_read = asyncio.Event()

        async def pause(item):
            if item == 5:
                all_read.set()

        async def release_when_all_read():
            await all_read.wait()
            await until(lambda: window.in_progress == 6)  # the reader admitted request 5
            for r in range(6):
                work.gate(r).set()

        releaser = asyncio.create_task(release_when_all_read())
        results = [x async for x in window.run(source(range(6), pause))]
        await releaser
        return results, work.started, len(drops)

    results, started, drops = run(main())
    # 0 and 1 run; 2 and 3 wait and are pushed out by 4 and 5, the freshest frames.
    assert results == ["done 0", "done 1", "dropped 2", "dropped 3", "done 4", "done 5"]
    assert started == [0, 1, 4, 5] and drops == 2


def test_an_error_answers_its_request_and_the_stream_goes_on():
    async def main():
        work = Work(fail_on=1)
        for r in range(3):
            work.gate(r).set()
        window = StreamWindow(work, failed, window=2)
        return [x async for x in window.run(source(range(3)))]

    assert run(main()) == ["done 0", "failed 1: RuntimeError", "done 2"]


def test_a_consumer_leaving_cancels_running_work_and_starts_nothing_more():
    async def main():
        work = Work()
        work.gate(0).set()
        window = StreamWindow(work, failed, window=2)
        results = window.run(source(range(8)))
        first = await results.__anext__()
        await until(lambda: work.started == [0, 1, 2])
        await results.aclose()  # the client goes away
        await until(lambda: work.running == 0)
        await settle()
        return first, work

    first, work = run(main())
    assert first == "done 0"
    assert work.started == [0, 1, 2]  # nothing started after the consumer left
    assert sorted(work.cancelled) == [1, 2] and work.running == 0


def test_a_broken_request_source_raises_after_earlier_requests_are_answered():
    async def broken():
        yield 0
        raise ConnectionError("client vanished")

    async def main():
        work = Work()
        work.gate(0).set()
        window = StreamWindow(work, failed, window=2)
        seen = []
        with pytest.raises(ConnectionError):
            async for x in window.run(broken()):
                seen.append(x)
        return seen

    assert run(main()) == ["done 0"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="window"):
        StreamWindow(Work(), failed, window=0)
    with pytest.raises(ValueError, match="policy"):
        StreamWindow(Work(), failed, window=1, policy="fifo")
    with pytest.raises(ValueError, match="dropped"):
        StreamWindow(Work(), failed, window=1, policy="drop_oldest")


def test_stop_answers_what_was_read_and_ends_the_stream():
    async def main():
        work = Work()
        window = StreamWindow(work, failed, window=2)
        results = []

        async def endless():
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0)

        async def consume():
            async for x in window.run(endless()):
                results.append(x)

        consumer = asyncio.create_task(consume())
        await until(lambda: work.started == [0, 1] and window.in_progress == 4)
        await settle()  # 0 and 1 running, 2 and 3 waiting, reading blocked
        window.stop(RuntimeError("draining"))
        work.gate(0).set()
        work.gate(1).set()
        await asyncio.wait_for(consumer, 5)
        return results, work.started, window.stopped

    results, started, stopped = run(main())
    assert stopped and started == [0, 1]  # nothing started after the stop
    assert results == ["done 0", "done 1", "failed 2: RuntimeError", "failed 3: RuntimeError"]


def test_hold_pauses_starting_and_reading_then_resumes_and_a_drain_answers_what_was_held():
    started: list[tuple[int, float]] = []

    async def main():
        window = None

        async def process(i):
            started.append((i, time.monotonic()))
            if i == 0:
                window.hold(0.3)  # e.g. refused: the server is behind
            return i

        window = StreamWindow(process, lambda r, e: ("failed", r), window=1)
        t0 = time.monotonic()
        results = [r async for r in window.run(source(range(3)))]
        return results, t0

    results, t0 = asyncio.run(main())
    assert results == [0, 1, 2]
    assert started[1][1] - t0 >= 0.28  # the next one waited out the hold
    assert started[2][1] - started[1][1] < 0.1  # then the stream went on at once

    async def drained():
        window = None

        async def process(i):
            if i == 0:
                window.hold(30)
                asyncio.get_running_loop().call_later(0.1, window.stop, RuntimeError("draining"))
            return i

        window = StreamWindow(process, lambda r, e: ("failed", r), window=1)
        return [r async for r in window.run(source(range(2)))]

    assert asyncio.run(asyncio.wait_for(drained(), 5)) == [0, ("failed", 1)]
