"""The output heads of YOLO-seg networks, and the one layout the rest of the pipeline reads.

Both heads give M mask coefficients per candidate and prototypes ``proto`` (B, M, Ph, Pw);
their detections differ:

- ``yolov5`` (YOLOv5-seg, YOLOv7-seg): ``pred`` (B, A, 5 + C + M): cx, cy, w, h,
  objectness, C class scores, M coefficients, one row per candidate;
- ``yolov8`` (YOLOv8-seg, YOLO11-seg, as ultralytics exports them): ``pred`` (B, 4 + C + M,
  A): cx, cy, w, h, C class scores, M coefficients, one COLUMN per candidate, and no
  objectness.

``normalize`` gives every head the YOLOv5 layout (a v8 candidate's objectness is 1, so its
score is its class score), so NMS and masks (``postprocess``) are written once.

Which head a network has is read from its output shapes: the candidates are the long
dimension (thousands) and the channels the short one; with class names known, the channel
count must be 5 + C + M (v5) or 4 + C + M (v8); without them, candidates in rows read as
v5 and in columns as v8, each head's own layout. A config parameter ``head`` ("yolov5" or
"yolov8") decides where the shapes cannot (a v8 network with its candidates first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError

HEADS = ("yolov5", "yolov8")


@dataclass(frozen=True)
class Head:
    """name: "yolov5" or "yolov8"; candidates_first: the candidates are pred's dim 1 (else its
    dim 2); num_classes: C."""

    name: str
    candidates_first: bool
    num_classes: int

    def normalize(self, pred: torch.Tensor) -> torch.Tensor:
        """pred in the YOLOv5 layout (B, A, 5 + C + M)."""
        if self.name == "yolov5":
            return pred
        rows = pred if self.candidates_first else pred.transpose(1, 2)
        objectness = torch.ones_like(rows[..., :1])
        return torch.cat([rows[..., :4], objectness, rows[..., 4:]], dim=-1)


def find_head(pred_shape: Sequence[int], proto_shape: Sequence[int], num_classes: int | None,
              declared: str | None, where) -> Head:
    """The head of a network from its outputs' shapes (B, X, Y) and (B, M, Ph, Pw).

    num_classes: from the class names, when known. declared: config.pbtxt's ``head``
    parameter, if any. ConfigError naming the file when the shapes fit no head."""
    if len(pred_shape) != 3 or len(proto_shape) != 4:
        raise ConfigError(f"{where}: a YOLO-seg network returns detections (B, A, channels) and "
                          f"prototypes (B, M, h, w); got {list(pred_shape)} and {list(proto_shape)}")
    if declared is not None and declared not in HEADS:
        raise ConfigError(f"{where}: field 'parameters.head': {declared!r} is not a head we know "
                          f"(use one of: {', '.join(HEADS)})")
    _, x, y = (int(d) for d in pred_shape)
    m = int(proto_shape[1])
    fits = []  # (name, candidates_first, classes) of every reading the shapes allow
    for name, extra in (("yolov5", 5), ("yolov8", 4)):
        for first, channels in ((True, y), (False, x)):
            classes = channels - extra - m
            if classes > 0 and (num_classes is None or classes == num_classes):
                fits.append((name, first, classes))
    if declared is not None:
        fits = [f for f in fits if f[0] == declared]
    if num_classes is None or len(fits) > 1:  # the candidates are the long dimension
        fits = [f for f in fits if (x >= y) == f[1]]
    if declared is None and len(fits) > 1:  # each head's own layout: v5 rows, v8 columns
        fits = [f for f in fits if (f[0] == "yolov5") == f[1]]
    if len(fits) != 1:
        known = "" if num_classes is None else f" with {num_classes} classes"
        raise ConfigError(
            f"{where}: outputs {list(pred_shape)} and {list(proto_shape)} fit no YOLO-seg "
            f"head{known}: YOLOv5/v7-seg gives (B, A, 5 + C + M), YOLOv8/11-seg (B, 4 + C + M, A), "
            f"with M = {m} coefficients (the prototypes' channels); set parameters.head to "
            f"choose one of {', '.join(HEADS)}")
    name, first, classes = fits[0]
    return Head(name, first, classes)
