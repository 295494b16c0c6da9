"""RLE encode benchmark: ours (host, and device when a GPU is present) against the peers.

Peers measured in the same run, on the same masks:
- pycocotools ``mask.encode``, including the Fortran-order copy it requires;
- a SAM-style torch encoder (segment-anything's ``mask_to_rle_pytorch`` shape: permute to
  column-major, XOR neighbours, one ``nonzero``, then a per-mask loop with ``.tolist()`` and
  pycocotools' ``frPyObjects`` to pack), on the CPU and, when present, on the GPU.

Every encoder's output is checked equal to pycocotools before it is timed. "ours host, no
numba" is what a light client without the ``encode`` extra runs: the array-module path on
NumPy instead of the compiled kernel.
Run: ``make bench`` or ``python -m benchmarks.rle_bench [--repeat 9] [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import numpy as np
from pycocotools import mask as coco_mask

from pipeline import rle
from pipeline.rle import runs
from pipeline.rle.arrays import cupy_or_none


@dataclass
class Workload:
    name: str
    masks: np.ndarray  # (N, H, W) bool
    boxes: np.ndarray  # (N, 4) xyxy, each mask lies inside its box


def _blobs(n: int, size: tuple[int, int], box_px: tuple[int, int], seed: int) -> Workload:
    """n filled ellipses, each inside a random box whose sides lie in box_px."""
    rng = np.random.default_rng(seed)
    H, W = size
    masks = np.zeros((n, H, W), bool)
    boxes = np.zeros((n, 4))
    for i in range(n):
        bh, bw = rng.integers(box_px[0], box_px[1] + 1, 2)
        bh, bw = min(bh, H), min(bw, W)
        top, left = rng.integers(0, H - bh + 1), rng.integers(0, W - bw + 1)
        yy, xx = np.ogrid[:bh, :bw]
        ell = ((yy - bh / 2) / (bh / 2)) ** 2 + ((xx - bw / 2) / (bw / 2)) ** 2 <= 1
        masks[i, top : top + bh, left : left + bw] = ell
        boxes[i] = (left, top, left + bw, top + bh)
    return Workload("", masks, boxes)


def _large_with_holes(n: int, size: tuple[int, int], seed: int) -> Workload:
    """n whole-frame masks of large objects (~25% of the frame each), each with 8 holes."""
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.ogrid[:H, :W]
    masks = np.zeros((n, H, W), bool)
    boxes = np.zeros((n, 4))
    for i in range(n):
        cy, cx = rng.uniform(0.28, 0.72) * H, rng.uniform(0.21, 0.79) * W
        ry, rx = rng.uniform(0.28, 0.39) * H, rng.uniform(0.22, 0.31) * W
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        for _ in range(8):
            hy, hx = rng.uniform(cy - ry / 2, cy + ry / 2), rng.uniform(cx - rx / 2, cx + rx / 2)
            blob &= (yy - hy) ** 2 + (xx - hx) ** 2 > rng.uniform(20, 80) ** 2
        masks[i] = blob
        boxes[i] = (max(cx - rx, 0), max(cy - ry, 0), min(cx + rx + 1, W), min(cy + ry + 1, H))
    return Workload("", masks, boxes)


def workloads(quick: bool) -> list[Workload]:
    full_hd = (1080, 1920)
    scale = 4 if quick else 1
    out = []

    def add(name, w):
        w.name = name
        out.append(w)

    add("1080p x 1 large", _blobs(1, full_hd, (700, 1000), 1))
    add("1080p x 20", _blobs(20 // scale, full_hd, (200, 700), 2))
    add("1080p x 20 large, holes", _large_with_holes(20 // scale, full_hd, 6))
    add("1080p x 100 small", _blobs(100 // scale, full_hd, (30, 150), 3))
    # Sizes the codec was not tuned on: 4K frames of large objects, 16:9 720p video frames.
    add("2160p x 8 large, holes", _large_with_holes(8 // scale, (2160, 3840), 7))
    add("720p x 40 mixed", _blobs(40 // scale, (720, 1280), (20, 700), 8))
    add("640x640 x 100", _blobs(100 // scale, (640, 640), (40, 300), 4))
    rng = np.random.default_rng(5)
    noisy = rng.random((5, *full_hd)) < 0.033  # about 660k runs in all
    add("1080p x 5 noisy", Workload("", noisy, np.tile([0, 0, 1920, 1080], (5, 1))))
    empty_full = np.zeros((2, *full_hd), bool)
    empty_full[1] = True
    add("1080p empty + full", Workload("", empty_full, np.tile([0, 0, 1920, 1080], (2, 1))))
    return out


def pycocotools_encode(masks: np.ndarray) -> list[str]:
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    return [r["counts"].decode("ascii") for r in coco_mask.encode(fortran)]


def sam_style_encode(tensor) -> list[str]:
    """The segment-anything recipe, written here: (B, H, W) bool torch tensor -> counts."""
    import torch

    b, h, w = tensor.shape
    flat = tensor.permute(0, 2, 1).flatten(1)
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero()
    out = []
    for i in range(b):
        idx = change[change[:, 0] == i, 1] + 1
        bounds = torch.cat([idx.new_zeros(1), idx, idx.new_full((1,), h * w)])
        runs = [] if flat[i, 0] == 0 else [0]
        runs += (bounds[1:] - bounds[:-1]).cpu().tolist()
        packed = coco_mask.frPyObjects({"size": [h, w], "counts": runs}, h, w)
        out.append(packed["counts"].decode("ascii"))
    return out


def without_numba(fn: Callable[[], list[str]]) -> Callable[[], list[str]]:
    """``fn`` as a client without numba runs it."""
    def run():
        with mock.patch.object(runs, "compiled", lambda: False):
            return fn()
    return run


def median_ms(fn: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None):
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per cell (median)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for smoke tests")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    cp = cupy_or_none()
    gpu = cp is not None and torch.cuda.is_available()
    print(f"# RLE encode, median of {args.repeat} runs, ms (ratio = pycocotools / that column)")
    print(f"# host: numpy {np.__version__}, torch {torch.__version__}, gpu: {gpu}")
    cols = ["pycocotools", "SAM torch cpu", "ours host", "ours host+boxes", "ours crops",
            "ours host, no numba"]
    if gpu:
        cols += ["SAM torch gpu", "ours device", "ours device+boxes"]
    print("| workload | runs | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for wl in workloads(args.quick):
        expected = pycocotools_encode(wl.masks)
        windows = rle.box_windows(wl.boxes, wl.masks.shape[1:])
        crops = [wl.masks[i, t:b, l:r].copy() for i, (t, l, b, r) in enumerate(windows)]
        tensor = torch.from_numpy(wl.masks)
        candidates: dict[str, tuple[Callable[[], list[str]], Callable[[], None]]] = {
            "pycocotools": (lambda: pycocotools_encode(wl.masks), lambda: None),
            "SAM torch cpu": (lambda: sam_style_encode(tensor), lambda: None),
            "ours host": (lambda: [r["counts"] for r in rle.encode(wl.masks)], lambda: None),
            "ours host+boxes": (
                lambda: [r["counts"] for r in rle.encode(wl.masks, wl.boxes)],
                lambda: None,
            ),
            "ours crops": (
                lambda: [
                    r["counts"]
                    for r in rle.encode_crops(crops, windows[:, :2], wl.masks.shape[1:])
                ],
                lambda: None,
            ),
            "ours host, no numba": (
                without_numba(lambda: [r["counts"] for r in rle.encode(wl.masks)]), lambda: None),
        }
        if gpu:
            cuda = tensor.cuda()
            sync = torch.cuda.synchronize
            candidates["SAM torch gpu"] = (lambda: sam_style_encode(cuda), sync)
            candidates["ours device"] = (lambda: [r["counts"] for r in rle.encode(cuda)], sync)
            candidates["ours device+boxes"] = (
                lambda: [r["counts"] for r in rle.encode(cuda, wl.boxes)],
                sync,
            )
        cells = []
        base = None
        for name in cols:
            fn, sync = candidates[name]
            if fn() != expected:
                print(f"MISMATCH: {name} differs from pycocotools on {wl.name}", file=sys.stderr)
                return 1
            ms = median_ms(fn, args.repeat, sync)
            base = ms if name == "pycocotools" else base
            cells.append(f"{ms:.2f}" if name == "pycocotools" else f"{ms:.2f} ({base / ms:.1f}x)")
        runs = int(rle.run_lengths(wl.masks).counts.size)
        print(f"| {wl.name} | {runs} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
