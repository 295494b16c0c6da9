"""Load benchmark: N concurrent video streams against an in-process server on loopback.

Each client streams the same number of real photos (JPEG) through the typed video API and
measures, per frame, the time from handing the frame to gRPC until its result arrives.
Prints frames/s over all clients, p50/p99 latency, and the mean batch size the dynamic
batcher achieved. Bounded in clients, frames and time; loopback only.
Run: ``make bench`` or ``python -m benchmarks.load_bench [--clients 1 4] [--frames 4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import Counter

import grpc
import numpy as np

from pipeline.frontends.config import ServerConfig
from pipeline.frontends.server import PipelineServer
from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc
from pipeline.tools.samples import NAMES, sample_rgb

from .common import jpeg


def run_client(address: str, stream_id: str, frames: list[bytes], latencies: list[float],
               errors: Counter) -> None:
    """Stream ``frames``; latencies of the answered ones, errors counted by status (frames
    past the model's queue timeout are answered DEADLINE_EXCEEDED, not run)."""
    sent: dict[int, float] = {}

    def requests():
        for i, data in enumerate(frames):
            sent[i] = time.perf_counter()
            yield vpb.Frame(stream_id=stream_id, frame_index=i, encoded=data)

    with grpc.insecure_channel(address) as channel:
        stub = video_pb2_grpc.VideoSegmentationStub(channel)
        for result in stub.StreamFrames(requests(), timeout=600):
            if result.error or result.dropped:
                errors[result.error.split(":", 1)[0] if result.error else "dropped"] += 1
            else:
                latencies.append(time.perf_counter() - sent[result.frame_index])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--frames", type=int, default=4, help="frames per client")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--repository", default="model_repository")
    args = parser.parse_args(argv)

    photos = [jpeg(sample_rgb(n)) for n in NAMES]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = PipelineServer(ServerConfig(model_repository=args.repository, host="127.0.0.1", http_port=0,
                                         grpc_port=0, metrics_port=0, device=args.device))
    asyncio.run_coroutine_threadsafe(server.start(serve_metrics=False), loop).result(300)
    address = f"127.0.0.1:{server.grpc_port}"
    pipe = next(iter(server.state.pipelines.values()))
    print(f"# load: video streams over loopback gRPC, {args.frames} real photos per client, "
          f"device {pipe.device}")
    print("| clients | frames | answered frames/s | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|")
    run_client(address, "warm-up", photos[:1], [], Counter())
    for clients in args.clients:
        before = server.ledger.totals(pipe.name)
        latencies: list[float] = []
        errors: Counter = Counter()
        frames = [photos[k % len(photos)] for k in range(args.frames)]
        threads = [threading.Thread(target=run_client,
                                    args=(address, f"client-{c}", frames, latencies, errors))
                   for c in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        elapsed = time.perf_counter() - start
        total = clients * args.frames
        if len(latencies) + sum(errors.values()) != total:
            print(f"incomplete run: {len(latencies)} + {sum(errors.values())} errors of {total} "
                  "frames", file=sys.stderr)
            return 1
        ms = np.array(latencies) * 1e3
        after = server.ledger.totals(pipe.name)
        batches = after.batches - before.batches
        mean_batch = (after.images - before.images) / batches if batches else 0.0
        failed = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"
        print(f"| {clients} | {total} | {len(latencies) / elapsed:.2f} | {np.percentile(ms, 50):.0f} | "
              f"{np.percentile(ms, 99):.0f} | {mean_batch:.2f} | {failed} |", flush=True)
    asyncio.run_coroutine_threadsafe(server.drain(grace_s=5), loop).result(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
