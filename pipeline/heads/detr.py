"""``detr``: RF-DETR-Seg as rfdetr exports it (and Mask2Former's and SAM 3 decoder's layout).

Outputs: ``dets`` (B, Q, 4) boxes as normalised cx, cy, w, h of the network input; ``labels``
(B, Q, C) class logits (sigmoid, not softmax: a query may score for several classes);
``masks`` (B, Q, h, w) mask logits over the whole input (h = S / 4), foreground above 0.

No NMS: each image keeps its top-k (query, class) pairs by sigmoid score, k its
``max_detections`` and at most the query count (rfdetr's ``num_select`` is its query count),
above its confidence. A query's mask is not cut to its box: it is upsampled bilinearly to the image
and thresholded at 0 (``postprocess``), only inside the smallest window its positive cells
allow.
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


@dataclass(frozen=True)
class QueryMasks:
    """The kept queries' own mask logits, (U, h, w), one row per (image, query) kept, in image
    order: a query kept for two classes is one mask, sampled once. rows: (K,) each
    detection's; image: (U,) each row's."""

    masks: Any
    rows: np.ndarray
    image: np.ndarray
    confined = False

    def logits(self, start: int, end: int):
        return self.masks[start:end]


@dataclass(frozen=True)
class DetrHead:
    """boxes, labels, masks: the outputs' names."""

    boxes: str
    labels: str
    masks: str
    num_classes: int
    name = "detr"

    def select(self, outputs: Mapping[str, Any], options: Sequence[PostprocessOptions],
               input_hw: tuple[int, int]) -> Kept:
        boxes, logits, masks = outputs[self.boxes], outputs[self.labels], outputs[self.masks]
        device = logits.device
        batch, queries, classes = logits.shape
        k = min(max(o.max_detections for o in options), queries)
        scores = logits.sigmoid().reshape(batch, -1)
        # Ties go to the lower (query, class) index, as rfdetr's own decoders break them.
        index = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
        top = scores.gather(1, index)
        threshold = torch.tensor([o.confidence for o in options], device=device,
                                 dtype=top.dtype)[:, None]
        limit = torch.tensor([o.max_detections for o in options], device=device)[:, None]
        rank = torch.arange(k, device=device)[None, :]
        image, place = torch.nonzero((top > threshold) & (rank < limit), as_tuple=True)
        chosen = index[image, place]
        query, cls = chosen // classes, chosen % classes
        cx, cy, w, h = boxes[image, query].unbind(-1)
        height, width = input_hw
        xyxy = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                            (cx + w / 2) * width, (cy + h / 2) * height], 1)
        kept = postprocess.to_host(torch.stack([image, query])).astype(np.int64)
        pairs, rows = np.unique(kept[0] * queries + kept[1], return_inverse=True)
        at = torch.as_tensor(pairs, device=device)
        return Kept(xyxy, top[image, place], cls,
                    QueryMasks(masks[at // queries, at % queries], rows.reshape(-1), pairs // queries),
                    kept[0])


def find(shapes: Mapping[str, Sequence[int]], num_classes: int | None, where) -> DetrHead:
    """Which output is which: boxes (B, Q, 4), class logits (B, Q, C), masks (B, Q, h, w),
    by rank and the box's 4 (rfdetr names them dets, labels, masks)."""
    named = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    masks = [k for k, v in named.items() if len(v) == 4]
    threes = [k for k, v in named.items() if len(v) == 3]
    boxes = [k for k in threes if named[k][2] == 4]
    if len(boxes) > 1 and "dets" in boxes:
        boxes = ["dets"]
    labels = [k for k in threes if k not in boxes[:1]]
    queries = {named[k][1] for k in masks + threes}
    if len(masks) != 1 or len(threes) != 2 or len(boxes) != 1 or len(labels) != 1 or len(queries) != 1:
        described = ", ".join(f"{k} {list(v)}" for k, v in named.items())
        raise ConfigError(f"{where}: a DETR network returns boxes (B, Q, 4), class logits (B, Q, C) "
                          f"and masks (B, Q, h, w) for the same Q queries; got {described}")
    classes = named[labels[0]][2]
    if num_classes is not None and num_classes != classes:
        raise ConfigError(f"{where}: {num_classes} class names for the {classes} class logits of "
                          f"output {labels[0]!r}")
    return DetrHead(boxes[0], labels[0], masks[0], classes)
