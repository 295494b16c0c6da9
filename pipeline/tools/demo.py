"""``make run``: the main job on the embedded default model, end to end.

1. make a short sample clip from real photos shipped in packages (a slow pan and zoom over
   scikit-image's astronaut and coffee and ultralytics' bus.jpg): out/sample.mp4;
2. start the server (``python -m pipeline serve``) on free ports and wait until it is SERVING;
3. stream the clip through it with the client CLI, tracking objects: out/results.jsonl and
   out/annotated.mp4 (each tracked object keeps its colour and ``#id`` label);
4. print a summary, then stop the server with SIGTERM (it drains and exits 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from clients.cli import build_parser, run
from clients.sources import VideoWriter

from .launch import local_server
from .samples import sample_rgb

CLIP_SIZE = (480, 640)  # height, width
PHOTOS = ("astronaut", "coffee", "bus")


def make_clip(path: Path, frames_per_photo: int = 8, fps: int = 8) -> int:
    """A pan-and-zoom over each photo; returns the number of frames written."""
    from PIL import Image

    writer = VideoWriter(path, fps)
    count = 0
    H, W = CLIP_SIZE
    for name in PHOTOS:
        photo = Image.fromarray(sample_rgb(name))
        pw, ph = photo.size
        for i in range(frames_per_photo):
            t = i / max(frames_per_photo - 1, 1)
            zoom = 1.0 - 0.25 * t  # window shrinks: the camera zooms in
            cw, ch = pw * zoom, ph * zoom
            left, top = (pw - cw) * t * 0.5, (ph - ch) * 0.5
            frame = photo.resize((W, H), Image.BILINEAR, box=(left, top, left + cw, top + ch))
            writer.write(np.asarray(frame))
            count += 1
    writer.close()
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out/)")
    parser.add_argument("--frames-per-photo", type=int, default=8)
    parser.add_argument("--model-repository", default="model_repository")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    clip = args.out / "sample.mp4"
    n = make_clip(clip, args.frames_per_photo)
    print(f"[1/4] sample clip: {clip} ({n} frames of {CLIP_SIZE[1]}x{CLIP_SIZE[0]} from real photos)")

    with local_server("--model-repository", args.model_repository,
                      log=open(args.out / "server.log", "w")) as server:
        address = server.address
        print(f"[2/4] server SERVING on {address} (log: {args.out / 'server.log'})")
        cli = build_parser().parse_args([str(clip), "--server", address, "--track",
                                         "--jsonl", str(args.out / "results.jsonl"),
                                         "--annotate", str(args.out / "annotated.mp4")])
        print("[3/4] streaming the clip through the server, tracking objects ...")
        summary = run(cli)
    code = server.process.returncode
    dense = summary["dense_bytes"]
    print(f"[4/4] server drained and exited with {code}\n")
    print(f"frames:            {summary['frames']} ({summary['frames_per_second']} frames/s, "
          f"{summary['errors']} errors, {summary['dropped']} dropped)")
    print(f"detections:        {summary['detections']} — " +
          ", ".join(f"{k} {v}" for k, v in summary["classes"].items()))
    print("objects followed:  " + (", ".join(f"{k} {v}" for k, v in summary["objects"].items())
                                   or "none") + " (unique tracker ids)")
    print(f"mask bytes:        RLE {summary['rle_bytes']:,} vs dense {dense:,} as uint8 "
          f"({dense // 8:,} bit-packed): {dense / max(summary['rle_bytes'], 1):.0f}x smaller")
    print(f"results:           {args.out / 'results.jsonl'}")
    print(f"annotated video:   {args.out / 'annotated.mp4'}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    ok = summary["frames"] == n and summary["errors"] == 0 and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
