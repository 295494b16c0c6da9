"""Network runners: a network file from the repository on one device, checked at load time.

One interface, ``Runner``: (B, 3, h, w) float32 RGB in [0, 1] in, ``(pred, proto)`` out as
torch tensors in the YOLOv5-seg layout, whatever runs it and whichever head the network has.
Each runtime is a small module of its own, imported only when a model needs it:

- ``torchscript``: Triton's ``pytorch_libtorch`` (``<version>/model.pt``);
- ``onnx``: ``onnxruntime_onnx`` (``model.onnx``, ONNX Runtime; the CUDA and TensorRT
  providers where a GPU is visible, else the CPU's);
- ``openvino``: backend ``openvino`` (``model.xml`` + ``model.bin``, OpenVINO's CPU plugin).

What they share is here: the check of a network against its config.pbtxt (and, as Triton's
auto-complete does, filling in the inputs and outputs a config leaves out from the file), the
head (``heads``), the class names, and the batch size measured at load (``calibration``). Nothing is unpickled:
TorchScript, ONNX and OpenVINO IR hold no Python code to run.
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from tritonclient.grpc import model_config_pb2 as mc

from ..errors import ConfigError, ModelError
from ..heads import Head, find_head
from ..repository import ModelEntry, runtime_of
from .calibration import NEIGHBOURS_SHARE, Run, busy_s, choose_batch_size

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkInfo:
    """What pre- and post-processing need to know about a YOLO-seg network.

    input_size: the scale it works at (an image's long side is letterboxed to it). stride:
    None for a fixed input_size x input_size input; else the network runs at any height and
    width divisible by it, and each image gets the smallest such rectangle that holds it.
    head: the output layout the network has (see ``heads``).
    """

    input_size: int
    stride: int | None
    num_classes: int
    num_coefficients: int
    class_names: tuple[str, ...]
    head: str = "yolov5"


@dataclass(frozen=True)
class Tensor:
    """A network input or output as its file declares it: name and dims (-1: any)."""

    name: str
    dims: tuple[int, ...]


def cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


class Runner:
    """Runs a YOLO-seg network: (B, 3, h, w) float32 on ``device`` -> (pred, proto) torch
    tensors, pred in the YOLOv5 layout (B, A, 5 + C + M). A runtime module subclasses it with
    ``_load`` (the file -> its session, its declared inputs and outputs, its metadata) and
    ``_run`` (images -> the network's raw outputs, in any order)."""

    head: Head  # what the outputs say, learnt at load

    def __init__(self, entry: ModelEntry, device: str):
        self.entry = entry
        self.device = torch.device(device)
        self.path = entry.model_file()
        self._lock = threading.Lock()  # one batch at a time per instance
        self.inputs, self.outputs, meta = self._load()
        self.info = self._check_against_config(meta)

    # What a runtime provides ----------------------------------------------------------

    def _load(self) -> tuple[list[Tensor], list[Tensor], dict]:
        raise NotImplementedError

    def _run(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    # What every runtime shares -----------------------------------------------------

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, h, w) float32 on self.device -> (pred, proto) on self.device, pred
        in the YOLOv5 layout."""
        pred, proto = self.raw(images)
        return self.head.normalize(pred), proto

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's own (pred, proto), its errors as ModelError."""
        try:
            with self._lock, torch.inference_mode():
                outputs = self._run(images)
        except Exception as exc:
            raise ModelError(f"{self.entry.name} failed on a batch of {len(images)}: "
                             f"{last_line(exc)}") from exc
        return _pred_and_proto(outputs)

    def _check_against_config(self, meta: dict) -> NetworkInfo:
        """Fill in what the config leaves out from the file (Triton's auto-complete), check
        what it declares against the file, and run dummy batches to learn the head."""
        config, where = self.entry.config, self.entry.config_path
        self._complete_config()
        if len(config.input) != 1 or len(config.output) != 2:
            raise ConfigError(
                f"{where}: a YOLO-seg network has 1 input and 2 outputs "
                f"(pred, proto); config declares {len(config.input)} and {len(config.output)}"
            )
        self._check_names(where)
        if sorted(len(o.dims) for o in config.output) != [2, 3]:
            raise ConfigError(f"{where}: field 'output': a YOLO-seg network's outputs are the "
                              "detections (2 dims after the batch) and the prototypes (3 dims); "
                              f"config declares {[list(o.dims) for o in config.output]}")
        dims = list(config.input[0].dims)
        size, stride = _scale(meta), _int(meta.get("stride"))
        if dims[:1] == [3] and dims[1:] == [-1, -1]:
            if not size or not stride:
                raise ConfigError(f"{where}: input[0].dims [3, -1, -1] needs a network exported "
                                  f"for any size with its scale and stride in {self.path.name}'s "
                                  "metadata (input_size and stride, as `python -m pipeline.convert` "
                                  "writes them); else declare dims [3, S, S]")
            shapes = [(size, size), (size - 2 * stride, size)]  # a square and a rectangle
        elif len(dims) == 3 and dims[0] == 3 and dims[1] == dims[2] and dims[1] > 0:
            size, stride = dims[1], None
            shapes = [(size, size)]
        else:
            raise ConfigError(f"{where}: input[0].dims must be [3, S, S] or [3, -1, -1], got {dims}")
        names = self.entry.labels() or _class_names(meta)  # the config's label file first
        for h, w in shapes:
            try:
                pred, proto = self.raw(torch.zeros(1, 3, h, w, device=self.device))
            except ModelError as exc:
                raise ConfigError(f"{where}: the network does not run at {h}x{w} ({exc}); if it "
                                  "was exported for one size, declare dims [3, S, S]") from None
            for i, output in enumerate(config.output):
                want, got = list(output.dims), list((pred if len(output.dims) == 2 else proto).shape[1:])
                if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
                    raise ConfigError(f"{where}: field 'output[{i}].dims': {output.name} {want} do "
                                      f"not match the network's {got} at {h}x{w}")
        self.head = find_head(pred.shape, proto.shape, len(names) if names else None,
                              self.entry.parameter("head"), where)
        num_coefficients = int(proto.shape[1])
        num_classes = self.head.num_classes
        names = names or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ConfigError(f"{where}: {len(names)} class names for {num_classes} classes")
        return NetworkInfo(int(size), int(stride) if stride else None, num_classes,
                           num_coefficients, tuple(names), self.head.name)

    def _complete_config(self) -> None:
        """Inputs and outputs the config leaves out, read from the file (Triton's auto-complete)."""
        config = self.entry.config
        for kind, declared, found in (("input", config.input, self.inputs),
                                      ("output", config.output, self.outputs)):
            if len(declared) or not found:
                continue
            for tensor in found:
                dims = tensor.dims[1:] if len(tensor.dims) > 1 else tensor.dims  # no batch dim
                declared.add(name=tensor.name, data_type=mc.TYPE_FP32, dims=list(dims))
            LOG.info("%s: %ss read from %s: %s", self.entry.name, kind, self.path.name,
                     ", ".join(f"{t.name} {list(t.dims)}" for t in found))

    def _check_names(self, where) -> None:
        """Where the file names its tensors, the config must name the same ones."""
        config = self.entry.config
        for kind, declared, found in (("input", config.input, self.inputs),
                                      ("output", config.output, self.outputs)):
            if not found:
                continue
            have = sorted(t.name for t in found)
            for i, tensor in enumerate(declared):
                if tensor.name not in have:
                    raise ConfigError(f"{where}: field '{kind}[{i}].name': {tensor.name!r} is not in "
                                      f"{self.path.name}, whose {kind}s are {have}")

    # Batch size ------------------------------------------------------------------------

    def seconds_per_batch(self, batch: int) -> Run:
        """One run of ``batch`` random frames at the network's scale: its wall seconds (a
        GPU's work waited for), and on the CPU whether the process had the cores to itself
        (``neighbours_busy``)."""
        images = torch.rand(batch, 3, self.info.input_size, self.info.input_size, device=self.device)
        before, own = busy_s(), time.process_time()
        start = time.perf_counter()
        self(images)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return Run(time.perf_counter() - start)
        wall = time.perf_counter() - start
        after = busy_s()
        if before is None or after is None:
            return Run(wall)  # no /proc/stat here: nothing to tell neighbours by
        others = (after - before) - (time.process_time() - own)
        return Run(wall, alone=others <= NEIGHBOURS_SHARE * wall * cores())

    def best_batch_size(self, max_batch_size: int) -> tuple[int, dict[int, float]]:
        """``choose_batch_size`` for this network on this device, measured now; once per
        process for a model file, device, bound and thread count."""
        key = (str(self.path), str(self.device), max_batch_size, torch.get_num_threads())
        if key not in _MEASURED_BATCHES:
            _MEASURED_BATCHES[key] = choose_batch_size(self.seconds_per_batch, max_batch_size)
        return _MEASURED_BATCHES[key]


def last_line(exc: BaseException) -> str:
    """What a runtime's error says: its messages carry whole tracebacks or graph dumps, and
    the last line says it."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


def _pred_and_proto(outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The detections (3-D) and the prototypes (4-D), in whichever order a runtime gives them."""
    by_rank = {o.dim(): o for o in outputs}
    if len(outputs) != 2 or set(by_rank) != {3, 4}:
        shapes = [list(o.shape) for o in outputs]
        raise ModelError(f"a YOLO-seg network returns detections (3-D) and prototypes (4-D), got {shapes}")
    return by_rank[3], by_rank[4]


def _int(value: Any) -> int | None:
    try:
        return int(ast.literal_eval(value) if isinstance(value, str) else value) if value else None
    except (ValueError, SyntaxError, TypeError):
        return None


def _scale(meta: dict) -> int | None:
    """The scale a network works at: ours (``input_size``) or ultralytics' (``imgsz``)."""
    if meta.get("input_size"):
        return _int(meta["input_size"])
    imgsz = meta.get("imgsz")
    if isinstance(imgsz, str):
        try:
            imgsz = ast.literal_eval(imgsz)
        except (ValueError, SyntaxError):
            return None
    if isinstance(imgsz, (list, tuple)) and imgsz:
        return max(int(v) for v in imgsz)
    return _int(imgsz)


def _class_names(meta: dict) -> list[str] | None:
    """Class names from a file's metadata: ours (a JSON list) or ultralytics' (a dict by id)."""
    names = meta.get("names")
    if isinstance(names, str):
        try:
            names = json.loads(names)
        except json.JSONDecodeError:
            try:
                names = ast.literal_eval(names)
            except (ValueError, SyntaxError):
                return None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    return [str(n) for n in names] if isinstance(names, list) and names else None


def load_runner(entry: ModelEntry, device: str) -> Runner:
    """The runner for a network model, by its platform or backend; ConfigError if it cannot run."""
    runtime = runtime_of(entry)
    try:
        module = importlib.import_module(f"{__name__}.{runtime}")
    except ImportError as exc:
        raise ConfigError(f"{entry.config_path}: {runtime} models need the {exc.name} package, "
                          "which the server's install brings: pip install 'rle-serving[server]'") from None
    return module.RUNNER(entry, device)


__all__ = ["NetworkInfo", "Run", "Runner", "Tensor", "choose_batch_size", "cores", "load_runner",
           "resolve_device"]
