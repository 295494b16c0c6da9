"""Cameras pulled by the server vs the same cameras pushed by clients, in one run, one server.

Eight RTSP cameras (GStreamer's RTSP server, ``tests/cameras.py``), each a 720p H.264 clip of
the bundled photos at 10 fps (each camera shows the photos in another order), looped in real
time. One ``python -m pipeline serve`` with the real model serves two ways, one after the
other, each for ``--seconds`` after ``--warmup``:

- **server-side**: one ``POST /v1/streams`` per camera, ``max_fps`` 2, a webhook sink (a
  receiver in this process): the server decodes, samples and batches;
- **client push**: eight threads, each decoding its camera with PyAV as a client does today,
  sampling 2 fps, keeping the newest two frames, JPEG-encoding them (quality 90) and sending
  them through ``StreamFrames`` (the client library's ``stream``; the server's window 1 and
  ``drop_oldest``, as the camera streams have).

Printed per way: frames decoded and delivered per camera, frames dropped, results per second
in all, capture-to-result latency p50 / p99 (decoded, to the sink or the client holding the
result), CPU seconds per result of the server process and of this process (client threads,
the receiver); then the ratios. Last, decoding alone: the eight cameras decoded and sampled
by the server's ``Source`` in this process, its CPU share of the machine.

    python -m benchmarks.camera_bench --cameras 8 --max-fps 2 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import requests

from clients.client import SegmentationClient
from pipeline.cameras.sources import FrameQueue, Source
from pipeline.proto import video_pb2 as vpb
from pipeline.tools.launch import local_server
from pipeline.tools.samples import NAMES
from tests.cameras import RtspServer, make_clip, rtsp_unavailable

from .common import ROOT, cpu_s, jpeg, out_path, percentile


class Receiver:
    """The webhook sink: each document's arrival, and its latency from when it was decoded."""

    def __init__(self):
        self.latencies: dict[str, list[float]] = {}
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.latencies.setdefault(body["stream_id"], []).append(time.time() - body["timestamp"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/results"


def server_side(server, cameras: list[str], max_fps: float, warmup: float, seconds: float) -> dict:
    receiver = Receiver()
    base = f"http://127.0.0.1:{server.http_port}/v1/streams"
    for i, url in enumerate(cameras):
        added = requests.post(base, json={"source": url, "max_fps": max_fps, "stream_id": f"cam{i}",
                                          "sinks": [receiver.url]}, timeout=30)
        added.raise_for_status()
    time.sleep(warmup)
    before = {s["stream_id"]: s for s in requests.get(base, timeout=30).json()["streams"]}
    counted = {k: len(v) for k, v in receiver.latencies.items()}
    cpu_server, cpu_here, started = cpu_s(server.process.pid), time.process_time(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    cpu = (cpu_s(server.process.pid) - cpu_server, time.process_time() - cpu_here)
    after = {s["stream_id"]: s for s in requests.get(base, timeout=30).json()["streams"]}
    latencies = [x for k, v in receiver.latencies.items() for x in v[counted.get(k, 0):]]
    for stream in after.values():
        if stream["frame_errors"]:
            print(f"  {stream['stream_id']}: {stream['frame_errors']} frame errors, the last: {stream['last_error']}")
    for stream_id in after:
        requests.delete(f"{base}/{stream_id}", timeout=60)
    receiver.http.shutdown()

    def delta(key):
        return [after[k][key] - before[k][key] for k in sorted(after)]

    return {"decoded": delta("frames_decoded"), "out": delta("frames_out"), "dropped": sum(delta("frames_dropped")),
            "errors": sum(delta("frame_errors")), "latencies": latencies, "elapsed": elapsed, "cpu": cpu}


class PushingCamera(threading.Thread):
    """A client as users write one today: decode the camera, sample, keep the newest two,
    JPEG them, stream them; results and their latency from decoding."""

    def __init__(self, address: str, url: str, name: str, max_fps: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.address, self.url, self.name, self.max_fps, self.stop = address, url, name, max_fps, stop
        self.frames: queue.Queue = queue.Queue(2)
        self.decoded = 0
        self.results: list[tuple[float, float, bool, str]] = []  # (arrival, latency, dropped, error)

    def decode(self):
        with av.open(self.url, options={"rtsp_transport": "tcp"}, timeout=(5, 5)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 2
            due = 0.0
            for frame in container.decode(stream):
                if self.stop.is_set():
                    return
                self.decoded += 1
                now = time.monotonic()
                if now + 1e-3 < due:
                    continue
                due = max(due + 1 / self.max_fps, now)
                item = (time.time(), self.decoded - 1, frame.to_ndarray(format="rgb24"))
                if self.frames.full():
                    self.frames.get_nowait()
                self.frames.put(item)

    def sent(self):
        while not self.stop.is_set():
            try:
                captured, index, rgb = self.frames.get(timeout=0.5)
            except queue.Empty:
                continue
            yield vpb.Frame(stream_id=self.name, frame_index=index, timestamp=captured, encoded=jpeg(rgb))

    def run(self):
        threading.Thread(target=self.decode, daemon=True).start()
        with SegmentationClient(self.address) as client:
            for result in client.stream(self.sent()):
                now = time.time()
                self.results.append((now, now - result.timestamp, result.dropped, result.error))


def client_push(server, cameras: list[str], max_fps: float, warmup: float, seconds: float) -> dict:
    stop = threading.Event()
    pushers = [PushingCamera(server.address, url, f"cam{i}", max_fps, stop) for i, url in enumerate(cameras)]
    for pusher in pushers:
        pusher.start()
    time.sleep(warmup)
    start_wall = time.time()
    decoded = [p.decoded for p in pushers]
    cpu_server, cpu_here, started = cpu_s(server.process.pid), time.process_time(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    cpu = (cpu_s(server.process.pid) - cpu_server, time.process_time() - cpu_here)
    end_wall = time.time()
    stop.set()
    in_run = [[r for r in p.results if start_wall <= r[0] < end_wall] for p in pushers]
    return {"decoded": [p.decoded - d for p, d in zip(pushers, decoded)],
            "out": [sum(not (r[2] or r[3]) for r in rs) for rs in in_run],
            "dropped": sum(r[2] for rs in in_run for r in rs), "errors": sum(bool(r[3]) for rs in in_run for r in rs),
            "latencies": [r[1] for rs in in_run for r in rs if not (r[2] or r[3])], "elapsed": elapsed, "cpu": cpu}


def decode_alone(cameras: list[str], max_fps: float, seconds: float) -> float:
    """CPU share of the machine that decoding and sampling the cameras takes (server's Source)."""
    queues = [FrameQueue(2, drop_oldest=True, on_drop=lambda frame: None) for _ in cameras]
    sources = [Source(url, network=True, max_fps=max_fps, realtime=True, queue=q, name=f"d{i}",
                      on_state=lambda state, error: None) for i, (url, q) in enumerate(zip(cameras, queues))]
    for source in sources:
        source.start()
    time.sleep(3)
    cpu, started = time.process_time(), time.monotonic()
    time.sleep(seconds)
    share = (time.process_time() - cpu) / (time.monotonic() - started) / os.cpu_count()
    for source in sources:
        source.stop()
    return share


def report(name: str, run: dict) -> dict:
    total = sum(run["out"])
    row = {"way": name, "results_per_s": total / run["elapsed"],
           "decoded_per_camera_s": np.mean(run["decoded"]) / run["elapsed"],
           "out_per_camera_s": np.mean(run["out"]) / run["elapsed"], "dropped": run["dropped"],
           "errors": run["errors"], "p50_ms": percentile(run["latencies"], 50) * 1e3,
           "p99_ms": percentile(run["latencies"], 99) * 1e3,
           "server_cpu_ms": run["cpu"][0] / max(total, 1) * 1e3, "client_cpu_ms": run["cpu"][1] / max(total, 1) * 1e3}
    print(f"{name:12} {row['results_per_s']:6.2f} results/s | per camera: decoded "
          f"{row['decoded_per_camera_s']:5.2f}/s, "
          f"out {row['out_per_camera_s']:4.2f}/s | dropped {row['dropped']:4d} | errors {row['errors']} | "
          f"p50 {row['p50_ms']:7.0f} ms  p99 {row['p99_ms']:7.0f} ms | CPU per result: server "
          f"{row['server_cpu_ms']:6.0f} ms, client {row['client_cpu_ms']:5.0f} ms", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--max-fps", type=float, default=2.0, help="frames sampled per camera per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--clip-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    why = rtsp_unavailable()
    if why:
        raise SystemExit(f"no RTSP server here: {why}")
    print(f"making {args.cameras} clips of 720p H.264 at 10 fps ...", flush=True)
    clips = {f"cam{i}": make_clip(seconds=args.clip_seconds, fps=10, size=(1280, 720),
                                  photos=NAMES[i % len(NAMES):] + NAMES[:i % len(NAMES)])
             for i in range(args.cameras)}
    with RtspServer(clips) as rtsp, open(out_path("camera_bench_server.log"), "w") as log, \
            local_server("--model-repository", str(ROOT / "model_repository"), "--allow-stream-urls",
                         "--stream-url-allow", "127.0.0.1", "--stream-window", "1", "--stream-policy",
                         "drop_oldest", http=True, log=log, cwd=ROOT) as server:
        urls = [rtsp.url(name) for name in clips]
        print(f"{args.cameras} cameras, max_fps {args.max_fps:g} each, {args.seconds:g} s after {args.warmup:g} s "
              "of warm-up, one server (real model), this machine:", flush=True)
        ours = report("server-side", server_side(server, urls, args.max_fps, args.warmup, args.seconds))
        theirs = report("client push", client_push(server, urls, args.max_fps, args.warmup, args.seconds))
        share = decode_alone(urls, args.max_fps, args.seconds / 2)
    print(f"ratios, server-side / client push: results/s {ours['results_per_s'] / theirs['results_per_s']:.2f}x, "
          f"p99 {ours['p99_ms'] / theirs['p99_ms']:.2f}x, p50 {ours['p50_ms'] / theirs['p50_ms']:.2f}x")
    print(f"decoding {args.cameras} cameras of 720p at 10 fps (sampled to {args.max_fps:g}): "
          f"{share * 100:.1f}% of this machine's {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
