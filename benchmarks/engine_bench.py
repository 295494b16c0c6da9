"""End-to-end engine benchmark: frames/s and milliseconds per stage, batch 1 and batch 8.

Real photos (bus.jpg, zidane.jpg, scikit-image's astronaut/coffee/chelsea) through the real
default model, on the CPU and, where a CUDA device is visible, on the GPU. Stages: pre-process
(decode + letterbox), network, post-process (NMS + box-aware mask sampling), RLE (run lengths),
packing (ASCII + response documents).
Run: ``make bench`` or ``python -m benchmarks.engine_bench [--frames 16]``.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.engine import Pipeline
from pipeline.telemetry import STAGES
from pipeline.tools.samples import NAMES, sample_bytes

COLUMNS = (*STAGES, "packing")


def measure(pipe: Pipeline, frames: list[bytes], batch: int) -> tuple[float, dict[str, float]]:
    """frames/s and ms per frame per stage (from the telemetry ledger; packing timed here)."""
    pipe.infer(frames[:batch])  # warm-up: first-call allocations and kernel selection
    before = pipe.ledger.totals(pipe.name)
    packing = 0.0
    start = time.perf_counter()
    for i in range(0, len(frames), batch):
        for det in pipe.detect(frames[i : i + batch]):
            began = time.perf_counter()
            pipe.render(det)
            packing += time.perf_counter() - began
    elapsed = time.perf_counter() - start
    after = pipe.ledger.totals(pipe.name)
    images = max(after.images - before.images, 1)
    per_stage = {s: (after.stage_ns[s] - before.stage_ns[s]) / 1e6 / images for s in STAGES}
    per_stage["packing"] = packing * 1e3 / images
    return len(frames) / elapsed, per_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16, help="frames per measurement")
    parser.add_argument("--repository", default="model_repository")
    args = parser.parse_args(argv)

    import torch

    images = [sample_bytes(n) for n in NAMES]
    frames = [images[i % len(images)] for i in range(args.frames)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"# engine: yolov5s-seg, {args.frames} real photos per row, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print("| device | batch | frames/s | " + " | ".join(f"{s} ms" for s in COLUMNS)
          + " | RLE+packing share |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for device in devices:
        pipe = Pipeline.from_repository(args.repository, device=device)
        for batch in (1, 8):
            fps, per_stage = measure(pipe, frames, batch)
            total = sum(per_stage.values())
            share = (per_stage["rle"] + per_stage["packing"]) / total if total else 0.0
            cells = " | ".join(f"{per_stage[s]:.2f}" for s in COLUMNS)
            print(f"| {device} | {batch} | {fps:.2f} | {cells} | {100 * share:.2f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
