"""Helpers for the masks in results: decode, area, bounding box and IoU straight from COCO
RLE (area, box and IoU never build the dense mask), and supervision.Detections.

Every helper validates its input as ``pipeline.rle.decode`` does (``rle.parse``): malformed
RLE raises ValueError naming the problem, never another error or a silently wrong answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.rle import decode, parse


def _runs(rle: Mapping) -> np.ndarray:
    return parse(rle)[1]  # validated: malformed counts raise ValueError


def to_mask(rle: Mapping) -> np.ndarray:
    """(H, W) uint8 0/1 from one RLE (validated; our decoder, no pycocotools needed)."""
    return decode([rle])[0]


def area(rle: Mapping) -> int:
    """Pixels set: the sum of the odd (foreground) runs. ValueError if the RLE is malformed."""
    return int(_runs(rle)[1::2].sum())


def bbox(rle: Mapping) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the set pixels, COCO style; (0, 0, 0, 0) if empty.
    ValueError if the RLE is malformed."""
    (H, _), runs = parse(rle)
    ends = np.cumsum(runs)
    starts = ends - runs
    on = (np.arange(runs.size) % 2 == 1) & (runs > 0)
    if not on.any() or H == 0:
        return (0, 0, 0, 0)
    first, last = starts[on], ends[on] - 1  # column-major pixel indices
    x0, x1 = int(first.min() // H), int(last.max() // H)
    same_column = first // H == last // H
    y0 = int(np.where(same_column, first % H, 0).min())
    y1 = int(np.where(same_column, last % H, H - 1).max())
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


def iou(a: Mapping, b: Mapping) -> float:
    """Intersection over union of two masks of one size, computed on their runs (never
    decoded); 0.0 when both are empty. ValueError if either RLE is malformed or the sizes
    differ."""
    (size_a, runs_a), (size_b, runs_b) = parse(a, 0), parse(b, 1)
    if size_a != size_b:
        raise ValueError(f"masks of different sizes cannot be compared: {list(size_a)} vs "
                         f"{list(size_b)}")
    ends_a, ends_b = np.cumsum(runs_a), np.cumsum(runs_b)
    # Cut the frame at every run end of either mask; each piece is inside A (or B) when the
    # run of A holding it is odd (foreground).
    cuts = np.union1d(ends_a, ends_b)
    starts = np.concatenate([[0], cuts[:-1]])
    in_a = np.searchsorted(ends_a, starts, side="right") % 2 == 1
    in_b = np.searchsorted(ends_b, starts, side="right") % 2 == 1
    inter = int(((cuts - starts) * (in_a & in_b)).sum())
    union = int(runs_a[1::2].sum()) + int(runs_b[1::2].sum()) - inter
    return inter / union if union else 0.0


def to_supervision(document: Mapping):
    """A ``supervision.Detections`` from a response document (needs ``pip install supervision``)."""
    try:
        import supervision as sv
    except ImportError:
        raise ImportError("to_supervision needs the optional 'supervision' package: "
                          "pip install supervision") from None
    predictions: Sequence[Mapping] = document["predictions"]
    H, W = document["image"]["height"], document["image"]["width"]
    xyxy = np.array([[p["x"] - p["width"] / 2, p["y"] - p["height"] / 2,
                      p["x"] + p["width"] / 2, p["y"] + p["height"] / 2] for p in predictions],
                    np.float32).reshape(-1, 4)
    masks = (decode([p["rle"] for p in predictions]).astype(bool) if predictions
             else np.zeros((0, H, W), bool))
    return sv.Detections(
        xyxy=xyxy, mask=masks,
        confidence=np.array([p["confidence"] for p in predictions], np.float32),
        class_id=np.array([p["class_id"] for p in predictions], int),
        data={"class_name": np.array([p["class"] for p in predictions])},
    )
