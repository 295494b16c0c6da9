"""Post-processing, one batch at a time, whatever the network's head: the detections each
image keeps (the head's ``select``), boxes in original pixels, masks, run lengths.

A head (``pipeline.heads``) turns the batch's outputs into ``Kept``: the detections kept,
image by image best first, with boxes in network-input pixels and their masks as
``MaskLogits``: logits over the whole network input, either cut to each detection's box
(YOLO's prototype masks, as ultralytics crops them) or not (a DETR query's mask is wherever
the model marks it).

Masks are never made at full frame size. For each detection we sample its mask logits
bilinearly at the centre of every ORIGINAL-image pixel inside its window, threshold at logit 0
(sigmoid 0.5), and hand the crops of every image of the batch to ONE run-lengths call of the
codec, which reads only them. A window is the detection's box for a box-cut mask, else the
smallest crop that can hold the mask (from its logits' positive cells; bilinear upsampling
reaches at most one cell beyond them).

Device-to-host traffic is per batch, never per image or per mask: every copy goes through
``to_host`` (the candidates per image, the NMS overlaps, the kept detections, the masks'
extents, and the codec's one copy of all run lengths), so a test can count them on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from . import rle
from .errors import InvalidOptionError
from .images import Placement

# Sampling grids are made for at most this many pixels at once (about 50 MB of float32).
_SAMPLE_BUDGET_PIXELS = 1 << 22
MASK_FORMATS = ("rle", "polygon")
MAX_DETECTIONS_LIMIT = 10000


@dataclass(frozen=True)
class PostprocessOptions:
    """What one request asks of post-processing: which detections, and masks in which form.

    confidence: minimum score, 0..1. iou_threshold: NMS overlap, 0..1. max_detections: per
    image, 0..10000. mask_format: "rle" (exact COCO RLE) or "polygon" (outer contour).
    """

    confidence: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 300
    mask_format: str = "rle"

    def __post_init__(self):
        for key in ("confidence", "iou_threshold"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:  # NaN fails too
                raise InvalidOptionError(key, f"{key} must be in [0, 1], got {value}")
        if not 0 <= self.max_detections <= MAX_DETECTIONS_LIMIT:
            raise InvalidOptionError("max_detections", f"max_detections must be in "
                                     f"[0, {MAX_DETECTIONS_LIMIT}], got {self.max_detections}")
        if self.mask_format not in MASK_FORMATS:
            raise InvalidOptionError("response_mask_format", f"response_mask_format: unknown mask format "
                                     f"{self.mask_format!r}; use one of: {', '.join(MASK_FORMATS)}")

    @classmethod
    def overrides(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """The fields a request's (or config.pbtxt's) parameters set, validated, by field name.

        Known keys: confidence, iou_threshold, max_detections, response_mask_format (strings
        or numbers); others are ignored, as are missing or None ones. Raises
        InvalidOptionError (a BadInputError) naming the key. The checks do not depend on the
        values overridden, so ``replace(any_options, **overrides)`` cannot fail.
        """
        values: dict[str, Any] = {}
        for key, kind in (("confidence", float), ("iou_threshold", float), ("max_detections", int)):
            if params.get(key) is not None:
                values[key] = _number(params, key, kind)
        if params.get("response_mask_format") is not None:
            values["mask_format"] = str(params["response_mask_format"])
        cls(**values)  # range checks
        return values

    @classmethod
    def from_params(cls, params: Mapping[str, Any],
                    base: PostprocessOptions | None = None) -> PostprocessOptions:
        """``base`` (default: the defaults) with the ``overrides`` of ``params``."""
        return replace(base or cls(), **cls.overrides(params))


def _number(params: Mapping[str, Any], key: str, kind: type):
    value = params[key]
    try:
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError, OverflowError):
        what = "a whole number" if kind is int else "a number"
        raise InvalidOptionError(key, f"parameter {key!r} must be {what}, got {value!r}") from None


@dataclass(frozen=True)
class Detections:
    """One image's detections, on the host.

    boxes: (K, 4) float32 x1, y1, x2, y2 in original-image pixels. scores: (K,) float32.
    class_ids: (K,) int64. masks: run lengths of the K masks at the original (H, W).
    tracker_ids: (K,) int64 when the image belongs to a tracked stream (-1: not yet
    confirmed), else None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    masks: rle.RunLengths
    image_size: tuple[int, int]
    tracker_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @cached_property
    def counts(self) -> list[str]:
        """The masks' COCO ASCII counts, packed once however many outputs use them."""
        return rle.pack(self.masks)

    def rles(self) -> list[dict]:
        H, W = self.image_size
        return [{"size": [H, W], "counts": c} for c in self.counts]


def to_host(tensor) -> np.ndarray:
    """The one way a tensor leaves the device here (a no-op view on the CPU)."""
    return tensor.detach().cpu().numpy()


@dataclass(frozen=True)
class Kept:
    """The detections a head keeps for the whole batch, image by image, best first.

    boxes: (K, 4) xyxy in input pixels, scores (K,), classes (K,): on the device. masks: their
    MaskLogits. image: (K,) host int64, the image of each detection (non-decreasing).
    """

    boxes: Any
    scores: Any
    classes: Any
    masks: MaskLogits
    image: np.ndarray


class MaskLogits(Protocol):
    """The kept detections' masks as logits, each over its image's whole network input, one
    row per mask, rows in image order.

    confined: a mask is cut to its detection's box (then each detection has its own row).
    rows: (K,) host, the row each detection's mask is (detections may share one: a DETR
    query kept for two classes). image: (rows,) host, each row's image."""

    confined: bool
    rows: np.ndarray
    image: np.ndarray

    def logits(self, start: int, end: int) -> Any:
        """(end - start, h, w) logits of rows start..end."""


def to_original(boxes, geometries: Sequence[Placement], image: np.ndarray):
    """xyxy input-pixel boxes -> original-image pixels, clipped to each box's image."""
    import torch

    geo = np.array([[g.left, g.top, g.gain_x, g.gain_y, g.width, g.height] for g in geometries],
                   np.float64).reshape(-1, 6)[image]
    offset = torch.as_tensor(geo[:, [0, 1, 0, 1]], dtype=boxes.dtype, device=boxes.device)
    gain = torch.as_tensor(geo[:, [2, 3, 2, 3]], dtype=boxes.dtype, device=boxes.device)
    limit = torch.as_tensor(geo[:, [4, 5, 4, 5]], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(((boxes - offset) / gain).clamp(min=0), limit)


def mask_windows(logits, geometries: Sequence[Placement], image: np.ndarray) -> np.ndarray:
    """(K, 4) host (top, left, bottom, right) original-pixel windows that hold each mask whole:
    its positive logit cells, one cell more on every side (bilinear upsampling reads a
    neighbour), placed in its image. logits (K, h, w), every detection of the batch: one
    device-to-host copy."""
    import torch

    k, h, w = logits.shape
    if k == 0:
        return np.zeros((0, 4), np.int64)
    positive = logits > 0
    rows, cols = positive.any(2), positive.any(1)
    first_row = torch.where(rows.any(1), rows.float().argmax(1), h)
    last_row = h - 1 - rows.flip(1).float().argmax(1)
    first_col = torch.where(cols.any(1), cols.float().argmax(1), w)
    last_col = w - 1 - cols.flip(1).float().argmax(1)
    cells = to_host(torch.stack([first_row, first_col, last_row, last_col], 1)).astype(np.float64)
    empty = cells[:, 0] >= h
    geo = np.array([[g.input_h / h, g.input_w / w, g.top, g.left, g.gain_y, g.gain_x, g.height,
                     g.width] for g in geometries], np.float64).reshape(-1, 8)[image]
    cell_h, cell_w, top, left, gain_y, gain_x, height, width = geo.T
    windows = np.stack([
        np.floor(((cells[:, 0] - 1) * cell_h - top) / gain_y),
        np.floor(((cells[:, 1] - 1) * cell_w - left) / gain_x),
        np.ceil(((cells[:, 2] + 2) * cell_h - top) / gain_y),
        np.ceil(((cells[:, 3] + 2) * cell_w - left) / gain_x),
    ], 1)
    windows = np.clip(windows, 0, np.stack([height, width, height, width], 1)).astype(np.int64)
    windows[empty] = 0
    return windows


def mask_tiles(logits, windows: np.ndarray, ids: np.ndarray, rows: np.ndarray,
               geo: Placement) -> list[rle.Tiles]:
    """One image's masks as codec tiles, each row sampled once, only inside its window.

    logits (r, h, w): torch, over the image's whole network input. windows: (r, 4) host (top,
    left, bottom, right) in original pixels. ids: (k,) the detections' batch ids; rows: (k,)
    the row of ``logits`` each one's mask is.
    """
    import torch
    import torch.nn.functional as F

    H, W = geo.height, geo.width
    if len(ids) == 0:
        return []
    logits = logits[:, None]
    sizes = windows[:, 2:] - windows[:, :2]
    dev = logits.device
    tiles = []
    for members in _chunks_by_area(sizes):
        th = max(1, int(sizes[members, 0].max()))
        tw = max(1, int(sizes[members, 1].max()))
        tops = np.minimum(windows[members, 0], max(H - th, 0))
        lefts = np.minimum(windows[members, 1], max(W - tw, 0))
        ys = torch.as_tensor(tops, device=dev)[:, None] + torch.arange(th, device=dev)
        xs = torch.as_tensor(lefts, device=dev)[:, None] + torch.arange(tw, device=dev)
        # Original pixel centre x + 0.5 sits at input x_in = (x + 0.5) * gain + left, which in
        # grid_sample's normalised coordinates (align_corners=False) is 2 x_in / input_w - 1.
        gx = (xs + 0.5) * (2 * geo.gain_x / geo.input_w) + (2 * geo.left / geo.input_w - 1)
        gy = (ys + 0.5) * (2 * geo.gain_y / geo.input_h) + (2 * geo.top / geo.input_h - 1)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        sampled = F.grid_sample(logits[members], grid.to(logits.dtype), mode="bilinear",
                                padding_mode="border", align_corners=False)[:, 0]
        win = torch.as_tensor(windows[members], device=dev)
        inside = ((ys >= win[:, 0:1]) & (ys < win[:, 2:3]))[:, :, None] & (
            (xs >= win[:, 1:2]) & (xs < win[:, 3:4])
        )[:, None, :]
        masks = (sampled > 0) & inside
        place = np.full(len(windows), -1)
        place[members] = np.arange(len(members))
        users = np.nonzero(place[rows] >= 0)[0]  # the detections whose masks are in this chunk
        at = place[rows[users]]
        if len(users) != len(members) or not np.array_equal(at, np.arange(len(members))):
            masks = masks[torch.as_tensor(at, device=dev)]
        origins = np.stack([tops, lefts], 1).astype(np.int64)[at]
        tiles.append(rle.Tiles(masks, origins, ids[users]))
    return tiles


def _chunks_by_area(sizes: np.ndarray) -> list[np.ndarray]:
    """Group detections of similar size so padded tiles waste little and fit the budget."""
    order = np.argsort(-(sizes[:, 0] * sizes[:, 1]), kind="stable")
    chunks, current, th, tw = [], [], 0, 0
    for i in order:
        h, w = max(1, int(sizes[i, 0])), max(1, int(sizes[i, 1]))
        nh, nw = max(th, h), max(tw, w)
        if current and nh * nw * (len(current) + 1) > _SAMPLE_BUDGET_PIXELS:
            chunks.append(np.array(current))
            current, nh, nw = [], h, w
        current.append(i)
        th, tw = nh, nw
    if current:
        chunks.append(np.array(current))
    return chunks


def postprocess(outputs: Mapping[str, Any], head, geometries: Sequence[Placement],
                options: Sequence[PostprocessOptions], stages: dict | None = None) -> list[Detections]:
    """A batch's network outputs (by name) -> Detections per image (boxes, scores, classes,
    masks). head: the network's (``pipeline.heads``); every image of a batch has one input
    shape.

    stages: optional dict; seconds are added under "postprocess" and "rle".
    """
    import torch

    start = time.perf_counter()
    kept = head.select(outputs, options, (geometries[0].input_h, geometries[0].input_w))
    boxes = to_original(kept.boxes, geometries, kept.image)
    found = to_host(torch.cat([boxes, kept.scores[:, None], kept.classes[:, None].to(boxes.dtype)],
                              1)) if len(kept.image) else np.zeros((0, 6), np.float32)
    frames = [(g.height, g.width) for g in geometries]
    bounds = np.searchsorted(kept.image, np.arange(len(geometries) + 1))
    masks = kept.masks
    row_bounds = np.searchsorted(masks.image, np.arange(len(geometries) + 1))
    if not masks.confined:
        extents = mask_windows(masks.logits(0, row_bounds[-1]), geometries, masks.image)
    tiles: list[rle.Tiles] = []
    for b, geo in enumerate(geometries):
        s, e, rs, re = bounds[b], bounds[b + 1], row_bounds[b], row_bounds[b + 1]
        if s == e:
            continue
        windows = (rle.box_windows(found[s:e, :4], frames[b]) if masks.confined
                   else extents[rs:re])
        tiles.extend(mask_tiles(masks.logits(rs, re), windows, np.arange(s, e),
                                masks.rows[s:e] - rs, geo))
    sampled = time.perf_counter()
    runs = rle.batch_run_lengths(tiles, frames, kept.image)
    done = time.perf_counter()
    if stages is not None:
        stages["postprocess"] = stages.get("postprocess", 0.0) + sampled - start
        stages["rle"] = stages.get("rle", 0.0) + done - sampled
    return [
        Detections(boxes=found[s:e, :4].astype(np.float32),
                   scores=found[s:e, 4].astype(np.float32),
                   class_ids=found[s:e, 5].astype(np.int64), masks=runs[b], image_size=frames[b])
        for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
