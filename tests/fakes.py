"""A fake network for the frontend, batching and reliability tests: a tiny TorchScript file with
the YOLO-seg contract (``pred``, ``proto``), served from a repository like the real one.

It finds saturated colour blobs: a pixel is "red", "green" or "blue" when that channel is
above 0.6 and the other two below 0.4. For each class present it proposes the bounding box
of that class's pixels, scored by how much of the box they fill; its prototype masks are
those pixels (at a quarter of the input's resolution, as YOLO's). So a synthetic ``scene``
(coloured rectangles on grey) gives known detections and masks, deterministically, at any
input size divisible by 32, in milliseconds. ``delay_ms`` adds busy work per image, so
queues and deadlines can be exercised: the network is slow the way a real one is (on the
CPU), not asleep.
"""

from __future__ import annotations

import functools
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CLASSES = ("red", "green", "blue")
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
COEFFICIENTS = 32
NETWORK = "fake_seg"
PIPELINE = "instance_segmentation"


class FakeSegmenter(torch.nn.Module):
    def __init__(self, iterations_per_image: int, fails_on_width: int = 0):
        super().__init__()
        self.iterations_per_image = iterations_per_image
        self.fails_on_width = fails_on_width
        self.coefficients = COEFFICIENTS

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = images.shape
        if w == self.fails_on_width:
            raise RuntimeError(f"this network cannot run {w}-wide inputs")
        busy = torch.zeros(1)
        for _ in range(self.iterations_per_image * b):  # the network's "compute"
            busy = busy + 1.0
        strong, weak = images > 0.6, images < 0.4
        rows = torch.arange(h, dtype=torch.float32).view(1, h)
        cols = torch.arange(w, dtype=torch.float32).view(1, w)
        preds: list[Tensor] = []
        protos: list[Tensor] = []
        for c in range(3):
            mask = strong[:, c] & weak[:, (c + 1) % 3] & weak[:, (c + 2) % 3]  # (b, h, w)
            in_rows, in_cols = mask.any(2).float(), mask.any(1).float()  # (b, h), (b, w)
            y1 = (rows + (1 - in_rows) * 1e9).min(1).values
            y2 = (rows - (1 - in_rows) * 1e9).max(1).values + 1
            x1 = (cols + (1 - in_cols) * 1e9).min(1).values
            x2 = (cols - (1 - in_cols) * 1e9).max(1).values + 1
            present = in_rows.sum(1) > 0
            area = ((y2 - y1) * (x2 - x1)).clamp(min=1.0)
            fill = torch.where(present, mask.flatten(1).float().sum(1) / area, torch.zeros(b))
            box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1)
            box = torch.where(present.view(b, 1), box, torch.zeros(b, 4))
            scores = torch.zeros(b, 3)
            scores[:, c] = 1.0
            coefficients = torch.zeros(b, self.coefficients)
            coefficients[:, c] = 1.0
            preds.append(torch.cat([box, fill.view(b, 1), scores, coefficients], 1).view(b, 1, -1))
            quarter = torch.nn.functional.avg_pool2d(mask.float().unsqueeze(1), 4)  # (b, 1, h/4, w/4)
            protos.append(quarter * 16.0 - 8.0)  # logits: +8 on the class's pixels, -8 elsewhere
        zeros = torch.zeros(b, self.coefficients - 3, h // 4, w // 4)
        return torch.cat(preds, 1) + busy * 0.0, torch.cat(protos + [zeros], 1)


@functools.cache
def iterations_per_ms() -> int:
    """How many busy iterations the scripted loop runs in a millisecond here, now."""
    probe = torch.jit.script(FakeSegmenter(20000))
    image = torch.zeros(1, 3, 32, 32)
    probe(image)
    start = time.perf_counter()
    probe(image)
    return max(1, int(20000 / ((time.perf_counter() - start) * 1e3)))


PIPELINE_CONFIG = """name: "instance_segmentation"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "IMAGE", data_type: TYPE_STRING, dims: [ 1 ] }} ]
output [ {{ name: "DETECTIONS", data_type: TYPE_STRING, dims: [ 1 ] }} ]
dynamic_batching {{
  max_queue_delay_microseconds: 5000
  default_queue_policy {{
    max_queue_size: 64
    default_timeout_microseconds: {timeout_us}
    timeout_action: REJECT
    allow_timeout_override: true
  }}
}}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters {{ key: "network" value: {{ string_value: "fake_seg" }} }}
parameters {{ key: "calibrate_batch_size" value: {{ string_value: "false" }} }}
"""

NETWORK_CONFIG = """name: "fake_seg"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 3, -1, -1 ] } ]
output [
  { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ -1, 40 ], label_filename: "labels.txt" },
  { name: "OUTPUT__1", data_type: TYPE_FP32, dims: [ 32, -1, -1 ] }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""


META = {"names": list(CLASSES), "input_size": 320, "stride": 32}
# The fake network's other forms: Triton's platform line, and the file.
FORMS = {"onnx": ('platform: "onnxruntime_onnx"', "model.onnx"),
         "openvino": ('backend: "openvino"', "model.xml")}


def fake_repository(root: Path, delay_ms: float = 0.0, queue_timeout_s: float = 2.0,
                    max_batch_size: int = 8, fails_on_width: int = 0) -> Path:
    """A model repository under ``root``: the pipeline ``instance_segmentation`` over the fake
    network, ``delay_ms`` of busy work per image, the given queue timeout (REJECT,
    overridable) and batch bound (never calibrated). fails_on_width: the network raises on
    inputs this wide (a model that fails on some batches)."""
    per_image = round(delay_ms * iterations_per_ms()) if delay_ms else 0
    (root / PIPELINE).mkdir(parents=True, exist_ok=True)
    (root / PIPELINE / "config.pbtxt").write_text(PIPELINE_CONFIG.format(
        timeout_us=int(queue_timeout_s * 1e6), max_batch_size=max_batch_size))
    folder = root / NETWORK
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(NETWORK_CONFIG)
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    torch.jit.save(torch.jit.script(FakeSegmenter(per_image, fails_on_width)), str(folder / "1/model.pt"),
                   _extra_files={"meta.json": json.dumps(META)})
    return root


def fake_network_as(folder: Path, form: str, config: str | None = None) -> Path:
    """The fake network as ONNX or OpenVINO IR in ``folder`` (a repository's model folder),
    its metadata inside; ``config``: the config.pbtxt to write (default: only its name,
    runtime and batch bound, so inputs and outputs are read from the file)."""
    import onnx

    runtime, filename = FORMS[form]
    (folder / "1").mkdir(parents=True, exist_ok=True)
    onnx_file = folder / "1" / "model.onnx"
    with torch.inference_mode():
        torch.onnx.export(FakeSegmenter(0), (torch.zeros(1, 3, 64, 96),), str(onnx_file), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["pred", "proto"],
                          dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}, "pred": {0: "b"},
                                        "proto": {0: "b", 2: "ph", 3: "pw"}})
    model = onnx.load(str(onnx_file))
    for key, value in META.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(model, str(onnx_file))
    if form == "openvino":
        import openvino as ov

        ir = ov.convert_model(str(onnx_file))
        for key, value in META.items():
            ir.set_rt_info(json.dumps(value), [key])
        ov.save_model(ir, str(folder / "1" / filename))
        onnx_file.unlink()
    (folder / "config.pbtxt").write_text(
        config or f'name: "{folder.name}"\n{runtime}\nmax_batch_size: 8\n')
    return folder / "1" / filename


def scene(height: int = 240, width: int = 320, **objects: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8: grey, with a filled rectangle (x1, y1, x2, y2) per named colour, e.g.
    ``scene(red=(10, 20, 60, 90))``."""
    rgb = np.full((height, width, 3), 128, np.uint8)
    for name, (x1, y1, x2, y2) in objects.items():
        rgb[y1:y2, x1:x2] = COLOURS[name]
    return rgb


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
