"""A fleet on one machine: aggregate frames/s of 1, 2, 3 ... replicas behind the client
library's round-robin, and how soon a replica that joins gets work.

Each replica is ``python -m pipeline serve`` on loopback (the real model unless
``--server-args`` says otherwise), its network threads a share of the cores. ``--streams``
cameras go through one ``SegmentationClient`` listing every replica; each camera keeps one
720p raw frame in flight (the sample photos' 16:9 bands), so the fleet is saturated without
queueing past its deadlines. Per run: frames/s, p50/p99 latency, errors, and each replica's
answered requests from its own metrics (``nv_inference_request_success``).

``--join``: the same client lists one more address than are serving; after ``--join-after``
seconds that replica starts. Printed: the seconds from its SERVING to its first answered
request. Connections are made to age (``--grpc-max-connection-age-s``) so running streams
move too, not only new ones.

    python -m benchmarks.fleet_bench --replicas 1 2 3 --streams 8 --seconds 30
    python -m benchmarks.fleet_bench --replicas 2 --join --seconds 40
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import ExitStack

import numpy as np

from clients import SegmentationClient
from pipeline.tools.launch import free_port, local_server
from pipeline.tools.samples import NAMES, sample_rgb

from .common import ROOT, arguments, out_path, percentile, scrape, sixteen_by_nine


def answered(metrics_port: int) -> int:
    """A replica's answered requests so far (every model)."""
    return int(scrape(metrics_port).total("nv_inference_request_success"))


class Camera(threading.Thread):
    """One stream, one frame in flight: the next frame goes once the last is answered."""

    def __init__(self, client: SegmentationClient, index: int, frames: list[np.ndarray],
                 stop_at: float):
        super().__init__(daemon=True)
        self.client, self.index, self.frames, self.stop_at = client, index, frames, stop_at
        self.latencies_ms: list[float] = []
        self.errors = 0
        self._answered = threading.Semaphore(0)
        self._sent_at = 0.0

    def source(self):
        k = self.index
        while time.monotonic() < self.stop_at:
            self._sent_at = time.perf_counter()
            yield self.frames[k % len(self.frames)]
            k += 1
            self._answered.acquire()

    def run(self):
        for result in self.client.stream(self.source(), stream_id=f"camera-{self.index}"):
            if result.error:
                self.errors += 1
            else:
                self.latencies_ms.append((time.perf_counter() - self._sent_at) * 1e3)
            self._answered.release()


def drive(client: SegmentationClient, streams: int, frames: list[np.ndarray], seconds: float):
    stop_at = time.monotonic() + seconds
    cameras = [Camera(client, i, frames, stop_at) for i in range(streams)]
    started = time.perf_counter()
    for c in cameras:
        c.start()
    for c in cameras:
        c.join()
    elapsed = time.perf_counter() - started
    latencies = [x for c in cameras for x in c.latencies_ms]
    return len(latencies) / elapsed, latencies, sum(c.errors for c in cameras)


def replica_flags(replicas: int, extra: str) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // replicas)
    return ["--network-threads", str(threads), "--worker-threads", "1", *extra.split()]


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--server-args", default="", help="extra flags for every replica")
    parser.add_argument("--join", action="store_true", help="one more replica joins mid-run")
    parser.add_argument("--join-after", type=float, default=10.0)
    parser.add_argument("--age-s", type=float, default=10.0,
                        help="--grpc-max-connection-age-s of the replicas with --join")
    args = parser.parse_args(argv)
    frames = [sixteen_by_nine(sample_rgb(n)) for n in NAMES]
    print(f"# fleet bench: {args.streams} cameras (720p raw, one frame in flight each), "
          f"{args.seconds:.0f} s per row, replicas on this machine's {os.cpu_count()} cores")
    print("| replicas | frames/s | p50 ms | p99 ms | errors | answered per replica |")
    print("|---|---|---|---|---|---|")
    for count in args.replicas:
        total = count + args.join
        flags = replica_flags(total, args.server_args)
        if args.join:
            flags += ["--grpc-max-connection-age-s", str(args.age_s),
                      "--grpc-max-connection-age-grace-s", str(args.age_s / 2)]
        ports = [(free_port(), free_port()) for _ in range(total)]
        with ExitStack() as stack:
            for i in range(count):
                log = stack.enter_context(open(out_path(f"fleet_bench_{count}_{i}.log"), "w"))
                grpc_port, metrics_port = ports[i]
                stack.enter_context(local_server("--metrics-port", str(metrics_port), *flags,
                                                 port=grpc_port, log=log, cwd=ROOT))
            client = stack.enter_context(SegmentationClient([f"127.0.0.1:{g}" for g, _ in ports]))
            joined: dict[str, float] = {}
            done = threading.Event()

            def join():  # the joiner lives in this thread, and is stopped here once done is set
                time.sleep(args.join_after)
                grpc_port, metrics_port = ports[count]
                with open(out_path(f"fleet_bench_{count}_{count}.log"), "w") as log, \
                        local_server("--metrics-port", str(metrics_port), *flags, port=grpc_port,
                                     log=log, cwd=ROOT):
                    joined["serving"] = time.monotonic()
                    while not done.is_set() and "first" not in joined:
                        if answered(metrics_port):
                            joined["first"] = time.monotonic()
                        time.sleep(0.05)
                    done.wait()
                    joined["answered"] = answered(metrics_port)

            joiner = threading.Thread(target=join)
            if args.join:
                joiner.start()
            fps, latencies, errors = drive(client, args.streams, frames, args.seconds)
            share = [answered(m) for _, m in ports[:count]]
            done.set()
            if args.join:
                joiner.join()
                share.append(int(joined.get("answered", 0)))
            print(f"| {count}{' + 1 joining' if args.join else ''} | {fps:.2f} | "
                  f"{percentile(latencies, 50):.0f} | {percentile(latencies, 99):.0f} | {errors} | "
                  f"{', '.join(map(str, share))} |", flush=True)
            if args.join:
                waited = joined.get("first", float("nan")) - joined.get("serving", float("nan"))
                print(f"(the joining replica answered its first request {waited:.1f} s after it "
                      f"was SERVING; connections age {args.age_s:.0f} s + {args.age_s / 2:.0f} s grace)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
