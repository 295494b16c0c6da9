"""Model runner: a network file from the repository, on CPU or CUDA, checked at load time.

TorchScript (Triton's ``pytorch_libtorch`` layout, ``<version>/model.pt``). Nothing is
unpickled: a TorchScript archive holds no Python code to run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import torch
from tritonclient.grpc import model_config_pb2 as mc

from .errors import ConfigError, ModelError
from .repository import ModelEntry

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkInfo:
    """What pre- and post-processing need to know about a YOLO-seg network.

    input_size: the scale it works at (an image's long side is letterboxed to it). stride:
    None for a fixed input_size x input_size input; else the network runs at any height and
    width divisible by it, and each image gets the smallest such rectangle that holds it.
    """

    input_size: int
    stride: int | None
    num_classes: int
    num_coefficients: int
    class_names: tuple[str, ...]


def resolve_device(requested: str | None, entry: ModelEntry) -> str:
    """'cpu' or 'cuda' from the CLI override, else the model's instance_group kind."""
    if requested is None:
        kinds = {g.kind for g in entry.config.instance_group}
        requested = "cuda" if mc.ModelInstanceGroup.KIND_GPU in kinds else "cpu"
        if mc.ModelInstanceGroup.KIND_AUTO in kinds or not kinds:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
            LOG.info("%s: instance_group KIND_AUTO -> %s", entry.name, requested)
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{entry.config_path}: instance_group asks for KIND_GPU (or --device cuda) but no "
            "CUDA device is visible; run with --device cpu or on a GPU machine"
        )
    return requested


_MEASURED_BATCHES: dict[tuple, tuple[int, dict[int, float]]] = {}


class TorchScriptRunner:
    """Runs a traced YOLO-seg network: (B, 3, S, S) float -> (pred, proto)."""

    def __init__(self, entry: ModelEntry, device: str):
        self.entry = entry
        self.device = torch.device(device)
        path = entry.model_file()
        extra = {"meta.json": ""}
        try:
            self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra)
        except Exception as exc:
            raise ConfigError(f"{path}: not a loadable TorchScript file ({exc})") from None
        self.module = _optimised(self.module.eval(), path)
        meta = json.loads(extra["meta.json"] or "{}")
        self._lock = threading.Lock()  # one batch at a time per instance
        self.info = self._check_against_config(meta)

    def _check_against_config(self, meta: dict) -> NetworkInfo:
        """Run dummy batches and check the outputs' shapes against config.pbtxt."""
        config, where = self.entry.config, self.entry.config_path
        if len(config.input) != 1 or len(config.output) != 2:
            raise ConfigError(
                f"{where}: a YOLO-seg network has 1 input and 2 outputs "
                f"(pred, proto); config declares {len(config.input)} and {len(config.output)}"
            )
        dims = list(config.input[0].dims)
        if dims[:1] == [3] and dims[1:] == [-1, -1]:
            size, stride = meta.get("input_size"), meta.get("stride")
            if not size or not stride:
                raise ConfigError(f"{where}: input[0].dims [3, -1, -1] needs a network exported "
                                  "for any size (meta.json with input_size and stride); "
                                  "re-export it with `python -m pipeline.convert --force`")
            shapes = [(size, size), (size - 2 * stride, size)]  # a square and a rectangle
        elif len(dims) == 3 and dims[0] == 3 and dims[1] == dims[2] and dims[1] > 0:
            size, stride = dims[1], None
            shapes = [(size, size)]
        else:
            raise ConfigError(f"{where}: input[0].dims must be [3, S, S] or [3, -1, -1], got {dims}")
        for h, w in shapes:
            try:
                pred, proto = self(torch.zeros(1, 3, h, w, device=self.device))
            except ModelError as exc:
                raise ConfigError(f"{where}: the network does not run at {h}x{w} ({exc}); if it "
                                  "was exported for one size, declare dims [3, S, S]") from None
            for i, out in enumerate((pred, proto)):
                want, got = list(config.output[i].dims), list(out.shape[1:])
                if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
                    raise ConfigError(f"{where}: output[{i}] ({config.output[i].name}) dims "
                                      f"{want} do not match the network's {got} at {h}x{w}")
        num_coefficients = int(proto.shape[1])
        num_classes = int(pred.shape[2]) - 5 - num_coefficients
        if num_classes <= 0:
            raise ConfigError(f"{where}: output[0] is not a YOLO-seg head")
        names = meta.get("names") or self.entry.labels() or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ConfigError(f"{where}: {len(names)} class names for {num_classes} classes")
        return NetworkInfo(int(size), int(stride) if stride else None, num_classes,
                           num_coefficients, tuple(names))

    def per_frame_seconds(self, batch: int, shape: tuple[int, int], repeats: int = 2) -> float:
        """Best wall time per frame of ``repeats`` runs at this batch size (after a warm-up)."""
        images = torch.rand(batch, 3, *shape, device=self.device)
        self(images)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self(images)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best / batch

    def best_batch_size(self, max_batch_size: int) -> tuple[int, dict[int, float]]:
        """The batch size (a power of two up to ``max_batch_size``) with the least time per
        frame, measured now on this device, and the per-frame seconds measured.

        Doubling stops once it no longer saves 5% per frame: on a small CPU, batching makes
        every frame slower; on a GPU it keeps paying up to large batches. Measured once per
        process for a model file, device, bound and thread count.
        """
        key = (str(self.entry.model_file()), str(self.device), max_batch_size,
               torch.get_num_threads())
        if key not in _MEASURED_BATCHES:
            _MEASURED_BATCHES[key] = self._measure_batches(max_batch_size)
        return _MEASURED_BATCHES[key]

    def _measure_batches(self, max_batch_size: int) -> tuple[int, dict[int, float]]:
        shape = (self.info.input_size, self.info.input_size)
        measured = {1: self.per_frame_seconds(1, shape)}
        batch = 1
        while batch * 2 <= max_batch_size:
            measured[batch * 2] = self.per_frame_seconds(batch * 2, shape)
            if measured[batch * 2] > 0.95 * measured[batch]:
                break
            batch *= 2
        return batch, measured

    def __call__(self, images):
        """images: (B, 3, h, w) float32 on self.device -> (pred, proto) on self.device."""
        try:
            with self._lock, torch.inference_mode():
                return self.module(images.contiguous(memory_format=torch.channels_last))
        except Exception as exc:
            # TorchScript errors carry their whole interpreter traceback; the last line says it.
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise ModelError(f"{self.entry.name} failed on a batch of {len(images)}: {reason}") from exc


def _optimised(module, path):
    """Channels-last weights (and inputs, see ``__call__``), graph frozen: measured 1.2-1.4x
    faster than the plain TorchScript on this project's CPUs, same detections. torch's
    ``optimize_for_inference`` measured ~7% slower there, so it is not applied. A model that
    cannot be frozen runs as it is."""
    try:
        return torch.jit.freeze(module.to(memory_format=torch.channels_last))
    except Exception as exc:  # an unusual graph: correctness first
        LOG.warning("%s: running without freezing (%s)", path, exc)
        return module


def load_runner(entry: ModelEntry, device: str) -> TorchScriptRunner:
    platform = entry.config.platform or entry.config.backend
    if platform in ("pytorch_libtorch", "pytorch"):
        return TorchScriptRunner(entry, device)
    raise ConfigError(
        f"{entry.config_path}: platform {platform!r} cannot run the network here "
        "(supported: pytorch_libtorch)"
    )


__all__ = ["NetworkInfo", "TorchScriptRunner", "load_runner", "resolve_device"]
