"""The engine: a pipeline model from the repository, run with dynamic batching.

    images -> decode / letterbox (images) -> DynamicBatcher (batcher) -> network (runner)
      -> NMS + box-aware masks (postprocess) -> run lengths on the device (runs)
      -> one host copy -> ASCII packing (packing) -> response documents (schema)

``Pipeline.infer`` is the synchronous Python API; ``Pipeline.submit`` is the asynchronous one
that the gRPC frontend and streams share, so requests from every caller are batched together.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import schema
from .batcher import DynamicBatcher
from .errors import ConfigError
from .images import Letterbox, as_rgb_array, letterbox
from .postprocess import Detections, PostprocessOptions, postprocess
from .repository import ModelEntry, ModelRepository, instance_count
from .runner import load_runner, resolve_device

LOG = logging.getLogger(__name__)
DEFAULT_MODEL = "instance_segmentation"
STAGES = ("preprocess", "network", "postprocess", "rle", "packing")


@dataclass(frozen=True)
class Prepared:
    """A letterboxed image waiting for a batch: (3, S, S) float32 tensor on the device."""

    tensor: Any
    geometry: Letterbox
    options: PostprocessOptions


class StageClock:
    """Accumulated seconds per pipeline stage, and frames seen: for benchmarks and metrics."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.frames = 0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def per_frame_ms(self) -> dict[str, float]:
        return {s: 1e3 * self.seconds[s] / max(self.frames, 1) for s in STAGES}

    def reset(self) -> None:
        self.seconds.clear()
        self.frames = 0


class Pipeline:
    """Instance segmentation with COCO RLE masks, from a Triton-layout model repository."""

    def __init__(self, repository: ModelRepository, entry: ModelEntry, network: ModelEntry,
                 device: str):
        self.repository = repository
        self.entry = entry
        self.network_entry = network
        self.device = device
        self.runner = load_runner(network, device)
        self.info = self.runner.info
        self.defaults = PostprocessOptions(
            confidence=float(entry.parameter("confidence", "0.25")),
            iou_threshold=float(entry.parameter("iou_threshold", "0.45")),
            max_detections=int(entry.parameter("max_detections", "300")),
        )
        config = entry.config
        self.max_batch_size = max(1, config.max_batch_size)
        self.clock = StageClock()
        self._batcher: DynamicBatcher | None = None
        LOG.info("%s: network %s on %s, %d classes, input %d, max batch %d", entry.name,
                 network.name, device, self.info.num_classes, self.info.input_size,
                 self.max_batch_size)

    @classmethod
    def from_repository(cls, path: str | Path, model: str = DEFAULT_MODEL,
                        device: str | None = None) -> "Pipeline":
        """Load ``model`` from the repository at ``path``.

        model: a pipeline model (Python backend with a ``network`` parameter) or a network
        model with a YOLO-seg head itself. device: 'cpu' / 'cuda' overrides instance_group.
        Raises ConfigError (naming the file and field) for anything that cannot be served.
        """
        repository = ModelRepository.load(path)
        entry = repository.get(model)
        network_name = entry.parameter("network") if entry.platform == "python" else entry.name
        if network_name is None:
            raise ConfigError(f"{entry.config_path}: parameters.network is required")
        network = repository.get(network_name)
        return cls(repository, entry, network, resolve_device(device, entry))

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def options(self, confidence=None, iou_threshold=None, max_detections=None) -> PostprocessOptions:
        d = self.defaults
        return PostprocessOptions(
            confidence=d.confidence if confidence is None else float(confidence),
            iou_threshold=d.iou_threshold if iou_threshold is None else float(iou_threshold),
            max_detections=d.max_detections if max_detections is None else int(max_detections),
        )

    # ------------------------------------------------------------------ the stages

    def prepare(self, image: Any, options: PostprocessOptions | None = None) -> Prepared:
        """Decode (bytes, path, PIL or uint8 array) and letterbox one image."""
        start = time.perf_counter()
        rgb = as_rgb_array(image)
        tensor, geometry = letterbox(rgb, self.info.input_size, self.device)
        self.clock.add("preprocess", time.perf_counter() - start)
        return Prepared(tensor, geometry, options or self.defaults)

    def run_batch(self, pairs: Sequence[tuple[int, Prepared]]) -> list[tuple[int, Detections]]:
        """Network + post-processing for a batch; results keyed by the callers' ids."""
        import torch

        start = time.perf_counter()
        images = torch.stack([p.tensor for _, p in pairs])
        pred, proto = self.runner(images)
        network_done = time.perf_counter()
        self.clock.add("network", network_done - start)
        timings: dict[str, float] = defaultdict(float)
        out = []
        for (request_id, prepared), p, q in zip(pairs, pred, proto):
            det = postprocess(p, q, prepared.geometry, prepared.options, self.info.num_classes,
                              timings)
            out.append((request_id, det))
        self.clock.add("rle", timings["rle"])
        self.clock.add("postprocess", time.perf_counter() - network_done - timings["rle"])
        self.clock.frames += len(pairs)
        return out

    def document(self, det: Detections, mask_format: str = "rle") -> dict:
        start = time.perf_counter()
        doc = schema.document(det, self.class_names, mask_format)
        self.clock.add("packing", time.perf_counter() - start)
        return doc

    # ------------------------------------------------------------------ the APIs

    def detect(self, images: Iterable[Any], **options) -> list[Detections]:
        """Synchronous: Detections per image, in batches of up to max_batch_size."""
        opts = self.options(**options)
        prepared = [self.prepare(image, opts) for image in images]
        results: list[Detections] = []
        for start in range(0, len(prepared), self.max_batch_size):
            chunk = list(enumerate(prepared[start : start + self.max_batch_size]))
            results.extend(det for _, det in sorted(self.run_batch(chunk), key=lambda r: r[0]))
        return results

    def infer(self, images: Iterable[Any] | Any, mask_format: str = "rle", **options) -> list[dict]:
        """One response document per image (see ``pipeline.schema``)."""
        schema.check_mask_format(mask_format)
        if isinstance(images, (bytes, str, Path)) or (
            isinstance(images, np.ndarray) and images.ndim == 3
        ):
            images = [images]
        return [self.document(det, mask_format) for det in self.detect(images, **options)]

    @property
    def batcher(self) -> DynamicBatcher:
        """The shared dynamic batcher (created on first use inside the event loop)."""
        if self._batcher is None:
            batching = self.entry.config.dynamic_batching
            self._batcher = DynamicBatcher(
                self.run_batch,
                max_batch_size=self.max_batch_size,
                max_delay_s=batching.max_queue_delay_microseconds / 1e6,
                preferred_sizes=tuple(batching.preferred_batch_size),
                max_queue_size=self.entry.queue_size_limit(),
                workers=instance_count(self.entry),
                name=self.name,
            )
        return self._batcher

    async def submit(self, image: Any, **options) -> Detections:
        """Asynchronous: one image through the shared dynamic batcher."""
        prepared = self.prepare(image, self.options(**options))
        return await self.batcher.submit(prepared)

    async def close(self, drain: bool = True) -> None:
        if self._batcher is not None:
            await self._batcher.close(drain)
