"""Model runner: a network file from the repository, on CPU or CUDA, checked at load time.

TorchScript (Triton's ``pytorch_libtorch`` layout, ``<version>/model.pt``). Nothing is
unpickled: a TorchScript archive holds no Python code to run.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

from .errors import ConfigError, ModelError
from .repository import ModelEntry

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkInfo:
    """What post-processing needs to know about a YOLO-seg network."""

    input_size: int
    num_classes: int
    num_coefficients: int
    class_names: tuple[str, ...]


def resolve_device(requested: str | None, entry: ModelEntry) -> str:
    """'cpu' or 'cuda' from the CLI override, else the model's instance_group kind."""
    import torch
    from tritonclient.grpc import model_config_pb2 as mc

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


class TorchScriptRunner:
    """Runs a traced YOLO-seg network: (B, 3, S, S) float -> (pred, proto)."""

    def __init__(self, entry: ModelEntry, device: str):
        import torch

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
        """Run one dummy batch and check the outputs' shapes against config.pbtxt."""
        import torch

        config = self.entry.config
        if len(config.input) != 1 or len(config.output) != 2:
            raise ConfigError(
                f"{self.entry.config_path}: a YOLO-seg network has 1 input and 2 outputs "
                f"(pred, proto); config declares {len(config.input)} and {len(config.output)}"
            )
        dims = list(config.input[0].dims)
        if len(dims) != 3 or dims[0] != 3 or dims[1] != dims[2] or dims[1] <= 0:
            raise ConfigError(
                f"{self.entry.config_path}: input[0].dims must be [3, S, S], got {dims}"
            )
        size = dims[1]
        with torch.inference_mode():
            pred, proto = self.module(torch.zeros(1, 3, size, size, device=self.device))
        for i, out in enumerate((pred, proto)):
            want = list(config.output[i].dims)
            got = list(out.shape[1:])
            if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
                raise ConfigError(
                    f"{self.entry.config_path}: output[{i}] ({config.output[i].name}) dims "
                    f"{want} do not match the network's {got}"
                )
        num_coefficients = int(proto.shape[1])
        num_classes = int(pred.shape[2]) - 5 - num_coefficients
        if num_classes <= 0:
            raise ConfigError(f"{self.entry.config_path}: output[0] is not a YOLO-seg head")
        names = meta.get("names") or self.entry.labels() or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ConfigError(
                f"{self.entry.config_path}: {len(names)} class names for {num_classes} classes"
            )
        return NetworkInfo(size, num_classes, num_coefficients, tuple(names))

    def __call__(self, images):
        """images: (B, 3, S, S) float32 on self.device -> (pred, proto) on self.device."""
        import torch

        try:
            with self._lock, torch.inference_mode():
                return self.module(images)
        except Exception as exc:
            raise ModelError(f"{self.entry.name} failed on a batch of {len(images)}: {exc}") from exc


def _optimised(module, path):
    """Freeze the graph and let torch fold and fuse it for inference (measured ~1.5x on the
    CPU, outputs identical); a model that cannot be frozen runs as it is."""
    import torch

    try:
        return torch.jit.optimize_for_inference(torch.jit.freeze(module))
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
