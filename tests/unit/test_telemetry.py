"""The telemetry ledger is the one book: Prometheus and ModelStatistics read it, nothing else."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest

from pipeline.frontends.metrics import LedgerCollector
from pipeline.telemetry import BatchReport, Ledger


def exposition(ledger: Ledger) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_batches_and_requests_reach_the_exposition_under_tritons_names():
    ledger = Ledger()
    ledger.record_batch("m", BatchReport(3, (0.001, 0.002, 0.003), 0.5,
                                         {"preprocess": 0.03, "network": 0.4, "rle": 0.01}, False))
    ledger.record_batch("m", BatchReport(1, (0.0,), 0.2, {"network": 0.15}, True))
    ledger.record_request("m", images=3, duration_s=0.6, output_s=0.02)
    ledger.record_request("m", images=1, duration_s=0.3, failure="internal")
    ledger.add_load("m", 2, 1)
    ledger.stream_opened("video")
    ledger.frames_dropped(4)
    m = exposition(ledger)
    labels = '{model="m",version="1"}'
    assert m[f"nv_inference_exec_count{labels}"] == 2
    assert m[f"nv_inference_count{labels}"] == 4
    assert m[f"nv_inference_request_success{labels}"] == 1
    assert m['nv_inference_request_failure{model="m",reason="internal",version="1"}'] == 1
    assert abs(m[f"nv_inference_queue_duration_us{labels}"] - 6000) < 1
    assert abs(m[f"nv_inference_compute_infer_duration_us{labels}"] - 700000) < 1
    assert abs(m[f"nv_inference_compute_input_duration_us{labels}"] - 30000) < 1
    assert abs(m[f"nv_inference_compute_output_duration_us{labels}"] - 20000) < 1
    assert m[f"nv_inference_pending_request_count{labels}"] == 2
    assert m['rle_serving_batch_size_bucket{le="1.0",model="m"}'] == 1
    assert m['rle_serving_batch_size_bucket{le="4.0",model="m"}'] == 2
    assert m['rle_serving_batch_size_count{model="m"}'] == 2
    assert abs(m['rle_serving_rle_seconds_total{model="m"}'] - 0.01) < 1e-9
    assert m["rle_serving_frames_dropped_total"] == 4
    assert m['rle_serving_streams_open{api="video"}'] == 1
    totals = ledger.totals("m")
    assert totals.batch_sizes == {3: 1, 1: 1}


def test_writers_on_many_threads_lose_nothing():
    ledger = Ledger()

    def write():
        for _ in range(1000):
            ledger.record_batch("m", BatchReport(2, (0.0, 0.0), 0.0, {"rle": 1e-6}, False))

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = ledger.totals("m")
    assert (totals.batches, totals.images, totals.stage_ns["rle"]) == (4000, 8000, 4000000)
