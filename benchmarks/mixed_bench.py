"""Cameras on the server beside clients pushing work, one server: does each keep its share?

One ``python -m pipeline serve`` with the real model, and at once, for ``--seconds`` after
``--warmup``:

- **cameras**: ``--cameras`` file cameras (``POST /v1/streams``: 720p H.264 clips at 10 fps,
  played in real time, sampled to ``--max-fps``), no sinks;
- **video**: ``--video-streams`` clients of the typed video API (the client library's
  ``stream``), each sending the sample photos as JPEG as fast as the server's window lets it;
- **HTTP**: ``--http-loops`` clients of Roboflow's v1 route, one request after another.

Printed per class: results per second, and what was not served (camera frames dropped or
failed; video and HTTP requests refused or failed), and the model's queue timeouts. A class
the others starve shows as results near zero beside its demand.

    python -m benchmarks.mixed_bench --cameras 16 --video-streams 8 --http-loops 2 --seconds 20
    python -m benchmarks.mixed_bench ... --server-root ../other-checkout   # its server, same load
"""

from __future__ import annotations

import base64
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from clients.client import SegmentationClient
from pipeline.tools.launch import free_port
from pipeline.tools.samples import NAMES
from tests.cameras import make_clip

from .common import add_server_root, arguments, checkout_server, out_path, scrape, workload

MODEL = "instance_segmentation"


def pushing_video(address: str, photos: list[bytes], stop: threading.Event, got: list) -> None:
    """One video client: photos in turn, as fast as the stream's window lets them go."""
    def frames():
        k = 0
        while not stop.is_set():
            yield photos[k % len(photos)]
            k += 1

    with SegmentationClient(address, timeout_s=120) as client:
        for result in client.stream(frames()):
            got.append((time.monotonic(), not (result.error or result.dropped)))
            if stop.is_set():
                break


def http_loop(url: str, photos: list[bytes], stop: threading.Event, got: list) -> None:
    """One Roboflow v1 client: a request, its answer, the next."""
    bodies = [{"model_id": f"{MODEL}/1", "image": {"type": "base64", "value": base64.b64encode(p).decode()}}
              for p in photos]
    k = 0
    with requests.Session() as session:
        while not stop.is_set():
            answer = session.post(url, json=bodies[k % len(bodies)], timeout=120)
            got.append((time.monotonic(), answer.status_code == 200))
            k += 1


def served(events: list, start: float, end: float) -> tuple[int, int]:
    """(answered, not answered) among the events between ``start`` and ``end``."""
    window = [ok for at, ok in events if start <= at < end]
    return sum(window), len(window) - sum(window)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument("--max-fps", type=float, default=2.0, help="frames sampled per camera per second")
    parser.add_argument("--video-streams", type=int, default=8)
    parser.add_argument("--http-loops", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    add_server_root(parser)
    args = parser.parse_args(argv)
    root = args.server_root.resolve()
    clip_seconds = args.warmup + args.seconds + 15  # the files still play when the run ends
    folder = Path(tempfile.mkdtemp(prefix="mixed-bench-"))
    print(f"making {args.cameras} clips of 720p H.264 at 10 fps ...", flush=True)
    for i in range(args.cameras):
        shutil.copyfile(make_clip(seconds=clip_seconds, fps=10, size=(1280, 720),
                                  photos=NAMES[i % len(NAMES):] + NAMES[:i % len(NAMES)]), folder / f"cam{i}.mp4")
    photos = workload("photos")
    metrics_port = free_port()
    try:
        with open(out_path("mixed_bench_server.log"), "w") as log, \
                checkout_server(root, "--stream-source-dir", str(folder), "--max-ingest-streams",
                                str(args.cameras), "--metrics-port", str(metrics_port), http=True, log=log) as server:
            streams = f"http://127.0.0.1:{server.http_port}/v1/streams"
            stop = threading.Event()
            video: list = []
            http: list = []
            threads = [threading.Thread(target=pushing_video, args=(server.address, photos, stop, video), daemon=True)
                       for _ in range(args.video_streams)]
            threads += [threading.Thread(target=http_loop, daemon=True, args=(
                f"http://127.0.0.1:{server.http_port}/infer/instance_segmentation", photos, stop, http))
                for _ in range(args.http_loops)]
            for i in range(args.cameras):
                requests.post(streams, json={"source": f"cam{i}.mp4", "max_fps": args.max_fps,
                                             "stream_id": f"cam{i}"}, timeout=30).raise_for_status()
            for thread in threads:
                thread.start()
            time.sleep(args.warmup)
            before, metrics_before = requests.get(streams, timeout=30).json()["streams"], scrape(metrics_port)
            start = time.monotonic()
            time.sleep(args.seconds)
            end = time.monotonic()
            after, metrics_after = requests.get(streams, timeout=30).json()["streams"], scrape(metrics_port)
            stop.set()
            for thread in threads:
                thread.join(timeout=130)

            def camera_delta(key: str) -> int:
                return sum(a[key] for a in after) - sum(b[key] for b in before)

            elapsed = end - start
            timeouts = (metrics_after - metrics_before).total("rle_serving_queue_timeouts_total")
            print(f"{args.cameras} file cameras (max_fps {args.max_fps:g}), {args.video_streams} video clients, "
                  f"{args.http_loops} HTTP loops; {args.seconds:g} s after {args.warmup:g} s; server: {root}")
            rows = [("cameras", camera_delta("frames_out"),
                     camera_delta("frames_dropped") + camera_delta("frame_errors")),
                    ("video", *served(video, start, end)), ("HTTP", *served(http, start, end))]
            print("| class | results/s | per client per s | not served |\n|---|---|---|---|")
            for (name, ok, missed), clients in zip(rows, (args.cameras, args.video_streams, args.http_loops)):
                print(f"| {name} | {ok / elapsed:.2f} | {ok / elapsed / max(clients, 1):.2f} | {missed} |")
            print(f"queue timeouts: {timeouts:.0f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
