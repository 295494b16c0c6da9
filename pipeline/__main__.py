"""Command line: ``python -m pipeline <command>``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    """Encode the masks of a synthetic 1080p frame and prove the result with pycocotools."""
    from pycocotools import mask as coco_mask

    from . import rle

    rng = np.random.default_rng(0)
    H, W = 1080, 1920
    masks = np.zeros((args.instances, H, W), bool)
    boxes = []
    yy, xx = np.ogrid[:H, :W]
    for i in range(args.instances):
        cy, cx = rng.integers(100, H - 100), rng.integers(100, W - 100)
        ry, rx = rng.integers(20, 100), rng.integers(20, 150)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        boxes.append((cx - rx, cy - ry, cx + rx + 1, cy + ry + 1))
    start = time.perf_counter()
    ours = rle.encode(masks, boxes)
    ours_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    theirs = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    theirs_ms = (time.perf_counter() - start) * 1e3
    same = all(o["counts"].encode() == t["counts"] for o, t in zip(ours, theirs))
    print(json.dumps(ours[0]))
    print(
        f"{args.instances} masks of {H}x{W}: ours {ours_ms:.1f} ms, pycocotools {theirs_ms:.1f} ms "
        f"({theirs_ms / ours_ms:.1f}x); byte-identical: {same}; RLE bytes "
        f"{sum(len(o['counts']) for o in ours)} vs dense {masks.size}"
    )
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Instance segmentation serving with exact COCO RLE masks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="encode a synthetic frame's masks, check vs pycocotools")
    demo.add_argument("--instances", type=int, default=50, help="masks in the frame (default 50)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
