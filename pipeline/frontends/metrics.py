"""Prometheus metrics: a view of the telemetry ledger, rendered at scrape time.

NVIDIA Triton's names where they fit, so existing dashboards and the Kubernetes HPA adapter
work unchanged, plus ours for the RLE stage and streams. The ``nv_inference_*`` series are
cumulative, as Triton's are, but exposed as gauges: a Prometheus counter must be named
``<name>_total``, which would not match the series names Triton dashboards and adapter rules
query. Ours follow Prometheus conventions (counters end in ``_total``).

For an autoscaler and an SRE: live gauges per model (images waiting in the batcher under
Triton's ``nv_inference_pending_request_count``, images executing, streams open), and latency
histograms ``rle_serving_<what>_duration_seconds`` (``LATENCIES``) on fixed buckets, so a
fleet's quantile is ``histogram_quantile(0.99, sum by (le) (rate(..._bucket[1m])))``.

There is no second book here: every value is read from ``pipeline.telemetry.Ledger``.

The port is open by default (Prometheus scrapes without a token); with TLS configured it is
served over TLS with the server's certificate, and ``--metrics-token-required`` asks for the
server's bearer token too.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from ..serving.state import VERSION
from ..telemetry import LATENCY_BUCKETS_S, STAGES, Histogram, Ledger
from .auth import MISSING, Token

LOG = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# name -> (help, value from ModelTotals)
_CUMULATIVE = {
    "nv_inference_request_success": ("Inference requests that succeeded", lambda t: t.requests_ok),
    "nv_inference_count": ("Images inferred (a batch of 4 counts 4)", lambda t: t.images),
    "nv_inference_exec_count": ("Batches executed by the model", lambda t: t.batches),
    "nv_inference_request_duration_us": (
        "Cumulative end-to-end request time, microseconds",
        lambda t: (t.requests_ok_ns + t.requests_failed_ns) / 1e3),
    "nv_inference_queue_duration_us": (
        "Cumulative time requests waited in the batcher, microseconds", lambda t: t.queue_ns / 1e3),
    "nv_inference_compute_input_duration_us": (
        "Cumulative pre-processing time (decode, letterbox), microseconds",
        lambda t: t.stage_ns["preprocess"] / 1e3),
    "nv_inference_compute_infer_duration_us": (
        "Cumulative batch compute time (network + masks + RLE), microseconds",
        lambda t: t.compute_ns / 1e3),
    "nv_inference_compute_output_duration_us": (
        "Cumulative response building time (packing, JSON), microseconds",
        lambda t: t.output_ns / 1e3),
}
# name -> (help, value from ModelTotals): live gauges per model, labelled as Triton's are
_LIVE = {
    "nv_inference_pending_request_count": (
        "Images waiting in the dynamic batcher for their batch to start (Triton: requests "
        "awaiting execution; a request of n images counts n)", lambda t: t.queued),
    "rle_serving_images_executing": ("Images in batches being computed", lambda t: t.executing),
    "rle_serving_model_streams_open": ("Open streams that sent this model a request",
                                       lambda t: t.streams_open),
}
# what (``telemetry.LATENCIES``) -> help of the histogram rle_serving_<what>_duration_seconds
_LATENCY_HELP = {
    "request": "End-to-end time of answered requests, arrival to response built",
    "queue": "Time each image waited in the dynamic batcher",
    "compute_input": "Pre-processing time (decode, letterbox) of each image's batch",
    "compute_infer": "Compute time (network + masks + RLE) of each image's batch",
    "compute_output": "Response building time (packing, JSON) of answered requests",
    "rle": "Run-length encoding time of each image's batch",
}
# name (without _total) -> (help, value from ModelTotals): our counters per model
_COUNTERS = {
    "rle_serving_queue_timeouts": (
        "Requests answered DEADLINE_EXCEEDED from the queue, never run", lambda t: t.queue_timeouts),
    "rle_serving_rle_seconds": ("Cumulative seconds computing run lengths",
                                lambda t: t.stage_ns["rle"] / 1e9),
}


def _buckets(histogram: Histogram) -> list[tuple[str, int]]:
    """Prometheus' cumulative ``le`` buckets from the ledger's per-bucket counts."""
    out, seen = [], 0
    for bound, count in zip(LATENCY_BUCKETS_S, histogram.counts):
        seen += count
        out.append((str(bound), seen))
    out.append(("+Inf", seen + histogram.counts[-1]))
    return out


class LedgerCollector(Collector):
    """Renders the ledger's totals in Prometheus' exposition format on every scrape."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def collect(self):
        models, streams, dropped = self.ledger.snapshot()
        labels = ["model", "version"]
        for name, (help_text, value) in {**_CUMULATIVE, **_LIVE}.items():
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for model, totals in models.items():
                family.add_metric([model, VERSION], value(totals))
            yield family
        failures = GaugeMetricFamily("nv_inference_request_failure",
                                     "Inference requests that failed",
                                     labels=[*labels, "reason"])
        batch_size = HistogramMetricFamily("rle_serving_batch_size", "Images per executed batch",
                                           labels=["model"])
        limits = GaugeMetricFamily("rle_serving_batch_size_limit",
                                   "Most images per batch: the fastest per frame, measured at load",
                                   labels=["model"])
        stage_seconds = CounterMetricFamily("rle_serving_stage_seconds",
                                            "Cumulative seconds per pipeline stage",
                                            labels=["model", "stage"])
        counters = {name: CounterMetricFamily(name, help_text, labels=["model"])
                    for name, (help_text, _) in _COUNTERS.items()}
        latencies = {what: HistogramMetricFamily(f"rle_serving_{what}_duration_seconds",
                                                 f"{help_text}, seconds", labels=["model"])
                     for what, help_text in _LATENCY_HELP.items()}
        for model, totals in models.items():
            for reason, count in totals.requests_failed.items():
                failures.add_metric([model, VERSION, reason], count)
            buckets = [(str(float(b)), sum(c for s, c in totals.batch_sizes.items() if s <= b))
                       for b in BATCH_BUCKETS]
            buckets.append(("+Inf", totals.batches))
            batch_size.add_metric([model], buckets, sum_value=totals.images)
            for name, (_, value) in _COUNTERS.items():
                counters[name].add_metric([model], value(totals))
            limits.add_metric([model], totals.batch_limit)
            for stage in STAGES:
                stage_seconds.add_metric([model, stage], totals.stage_ns[stage] / 1e9)
            for what, histogram in totals.latency.items():
                latencies[what].add_metric([model], _buckets(histogram), sum_value=histogram.sum_s)
        yield failures
        yield batch_size
        yield limits
        yield stage_seconds
        yield from counters.values()
        yield from latencies.values()
        yield CounterMetricFamily("rle_serving_frames_dropped",
                                  "Video frames dropped by the drop_oldest flow-control policy",
                                  value=dropped)
        open_streams = GaugeMetricFamily("rle_serving_streams_open", "Streams currently open",
                                         labels=["api"])
        for api, count in streams.items():
            open_streams.add_metric([api], count)
        yield open_streams
        stream_errors = CounterMetricFamily(
            "rle_serving_stream_errors", "Camera streams' source failures, by error_code (counted when a "
            "source fails and when its reason changes, not per retry)", labels=["model", "code"])
        for (model, code), count in self.ledger.stream_errors().items():
            stream_errors.add_metric([model, code], count)
        yield stream_errors
        camera_streams = GaugeMetricFamily(
            "rle_serving_camera_streams", "Camera streams by state and error_code (\"\" while it has none); "
            "stopped and failed ones count until removed", labels=["model", "state", "code"])
        for (model, state, code), count in self.ledger.camera_streams().items():
            camera_streams.add_metric([model, state, code], count)
        yield camera_streams
        sink_messages = CounterMetricFamily(
            "rle_serving_sink_messages", "Camera streams' sink messages by the sink's kind, delivered or "
            "dropped (never to be delivered: pushed out of a full buffer, refused, left at close)",
            labels=["kind", "outcome"])
        for (kind, outcome), count in self.ledger.sink_message_counts().items():
            sink_messages.add_metric([kind, outcome], count)
        yield sink_messages


CONNECTION_TIMEOUT_S = 10.0  # a scrape's TLS handshake and request are due within this


class _Handler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_S  # a silent connection frees its thread

    def log_message(self, format, *args):  # no access log on stderr
        pass


class _MetricsServer(ThreadingWSGIServer):
    """prometheus_client's threaded WSGI server, with TLS done in each connection's thread:
    wrapping the listening socket (as its ``start_http_server`` does) runs every handshake
    in the accept loop, where one silent client stalls every scrape."""

    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request, client_address):
        if self.ssl_context is None:
            return super().finish_request(request, client_address)
        request.settimeout(CONNECTION_TIMEOUT_S)
        with self.ssl_context.wrap_socket(request, server_side=True) as secure:
            super().finish_request(secure, client_address)

    def handle_error(self, request, client_address):  # a failed handshake, a client gone
        LOG.debug("metrics: connection from %s failed", client_address, exc_info=True)


def serve(ledger: Ledger, port: int, address: str = "0.0.0.0", *,
          tls: tuple[str, str] | None = None, token: Token | None = None):
    """Expose /metrics over HTTP on ``port`` (0: pick a free one), in a thread of its own;
    over TLS with ``tls`` (certificate, key: PEM files); only to requests with the bearer
    ``token`` when one is given (401 otherwise). Returns (the HTTP server, to
    ``shutdown()``; its port)."""
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    app = make_wsgi_app(registry)
    if token is not None:
        scrape = app

        def app(environ, start_response):
            if not token.accepts(environ.get("HTTP_AUTHORIZATION", "")):
                start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                    ("WWW-Authenticate", "Bearer")])
                return [f"{MISSING} (header 'Authorization: Bearer <token>')\n".encode()]
            return scrape(environ, start_response)

    class Server(_MetricsServer):
        address_family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

    if tls is not None:
        Server.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        Server.ssl_context.load_cert_chain(*tls)
    server = make_server(address, port, app, Server, handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server, server.server_port
