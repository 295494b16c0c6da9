"""OpenVINO networks (Triton's ``openvino`` backend): ``<version>/model.xml`` + ``model.bin``
(IR), compiled for the CPU with the server's network threads. FP32 networks run in FP32
(OpenVINO would otherwise pick bf16 on CPUs that have it, which moves detections); an INT8
network's quantised layers run in INT8 all the same. Tensor names and shapes come from the
file; scale, stride and class names from its runtime info (ours, or ultralytics')."""

from __future__ import annotations

import logging

import numpy as np
import openvino as ov
import torch

from ..errors import ConfigError
from . import Runner, Tensor, last_line

LOG = logging.getLogger(__name__)


class OpenVinoRunner(Runner):
    def _load(self) -> tuple[list[Tensor], list[Tensor], dict]:
        if self.device.type != "cpu":
            raise ConfigError(f"{self.entry.config_path}: OpenVINO runs on the CPU here; use "
                              "instance_group KIND_CPU (or an ONNX or TorchScript form on a GPU)")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO's own errors for a corrupt or foreign file
            raise ConfigError(f"{self.path}: not a loadable OpenVINO model ({last_line(exc)})") from None
        meta = _metadata(model, self.path)
        inputs, outputs = _tensors(model.inputs), _tensors(model.outputs)
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # the server's thread budget
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        })
        self.request = self.compiled.create_infer_request()
        LOG.info("%s: OpenVINO %s on the CPU", self.entry.name, ov.__version__)
        return inputs, outputs, meta

    def _run(self, images: torch.Tensor) -> list[torch.Tensor]:
        host = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        results = self.request.infer([host])
        return [torch.from_numpy(np.array(results[o], copy=True)) for o in self.compiled.outputs]


def _metadata(model, path) -> dict:
    """Scale, stride and class names: the converter's runtime info (``names``,
    ``input_size``, ``stride``), else what an ultralytics export leaves: its
    ``model_info/labels`` and the ``metadata.yaml`` beside the file (with ``end2end``, a
    YOLO26 export's ranked rows)."""
    meta = {key: model.get_rt_info([key]).astype(str) for key in ("names", "input_size", "stride")
            if model.has_rt_info([key])}
    if "names" not in meta and model.has_rt_info(["model_info", "labels"]):
        meta["names"] = model.get_rt_info(["model_info", "labels"]).astype(str).split()
    beside = path.with_name("metadata.yaml")
    if beside.is_file():
        try:
            import yaml

            found = yaml.safe_load(beside.read_text()) or {}
        except Exception:  # noqa: BLE001 - no PyYAML, or not YAML: the rest still serves
            found = {}
        for key in ("names", "stride", "imgsz", "end2end"):
            if key in found:
                meta.setdefault(key, found[key])
    return meta


def _tensors(ports) -> list[Tensor]:
    """Each port's name (an unnamed output, as some exports leave, by its index) and dims."""
    out = []
    for i, port in enumerate(ports):
        shape = port.get_partial_shape()
        dims = tuple(d.get_length() if d.is_static else -1 for d in shape)
        out.append(Tensor(next(iter(port.get_names()), f"output{i}"), dims))
    return out


RUNNER = OpenVinoRunner  # what load_runner takes from this module
