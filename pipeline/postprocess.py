"""Post-processing for the YOLO-seg head: candidates, class-aware NMS, box-aware masks, RLE.

Input per image (torch, on the network's device):
  pred  (A, 5 + C + M): cx, cy, w, h, objectness, C class scores, M mask coefficients,
        in letterboxed-input pixels;
  proto (M, Ph, Pw): mask prototypes covering the whole input at stride size / Ph.

Masks are never made at full frame size. For each kept box we sample the prototype mask
logits (coefficients @ prototypes) bilinearly at the centre of every ORIGINAL-image pixel
inside the box, threshold at logit 0 (sigmoid 0.5), and hand the resulting crops to the RLE
codec, which reads only them. On a GPU the crops stay on the device and the codec copies one
small array of run lengths per batch to the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import rle
from .arrays import to_xp_array
from .images import Letterbox
from .packing import pack_counts
from .runs import RunLengths, crop_stack_run_lengths

# Sampling grids are made for at most this many pixels at once (about 50 MB of float32).
_SAMPLE_BUDGET_PIXELS = 1 << 22
# More candidates than this after the confidence filter are cut to the best-scoring ones
# before NMS (the IoU matrix is candidates squared).
MAX_NMS_CANDIDATES = 3000


@dataclass(frozen=True)
class PostprocessOptions:
    confidence: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 300

    def __post_init__(self):
        from .errors import BadInputError

        if not 0.0 <= self.confidence <= 1.0:
            raise BadInputError(f"confidence must be in [0, 1], got {self.confidence}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise BadInputError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")
        if not 0 <= self.max_detections <= 10000:
            raise BadInputError(f"max_detections must be in [0, 10000], got {self.max_detections}")


@dataclass(frozen=True)
class Detections:
    """One image's detections, on the host.

    boxes: (K, 4) float32 x1, y1, x2, y2 in original-image pixels. scores: (K,) float32.
    class_ids: (K,) int64. masks: run lengths of the K masks at the original (H, W).
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    masks: RunLengths
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    @cached_property
    def counts(self) -> list[str]:
        """The masks' COCO ASCII counts, packed once however many outputs use them."""
        return pack_counts(self.masks.counts, self.masks.offsets, self.image_size)

    def rles(self) -> list[dict]:
        H, W = self.image_size
        return [{"size": [H, W], "counts": c} for c in self.counts]


def box_iou(a, b):
    """(len(a), len(b)) IoU of xyxy boxes (torch)."""
    import torch

    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def nms(boxes, scores, classes, iou_threshold: float, limit: int):
    """Indices kept by greedy class-aware NMS, best score first (no torchvision needed).

    Boxes of different classes are moved apart so they never overlap; the greedy pass runs on
    the host over one (K, K) boolean matrix, which is one small copy from a GPU.
    """
    import torch

    if scores.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    order = scores.argsort(descending=True)[:MAX_NMS_CANDIDATES]
    shifted = boxes[order] + (classes[order].to(boxes.dtype) * 8192.0)[:, None]
    overlaps = (box_iou(shifted, shifted) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) == limit:
            break
        suppressed |= overlaps[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def select(pred, options: PostprocessOptions, num_classes: int):
    """Boxes (input pixels, xyxy), scores, classes and mask coefficients that survive."""
    import torch

    objectness = pred[:, 4]
    candidates = pred[objectness > options.confidence]
    class_scores = candidates[:, 5 : 5 + num_classes] * candidates[:, 4:5]
    scores, classes = class_scores.max(1)
    keep = scores > options.confidence
    candidates, scores, classes = candidates[keep], scores[keep], classes[keep]
    cx, cy, w, h = candidates[:, 0], candidates[:, 1], candidates[:, 2], candidates[:, 3]
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    kept = nms(boxes, scores, classes, options.iou_threshold, options.max_detections)
    coefficients = candidates[kept, 5 + num_classes :]
    return boxes[kept], scores[kept], classes[kept], coefficients


def to_original(boxes, geo: Letterbox):
    """xyxy input-pixel boxes -> original-image pixels, clipped to the image."""
    import torch

    offset = torch.tensor([geo.left, geo.top, geo.left, geo.top], dtype=boxes.dtype,
                          device=boxes.device)
    out = (boxes - offset) / geo.gain
    limit = torch.tensor([geo.width, geo.height, geo.width, geo.height], dtype=boxes.dtype,
                         device=boxes.device)
    return torch.minimum(out.clamp(min=0), limit)


def mask_run_lengths(coefficients, proto, boxes_original, geo: Letterbox,
                     timings: dict | None = None) -> RunLengths:
    """Run lengths of each detection's mask at the original size, reading only its box.

    coefficients (K, M), proto (M, Ph, Pw), boxes_original (K, 4) xyxy: torch, one device.
    """
    import torch
    import torch.nn.functional as F

    H, W = geo.height, geo.width
    k = int(coefficients.shape[0])
    if k == 0:
        return crop_stack_run_lengths(np, np.zeros((0, 1, 1), bool), np.zeros((0, 2), np.int64), (H, W))
    m, ph, pw = proto.shape
    logits = (coefficients @ proto.reshape(m, -1)).reshape(k, 1, ph, pw)
    windows = rle.box_windows(boxes_original.detach().cpu().numpy(), (H, W))
    sizes = windows[:, 2:] - windows[:, :2]
    # Original pixel centre (x + 0.5) sits at input x_in = (x + 0.5) * gain + left, which in
    # grid_sample's normalised prototype coordinates (align_corners=False) is 2 x_in / size - 1.
    scale = 2 * geo.gain / geo.size
    parts: list[tuple[np.ndarray, RunLengths]] = []
    for members in _chunks_by_area(sizes):
        th = max(1, int(sizes[members, 0].max()))
        tw = max(1, int(sizes[members, 1].max()))
        tops = np.minimum(windows[members, 0], max(H - th, 0))
        lefts = np.minimum(windows[members, 1], max(W - tw, 0))
        dev = logits.device
        rows = torch.as_tensor(tops, device=dev)[:, None] + torch.arange(th, device=dev)
        cols = torch.as_tensor(lefts, device=dev)[:, None] + torch.arange(tw, device=dev)
        gy = (rows + 0.5) * scale + (2 * geo.top / geo.size - 1)
        gx = (cols + 0.5) * scale + (2 * geo.left / geo.size - 1)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        sampled = F.grid_sample(logits[members], grid.to(logits.dtype), mode="bilinear",
                                padding_mode="border", align_corners=False)[:, 0]
        win = torch.as_tensor(windows[members], device=dev)
        inside = ((rows >= win[:, 0:1]) & (rows < win[:, 2:3]))[:, :, None] & (
            (cols >= win[:, 1:2]) & (cols < win[:, 3:4])
        )[:, None, :]
        tiles = (sampled > 0) & inside
        xp, stack = to_xp_array(tiles)
        origins = np.stack([tops, lefts], 1).astype(np.int64)
        start = time.perf_counter()
        runs = crop_stack_run_lengths(xp, stack, xp.asarray(origins), (H, W))
        if timings is not None:
            timings["rle"] += time.perf_counter() - start
        parts.append((members, runs))
    return _reorder(parts, k, (H, W))


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


def _reorder(parts: list[tuple[np.ndarray, RunLengths]], k: int, size) -> RunLengths:
    if len(parts) == 1 and np.array_equal(parts[0][0], np.arange(k)):
        return parts[0][1]
    runs_of = [None] * k
    for members, runs in parts:
        for j, i in enumerate(members):
            runs_of[i] = runs.runs(j)
    lengths = [len(r) for r in runs_of]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return RunLengths(np.concatenate(runs_of).astype(np.int64), offsets, size)


def postprocess(pred, proto, geo: Letterbox, options: PostprocessOptions, num_classes: int,
                timings: dict | None = None) -> Detections:
    """One image's network outputs -> Detections (boxes, scores, classes, mask run lengths).

    timings: optional dict; seconds spent in the RLE stage are added under "rle".
    """
    boxes, scores, classes, coefficients = select(pred, options, num_classes)
    boxes_original = to_original(boxes, geo)
    masks = mask_run_lengths(coefficients, proto, boxes_original, geo, timings)
    return Detections(
        boxes=boxes_original.detach().cpu().numpy().astype(np.float32),
        scores=scores.detach().cpu().numpy().astype(np.float32),
        class_ids=classes.detach().cpu().numpy().astype(np.int64),
        masks=masks,
        image_size=(geo.height, geo.width),
    )
