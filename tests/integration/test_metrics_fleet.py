"""The fleet metrics on a real server, scraped over HTTP: the live gauges an autoscaler reads,
moved by the real batcher and the real gRPC stream, and the latency histograms."""

from __future__ import annotations

import queue
import threading
import time
import urllib.request

import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from ..fakes import png, scene
from .test_server import MODEL, bytes_input

IMAGE = png(scene(240, 320, red=(20, 40, 100, 120), blue=(200, 100, 300, 200)))


def scrape(running) -> dict[str, float]:
    """name -> value of this model's samples (histogram buckets keyed by their le too)."""
    url = f"http://127.0.0.1:{running.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == MODEL:
                out[s.name + (f"@{s.labels['le']}" if "le" in s.labels else "")] = s.value
    return out


def scrape_until(running, condition, timeout_s: float = 60.0) -> dict[str, float]:
    """Scrape until ``condition(metrics)`` holds (ordered by events, not by sleeping)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = scrape(running)
        if condition(metrics):
            return metrics
        assert time.monotonic() < deadline, f"never true: {metrics}"


def test_requests_fill_the_latency_histograms(server):
    before = scrape(server)
    c = triton.InferenceServerClient(server.address)
    c.infer(MODEL, [bytes_input(IMAGE, IMAGE)])
    c.close()
    after = scrape(server)
    for what, grew in (("request", 1), ("compute_output", 1), ("queue", 2), ("compute_infer", 2),
                       ("compute_input", 2), ("rle", 2)):
        name = f"rle_serving_{what}_duration_seconds"
        assert after[f"{name}_count"] - before.get(f"{name}_count", 0) == grew, what
        assert after[f"{name}_bucket@+Inf"] == after[f"{name}_count"], what
    assert after["nv_inference_pending_request_count"] == 0
    assert after["rle_serving_images_executing"] == 0


def test_a_stream_counts_for_its_model_while_open(server):
    answers: queue.Queue = queue.Queue()
    c = triton.InferenceServerClient(server.address)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    c.async_stream_infer(MODEL, [bytes_input(IMAGE)], request_id="one")
    _, error = answers.get(timeout=120)
    assert error is None
    assert scrape(server)["rle_serving_model_streams_open"] == 1  # counted once the model is named
    c.stop_stream()
    c.close()
    scrape_until(server, lambda m: m["rle_serving_model_streams_open"] == 0)


def test_the_batcher_moves_the_queue_gauges(slow_root):
    """On a busy server (~100 ms an image) images are seen waiting and executing, then none."""
    from .conftest import running_server

    with running_server(model_repository=str(slow_root)) as running:
        busy = threading.Event()
        busy.set()

        def send():
            c = triton.InferenceServerClient(running.address)
            while busy.is_set():
                c.infer(MODEL, [bytes_input(IMAGE)])
            c.close()

        senders = [threading.Thread(target=send) for _ in range(12)]
        for t in senders:
            t.start()
        try:
            scrape_until(running, lambda m: m.get("rle_serving_images_executing", 0) >= 1
                         and m.get("nv_inference_pending_request_count", 0) >= 1)
        finally:
            busy.clear()
            for t in senders:
                t.join()
        metrics = scrape(running)
        assert (metrics["nv_inference_pending_request_count"], metrics["rle_serving_images_executing"]) == (0, 0)
