"""The response schema: Roboflow ``inference``'s instance-segmentation predictions.

One document per image::

    {"image": {"width": W, "height": H},
     "predictions": [{"x", "y", "width", "height",       # box centre and size, original px
                      "confidence", "class", "class_id", "detection_id",
                      "rle": {"size": [H, W], "counts": "..."}, "mask_format": "rle"}]}

With ``mask_format="polygon"`` a prediction carries ``points: [{"x", "y"}, ...]`` (the outer
contour of the mask's largest connected part) instead of ``rle``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # this module imports without torch: the light client uses ``record``
    from .postprocess import Detections
    from .rle import RunLengths

# Tensor outputs of the pipeline model: name -> (KServe datatype, dims after the batch
# dimension). Typed tensors are padded to the most detections K among the request's images.
OUTPUTS = {
    "DETECTIONS": ("BYTES", [1]),        # one JSON document per image
    "NUM_DETECTIONS": ("INT32", [1]),
    "BOXES": ("FP32", [-1, 4]),          # x1, y1, x2, y2 in original pixels
    "SCORES": ("FP32", [-1]),
    "CLASS_IDS": ("INT32", [-1]),        # -1 in padding
    "RLE_COUNTS": ("BYTES", [-1]),       # COCO counts; b"" in padding
    "IMAGE_SIZE": ("INT32", [2]),        # height, width
    "TRACKER_IDS": ("INT32", [-1]),      # tracked sequences only; -1: unconfirmed or padding
}
# What a request naming no outputs gets (TRACKER_IDS only when its sequence is tracked).
DEFAULT_OUTPUTS = tuple(name for name in OUTPUTS if name != "TRACKER_IDS")


def class_name(names: Sequence[str], class_id: int) -> str:
    """The class's name, or its number when the model has no name for it."""
    return names[class_id] if 0 <= class_id < len(names) else str(class_id)


def record(x1: float, y1: float, x2: float, y2: float, confidence: float, class_id: int,
           name: str, detection_id: str, tracker_id: int | None = None, **mask) -> dict:
    """THE prediction record (Roboflow's schema): box centre and size, score, class, id, the
    tracker's id on tracked streams, and the mask fields (``rle`` + ``mask_format``, or
    ``points`` + ``mask_format``)."""
    tracked = {} if tracker_id is None else {"tracker_id": tracker_id}
    return {
        "x": (x1 + x2) / 2,
        "y": (y1 + y2) / 2,
        "width": x2 - x1,
        "height": y2 - y1,
        "confidence": confidence,
        "class": name,
        "class_id": class_id,
        "detection_id": detection_id,
        **tracked,
        **mask,
    }


@dataclass(frozen=True)
class Row:
    """One detection, typed, before it becomes a JSON record or a protobuf message.

    i: its index in the image's Detections; box: x1, y1, x2, y2 in original pixels;
    tracker_id: on tracked streams (-1 until confirmed), else None.
    """

    i: int
    box: tuple[float, float, float, float]
    confidence: float
    class_id: int
    class_name: str
    detection_id: str
    tracker_id: int | None = None


def rows(det: Detections, class_names: Sequence[str]) -> Iterator[Row]:
    """An image's detections, best score first, each with a fresh detection id."""
    for i in range(len(det)):
        class_id = int(det.class_ids[i])
        tracker_id = None if det.tracker_ids is None else int(det.tracker_ids[i])
        yield Row(i, tuple(float(v) for v in det.boxes[i]), float(det.scores[i]), class_id,
                  class_name(class_names, class_id), str(uuid.uuid4()), tracker_id)


def predictions(det: Detections, class_names: Sequence[str], mask_format: str = "rle") -> list[dict]:
    """The prediction records of one image, best score first."""
    H, W = det.image_size
    out = []
    for row in rows(det, class_names):
        if mask_format == "rle":
            mask = {"rle": {"size": [H, W], "counts": det.counts[row.i]}, "mask_format": "rle"}
        else:
            mask = {"points": polygon(det.masks, row.i, det.boxes[row.i]),
                    "mask_format": "polygon"}
        out.append(record(*row.box, row.confidence, row.class_id, row.class_name,
                          row.detection_id, row.tracker_id, **mask))
    return out


def document(det: Detections, class_names: Sequence[str], mask_format: str = "rle") -> dict:
    H, W = det.image_size
    return {"image": {"width": W, "height": H},
            "predictions": predictions(det, class_names, mask_format)}


# --------------------------------------------------------------------------- polygons


def window_mask(runs: np.ndarray, size: tuple[int, int], box) -> tuple[np.ndarray, int, int]:
    """A mask (column-major ``runs`` of ``size`` (H, W)) cut to its box window: (h, w) uint8,
    with the window's (top, left)."""
    from .rle import box_windows, dense

    top, left, bottom, right = box_windows(np.asarray(box)[None], size)[0]
    full = dense(runs, size)
    return full[top:bottom, left:right], int(top), int(left)


def outer_contour(mask: np.ndarray) -> list[tuple[int, int]]:
    """(x, y) pixels on the outer boundary of the largest 8-connected part (of equal parts, the
    one a raster scan meets first), clockwise from its topmost-leftmost pixel, with points
    inside straight runs dropped.

    OpenCV's border following (``findContours``, external borders, CHAIN_APPROX_SIMPLE) on
    that part; OpenCV runs outer borders counter-clockwise, so the path is reversed after its
    first point.
    """
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return []
    areas = stats[1:, cv2.CC_STAT_AREA]
    tied = np.flatnonzero(areas == areas.max()) + 1
    flat = labels.ravel()
    largest = tied[0] if len(tied) == 1 else flat[np.flatnonzero(np.isin(flat, tied))[0]]
    contours, _ = cv2.findContours((labels == largest).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    points = [(int(x), int(y)) for x, y in contours[0][:, 0]]
    return points[:1] + points[:0:-1]


def polygon(runs: RunLengths, i: int, box) -> list[dict]:
    return outline(runs.runs(i), runs.size, box)


def outline(runs: np.ndarray, size: tuple[int, int], box) -> list[dict]:
    """The ``points`` of one mask (column-major ``runs`` of ``size``) within its xyxy box:
    ``outer_contour`` in image pixels."""
    crop, top, left = window_mask(runs, size, box)
    return [{"x": float(x + left), "y": float(y + top)} for x, y in outer_contour(crop)]


def output_arrays(dets: Sequence[Detections], names: Sequence[str],
                  class_names: Sequence[str], mask_format: str = "rle") -> dict:
    """The requested OUTPUTS as arrays for a batch of images (BYTES as object arrays)."""
    b = len(dets)
    k = max((len(d) for d in dets), default=0)

    def padded(values, fill, dtype, tail=()):
        out = np.full((b, k, *tail), fill, dtype)
        for i, d in enumerate(dets):
            out[i, : len(d)] = values(d)
        return out

    makers = {
        "DETECTIONS": lambda: np.array(
            [json.dumps(document(d, class_names, mask_format)).encode() for d in dets],
            dtype=object).reshape(b, 1),
        "NUM_DETECTIONS": lambda: np.array([len(d) for d in dets], np.int32).reshape(b, 1),
        "BOXES": lambda: padded(lambda d: d.boxes, 0, np.float32, (4,)),
        "SCORES": lambda: padded(lambda d: d.scores, 0, np.float32),
        "CLASS_IDS": lambda: padded(lambda d: d.class_ids, -1, np.int32),
        "RLE_COUNTS": lambda: padded(lambda d: [c.encode() for c in d.counts], b"", object),
        "IMAGE_SIZE": lambda: np.array([d.image_size for d in dets], np.int32).reshape(b, 2),
        "TRACKER_IDS": lambda: padded(
            lambda d: -1 if d.tracker_ids is None else d.tracker_ids, -1, np.int32),
    }
    return {name: makers[name]() for name in names}
