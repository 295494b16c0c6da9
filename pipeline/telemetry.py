"""The one book of what the server did: every batch, every request, a few live gauges.

Writers report facts once: the batcher (or the synchronous API) hands in one ``BatchReport``
per executed batch; the frontends record one outcome per request. Readers take snapshots: the
Prometheus exporter (``pipeline.frontends.metrics``), KServe's ModelStatistics and the benchmarks. A
lock makes it safe to write from the event loop and read from the exporter's thread.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

# Stages of a batch, in data-path order; "preprocess" is decode + letterbox of its images.
STAGES = ("preprocess", "network", "postprocess", "rle")


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
    pending: int = 0
    batch_limit: int = 0  # the most images the network is given at once (measured at load)
    queue_timeouts: int = 0  # requests answered DEADLINE_EXCEEDED from the queue, never run


class Ledger:
    """Totals per model, plus server-wide stream gauges. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[str, ModelTotals] = {}
        self._streams_open: Counter = Counter()
        self._frames_dropped = 0

    def _model(self, model: str) -> ModelTotals:
        return self._models.setdefault(model, ModelTotals())

    def record_batch(self, model: str, report: BatchReport) -> None:
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

    def record_request(self, model: str, *, images: int, duration_s: float, output_s: float = 0.0,
                       failure: str | None = None) -> None:
        """One request's outcome: ``failure`` is None or its status name (lower case)."""
        with self._lock:
            t = self._model(model)
            if failure is None:
                t.requests_ok += 1
                t.requests_ok_ns += int(duration_s * 1e9)
                t.answered_images += images
                t.output_ns += int(output_s * 1e9)
            else:
                t.requests_failed[failure] += 1
                t.requests_failed_ns += int(duration_s * 1e9)

    def set_batch_limit(self, model: str, limit: int) -> None:
        with self._lock:
            self._model(model).batch_limit = limit

    def queue_timeout(self, model: str) -> None:
        with self._lock:
            self._model(model).queue_timeouts += 1

    def add_pending(self, model: str, count: int) -> None:
        with self._lock:
            self._model(model).pending += count

    def stream_opened(self, api: str, delta: int = 1) -> None:
        with self._lock:
            self._streams_open[api] += delta

    def frames_dropped(self, count: int = 1) -> None:
        with self._lock:
            self._frames_dropped += count

    def totals(self, model: str) -> ModelTotals:
        """A copy of one model's totals (zeros if it has done nothing yet)."""
        with self._lock:
            return copy.deepcopy(self._models.get(model, ModelTotals()))

    def snapshot(self) -> tuple[dict[str, ModelTotals], dict[str, int], int]:
        """(totals per model, open streams per API, frames dropped): copies, for exporters."""
        with self._lock:
            return (copy.deepcopy(self._models), dict(self._streams_open), self._frames_dropped)
