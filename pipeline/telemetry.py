"""The one book of what the server did: every batch, every request, a few live gauges.

Writers report facts once: the batcher (or the synchronous API) hands in one ``BatchReport``
per executed batch and moves its live queued/executing counts; the frontends record one outcome
per request. Readers take snapshots: the Prometheus exporter (``pipeline.frontends.metrics``),
KServe's ModelStatistics and the benchmarks. A lock makes it safe to write from the event loop
and read from the exporter's thread. Latencies also land in fixed-bucket histograms (one bisect
per observation, under the same lock), so quantiles can be summed across replicas: a mean from
cumulative counters hides the tail an SLO and an autoscaler care about.
"""

from __future__ import annotations

import copy
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

# Stages of a batch, in data-path order; "preprocess" is decode + letterbox of its images.
STAGES = ("preprocess", "network", "postprocess", "rle")
# The latency histograms, by what they time (see ``Ledger.record_batch``/``record_request``).
LATENCIES = ("request", "queue", "compute_input", "compute_infer", "compute_output", "rle")
# Their upper bounds in seconds: 1 ms .. 10 s in 1-2-5 steps, so histogram_quantile's linear
# interpolation inside a bucket errs by at most one step; the same for every replica and model,
# so buckets sum across a fleet. Slower observations fall in the +Inf bucket.
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class BatchReport:
    """One executed batch.

    waits_s: per request, seconds from queueing to the batch starting. compute_s: wall time of
    the batch function. stages: seconds per stage of ``STAGES`` spent on this batch.
    failed: the batch raised, so every request in it failed.
    """

    size: int
    waits_s: tuple[float, ...]
    compute_s: float
    stages: Mapping[str, float]
    failed: bool
    finished: float = field(default_factory=time.time)


@dataclass
class Histogram:
    """Observations counted per bucket of ``LATENCY_BUCKETS_S`` (not cumulative; the last slot
    is above the largest bound), and their sum in seconds."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, seconds: float, weight: int = 1) -> None:
        """``weight`` observations of ``seconds`` (e.g. every image of a batch at once)."""
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += weight  # le: bound >= seconds
        self.sum_s += seconds * weight

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) in seconds as Prometheus' ``histogram_quantile`` estimates
        it: linear within the bucket the rank falls in; the largest bound for ranks in the
        +Inf bucket; None with no observations."""
        total = sum(self.counts)
        if not total:
            return None
        rank, below, lower = q * total, 0, 0.0
        for bound, count in zip(LATENCY_BUCKETS_S, self.counts):
            if count and below + count >= rank:
                return lower + (bound - lower) * (rank - below) / count
            below, lower = below + count, bound
        return LATENCY_BUCKETS_S[-1]


@dataclass
class ModelTotals:
    """Running totals for one model (times in nanoseconds). ``images`` counts batch items."""

    batches: int = 0
    images: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    stage_ns: Counter = field(default_factory=Counter)
    last_inference_ms: int = 0
    requests_ok: int = 0
    requests_ok_ns: int = 0
    requests_failed: Counter = field(default_factory=Counter)  # by reason (status name)
    requests_failed_ns: int = 0
    answered_images: int = 0
    output_ns: int = 0
    queued: int = 0  # live: images waiting in the batcher for a batch to start
    executing: int = 0  # live: images in batches being computed
    streams_open: int = 0  # live: open streams that sent this model a request (read-only copy)
    batch_limit: int = 0  # the most images the network is given at once (measured at load)
    queue_timeouts: int = 0  # requests answered DEADLINE_EXCEEDED from the queue, never run
    latency: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram() for name in LATENCIES})


class Ledger:
    """Totals per model, plus server-wide stream gauges. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[str, ModelTotals] = {}
        self._streams_open: Counter = Counter()
        # Open streams per model name as the streams named it: kept apart from the totals so
        # a stream naming no loaded model adds no series (it leaves when the stream ends).
        self._model_streams: Counter = Counter()
        self._frames_dropped = 0
        self._stream_errors: Counter = Counter()  # (model, code): camera sources' failures
        self._camera_streams: Counter = Counter()  # live: (model, state, code) -> camera streams
        self._sink_messages: Counter = Counter()  # (kind, "delivered" or "dropped") -> messages
        self._requests_by_api: Counter = Counter()  # (api, "ok" or the failure's reason) -> requests

    def _model(self, model: str) -> ModelTotals:
        return self._models.setdefault(model, ModelTotals())

    def record_batch(self, model: str, report: BatchReport) -> None:
        """One batch. Its histograms count images (a batch of 4 observes 4 times): each image
        waited its own time and saw the whole batch's compute, input and RLE time."""
        with self._lock:
            t = self._model(model)
            t.batches += 1
            t.images += report.size
            t.queue_ns += int(sum(report.waits_s) * 1e9)
            t.compute_ns += int(report.compute_s * 1e9)
            t.batch_sizes[report.size] += 1
            for stage, seconds in report.stages.items():
                t.stage_ns[stage] += int(seconds * 1e9)
            t.last_inference_ms = int(report.finished * 1000)
            latency = t.latency
            for wait in report.waits_s:
                latency["queue"].observe(wait)
            latency["compute_infer"].observe(report.compute_s, report.size)
            for name, stage in (("compute_input", "preprocess"), ("rle", "rle")):
                if stage in report.stages:  # a batch that failed early never reached it
                    latency[name].observe(report.stages[stage], report.size)

    def record_request(self, model: str, *, images: int, duration_s: float, output_s: float = 0.0,
                       failure: str | None = None, api: str = "") -> None:
        """One request's outcome: ``failure`` is None or its status name (lower case); ``api``:
        the way it came in (a ``serving.life.Call``'s). The request and output histograms count
        answered requests only: failures (fast refusals among them) would flatter the latency;
        they are counted by reason instead."""
        with self._lock:
            self._requests_by_api[(api, failure or "ok")] += 1
            t = self._model(model)
            if failure is None:
                t.requests_ok += 1
                t.requests_ok_ns += int(duration_s * 1e9)
                t.answered_images += images
                t.output_ns += int(output_s * 1e9)
                t.latency["request"].observe(duration_s)
                t.latency["compute_output"].observe(output_s)
            else:
                t.requests_failed[failure] += 1
                t.requests_failed_ns += int(duration_s * 1e9)

    def set_batch_limit(self, model: str, limit: int) -> None:
        with self._lock:
            self._model(model).batch_limit = limit

    def queue_timeout(self, model: str) -> None:
        with self._lock:
            self._model(model).queue_timeouts += 1

    def add_load(self, model: str, queued: int, executing: int) -> None:
        """Move the live gauges by these many images (the batcher's ``on_load``)."""
        with self._lock:
            t = self._model(model)
            t.queued += queued
            t.executing += executing

    def model_stream_opened(self, model: str, delta: int = 1) -> None:
        with self._lock:
            self._model_streams[model] += delta
            if not self._model_streams[model]:
                del self._model_streams[model]

    def streams_using(self, model: str) -> int:
        """Open streams that sent ``model`` a request (a model in use is not unloaded)."""
        with self._lock:
            return self._model_streams[model]

    def _copy(self, model: str, totals: ModelTotals) -> ModelTotals:
        out = copy.deepcopy(totals)
        out.streams_open = self._model_streams[model]
        return out

    def stream_opened(self, api: str, delta: int = 1) -> None:
        with self._lock:
            self._streams_open[api] += delta

    def frames_dropped(self, count: int = 1) -> None:
        with self._lock:
            self._frames_dropped += count

    def requests_by_api(self) -> dict[tuple[str, str], int]:
        """Requests so far by (api, outcome): "ok", or the failure's reason."""
        with self._lock:
            return dict(self._requests_by_api)

    def stream_error(self, model: str, code: str) -> None:
        """A camera stream's source failed (or failed otherwise), ``code`` saying how."""
        with self._lock:
            self._stream_errors[model, code] += 1

    def stream_errors(self) -> dict[tuple[str, str], int]:
        """Camera sources' failures by (model, code), a copy."""
        with self._lock:
            return dict(self._stream_errors)

    def camera_stream_moved(self, model: str, was: tuple[str, str] | None, now: tuple[str, str] | None) -> None:
        """A camera stream of ``model`` went from (state, error code or "") ``was`` to ``now``;
        None: it was not yet counted, or is no more (removed)."""
        with self._lock:
            if was is not None:
                self._camera_streams[(model, *was)] -= 1
                if not self._camera_streams[(model, *was)]:
                    del self._camera_streams[(model, *was)]
            if now is not None:
                self._camera_streams[(model, *now)] += 1

    def camera_streams(self) -> dict[tuple[str, str, str], int]:
        """The server's camera streams by (model, state, error code or ""), a copy."""
        with self._lock:
            return dict(self._camera_streams)

    def sink_messages(self, kind: str, outcome: str, count: int = 1) -> None:
        """A sink of ``kind`` delivered or dropped (``outcome``) ``count`` messages: kept when its
        stream is removed, so a scrape after a removal still adds up."""
        with self._lock:
            self._sink_messages[kind, outcome] += count

    def sink_message_counts(self) -> dict[tuple[str, str], int]:
        """Sinks' messages so far by (kind, outcome), a copy."""
        with self._lock:
            return dict(self._sink_messages)

    def totals(self, model: str) -> ModelTotals:
        """A copy of one model's totals (zeros if it has done nothing yet)."""
        with self._lock:
            return self._copy(model, self._models.get(model, ModelTotals()))

    def snapshot(self) -> tuple[dict[str, ModelTotals], dict[str, int], int]:
        """(totals per model, open streams per API, frames dropped): copies, for exporters."""
        with self._lock:
            return ({name: self._copy(name, t) for name, t in self._models.items()},
                    dict(self._streams_open), self._frames_dropped)
