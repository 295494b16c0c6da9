"""``yolo_end2end``: YOLO26-seg as ultralytics exports it NMS-free (``end2end=True``, its
default since 8.4).

``pred`` (B, N, 6 + M): x1, y1, x2, y2 (input pixels), score, class id, M mask coefficients,
one row per detection, at most N (ultralytics' ``max_det``, 300); ``proto`` (B, M, Ph, Pw) as
``yolo``'s. The network has ranked and de-duplicated its rows itself: no NMS here, only each
image's confidence and detection limit.
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
from .yolo import PrototypeMasks, by_rank

# More rows than this are a dense head's candidates, not an end-to-end head's detections.
MAX_ROWS = 1000


def fits(shapes: Mapping[str, Sequence[int]]) -> bool:
    """(B, N, 6 + M) rows with N a detection limit, not thousands of candidates."""
    (_, rows, channels), proto = by_rank(shapes)
    return 0 < rows <= MAX_ROWS and channels == 6 + int(proto[1])


@dataclass(frozen=True)
class EndToEndHead:
    num_classes: int | None  # unknown without class names: the rows hold ids, not scores
    name = "yolo_end2end"

    def select(self, outputs: Mapping[str, Any], options: Sequence[PostprocessOptions],
               input_hw: tuple[int, int]) -> Kept:
        pred, proto = by_rank(outputs)
        device = pred.device
        scores = pred[..., 4]
        order = scores.argsort(dim=1, descending=True, stable=True)  # ranked already, as a rule
        pred = torch.take_along_dim(pred, order[..., None], dim=1)
        threshold = torch.tensor([o.confidence for o in options], device=device,
                                 dtype=pred.dtype)[:, None]
        limit = torch.tensor([o.max_detections for o in options], device=device)[:, None]
        rank = torch.arange(pred.shape[1], device=device)[None, :]
        image, row = torch.nonzero((pred[..., 4] > threshold) & (rank < limit), as_tuple=True)
        rows = pred[image, row]
        images = postprocess.to_host(image).astype(np.int64)
        return Kept(rows[:, :4], rows[:, 4], rows[:, 5].round().long(),
                    PrototypeMasks(rows[:, 6:], proto, images), images)


def find(shapes: Mapping[str, Sequence[int]], num_classes: int | None, where) -> EndToEndHead:
    (_, rows, channels), proto = by_rank(shapes)
    if channels != 6 + int(proto[1]):
        raise ConfigError(f"{where}: a YOLO end-to-end network returns (B, N, 6 + M) rows and "
                          f"(B, M, h, w) prototypes; got {[1, rows, channels]} and {list(proto)}")
    return EndToEndHead(num_classes)
