"""Network runners: a network file from the repository on one device, checked at load time.

One interface, ``Runner``: a (B, 3, h, w) float32 batch prepared as the network's
``Preprocess`` says in, its outputs out as torch tensors by name, whatever runs it; the
network's head (``heads``) reads them. Each runtime is a small module of its own, imported
only when a model needs it:

- ``torchscript``: Triton's ``pytorch_libtorch`` (``<version>/model.pt``);
- ``onnx``: ``onnxruntime_onnx`` (``model.onnx``, ONNX Runtime; the CUDA and TensorRT
  providers where a GPU is visible, else the CPU's);
- ``openvino``: backend ``openvino`` (``model.xml`` + ``model.bin``, OpenVINO's CPU plugin).

What they share is here: the check of a network against its config.pbtxt (and, as Triton's
auto-complete does, filling in the inputs and outputs a config leaves out from the file), the
head and pre-processing (``heads``), the class names, a batch size fixed in the file, and the
batch size measured at load (``calibration``). Nothing is unpickled:
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
from ..heads import Head, family_of, find_head, preprocess_for
from ..images import Preprocess
from ..repository import ModelEntry, runtime_of
from .calibration import NEIGHBOURS_SHARE, Run, busy_s, choose_batch_size

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkInfo:
    """What pre- and post-processing need to know about a network.

    preprocess: how an image becomes its input (its scale, stride, resize, normalisation).
    head: its output layout's family (see ``heads``). fixed_batch: the batch size its file
    fixes, else None.
    """

    preprocess: Preprocess
    num_classes: int
    class_names: tuple[str, ...]
    head: str = "yolo"
    fixed_batch: int | None = None

    @property
    def input_size(self) -> int:
        """The scale it works at (a letterbox's long side, a stretch's square)."""
        return self.preprocess.size

    @property
    def stride(self) -> int | None:
        """None for a fixed square input; else any height and width divisible by it."""
        return self.preprocess.stride


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
    """Runs a network: (B, 3, h, w) float32 on ``device`` -> its outputs by name, torch
    tensors on the device. A runtime module subclasses it with ``_load`` (the file -> its
    session, its declared inputs and outputs, its metadata) and ``_run`` (images -> the
    network's raw outputs, in the file's order)."""

    head: Head  # what the outputs say, learnt at load

    def __init__(self, entry: ModelEntry, device: str):
        self.entry = entry
        self.device = torch.device(device)
        self.path = entry.model_file()
        self._lock = threading.Lock()  # one batch at a time per instance
        self.inputs, self.outputs, meta = self._load()
        batch = self.inputs[0].dims[0] if self.inputs and len(self.inputs[0].dims) == 4 else -1
        self.fixed_batch = batch if batch > 0 else None
        self.info = self._check_against_config(meta)

    # What a runtime provides ----------------------------------------------------------

    def _load(self) -> tuple[list[Tensor], list[Tensor], dict]:
        raise NotImplementedError

    def _run(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    # What every runtime shares -----------------------------------------------------

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, h, w) float32 on self.device -> the outputs by name (the file's,
        else output0, output1, ...), each (B, ...); errors as ModelError. A file with a fixed
        batch size gets a smaller batch padded to it."""
        count = len(images)
        if self.fixed_batch and count < self.fixed_batch:
            padding = images.new_zeros((self.fixed_batch - count, *images.shape[1:]))
            images = torch.cat([images, padding])
        try:
            with self._lock, torch.inference_mode():
                outputs = self._run(images)
        except Exception as exc:
            raise ModelError(f"{self.entry.name} failed on a batch of {count}: "
                             f"{last_line(exc)}") from exc
        names = [t.name for t in self.outputs] if len(self.outputs) == len(outputs) else \
            [f"output{i}" for i in range(len(outputs))]
        return {name: output[:count] for name, output in zip(names, outputs)}

    def _check_against_config(self, meta: dict) -> NetworkInfo:
        """Fill in what the config leaves out from the file (Triton's auto-complete), check
        what it declares against the file, and run dummy batches to learn the head."""
        config, where = self.entry.config, self.entry.config_path
        self._complete_config()
        declared = self.entry.parameter("head")
        family = family_of(len(self.outputs) or len(config.output), declared, where)
        wanted = 3 if family == "detr" else 2
        if len(config.input) != 1 or len(config.output) != wanted:
            raise ConfigError(
                f"{where}: a {family} network has 1 input and {wanted} outputs "
                f"({'boxes, class logits, masks' if family == 'detr' else 'detections, prototypes'})"
                f"; config declares {len(config.input)} and {len(config.output)}")
        self._check_names(where)
        dims = list(config.input[0].dims)
        if not (len(dims) == 3 and dims[0] == 3 and (dims[1:] == [-1, -1] or dims[1] == dims[2] > 0)):
            raise ConfigError(f"{where}: input[0].dims must be [3, S, S] or [3, -1, -1], got {dims}")
        preprocess, said = preprocess_for(family, self.entry.parameters, _scale(meta),
                                          _int(meta.get("stride")), dims, where)
        size, stride = preprocess.size, preprocess.stride
        shapes = [(size, size), (size - 2 * stride, size)] if stride else [(size, size)]
        labels = self.entry.labels()  # the config's label file, or labels.txt beside it
        names = labels or _class_names(meta)
        for h, w in shapes:
            try:
                outputs = self(torch.zeros(1, 3, h, w, device=self.device))
            except ModelError as exc:
                raise ConfigError(f"{where}: {self.path.name} does not run at {h}x{w} ({exc}); "
                                  "if it was exported for one size, declare dims [3, S, S] (or "
                                  "set parameters input_scale and stride)") from None
            self._check_output_dims(outputs, f"{h}x{w}", where)
        shapes_by_name = {k: tuple(v.shape) for k, v in outputs.items()}
        self.head = find_head(shapes_by_name, len(names) if names else None, declared,
                              f"{where} ({self.path.name})", end2end=_true(meta.get("end2end")))
        num_classes = self.head.num_classes or len(names or ())
        names = names or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ConfigError(f"{where}: {len(names)} class names for {num_classes} classes")
        LOG.info("%s: %s head, outputs %s; input: %s; from %s; class names %s%s", self.entry.name,
                 self.head.name, ", ".join(f"{k} {list(v)}" for k, v in shapes_by_name.items()),
                 preprocess.describe(), "; ".join(said),
                 f"from {self.entry.label_file()}" if labels else
                 ("from the file's metadata" if names and _class_names(meta) else
                  "unknown: classes are reported by number"),
                 f"; the file fixes its batch size at {self.fixed_batch}" if self.fixed_batch else "")
        return NetworkInfo(preprocess, num_classes, tuple(names), self.head.name, self.fixed_batch)

    def _check_output_dims(self, outputs: dict[str, torch.Tensor], at: str, where) -> None:
        """Each declared output's dims against what the network gave (by name where the file
        names them, else by rank)."""
        for i, output in enumerate(self.entry.config.output):
            found = outputs.get(output.name)
            if found is None:
                same_rank = [v for v in outputs.values() if v.dim() == len(output.dims) + 1]
                if len(same_rank) != 1:
                    continue
                found = same_rank[0]
            want, got = list(output.dims), list(found.shape[1:])
            if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
                raise ConfigError(f"{where}: field 'output[{i}].dims': {output.name} {want} do "
                                  f"not match the network's {got} at {at}")

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


def _int(value: Any) -> int | None:
    try:
        return int(ast.literal_eval(value) if isinstance(value, str) else value) if value else None
    except (ValueError, SyntaxError, TypeError):
        return None


def _true(value: Any) -> bool:
    return value is True or str(value).strip().lower() == "true"


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
