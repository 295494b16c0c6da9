"""DynamicBatcher with fake batch functions: grouping, delays, cancellation, errors, overload."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pipeline.batcher import DynamicBatcher, QueuePolicy
from pipeline.errors import DeadlineError, ModelError, OverloadedError, ShuttingDownError

from ..conftest import until


class Recorder:
    """A fake model: doubles each item, remembers the batches it saw. ``entered`` is set when
    a batch reaches it; ``release`` (when cleared) holds batches there."""

    def __init__(self, delay: float = 0.0, fail_on=None):
        self.batches: list[list] = []
        self.delay = delay
        self.fail_on = fail_on
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    async def running(self) -> None:
        """Until a batch is inside the model."""
        await asyncio.to_thread(self.entered.wait, 5)

    def __call__(self, pairs, stages):
        self.entered.set()
        self.release.wait(5)
        stages["network"] = self.delay
        items = [item for _, item in pairs]
        self.batches.append(items)
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"model broke on {self.fail_on}")
        return [(i, item * 2) for i, item in reversed(pairs)]  # any order: matched by id


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_grouped_and_each_gets_its_own_result():
    model = Recorder(delay=0.01)

    async def main():
        reports = []
        b = DynamicBatcher(model, max_batch_size=4, max_delay_s=0.05, report=reports.append)
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.close()
        return results, reports

    results, reports = run(main())
    assert results == [i * 2 for i in range(10)]
    assert all(len(batch) <= 4 for batch in model.batches)
    assert sorted(x for batch in model.batches for x in batch) == list(range(10))
    assert len(model.batches) <= 4  # grouped, not one by one
    # One report per executed batch: its size, one wait per request, the stages it timed.
    assert [r.size for r in reports] == [len(batch) for batch in model.batches]
    assert all(len(r.waits_s) == r.size and r.stages == {"network": 0.01} for r in reports)
    assert not any(r.failed for r in reports) and all(r.compute_s >= 0.01 for r in reports)


def test_a_lone_request_waits_at_most_the_delay():
    model = Recorder()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=0.05)
        start = time.monotonic()
        result = await b.submit(21)
        elapsed = time.monotonic() - start
        await b.close()
        return result, elapsed

    result, elapsed = run(main())
    assert result == 42 and model.batches == [[21]]
    assert 0.04 <= elapsed < 1.0


def test_preferred_size_is_sent_without_waiting_for_the_delay():
    model = Recorder()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=5.0, preferred_sizes=[2])
        start = time.monotonic()
        await asyncio.gather(b.submit(1), b.submit(2))
        elapsed = time.monotonic() - start
        await b.close()
        return elapsed

    assert run(main()) < 2.0
    assert model.batches == [[1, 2]]


def test_cancelled_requests_never_reach_the_model_and_do_not_poison_the_batch():
    model = Recorder()
    model.release.clear()  # hold the first batch so the rest queue up

    async def main():
        b = DynamicBatcher(model, max_batch_size=4, max_delay_s=0.01)
        first = asyncio.create_task(b.submit(0))
        await model.running()  # batch [0] is now running, blocked in the model
        doomed = asyncio.create_task(b.submit(99))
        kept = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await until(lambda: b.queued == 3)
        doomed.cancel()
        model.release.set()
        results = await asyncio.gather(first, *kept)
        await b.close()
        return results, doomed

    results, doomed = run(main())
    assert results == [0, 2, 4]
    assert doomed.cancelled()
    assert 99 not in [x for batch in model.batches for x in batch]


def test_a_client_cancelling_mid_batch_does_not_break_the_loop():
    model = Recorder(delay=0.1)

    async def main():
        b = DynamicBatcher(model, max_batch_size=2, max_delay_s=0.001)
        task = asyncio.create_task(b.submit(1))
        await model.running()
        task.cancel()  # its batch finishes after this: a result for a cancelled future
        after = await asyncio.wait_for(b.submit(5), 5)  # the batching loop is still alive
        await b.close()
        return after

    assert run(main()) == 10


def test_an_exception_reaches_every_request_of_its_batch_only():
    model = Recorder(fail_on=3)

    async def main():
        reports = []
        b = DynamicBatcher(model, max_batch_size=4, max_delay_s=0.05, report=reports.append)
        results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        later = await b.submit(7)
        await b.close()
        return results, later, reports

    results, later, reports = run(main())
    assert all(isinstance(r, RuntimeError) and "broke on 3" in str(r) for r in results)
    assert later == 14
    assert [(r.size, r.failed) for r in reports] == [(4, True), (1, False)]


def test_results_are_checked_by_id_not_by_count():
    def wrong_ids(pairs, stages):
        return [(i + 1000, item) for i, item in pairs]

    async def main():
        b = DynamicBatcher(wrong_ids, max_batch_size=2, max_delay_s=0.01)
        out = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        await b.close()
        return out

    out = run(main())
    assert all(isinstance(e, ModelError) and "ids" in str(e) for e in out)


def test_full_queue_is_an_immediate_overloaded_error():
    model = Recorder()
    model.release.clear()

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, max_queue_size=2)
        running = asyncio.create_task(b.submit(0))
        await model.running()
        queued = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await until(lambda: b.queued == 2)
        with pytest.raises(OverloadedError, match="max_queue_size 2"):
            await b.submit(3)
        model.release.set()
        results = await asyncio.gather(running, *queued)
        await b.close()
        return results

    assert run(main()) == [0, 2, 4]


def test_close_drains_then_refuses():
    model = Recorder(delay=0.02)

    async def main():
        b = DynamicBatcher(model, max_batch_size=2, max_delay_s=0.01)
        pending = [asyncio.create_task(b.submit(i)) for i in range(5)]
        await asyncio.sleep(0)
        await b.close(drain=True)
        with pytest.raises(ShuttingDownError):
            await b.submit(9)
        return [p.result() for p in pending]

    assert run(main()) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("drain", [True, False])
def test_close_while_a_batch_gathers_answers_its_requests(drain):
    """A lone request waits up to the delay for company, out of the queue and not yet in
    flight: a drain serves it, a close without one answers it ShuttingDownError; never a
    caller left waiting for good."""
    model = Recorder()

    async def main():
        b = DynamicBatcher(model, max_batch_size=4, max_delay_s=1.0)
        pending = asyncio.create_task(b.submit(3))
        await asyncio.sleep(0.05)  # the worker took it and waits for more
        assert not b._queue and not b._in_flight
        await asyncio.wait_for(b.close(drain=drain), 10)
        return await asyncio.wait_for(pending, 1)

    if drain:
        assert run(main()) == 6
    else:
        with pytest.raises(ShuttingDownError):
            run(main())


# ------------------------------------------------------------------ queue policy (timeouts)


def test_a_request_past_its_queue_timeout_is_answered_at_once_and_never_run():
    model = Recorder()
    model.release.clear()  # the first batch holds the model: the rest must wait
    timeouts = []

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0,
                           policy=QueuePolicy(timeout_s=0.1), on_timeout=lambda: timeouts.append(1))
        first = asyncio.create_task(b.submit(0))
        await model.running()
        start = time.monotonic()
        with pytest.raises(DeadlineError, match="past model's queue timeout of 0.10 s"):
            await b.submit(1)
        answered_after = time.monotonic() - start
        model.release.set()
        assert await first == 0
        await b.close()
        return answered_after

    answered_after = run(main())
    assert 0.08 <= answered_after < 0.5  # at its deadline, not when the model came free
    assert model.batches == [[0]] and timeouts == [1]


def test_delay_keeps_timed_out_requests_but_runs_them_after_the_rest():
    model = Recorder()
    model.release.clear()

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0,
                           policy=QueuePolicy(timeout_s=0.05, action="delay"))
        tasks = [asyncio.create_task(b.submit(0))]
        await model.running()
        tasks.append(asyncio.create_task(b.submit(1)))  # will time out while 0 runs
        await asyncio.sleep(0.1)  # time passes: 1 is past its 0.05 s
        tasks.append(asyncio.create_task(b.submit(2)))  # fresh: goes before the delayed 1
        await until(lambda: b.queued == 2)
        model.release.set()
        results = await asyncio.gather(*tasks)
        await b.close()
        return results

    assert run(main()) == [0, 2, 4]
    assert model.batches == [[0], [2], [1]]


def test_a_request_may_shorten_its_timeout_only_where_the_policy_allows():
    assert QueuePolicy(2.0, allow_override=True).deadline(10.0, 0.5) == 10.5
    assert QueuePolicy(2.0, allow_override=True).deadline(10.0, 5.0) == 12.0  # never longer
    assert QueuePolicy(2.0, allow_override=False).deadline(10.0, 0.5) == 12.0
    assert QueuePolicy(None, allow_override=True).deadline(10.0, 0.5) == 10.5
    assert QueuePolicy(None).deadline(10.0) is None


def test_the_callers_deadline_rejects_whatever_the_policy():
    model = Recorder()
    model.release.clear()

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0,
                           policy=QueuePolicy(timeout_s=None, action="delay"))
        first = asyncio.create_task(b.submit(0))
        await model.running()
        with pytest.raises(DeadlineError, match="caller's deadline"):
            await b.submit(1, deadline=time.monotonic() + 0.05)
        model.release.set()
        await first
        await b.close()

    run(main())
    assert model.batches == [[0]]


def test_requests_that_start_in_time_finish_even_if_slow():
    model = Recorder(delay=0.2)

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, policy=QueuePolicy(0.05))
        result = await b.submit(21)  # starts at once; running past the timeout is fine
        await b.close()
        return result

    assert run(main()) == 42


def test_on_idle_runs_once_after_the_queue_stays_empty_never_between_close_requests(monkeypatch):
    import pipeline.batcher as batcher_module

    monkeypatch.setattr(batcher_module, "IDLE_S", 0.1)
    model = Recorder()
    idle = []

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, on_idle=lambda: idle.append(1))
        for i in range(5):  # a steady stream, gaps far shorter than IDLE_S
            await b.submit(i)
            await asyncio.sleep(0.01)
        during = len(idle)
        await until(lambda: len(idle) == 1)  # now idle: on_idle runs ...
        await asyncio.sleep(0.3)  # ... once, not again and again
        after = len(idle)
        await b.submit(9)
        await until(lambda: len(idle) == 2)
        await b.close()
        return during, after, len(idle)

    assert run(main()) == (0, 1, 2)


def test_a_request_that_cannot_start_before_its_deadline_is_refused_on_arrival():
    """0.1 s per item, one at a time, 0.35 s to start: once the pace is measured, a request
    with more than ~3 items ahead is refused at once (not after its 0.35 s), and the ones
    that were let in all start in time."""
    model = Recorder(delay=0.1)
    timeouts = []

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0,
                           policy=QueuePolicy(timeout_s=0.35), on_timeout=lambda: timeouts.append(1))
        assert b.expected_wait_s() == 0.0  # nothing measured yet: nothing refused early
        await b.submit(0)
        await b.submit(0)  # the pace: ~0.1 s per item

        async def timed(i):
            start = time.monotonic()
            try:
                return await b.submit(i), time.monotonic() - start
            except DeadlineError as exc:
                return exc, time.monotonic() - start

        outcomes = await asyncio.gather(*(timed(i) for i in range(1, 9)))
        await b.close()
        return outcomes

    outcomes = run(main())
    served = [after for result, after in outcomes if not isinstance(result, Exception)]
    refused = [(result, after) for result, after in outcomes if isinstance(result, Exception)]
    assert 2 <= len(served) <= 5 and len(refused) == 8 - len(served)
    assert all(after < 0.05 for _, after in refused)  # refused on arrival
    assert all("requests are queued ahead" in str(result) for result, _ in refused)
    assert all(0.03 <= result.retry_after_s <= 1.0 for result, _ in refused)
    assert len(timeouts) == len(refused)
    assert max(served) < 0.35 + 0.1 + 0.1  # every request let in started within its deadline


def test_delay_policies_are_never_refused_early_but_a_callers_deadline_is():
    model = Recorder(delay=0.05)

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0,
                           policy=QueuePolicy(timeout_s=0.01, action="delay"))
        await b.submit(0)
        delayed = await asyncio.gather(*(b.submit(i) for i in range(6)))  # all run, late
        tasks = [asyncio.create_task(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        with pytest.raises(DeadlineError, match="refused at once"):
            await b.submit(9, deadline=time.monotonic() + 0.05)
        await asyncio.gather(*tasks)
        await b.close()
        return delayed

    assert run(main()) == [i * 2 for i in range(6)]


def test_a_requests_items_are_admitted_together():
    model = Recorder(delay=0.1)  # 0.1 s a batch, whatever its size

    async def main():
        b = DynamicBatcher(model, max_batch_size=4, max_delay_s=0.0, policy=QueuePolicy(timeout_s=0.35))
        await b.submit_all([0, 1, 2, 3])  # measured: a batch of four, ~0.025 s an item
        estimate = b.expected_wait_s(queued=8)
        model.release.clear()
        running = asyncio.create_task(b.submit(1))
        await model.running()
        with pytest.raises(DeadlineError, match="refused at once"):
            await b.submit_all(list(range(20)))  # its last item would wait ~20 items
        refused_queued = b.queued
        fits = asyncio.create_task(b.submit_all([5, 6, 7]))  # one batch ahead at most: in
        await asyncio.sleep(0.01)
        model.release.set()
        results = await asyncio.gather(running, fits)
        await b.close()
        return estimate, refused_queued, results

    estimate, refused_queued, results = run(main())
    assert 0.15 < estimate < 0.35  # eight items at ~0.025 s
    assert refused_queued == 0  # none of the refused request's items was queued
    assert results == [2, [10, 12, 14]]


def test_lanes_share_the_model_equally_whatever_one_lane_has_queued():
    model = Recorder()
    model.release.clear()

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, max_queue_size=6)
        running = asyncio.create_task(b.submit(0))
        await model.running()
        pushed = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3, 4, 5, 6)]  # a full queue
        await until(lambda: b.queued == 6)
        cameras = [asyncio.create_task(b.submit(i, lane="cameras")) for i in (101, 102, 103)]
        await until(lambda: b.queued == 9)  # its own bound: a full pushed lane refuses no camera
        with pytest.raises(OverloadedError):
            await b.submit(7)
        model.release.set()
        await asyncio.gather(running, *pushed, *cameras)
        await b.close()

    run(main())
    order = [batch[0] for batch in model.batches]
    # Every other image from each waiting lane, oldest first within a lane and on a tie.
    assert order == [0, 1, 101, 2, 102, 3, 103, 4, 5, 6]


def test_a_lane_that_was_idle_comes_back_level_not_owed():
    model = Recorder()
    model.release.clear()

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0)
        running = asyncio.create_task(b.submit(0))
        await model.running()
        first = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
        await until(lambda: b.queued == 3)
        model.release.set()
        await asyncio.gather(running, *first)  # four pushed images served, no camera waiting
        model.release.clear()
        blocker = asyncio.create_task(b.submit(4))
        await until(lambda: len(model.batches) == 4)
        await model.running()
        later = [asyncio.create_task(b.submit(i)) for i in (5, 6)]
        cameras = [asyncio.create_task(b.submit(i, lane="cameras")) for i in (101, 102)]
        await until(lambda: b.queued == 4)
        model.release.set()
        await asyncio.gather(blocker, *later, *cameras)
        await b.close()

    run(main())
    order = [batch[0] for batch in model.batches]
    assert order[5:] == [5, 101, 6, 102]  # the cameras alternate: they are not owed four images


def test_a_requests_expected_wait_counts_its_own_lane_and_the_others_interleaved():
    model = Recorder(delay=0.05)

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0)
        await b.submit(0)  # measured: ~0.05 s an item
        model.release.clear()
        running = asyncio.create_task(b.submit(1))
        await model.running()
        pushed = [asyncio.create_task(b.submit(i)) for i in range(2, 12)]
        await until(lambda: b.queued == 10)
        waits = b.expected_wait_s(), b.expected_wait_s(lane="cameras")
        model.release.set()
        await asyncio.gather(running, *pushed)
        await b.close()
        return waits

    pushed_wait, camera_wait = run(main())
    # Pushed: ten ahead. A camera: none of its own, and one pushed image interleaved.
    assert pushed_wait > 4 * camera_wait and 0.03 < camera_wait < 0.15
