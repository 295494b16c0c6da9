"""Tracking's cost per frame against the frame's own cost, at 10 and 100 detections.

Tracking: ``pipeline.tracking.Tracks`` as the server runs it (ticket, turn, class-aware
ByteTrack, stream-unique ids) on synthetic scenes of 1280x720 frames: objects walking at
their own speeds, detection jitter, 5% of detections missed, a few classes (mostly people,
as in a crowd), objects leaving and new ones entering. Every object's id is checked frame
to frame, so the timed work is work that tracks (the id switches are printed).

Frame: the real default model through the engine (decode, network, post-processing, RLE,
packing) on a real 1280x720 JPEG frame with about as many objects (photos tiled into it),
at batch 1 (one stream) and at the measured batch limit (many streams), in the same run.

Run: ``python -m benchmarks.tracking_bench [--frames 300]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time

import numpy as np

from pipeline import rle
from pipeline.postprocess import Detections
from pipeline.tracking import TrackerOptions, Tracks

WIDTH, HEIGHT = 1280, 720


class Scene:
    """``objects`` boxes walking across a 1280x720 view; one leaves and a new one enters
    every few frames, so tracks are born and die as in real video."""

    def __init__(self, objects: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.boxes = np.zeros((objects, 4))
        self.speed = np.zeros((objects, 2))
        self.classes = np.zeros(objects, np.int64)
        self.identity = np.zeros(objects, np.int64)  # ground truth, for the switch count
        self.born = 0
        for i in range(objects):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        w, h = self.rng.uniform(20, 90), self.rng.uniform(40, 200)
        x, y = self.rng.uniform(0, WIDTH - w), self.rng.uniform(0, HEIGHT - h)
        self.boxes[i] = x, y, x + w, y + h
        self.speed[i] = self.rng.normal(0, 4, 2)
        self.classes[i] = self.rng.choice([0, 0, 0, 0, 2, 24, 26])  # people, cars, bags
        self.identity[i] = self.born
        self.born += 1

    def step(self) -> tuple[Detections, np.ndarray]:
        """The next frame's detections and each one's true identity."""
        self.boxes += np.hstack([self.speed, self.speed])  # x1, y1, x2, y2 move together
        outside = (self.boxes[:, 2] < 0) | (self.boxes[:, 0] > WIDTH) | \
                  (self.boxes[:, 3] < 0) | (self.boxes[:, 1] > HEIGHT)
        if self.rng.random() < 0.2:  # now and then someone leaves the view
            outside[self.rng.integers(len(outside))] = True
        for i in np.flatnonzero(outside):
            self._spawn(i)
        seen = self.rng.random(len(self.boxes)) > 0.05
        boxes = self.boxes[seen] + self.rng.normal(0, 1.5, (int(seen.sum()), 4))
        k = len(boxes)
        det = Detections(boxes=boxes.astype(np.float32),
                         scores=self.rng.uniform(0.3, 0.95, k).astype(np.float32),
                         class_ids=self.classes[seen],
                         masks=rle.RunLengths(np.zeros(0, np.int64), np.zeros(k + 1, np.int64), (HEIGHT, WIDTH)),
                         image_size=(HEIGHT, WIDTH))
        return det, self.identity[seen]


def time_tracking(objects: int, frames: int, warmup: int = 30) -> dict:
    """Seconds per frame (mean, p99) of tracking ``objects`` detections, and id switches."""
    scene = Scene(objects)
    tracks = Tracks()
    options = TrackerOptions(frame_rate=30)
    times, switches, last = [], 0, {}

    async def run() -> None:
        nonlocal switches
        for f in range(warmup + frames):
            det, truth = scene.step()
            began = time.perf_counter()
            ticket = tracks.ticket("bench", options)
            tracked = await tracks.assign("bench", ticket, det, f / 30)
            elapsed = time.perf_counter() - began
            if f >= warmup:
                times.append(elapsed)
            for true_id, tracker_id in zip(truth.tolist(), tracked.tracker_ids.tolist()):
                if tracker_id >= 0:
                    switches += last.get(true_id, tracker_id) != tracker_id
                    last[true_id] = tracker_id

    asyncio.run(run())
    seconds = np.array(times)
    return {"mean": float(seconds.mean()), "p99": float(np.percentile(seconds, 99)),
            "switches": switches, "objects": scene.born}


# Real photos tiled into one 1280x720 frame: about 10 and about 100 objects in view.
MOSAICS = {10: (("bus", "zidane"), 2, 1), 100: (("bus",), 8, 3)}


def mosaic(names: tuple[str, ...], columns: int, rows: int) -> bytes:
    """A 1280x720 JPEG frame: the photos tiled ``columns`` x ``rows``, each letterboxed."""
    from PIL import Image

    from pipeline.tools.samples import sample_rgb

    canvas = Image.new("RGB", (WIDTH, HEIGHT), (114, 114, 114))
    cell_w, cell_h = WIDTH // columns, HEIGHT // rows
    for i in range(columns * rows):
        photo = Image.fromarray(sample_rgb(names[i % len(names)]))
        photo.thumbnail((cell_w, cell_h))
        canvas.paste(photo, ((i % columns) * cell_w + (cell_w - photo.width) // 2,
                             (i // columns) * cell_h + (cell_h - photo.height) // 2))
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def time_frames(repository: str, count: int) -> dict[int, tuple[int, dict[int, float]]]:
    """For each mosaic: its detections, and seconds per frame through the engine by batch."""
    from pipeline.engine import Pipeline

    pipe = Pipeline.from_repository(repository, device="cpu")
    out = {}
    for objects, (names, columns, rows) in MOSAICS.items():
        frame = mosaic(names, columns, rows)
        found = len(pipe.infer([frame])[0]["predictions"])  # also the warm-up
        per_frame = {}
        for batch in sorted({1, pipe.batch_limit}):
            began = time.perf_counter()
            for _ in range(0, count, batch):
                pipe.infer([frame] * batch)
            per_frame[batch] = (time.perf_counter() - began) / (count // batch * batch)
        out[objects] = found, per_frame
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="tracked frames per measurement")
    parser.add_argument("--model-frames", type=int, default=16, help="frames through the engine")
    parser.add_argument("--repository", default="model_repository")
    args = parser.parse_args(argv)

    import torch

    frames = time_frames(args.repository, args.model_frames)
    batches = sorted(next(iter(frames.values()))[1])
    print(f"# tracking: ByteTrack (trackers), class-aware, {args.frames} synthetic 1280x720 frames; "
          f"frame: yolov5s-seg end to end on a real 1280x720 frame with as many objects, CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| detections | tracking ms/frame (mean) | p99 ms | id switches / objects | real frame: "
          "detections | " + " | ".join(f"frame ms, batch {b} | tracking share" for b in batches) + " |")
    print("|---" * (5 + 2 * len(batches)) + "|")
    for objects, (found, per_frame) in frames.items():
        cost = time_tracking(objects, args.frames)
        cells = " | ".join(f"{s * 1e3:.0f} | {100 * cost['mean'] / s:.2f}%" for s in per_frame.values())
        print(f"| {objects} | {cost['mean'] * 1e3:.3f} | {cost['p99'] * 1e3:.3f} | "
              f"{cost['switches']} / {cost['objects']} | {found} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
