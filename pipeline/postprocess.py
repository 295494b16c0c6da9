"""Post-processing for the YOLO-seg head, one batch at a time: candidates, class-aware NMS,
box-aware masks, run lengths.

Input for a batch of B images (torch, on the network's device):
  pred  (B, A, 5 + C + M): cx, cy, w, h, objectness, C class scores, M mask coefficients,
        in letterboxed-input pixels;
  proto (B, M, Ph, Pw): mask prototypes covering each whole input at stride input / Ph.

Masks are never made at full frame size. For each kept box we sample the prototype mask
logits (coefficients @ prototypes) bilinearly at the centre of every ORIGINAL-image pixel
inside the box, threshold at logit 0 (sigmoid 0.5), and hand the crops of every image of the
batch to ONE run-lengths call of the codec, which reads only them.

Device-to-host traffic is per batch, never per image or per mask: every copy goes through
``to_host`` (the candidates per image, the NMS overlaps, the kept detections, and the codec's
one copy of all run lengths), so a test can count them on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from . import rle
from .errors import InvalidOptionError
from .images import Letterbox

# Sampling grids are made for at most this many pixels at once (about 50 MB of float32).
_SAMPLE_BUDGET_PIXELS = 1 << 22
# More candidates than this per image after the confidence filter are cut to the best-scoring
# ones before NMS (the IoU matrix is candidates squared).
MAX_NMS_CANDIDATES = 3000
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
    """The detections that survive NMS, for the whole batch, image by image, best first.

    boxes: (K, 4) xyxy in input pixels, scores (K,), classes (K,), coefficients (K, M): on the
    device. image: (K,) host int64, the image of each detection (non-decreasing).
    """

    boxes: Any
    scores: Any
    classes: Any
    coefficients: Any
    image: np.ndarray


def select(pred, options: Sequence[PostprocessOptions], num_classes: int) -> Kept:
    """Candidates above each image's confidence, then greedy class-aware NMS per image."""
    import torch

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
    per_image = to_host(torch.bincount(image, minlength=len(options)))
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
    return Kept(boxes[index], scores[index], classes[index], rows[index, 5 + num_classes :],
                np.repeat(np.arange(len(options)), counts))


def _overlaps(boxes, classes, image, rank, per_image: np.ndarray,
              options: Sequence[PostprocessOptions]) -> np.ndarray:
    """(B, Kmax, Kmax) host bools: candidate pairs of one image and one class overlapping
    above that image's IoU threshold. One device-to-host copy for the batch."""
    import torch

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
    return to_host(iou > thresholds[:, None, None])


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


def to_original(boxes, geometries: Sequence[Letterbox], image: np.ndarray):
    """xyxy input-pixel boxes -> original-image pixels, clipped to each box's image."""
    import torch

    geo = np.array([[g.left, g.top, g.gain, g.width, g.height] for g in geometries],
                   np.float64).reshape(-1, 5)[image]
    offset = torch.as_tensor(geo[:, [0, 1, 0, 1]], dtype=boxes.dtype, device=boxes.device)
    gain = torch.as_tensor(geo[:, 2:3], dtype=boxes.dtype, device=boxes.device)
    limit = torch.as_tensor(geo[:, [3, 4, 3, 4]], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(((boxes - offset) / gain).clamp(min=0), limit)


def mask_tiles(coefficients, proto, windows: np.ndarray, ids: np.ndarray,
               geo: Letterbox) -> list[rle.Tiles]:
    """One image's masks as codec tiles, sampled only inside each detection's window.

    coefficients (k, M) and proto (M, Ph, Pw): torch, one device. windows: (k, 4) host
    (top, left, bottom, right) in original pixels. ids: (k,) the detections' batch ids.
    """
    import torch
    import torch.nn.functional as F

    H, W = geo.height, geo.width
    k = len(ids)
    if k == 0:
        return []
    m, ph, pw = proto.shape
    logits = (coefficients @ proto.reshape(m, -1)).reshape(k, 1, ph, pw)
    sizes = windows[:, 2:] - windows[:, :2]
    dev = logits.device
    tiles = []
    for members in _chunks_by_area(sizes):
        th = max(1, int(sizes[members, 0].max()))
        tw = max(1, int(sizes[members, 1].max()))
        tops = np.minimum(windows[members, 0], max(H - th, 0))
        lefts = np.minimum(windows[members, 1], max(W - tw, 0))
        rows = torch.as_tensor(tops, device=dev)[:, None] + torch.arange(th, device=dev)
        cols = torch.as_tensor(lefts, device=dev)[:, None] + torch.arange(tw, device=dev)
        # Original pixel centre x + 0.5 sits at input x_in = (x + 0.5) * gain + left, which in
        # grid_sample's normalised coordinates (align_corners=False) is 2 x_in / input_w - 1.
        gx = (cols + 0.5) * (2 * geo.gain / geo.input_w) + (2 * geo.left / geo.input_w - 1)
        gy = (rows + 0.5) * (2 * geo.gain / geo.input_h) + (2 * geo.top / geo.input_h - 1)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        sampled = F.grid_sample(logits[members], grid.to(logits.dtype), mode="bilinear",
                                padding_mode="border", align_corners=False)[:, 0]
        win = torch.as_tensor(windows[members], device=dev)
        inside = ((rows >= win[:, 0:1]) & (rows < win[:, 2:3]))[:, :, None] & (
            (cols >= win[:, 1:2]) & (cols < win[:, 3:4])
        )[:, None, :]
        tiles.append(rle.Tiles((sampled > 0) & inside,
                               np.stack([tops, lefts], 1).astype(np.int64), ids[members]))
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


def postprocess(pred, proto, geometries: Sequence[Letterbox],
                options: Sequence[PostprocessOptions], num_classes: int,
                stages: dict | None = None) -> list[Detections]:
    """A batch's network outputs -> Detections per image (boxes, scores, classes, masks).

    stages: optional dict; seconds are added under "postprocess" and "rle".
    """
    import torch

    start = time.perf_counter()
    kept = select(pred, options, num_classes)
    boxes = to_original(kept.boxes, geometries, kept.image)
    found = to_host(torch.cat([boxes, kept.scores[:, None], kept.classes[:, None].to(boxes.dtype)],
                              1)) if len(kept.image) else np.zeros((0, 6), np.float32)
    frames = [(g.height, g.width) for g in geometries]
    bounds = np.searchsorted(kept.image, np.arange(len(geometries) + 1))
    tiles: list[rle.Tiles] = []
    for b, (geo, s, e) in enumerate(zip(geometries, bounds[:-1], bounds[1:])):
        windows = rle.box_windows(found[s:e, :4], frames[b])
        tiles.extend(mask_tiles(kept.coefficients[s:e], proto[b], windows, np.arange(s, e), geo))
    sampled = time.perf_counter()
    masks = rle.batch_run_lengths(tiles, frames, kept.image)
    done = time.perf_counter()
    if stages is not None:
        stages["postprocess"] = stages.get("postprocess", 0.0) + sampled - start
        stages["rle"] = stages.get("rle", 0.0) + done - sampled
    return [
        Detections(boxes=found[s:e, :4].astype(np.float32),
                   scores=found[s:e, 4].astype(np.float32),
                   class_ids=found[s:e, 5].astype(np.int64), masks=masks[b], image_size=frames[b])
        for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
