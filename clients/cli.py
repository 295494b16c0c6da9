"""``python -m clients``: stream a video, an image folder, a stream URL or a webcam through the
server; write JSON Lines of per-frame results and, optionally, an annotated video or PNGs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from pipeline.images import encode_jpeg
from pipeline.overlay import tracker_id
from pipeline.repository import DEFAULT_MODEL

from .client import ClientError, SegmentationClient, result_document
from .sources import VideoWriter, check, describe, frame_rate, frames

LOG = logging.getLogger(__name__)
SEND_QUALITY = 90  # JPEG quality of the frames the CLI sends (raw RGB with --shared-memory)


class Progress:
    """One status line on stderr: frames, frames/s, detections; redrawn in place on a TTY."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, frames: int, detections: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        rate = frames / max(now - self.start, 1e-9)
        line = f"frames {frames} | {rate:.2f} frames/s | detections {detections}"
        print(f"\r{line}" if self.tty else line, end="\n" if final or not self.tty else "",
              file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients",
        description="Stream frames through an rle-serving server and save the results.",
        epilog="SOURCE is a video file, a folder of images, an rtsp:// or http(s):// stream, or "
        "a webcam index (0 = /dev/video0). Ctrl-C stops cleanly; what was done is saved. "
        "`python -m clients streams --help`: cameras the server pulls itself.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--server", default="localhost:8001",
                   help="host:port; several replicas as host1:8001,host2:8001; or "
                   "dns:///service:8001 to spread over the pods a DNS name lists (default "
                   "localhost:8001)")
    p.add_argument("--jsonl", type=Path, default=Path("results.jsonl"),
                   help="per-frame results, one JSON document per line (default results.jsonl)")
    p.add_argument("--annotate", type=Path, default=None,
                   help="draw masks: a .mp4/.mkv/.mov file, or a folder for one PNG per frame")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--confidence", type=float, default=None, help="minimum score (server default 0.25)")
    p.add_argument("--shared-memory", action="store_true",
                   help="send raw frames through shared memory instead of JPEGs in the messages "
                   "(a server on this host started with --allow-shared-memory; no encoding, "
                   "no network bytes)")
    p.add_argument("--track", action="store_true",
                   help="follow objects from frame to frame: each gets a tracker_id (JSONL, "
                   "overlay) and the summary counts unique objects per class")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--token", default=None, help="bearer token, if the server wants one")
    p.add_argument("--tls-root-cert", default=None, help="CA certificate (PEM) to use TLS")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def run(args: argparse.Namespace) -> dict:
    """Stream the source; returns a summary dict (also for ``make run``)."""
    check(args.source)
    # A bad --server (no port, a name that does not resolve) fails here, before any output.
    client = SegmentationClient(args.server, model=args.model, timeout_s=args.timeout,
                                tls_root_cert=args.tls_root_cert, token=args.token)
    images: dict[int, object] = {}

    def send():
        for f in frames(args.source, args.max_frames):
            images[f.index] = f.rgb
            yield f.rgb if args.shared_memory else encode_jpeg(f.rgb, quality=SEND_QUALITY)

    writer = None
    png_folder = None
    if args.annotate is not None:
        if args.annotate.suffix.lower() in (".mp4", ".mkv", ".mov", ".avi"):
            writer = VideoWriter(args.annotate, frame_rate(args.source))
        else:
            png_folder = args.annotate
            png_folder.mkdir(parents=True, exist_ok=True)
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    classes: Counter = Counter()
    tracked_objects: dict[str, set] = {}
    summary = {"source": describe(args.source), "frames": 0, "errors": 0, "dropped": 0,
               "detections": 0, "rle_bytes": 0, "dense_bytes": 0, "interrupted": False}
    progress = Progress(not args.quiet)
    start = time.perf_counter()
    results = client.stream(send(), confidence=args.confidence, track=args.track,
                            shared_memory=args.shared_memory)
    try:
        with args.jsonl.open("w") as out:
            for result in results:
                doc = result_document(result)
                out.write(json.dumps(doc) + "\n")
                summary["frames"] += 1
                summary["errors"] += bool(result.error)
                summary["dropped"] += bool(result.dropped)
                for p in doc["predictions"]:
                    classes[p["class"]] += 1
                    if tracker_id(p) is not None:
                        tracked_objects.setdefault(p["class"], set()).add(tracker_id(p))
                    summary["rle_bytes"] += len(p["rle"]["counts"])
                    summary["dense_bytes"] += result.height * result.width
                summary["detections"] += len(doc["predictions"])
                rgb = images.pop(result.frame_index, None)
                if rgb is not None and (writer or png_folder):
                    from pipeline.overlay import draw

                    picture = draw(rgb, doc["predictions"])
                    if writer:
                        import numpy as np

                        writer.write(np.asarray(picture))
                    else:
                        picture.save(png_folder / f"frame-{result.frame_index:06d}.png")
                progress.update(summary["frames"], summary["detections"])
    except KeyboardInterrupt:
        summary["interrupted"] = True
    finally:
        results.close()
        client.close()
        if writer:
            writer.close()
    elapsed = time.perf_counter() - start
    progress.update(summary["frames"], summary["detections"], final=True)
    summary["seconds"] = round(elapsed, 2)
    summary["frames_per_second"] = round(summary["frames"] / elapsed, 2) if elapsed else 0.0
    summary["classes"] = dict(classes.most_common())
    if args.track:  # unique objects followed, per class
        summary["objects"] = dict(sorted(((c, len(ids)) for c, ids in tracked_objects.items()),
                                         key=lambda item: -item[1]))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["streams"]:  # cameras on the server (a folder named so: ./streams)
        from .camera_cli import main as streams_main

        return streams_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except (ClientError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary), file=sys.stderr)
    return 130 if summary["interrupted"] else 0
