"""``python -m clients streams add|list|show|rm|pause|resume|watch``: cameras the server pulls itself.

``add`` asks the server to pull a camera (rtsp://, HLS over http(s)://) or a file from its
--stream-source-dir, its results to sinks (webhook, MQTT, Redis) and subscribers; ``list``
shows every stream's state and rates; ``watch`` subscribes and prints each stream's live
results per second, and can save the results (JSON Lines) and the annotated frames.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path

from pipeline.repository import DEFAULT_MODEL

from .client import ClientError, SegmentationClient, result_document

COLUMNS = ("stream_id", "state", "fps_in", "fps_out", "frames_out", "frames_dropped", "frame_errors",
           "reconnects", "source")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients streams",
        description="Cameras on the server: the server pulls RTSP/HLS cameras or files itself, "
        "batches their frames with every other request, and delivers each frame's masks (COCO "
        "RLE) and track ids to sinks and subscribers.")
    p.add_argument("--server", default="localhost:8001", help="the server's gRPC host:port")
    p.add_argument("--token", default=None, help="bearer token, if the server wants one")
    p.add_argument("--tls-root-cert", default=None, help="CA certificate (PEM) to use TLS")
    commands = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = commands.add_parser("add", help="have the server pull a camera or a file",
                              description="Prints the new stream's status (JSON).")
    add.add_argument("source", help="rtsp://..., https://.../playlist.m3u8, or a file in the "
                     "server's --stream-source-dir")
    add.add_argument("--id", dest="stream_id", default="", help="a name for the stream (default: "
                     "the server makes one up)")
    add.add_argument("--model", default=DEFAULT_MODEL)
    add.add_argument("--max-fps", type=float, default=None,
                     help="frames to segment per second (default: every frame)")
    add.add_argument("--track", action="store_true", help="tracker ids per camera (ByteTrack)")
    add.add_argument("--sink", action="append", default=[], metavar="URL",
                     help="where each frame's JSON goes: http(s)://host/path (POST), "
                     "mqtt://host:1883/topic (a topic per stream under it), "
                     "redis://host:6379/key (XADD); mqtts://, rediss:// and https:// "
                     "verify the server's certificate; repeatable")
    add.add_argument("--as-fast-as-possible", dest="realtime", action="store_false", default=None,
                     help="files only: play as fast as the model takes frames, dropping none "
                     "(default: at the file's own rate, like a camera)")
    add.add_argument("--confidence", type=float, default=None, help="minimum score (default 0.25)")

    commands.add_parser("list", help="every stream: state, rates, counts")
    for action, text in (("show", "one stream's whole status (JSON)"), ("rm", "stop and remove a stream"),
                         ("pause", "pause a stream"), ("resume", "resume a paused stream")):
        commands.add_parser(action, help=text).add_argument("stream_id")

    watch = commands.add_parser(
        "watch", help="print live results per second; optionally save them",
        description="Subscribes to one stream (or all) and prints, every second, each stream's "
        "results per second, detections and drops. Ctrl-C stops.")
    watch.add_argument("stream_id", nargs="?", default="", help="one stream (default: all)")
    watch.add_argument("--jsonl", type=Path, default=None, help="also write every result (JSON Lines)")
    watch.add_argument("--annotate", type=Path, default=None,
                       help="a folder: one PNG per result, the masks drawn over the frame")
    watch.add_argument("--seconds", type=float, default=None, help="stop after this long")
    watch.add_argument("--max-results", type=int, default=None, help="stop after this many results")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = SegmentationClient(args.server, token=args.token, tls_root_cert=args.tls_root_cert)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.action == "add":
                options = {} if args.confidence is None else {"confidence": args.confidence}
                status = client.add_stream(args.source, max_fps=args.max_fps, track=args.track,
                                           sinks=args.sink, realtime=args.realtime,
                                           stream_id=args.stream_id, model=args.model, **options)
                print(json.dumps(status, indent=2))
            elif args.action == "list":
                print_table(client.streams())
            elif args.action == "watch":
                return watch(client, args)
            else:
                call = {"show": client.get_stream, "rm": client.remove_stream, "pause": client.pause_stream,
                        "resume": client.resume_stream}[args.action]
                print(json.dumps(call(args.stream_id), indent=2))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def print_table(streams: list[dict]) -> None:
    if not streams:
        print("no camera streams")
        return
    rows = [[str(s.get(c, "")) for c in COLUMNS] for s in streams]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    for row in [list(COLUMNS), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for s in streams:
        if s.get("last_error"):  # the code is the present failure's (none once it runs again)
            code = f" [{s['error_code']}]" if s.get("error_code") else ""
            print(f"{s['stream_id']}: last error{code}: {s['last_error']}")


def watch(client: SegmentationClient, args: argparse.Namespace) -> int:
    """Print each stream's results per second until Ctrl-C, --seconds or --max-results."""
    if args.annotate is not None:
        args.annotate.mkdir(parents=True, exist_ok=True)
    out = args.jsonl.open("w") if args.jsonl else None
    results = client.subscribe(args.stream_id, frames=args.annotate is not None, seconds=args.seconds)
    started = last = time.monotonic()
    window: dict[str, Counter] = {}
    total = 0
    try:
        for result in results:
            counts = window.setdefault(result.stream_id, Counter())
            counts["dropped" if result.dropped else "errors" if result.error else "results"] += 1
            counts["detections"] += len(result.detections)
            if not result.dropped:
                total += 1
                doc = result_document(result)
                if out is not None:
                    out.write(json.dumps(doc) + "\n")
                if args.annotate is not None and result.frame_jpeg:
                    save_overlay(result, doc, args.annotate)
            now = time.monotonic()
            if now - last >= 1.0:
                report(window, now - last)
                window, last = {}, now
            if (args.max_results and total >= args.max_results) or (
                    args.seconds and now - started >= args.seconds):
                break
    except KeyboardInterrupt:
        pass
    finally:
        results.close()
        if out is not None:
            out.close()
    if window:
        report(window, max(time.monotonic() - last, 1e-3))
    return 0


def report(window: dict[str, Counter], seconds: float) -> None:
    for stream_id, c in sorted(window.items()):
        print(f"{stream_id}: {c['results'] / seconds:.1f} results/s | detections {c['detections']} | "
              f"dropped {c['dropped']} | errors {c['errors']}", flush=True)


def save_overlay(result, doc: dict, folder: Path) -> None:
    import numpy as np
    from PIL import Image

    from pipeline.overlay import draw

    rgb = np.asarray(Image.open(io.BytesIO(result.frame_jpeg)).convert("RGB"))
    draw(rgb, doc["predictions"]).save(folder / f"{result.stream_id}-{result.frame_index:06d}.png")
