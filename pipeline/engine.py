"""The engine: a pipeline model from the repository, run with dynamic batching.

    images -> header probe (images) -> DynamicBatcher (batcher) -> decode, resize
      (the network's Preprocess) -> network (runner) -> its head's detections (heads)
      -> masks (postprocess)
      -> run lengths for the whole batch (rle) -> one host copy
      -> ASCII packing + response documents (schema)

Images wait in the queue undecoded (an encoded frame is ~100 KB, a letterboxed one 5 MB), so
a full queue costs little memory and a frame that times out in it costs no decoding; the
header alone tells each image's input shape, which is all batching needs.

``Pipeline.infer`` is the synchronous Python API; ``Pipeline.submit`` is the asynchronous one
that every frontend and stream shares, so requests from every caller are batched together.
Every executed batch is reported once to the telemetry ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import memory, rle, schema
from .batcher import DynamicBatcher, QueuePolicy
from .errors import BadInputError, PipelineError
from .images import PixelBudget, Placement, as_picture, probe
from .postprocess import Detections, PostprocessOptions, postprocess
from .repository import DEFAULT_MODEL, ModelEntry, ModelRepository, instance_count, pinned_batch_limit
from .runners import load_runner, resolve_device
from .telemetry import BatchReport, Ledger

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accepted:
    """An image waiting for a batch: its undecoded source (bytes, PIL image or Picture),
    where it will sit in the network input, and what the request asked for."""

    source: Any
    geometry: Placement
    options: PostprocessOptions


def queue_policy(entry: ModelEntry) -> QueuePolicy:
    """config.pbtxt's ``dynamic_batching.default_queue_policy`` (timeouts) as a QueuePolicy."""
    from tritonclient.grpc import model_config_pb2 as mc

    policy = entry.config.dynamic_batching.default_queue_policy
    timeout = policy.default_timeout_microseconds
    return QueuePolicy(
        timeout_s=timeout / 1e6 if timeout else None,
        action="delay" if policy.timeout_action == mc.ModelQueuePolicy.DELAY else "reject",
        allow_override=policy.allow_timeout_override,
    )


def batch_key(accepted: Accepted) -> tuple[int, int]:
    """Images batch together only when their network inputs have one shape."""
    return accepted.geometry.input_h, accepted.geometry.input_w


class Pipeline:
    """Instance segmentation with COCO RLE masks, from a Triton-layout model repository."""

    def __init__(self, repository: ModelRepository, entry: ModelEntry, network: ModelEntry,
                 device: str, ledger: Ledger | None = None):
        self.repository = repository
        self.entry = entry
        self.network_entry = network
        self.device = device
        self.ledger = ledger or Ledger()
        self.runner = load_runner(network, device)
        self.info = self.runner.info
        # config.pbtxt was validated at load, so its parameters are known to be good here.
        self.defaults = PostprocessOptions.from_params(entry.parameters)
        # max_batch_size bounds what a request may carry; batch_limit is what the network is
        # given at once: pinned in config.pbtxt, or the fastest per frame measured here,
        # never above the bound.
        self.max_batch_size = max(1, entry.config.max_batch_size)
        self.batch_limit = self._batch_limit()
        self.ledger.set_batch_limit(self.name, self.batch_limit)
        started = time.perf_counter()
        rle.warm_up()
        LOG.info("%s: host RLE kernel ready in %.1f s", entry.name, time.perf_counter() - started)
        self._batcher: DynamicBatcher | None = None
        # Requests using this version now: a frontend counts them, so a replaced version is
        # freed only once it has answered them (see serving/control.py).
        self.held = 0
        LOG.info("%s: network %s on %s, %d classes, %s, batches of up to %d (max_batch_size %d)",
                 entry.name, network.name, device, self.info.num_classes,
                 self.info.preprocess.describe(), self.batch_limit, self.max_batch_size)

    def _batch_limit(self) -> int:
        """The file's own batch size where it fixes one, else pinned in config.pbtxt, else
        measured now (``calibration.choose_batch_size``)."""
        fixed = self.info.fixed_batch
        if fixed:
            LOG.info("%s: %s fixes its batch size at %d: batches of %d whatever max_batch_size "
                     "(%d) says", self.name, self.runner.path.name, fixed, fixed, self.max_batch_size)
            return fixed
        pinned = pinned_batch_limit(self.entry.config, self.entry.config_path)
        if pinned is not None:
            return pinned
        started = time.perf_counter()
        best, measured = self.runner.best_batch_size(self.max_batch_size)
        LOG.info("%s: per-frame network time by batch size (fastest uncontended run): %s "
                 "-> batches of up to %d (measured in %.1f s)", self.name,
                 ", ".join(f"{b}: {1e3 * s:.1f} ms" for b, s in measured.items()), best,
                 time.perf_counter() - started)
        return best

    @classmethod
    def from_repository(cls, path: str | Path, model: str = DEFAULT_MODEL,
                        device: str | None = None, ledger: Ledger | None = None) -> Pipeline:
        """Load ``model`` from the repository at ``path``.

        model: a pipeline model (Python backend with a ``network`` parameter) or a network
        model with a YOLO-seg head itself. device: 'cpu' / 'cuda' overrides instance_group.
        Raises ConfigError (naming the file and field) for anything that cannot be served.
        """
        repository = ModelRepository.load(path)
        entry = repository.get(model)
        return cls(repository, entry, repository.network_of(entry), resolve_device(device, entry), ledger)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def options(self, mask_format: str | None = None, **params) -> PostprocessOptions:
        """This model's defaults with keyword overrides (confidence, iou_threshold, ...)."""
        return PostprocessOptions.from_params({**params, "response_mask_format": mask_format},
                                              self.defaults)

    # ------------------------------------------------------------------ the stages

    def accept(self, image: Any, options: PostprocessOptions | None = None,
               pixels: PixelBudget | None = None) -> Accepted:
        """Check an image (bytes, path, PIL image or uint8 array) from its header and place
        it in the network input; cheap, no pixels decoded. BadInputError if unusable, or
        past its request's ``pixels`` budget."""
        source, size = probe(image)
        if pixels is not None:
            pixels.take(*size)
        return Accepted(source, self.info.preprocess.place(*size), options or self.defaults)

    def prepare(self, accepted: Accepted):
        """Decode (reduced, before any float tensor, when it is far larger) and prepare as the
        network's Preprocess says: the (3, input_h, input_w) float32 tensor on the device."""
        picture = as_picture(accepted.source, long_side=self.info.preprocess.decode_side())
        if picture.size != (accepted.geometry.height, accepted.geometry.width):
            raise BadInputError(f"image decodes to {picture.size[1]}x{picture.size[0]} but its "
                                f"header says {accepted.geometry.width}x{accepted.geometry.height}")
        tensor, _ = self.info.preprocess.tensor(picture, self.device, accepted.geometry)
        return tensor

    def run_batch(self, pairs: Sequence[tuple[int, Accepted]],
                  stages: dict | None = None) -> list[tuple[int, Detections | PipelineError]]:
        """Decode, network and post-processing for a batch; results keyed by the callers' ids.

        An image that fails to decode gets its BadInputError as its result; the rest of the
        batch runs. stages: optional dict that receives seconds per stage (``STAGES``).
        """
        import torch

        stages = {} if stages is None else stages
        start = time.perf_counter()
        tensors, ready, failed = [], [], []
        for request_id, accepted in pairs:
            try:
                tensors.append(self.prepare(accepted))
                ready.append((request_id, accepted))
            except BadInputError as exc:
                failed.append((request_id, exc))
        network_start = time.perf_counter()
        stages["preprocess"] = network_start - start
        if not ready:
            return failed
        outputs = self.runner(torch.stack(tensors))
        stages["network"] = time.perf_counter() - network_start
        dets = postprocess(outputs, self.runner.head, [a.geometry for _, a in ready],
                           [a.options for _, a in ready], stages)
        return [(request_id, det) for (request_id, _), det in zip(ready, dets)] + failed

    def render(self, det: Detections, options: PostprocessOptions | None = None) -> dict:
        """The response document of one image (see ``pipeline.schema``)."""
        mask_format = (options or self.defaults).mask_format
        return schema.document(det, self.class_names, mask_format)

    # ------------------------------------------------------------------ the APIs

    def detect(self, images: Iterable[Any], **options) -> list[Detections]:
        """Synchronous: Detections per image, in batches of up to max_batch_size."""
        return self._detect(images, self.options(**options))

    def batches(self, accepted: Sequence[Accepted]) -> list[list[int]]:
        """Indices of ``accepted`` grouped into batches the network takes: one input shape
        each, at most ``batch_limit`` images, in order of first appearance."""
        by_shape: dict[tuple, list[int]] = {}
        for i, a in enumerate(accepted):
            by_shape.setdefault(batch_key(a), []).append(i)
        return [group[start : start + self.batch_limit] for group in by_shape.values()
                for start in range(0, len(group), self.batch_limit)]

    def _detect(self, images: Iterable[Any], options: PostprocessOptions) -> list[Detections]:
        accepted = [self.accept(image, options) for image in images]
        results: dict[int, Detections | PipelineError] = {}
        for chunk in self.batches(accepted):
            stages: dict[str, float] = {}
            began = time.monotonic()
            results.update(self.run_batch([(i, accepted[i]) for i in chunk], stages))
            self._report(BatchReport(len(chunk), (0.0,) * len(chunk), time.monotonic() - began,
                                     stages, failed=False))
        for i in range(len(accepted)):
            if isinstance(results[i], PipelineError):
                raise results[i]
        return [results[i] for i in range(len(accepted))]

    def infer(self, images: Iterable[Any] | Any, mask_format: str = "rle", **options) -> list[dict]:
        """One response document per image (see ``pipeline.schema``)."""
        opts = self.options(mask_format, **options)
        if isinstance(images, (bytes, str, Path)) or (
            isinstance(images, np.ndarray) and images.ndim == 3
        ):
            images = [images]
        return [self.render(det, opts) for det in self._detect(images, opts)]

    def _report(self, report: BatchReport) -> None:
        self.ledger.record_batch(self.name, report)

    @property
    def batcher(self) -> DynamicBatcher:
        """The shared dynamic batcher (created on first use inside the event loop)."""
        if self._batcher is None:
            batching = self.entry.config.dynamic_batching
            self._batcher = DynamicBatcher(
                self.run_batch,
                max_batch_size=self.batch_limit,
                max_delay_s=batching.max_queue_delay_microseconds / 1e6,
                preferred_sizes=tuple(batching.preferred_batch_size),
                max_queue_size=self.entry.queue_size_limit(),
                workers=instance_count(self.entry),
                name=self.name,
                report=self._report,
                key=batch_key,
                policy=queue_policy(self.entry),
                on_timeout=lambda: self.ledger.queue_timeout(self.name),
                on_load=lambda waiting, running: self.ledger.add_load(self.name, waiting, running),
                on_idle=memory.trim,
            )
        return self._batcher

    async def submit(self, images: Sequence[Any], options: PostprocessOptions | None = None, *,
                     timeout_s: float | None = None, deadline: float | None = None,
                     lane: str = "") -> list[Detections]:
        """Asynchronous: one request's images through the shared dynamic batcher, results in
        order. Every header is read first (in worker threads, never on the event loop), within
        one pixel budget (``MAX_REQUEST_PIXELS``), so a request that cannot be taken whole
        puts nothing in the queue; decoding happens in the batch.

        timeout_s: the request's own queue timeout (config.pbtxt's queue policy decides
        whether it may override the default). deadline: the caller's absolute monotonic
        deadline (e.g. gRPC's). Either way a request that waited too long is answered with
        DeadlineError and never run. lane: its share of the batcher (``batcher``'s lanes).
        """
        arrived = time.monotonic()
        self.batcher.admit(arrived, timeout_s, deadline, count=len(images), lane=lane)  # before any header
        pixels = PixelBudget()
        accepted = await asyncio.gather(*(asyncio.to_thread(self.accept, image, options, pixels)
                                          for image in images))
        return await self.batcher.submit_all(accepted, arrived=arrived, timeout_s=timeout_s,
                                             deadline=deadline, lane=lane)

    async def close(self, drain: bool = True) -> None:
        if self._batcher is not None:
            await self._batcher.close(drain)
