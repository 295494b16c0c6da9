"""Cameras of huge frames against the server's memory budget: peak and resting memory.

One ``python -m pipeline serve`` (the real model) with ``--max-bytes-in-flight-mb``; then
``--streams`` file cameras of the same huge-frame clip (made here with ffmpeg: MJPEG in AVI,
or H.264 in MP4), played in real time, for ``--seconds``; then every stream removed. The
server's resident memory (VmRSS) is sampled every 0.1 s. Printed: the server's memory before
the cameras, its peak while they play and what stays after they are removed (each as MB above
the start), how many streams ran and failed (and why), and the results they delivered.

    python -m benchmarks.camera_memory_bench --streams 8 --size 8000x8000 --codec mjpeg --budget-mb 1024
    python -m benchmarks.camera_memory_bench --streams 4 --size 7680x4320 --codec h264 --budget-mb 512
    python -m benchmarks.camera_memory_bench ... --server-root ../other-checkout   # its server
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from .common import add_server_root, arguments, checkout_server, out_path

CODECS = {"mjpeg": ("avi", ["-c:v", "mjpeg", "-q:v", "8"]),
          "h264": ("mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"])}


def rss_mb(pid: int) -> float:
    """A process's resident memory now, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """The highest resident memory of a process seen since it started, read every
    ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.peak, self.stop = pid, interval_s, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_mb(self.pid))


def clip(folder: Path, size: str, codec: str, seconds: float, fps: float) -> str:
    """A test-pattern clip of ``size`` (WxH), made by ffmpeg; its file name."""
    suffix, flags = CODECS[codec]
    name = f"huge.{suffix}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=s={size}:r={fps:g}",
                    "-t", f"{seconds:g}", *flags, str(folder / name)], check=True)
    return name


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--size", default="8000x8000", help="WxH of the clip's frames")
    parser.add_argument("--codec", choices=sorted(CODECS), default="mjpeg")
    parser.add_argument("--fps", type=float, default=2.0, help="the clip's frame rate")
    parser.add_argument("--budget-mb", type=int, default=1024, help="the server's --max-bytes-in-flight-mb")
    parser.add_argument("--seconds", type=float, default=20.0)
    add_server_root(parser)
    args = parser.parse_args(argv)
    root = args.server_root.resolve()
    folder = Path(tempfile.mkdtemp(prefix="camera-memory-"))
    try:
        print(f"making a {args.size} {args.codec} clip ...", flush=True)
        name = clip(folder, args.size, args.codec, args.seconds + 10, args.fps)
        with open(out_path("camera_memory_bench_server.log"), "w") as log, \
                checkout_server(root, "--stream-source-dir", str(folder), "--max-ingest-streams", str(args.streams),
                                "--max-bytes-in-flight-mb", str(args.budget_mb), http=True, log=log) as server:
            pid, base = server.process.pid, f"http://127.0.0.1:{server.http_port}/v1/streams"
            time.sleep(2)
            start = rss_mb(pid)
            sampler = Sampler(pid)
            sampler.start()
            for i in range(args.streams):
                requests.post(base, json={"source": name, "stream_id": f"huge{i}"}, timeout=60).raise_for_status()
            time.sleep(args.seconds)
            streams = requests.get(base, timeout=60).json()["streams"]
            for stream in streams:
                requests.delete(f"{base}/{stream['stream_id']}", timeout=120)
            time.sleep(5)  # removed: what the server gives back, it has given by now
            sampler.stop.set()
            sampler.join()
            resting = rss_mb(pid)
        failed = [s for s in streams if s["state"] == "failed"]
        print(f"{args.streams} streams of {args.size} {args.codec} at {args.fps:g} fps, --max-bytes-in-flight-mb "
              f"{args.budget_mb}, {args.seconds:g} s; server: {root}")
        print("| start MB | peak MB above start | resting MB above start | streams failed | results |")
        print("|---|---|---|---|---|")
        print(f"| {start:.0f} | {sampler.peak - start:.0f} | {resting - start:.0f} | {len(failed)} of {len(streams)} "
              f"| {sum(s['frames_out'] for s in streams)} |")
        for reason in sorted({s["last_error"] for s in failed}):
            print(f"  failed: {reason}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
