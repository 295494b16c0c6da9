"""``yolo``: YOLOv5/v7-seg and YOLOv8/11-seg, dense candidates with prototype masks.

Both layouts give M mask coefficients per candidate and prototypes ``proto`` (B, M, Ph, Pw);
their detections differ:

- ``yolov5`` (YOLOv5-seg, YOLOv7-seg): ``pred`` (B, A, 5 + C + M): cx, cy, w, h,
  objectness, C class scores, M coefficients, one row per candidate;
- ``yolov8`` (YOLOv8-seg, YOLO11-seg, as ultralytics exports them): ``pred`` (B, 4 + C + M,
  A): cx, cy, w, h, C class scores, M coefficients, one COLUMN per candidate, and no
  objectness.

``normalize`` gives both the YOLOv5 layout (a v8 candidate's objectness is 1, so its score is
its class score), so candidates and NMS are written once (``select``).

Which layout a network has is read from its output shapes: the candidates are the long
dimension (thousands) and the channels the short one; with class names known, the channel
count must be 5 + C + M (v5) or 4 + C + M (v8); without them, candidates in rows read as
v5 and in columns as v8, each layout's own. ``parameters.head`` "yolov5" or "yolov8" decides
where the shapes cannot (a v8 network with its candidates first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import postprocess
from ..errors import ConfigError
from ..postprocess import Kept, PostprocessOptions

# More candidates than this per image after the confidence filter are cut to the best-scoring
# ones before NMS (the IoU matrix is candidates squared).
MAX_NMS_CANDIDATES = 3000
LAYOUTS = ("yolov5", "yolov8")


def by_rank(outputs: Mapping[str, Any]) -> tuple[Any, Any]:
    """The detections (3-D) and the prototypes (4-D) of a YOLO network, tensors or shapes."""
    ranked = {len(getattr(v, "shape", v)): v for v in outputs.values()}
    return ranked[3], ranked[4]


@dataclass(frozen=True)
class PrototypeMasks:
    """Kept detections' coefficients (K, M) and the batch's prototypes (B, M, Ph, Pw): a
    mask's logits are its coefficients times its image's prototypes, cut to its box. One row
    per detection; image: (K,) host, each one's image."""

    coefficients: Any
    proto: Any
    image: np.ndarray
    confined = True

    @property
    def rows(self) -> np.ndarray:
        return np.arange(len(self.image))

    def logits(self, start: int, end: int):
        """Rows of one image (the only way post-processing asks for box-cut masks)."""
        m, ph, pw = self.proto.shape[1:]
        if start == end:
            return self.coefficients.new_zeros((0, ph, pw))
        prototypes = self.proto[int(self.image[start])].reshape(m, -1)
        return (self.coefficients[start:end] @ prototypes).reshape(-1, ph, pw)


@dataclass(frozen=True)
class YoloHead:
    """layout: "yolov5" or "yolov8"; candidates_first: the candidates are pred's dim 1 (else
    its dim 2); num_classes: C."""

    layout: str
    candidates_first: bool
    num_classes: int
    name = "yolo"

    def normalize(self, pred: torch.Tensor) -> torch.Tensor:
        """pred in the YOLOv5 layout (B, A, 5 + C + M)."""
        if self.layout == "yolov5":
            return pred
        rows = pred if self.candidates_first else pred.transpose(1, 2)
        objectness = torch.ones_like(rows[..., :1])
        return torch.cat([rows[..., :4], objectness, rows[..., 4:]], dim=-1)

    def select(self, outputs: Mapping[str, Any], options: Sequence[PostprocessOptions],
               input_hw: tuple[int, int]) -> Kept:
        """Candidates above each image's confidence, then greedy class-aware NMS per image."""
        raw, proto = by_rank(outputs)
        pred = self.normalize(raw)
        num_classes = self.num_classes
        device = pred.device
        threshold = torch.tensor([o.confidence for o in options], device=device,
                                 dtype=pred.dtype)[:, None]
        objectness = pred[..., 4]
        class_scores, classes = (pred[..., 5 : 5 + num_classes] * pred[..., 4:5]).max(-1)
        image, anchor = torch.nonzero((objectness > threshold) & (class_scores > threshold),
                                      as_tuple=True)
        scores = class_scores[image, anchor]
        # Best first within each image: sort by score, then stably by image.
        order = scores.argsort(descending=True)
        order = order[image[order].argsort(stable=True)]
        image, anchor, scores = image[order], anchor[order], scores[order]
        per_image = postprocess.to_host(torch.bincount(image, minlength=len(options)))
        starts = np.concatenate([[0], np.cumsum(per_image)[:-1]])
        rank = torch.arange(len(image), device=device) - torch.as_tensor(starts, device=device)[image]
        capped = rank < MAX_NMS_CANDIDATES
        image, anchor, scores, rank = image[capped], anchor[capped], scores[capped], rank[capped]
        per_image = np.minimum(per_image, MAX_NMS_CANDIDATES)
        starts = np.concatenate([[0], np.cumsum(per_image)[:-1]])
        rows = pred[image, anchor]
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        classes = classes[image, anchor]
        overlaps = _overlaps(boxes, classes, image, rank, per_image, options)
        kept: list[int] = []
        counts = []
        for b, o in enumerate(options):
            survivors = _greedy(overlaps[b, : per_image[b], : per_image[b]], o.max_detections)
            kept.extend(starts[b] + np.asarray(survivors, np.int64))
            counts.append(len(survivors))
        index = torch.as_tensor(np.asarray(kept, np.int64), device=device)
        images = np.repeat(np.arange(len(options)), counts)
        return Kept(boxes[index], scores[index], classes[index],
                    PrototypeMasks(rows[index, 5 + num_classes :], proto, images), images)


def _overlaps(boxes, classes, image, rank, per_image: np.ndarray,
              options: Sequence[PostprocessOptions]) -> np.ndarray:
    """(B, Kmax, Kmax) host bools: candidate pairs of one image and one class overlapping
    above that image's IoU threshold. One device-to-host copy for the batch."""
    size = int(per_image.max()) if per_image.size else 0
    padded = torch.zeros((len(options), size, 4), dtype=boxes.dtype, device=boxes.device)
    # Boxes of different classes are moved apart so they never overlap.
    padded[image, rank] = boxes + (classes.to(boxes.dtype) * 8192.0)[:, None]
    lt = torch.maximum(padded[:, :, None, :2], padded[:, None, :, :2])
    rb = torch.minimum(padded[:, :, None, 2:], padded[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (padded[..., 2:] - padded[..., :2]).clamp(min=0).prod(-1)
    iou = inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-9)
    thresholds = torch.tensor([o.iou_threshold for o in options], dtype=iou.dtype,
                              device=iou.device)
    return postprocess.to_host(iou > thresholds[:, None, None])


def _greedy(overlaps: np.ndarray, limit: int) -> list[int]:
    """Indices kept by greedy NMS over candidates sorted best first (host loop)."""
    suppressed = np.zeros(len(overlaps), bool)
    keep: list[int] = []
    for i in range(len(overlaps)):
        if len(keep) == limit:
            break
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return keep


def find(shapes: Mapping[str, Sequence[int]], num_classes: int | None, declared: str | None,
         where) -> YoloHead:
    """The layout of a YOLO network from its (B, X, Y) detections' and (B, M, Ph, Pw)
    prototypes' shapes. declared: parameters.head ("yolov5", "yolov8", or "yolo": either)."""
    pred_shape, proto_shape = by_rank(shapes)
    _, x, y = (int(d) for d in pred_shape)
    m = int(proto_shape[1])
    fits = []  # (layout, candidates_first, classes) of every reading the shapes allow
    for layout, extra in (("yolov5", 5), ("yolov8", 4)):
        for first, channels in ((True, y), (False, x)):
            classes = channels - extra - m
            if classes > 0 and (num_classes is None or classes == num_classes):
                fits.append((layout, first, classes))
    if declared in LAYOUTS:
        fits = [f for f in fits if f[0] == declared]
    if num_classes is None or len(fits) > 1:  # the candidates are the long dimension
        fits = [f for f in fits if (x >= y) == f[1]]
    if declared not in LAYOUTS and len(fits) > 1:  # each layout's own: v5 rows, v8 columns
        fits = [f for f in fits if (f[0] == "yolov5") == f[1]]
    if len(fits) != 1:
        known = "" if num_classes is None else f" with {num_classes} classes"
        raise ConfigError(
            f"{where}: outputs {list(pred_shape)} and {list(proto_shape)} fit no YOLO-seg "
            f"head{known}: YOLOv5/v7-seg gives (B, A, 5 + C + M), YOLOv8/11-seg (B, 4 + C + M, A), "
            f"with M = {m} coefficients (the prototypes' channels); set parameters.head to "
            f"choose one of {', '.join(LAYOUTS)}")
    return YoloHead(*fits[0])

