"""Latency histograms and live gauges: recorded in the ledger, rendered by the exporter.

The exposition is parsed with prometheus_client's own parser, and the fleet quantile is
computed the way Prometheus' ``histogram_quantile`` does, over buckets summed across replicas.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.batcher import DynamicBatcher, QueuePolicy
from pipeline.errors import DeadlineError
from pipeline.frontends.metrics import LedgerCollector
from pipeline.telemetry import LATENCIES, LATENCY_BUCKETS_S, BatchReport, Ledger

from ..conftest import until
from .test_batcher import Recorder


def scrape(ledger: Ledger) -> str:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    return generate_latest(registry).decode()


def buckets(text: str, name: str, model: str = "m") -> dict[float, float]:
    """le -> cumulative count of one histogram in an exposition."""
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
    assert family.type == "histogram"
    return {float(s.labels["le"]): s.value for s in family.samples
            if s.name == f"{name}_bucket" and s.labels["model"] == model}


def sample(text: str, name: str, model: str = "m") -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("model") == model:
                return s.value
    raise AssertionError(f"no {name} for {model}")


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in."""
    bounds = sorted(cumulative)
    rank = q * cumulative[float("inf")]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if cumulative[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (cumulative[bound] - below)
        lower, below = bound, cumulative[bound]
    raise AssertionError("no +Inf bucket")


def test_every_latency_is_a_histogram_on_the_fixed_buckets():
    ledger = Ledger()
    ledger.record_batch("m", BatchReport(1, (0.0,), 0.1, {}, False))
    text = scrape(ledger)
    for what in LATENCIES:
        got = buckets(text, f"rle_serving_{what}_duration_seconds")
        assert sorted(got) == [*LATENCY_BUCKETS_S, float("inf")], what
    assert LATENCY_BUCKETS_S[0] == 0.001 and LATENCY_BUCKETS_S[-1] == 10.0
    assert len(LATENCY_BUCKETS_S) + 1 == 14


def test_observations_land_in_their_bucket_le_inclusive_and_cumulative():
    ledger = Ledger()
    # waits: one on a bound (le is inclusive), one just above it, one beyond every bound
    ledger.record_batch("m", BatchReport(3, (0.005, 0.0051, 42.0), 0.3,
                                         {"preprocess": 0.002, "rle": 0.0004}, False))
    text = scrape(ledger)
    queue = buckets(text, "rle_serving_queue_duration_seconds")
    assert (queue[0.002], queue[0.005], queue[0.01], queue[10.0], queue[float("inf")]) == (0, 1, 2, 2, 3)
    assert sample(text, "rle_serving_queue_duration_seconds_count") == 3
    assert abs(sample(text, "rle_serving_queue_duration_seconds_sum") - 42.0101) < 1e-9
    # batch stages count every image of the batch: each saw the whole batch's time
    infer = buckets(text, "rle_serving_compute_infer_duration_seconds")
    assert (infer[0.2], infer[0.5], infer[float("inf")]) == (0, 3, 3)
    assert abs(sample(text, "rle_serving_compute_infer_duration_seconds_sum") - 0.9) < 1e-9
    assert buckets(text, "rle_serving_compute_input_duration_seconds")[0.002] == 3
    assert buckets(text, "rle_serving_rle_duration_seconds")[0.001] == 3


def test_a_batch_that_failed_before_a_stage_does_not_time_it():
    ledger = Ledger()
    ledger.record_batch("m", BatchReport(2, (0.0, 0.0), 0.01, {"preprocess": 0.01}, True))
    text = scrape(ledger)
    assert sample(text, "rle_serving_compute_input_duration_seconds_count") == 2
    assert sample(text, "rle_serving_rle_duration_seconds_count") == 0


def test_requests_histograms_count_answered_requests_only():
    ledger = Ledger()
    ledger.record_request("m", images=2, duration_s=0.03, output_s=0.004)
    ledger.record_request("m", images=1, duration_s=0.0005, failure="resource_exhausted")
    text = scrape(ledger)
    request = buckets(text, "rle_serving_request_duration_seconds")
    assert (request[0.02], request[0.05], request[float("inf")]) == (0, 1, 1)
    assert buckets(text, "rle_serving_compute_output_duration_seconds")[0.005] == 1
    # Triton's cumulative series still count both, in microseconds, as before
    assert sample(text, "nv_inference_request_duration_us") == 30500.0


def test_the_documented_fleet_quantile_sums_replicas_buckets():
    """histogram_quantile(q, sum by (le) (rate(rle_serving_request_duration_seconds_bucket[1m])))
    over two replicas: one fast, one slow; the fleet's p50 and p99 fall in the right buckets."""
    fast, slow = Ledger(), Ledger()
    for _ in range(90):
        fast.record_request("m", images=1, duration_s=0.015)
    for _ in range(10):
        slow.record_request("m", images=1, duration_s=3.0)
    name = "rle_serving_request_duration_seconds"
    a, b = buckets(scrape(fast), name), buckets(scrape(slow), name)
    fleet = {le: a[le] + b[le] for le in a}
    assert 0.01 < histogram_quantile(0.5, fleet) <= 0.02
    assert 2.0 < histogram_quantile(0.99, fleet) <= 5.0


# ------------------------------------------------------------------ live gauges


def test_live_gauges_follow_a_real_batcher():
    """Waiting then executing, per image, back to zero; withdrawn and timed-out images leave."""
    ledger = Ledger()
    model = Recorder()
    model.release.clear()

    def gauges():
        text = scrape(ledger)
        return (sample(text, "nv_inference_pending_request_count"),
                sample(text, "rle_serving_images_executing"))

    async def main():
        b = DynamicBatcher(model, max_batch_size=2, max_delay_s=0.0, name="m",
                           on_load=lambda waiting, running: ledger.add_load("m", waiting, running),
                           policy=QueuePolicy(timeout_s=60.0))
        first = asyncio.create_task(b.submit_all([1, 2]))
        await model.running()
        later = asyncio.create_task(b.submit_all([3, 4, 5]))
        withdrawn = asyncio.create_task(b.submit(6))
        await until(lambda: gauges() == (4, 2))
        withdrawn.cancel()
        await until(lambda: gauges() == (3, 2))
        model.release.set()
        assert await first == [2, 4] and await later == [6, 8, 10]
        await until(lambda: gauges() == (0, 0))
        await b.close()

    asyncio.run(main())


def test_an_image_answered_from_the_queue_leaves_the_gauge():
    ledger = Ledger()
    model = Recorder()
    model.release.clear()

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, name="m",
                           on_load=lambda waiting, running: ledger.add_load("m", waiting, running))
        running = asyncio.create_task(b.submit(1))
        await model.running()
        # queued behind the held batch, its caller's deadline passes there: never run
        with pytest.raises(DeadlineError, match="waited"):
            await b.submit(2, deadline=time.monotonic() + 0.05)
        assert (ledger.totals("m").queued, ledger.totals("m").executing) == (0, 1)
        model.release.set()
        assert await running == 2
        await b.close()
        assert (ledger.totals("m").queued, ledger.totals("m").executing) == (0, 0)

    asyncio.run(main())


def test_streams_per_model_are_live_and_unknown_models_add_no_series():
    ledger = Ledger()
    ledger.set_batch_limit("m", 8)  # a loaded model has totals from its load on
    ledger.model_stream_opened("m")
    ledger.model_stream_opened("m")
    ledger.model_stream_opened("no-such-model")
    text = scrape(ledger)
    assert sample(text, "rle_serving_model_streams_open") == 2
    assert "no-such-model" not in text
    ledger.model_stream_opened("m", -1)
    ledger.model_stream_opened("no-such-model", -1)
    assert sample(scrape(ledger), "rle_serving_model_streams_open") == 1
    assert ledger.totals("m").streams_open == 1
