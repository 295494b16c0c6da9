"""ONNX networks (Triton's ``onnxruntime_onnx``): ``<version>/model.onnx``, run by ONNX Runtime:
the TensorRT and CUDA execution providers on a CUDA device where the installed build has
them, the CPU's otherwise, with the server's network threads. Tensor names and shapes come
from the file; scale, stride and class names from its metadata (ours, or ultralytics')."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import torch

from ..errors import ConfigError
from . import Runner, Tensor, last_line

LOG = logging.getLogger(__name__)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxRunner(Runner):
    def _load(self) -> tuple[list[Tensor], list[Tensor], dict]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the server's thread budget
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's threads spin after a run, waiting for the next: on a small CPU that
        # takes the cores from the decoding, the event loop and any other model (measured:
        # an OpenVINO INT8 network beside it ran 1.4x slower). It costs ONNX Runtime nothing.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            providers = [p for p in GPU_PROVIDERS if p in ort.get_available_providers()]
            if not providers:
                raise ConfigError(f"{self.entry.config_path}: a GPU instance needs ONNX Runtime "
                                  "with CUDA (pip install onnxruntime-gpu); this build has "
                                  f"{ort.get_available_providers()}")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime's own errors for a corrupt or foreign file
            raise ConfigError(f"{self.path}: not a loadable ONNX model ({last_line(exc)})") from None
        LOG.info("%s: ONNX Runtime %s on %s", self.entry.name, ort.__version__,
                 ", ".join(self.session.get_providers()))
        self.input_name = self.session.get_inputs()[0].name
        return (_tensors(self.session.get_inputs()), _tensors(self.session.get_outputs()),
                dict(self.session.get_modelmeta().custom_metadata_map))

    def _run(self, images: torch.Tensor) -> list[torch.Tensor]:
        host = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        outputs = self.session.run(None, {self.input_name: host})
        return [torch.from_numpy(o).to(self.device) for o in outputs]


def _tensors(nodes) -> list[Tensor]:
    return [Tensor(n.name, tuple(d if isinstance(d, int) and d > 0 else -1 for d in n.shape))
            for n in nodes]


RUNNER = OnnxRunner  # what load_runner takes from this module
