"""``Histogram.quantile`` (the dashboard's p50/p99) estimates as Prometheus'
``histogram_quantile`` does over the exporter's buckets of the same histogram."""

from __future__ import annotations

import pytest

from pipeline.telemetry import BatchReport, Histogram, Ledger

from .test_metrics_histograms import buckets, histogram_quantile, scrape


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_quantile_agrees_with_prometheus_over_the_exported_buckets(q):
    ledger = Ledger()
    waits = (0.0004, 0.003, 0.004, 0.012, 0.03, 0.03, 0.2, 0.7, 3.0, 42.0)
    ledger.record_batch("m", BatchReport(len(waits), waits, 0.1, {}, False))
    exported = histogram_quantile(q, buckets(scrape(ledger), "rle_serving_queue_duration_seconds"))
    ours = ledger.totals("m").latency["queue"].quantile(q)
    assert ours == pytest.approx(min(exported, 10.0))  # both stop at the largest bound


def test_quantile_of_nothing_is_none_and_of_one_value_lies_in_its_bucket():
    histogram = Histogram()
    assert histogram.quantile(0.5) is None
    histogram.observe(0.015)
    assert 0.01 < histogram.quantile(0.5) <= 0.02
