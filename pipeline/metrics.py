"""Prometheus metrics, with NVIDIA Triton's names where they fit so existing dashboards and
the Kubernetes HPA adapter work unchanged, plus ours for the RLE stage and streams.

The ``nv_inference_*`` series are cumulative, as Triton's are, but registered as gauges:
prometheus_client renames every Counter to ``<name>_total``, which would not match the
series names Triton dashboards and adapter rules query. Ours are ordinary counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ["model", "version"]
        r = self.registry
        self.request_success = Gauge("nv_inference_request_success",
                                       "Inference requests that succeeded", labels, registry=r)
        self.request_failure = Gauge("nv_inference_request_failure",
                                       "Inference requests that failed", labels + ["reason"], registry=r)
        self.inference_count = Gauge("nv_inference_count",
                                       "Images inferred (a batch of 4 counts 4)", labels, registry=r)
        self.exec_count = Gauge("nv_inference_exec_count",
                                  "Batches executed by the model", labels, registry=r)
        self.request_duration_us = Gauge("nv_inference_request_duration_us",
                                           "Cumulative end-to-end request time, microseconds", labels, registry=r)
        self.queue_duration_us = Gauge("nv_inference_queue_duration_us",
                                         "Cumulative time requests waited in the batcher, microseconds", labels, registry=r)
        self.compute_input_us = Gauge("nv_inference_compute_input_duration_us",
                                        "Cumulative pre-processing time, microseconds", labels, registry=r)
        self.compute_infer_us = Gauge("nv_inference_compute_infer_duration_us",
                                        "Cumulative batch compute time (network + masks + RLE), microseconds", labels, registry=r)
        self.compute_output_us = Gauge("nv_inference_compute_output_duration_us",
                                         "Cumulative response building time (packing, JSON), microseconds", labels, registry=r)
        self.pending = Gauge("nv_inference_pending_request_count",
                             "Requests queued or running", labels, registry=r)
        self.batch_size = Histogram("rle_serving_batch_size", "Images per executed batch",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.rle_seconds = Counter("rle_serving_rle_seconds",
                                   "Cumulative seconds computing run lengths", ["model"], registry=r)
        self.frames_dropped = Counter("rle_serving_frames_dropped",
                                      "Video frames dropped by the drop_oldest flow-control policy", registry=r)
        self.streams_open = Gauge("rle_serving_streams_open", "Streams currently open", ["api"], registry=r)

    def serve(self, port: int, address: str = "0.0.0.0"):
        """Expose /metrics over HTTP on ``port`` (0: pick a free one); returns the port."""
        server, _ = start_http_server(port, addr=address, registry=self.registry)
        return server.server_port
