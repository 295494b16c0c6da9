"""Raw video frames to a server on the same host: shared memory vs raw frames in the gRPC
message vs JPEG, in one run against one server.

Starts ``python -m pipeline serve --allow-shared-memory`` on free ports and, for each frame
size (720p, 1080p: the sample photos' central 16:9 bands) and each way of sending, drives it
with N tritonclient ``ModelStreamInfer`` streams of ``window`` frames in flight (as
serve_bench does). Prints frames/s, p50 and p99 latency, and the CPU milliseconds per frame
of the server process and of this client process (both read from /proc), with ratios
against the in-message ways.

    python -m benchmarks.shm_bench --streams 4 --window 2 --seconds 30

Ways: ``shared memory``: each stream registers one region of ``window`` frame slots and sends
its name, offset and size (Triton's system shared-memory extension); ``raw``: UINT8
[1, H, W, 3] in the message; ``JPEG``: quality-90 JPEGs encoded before the run (the
client's encoding is not in its CPU column; its cost per frame is printed once).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from PIL import Image

from pipeline.tools.launch import local_server
from pipeline.tools.samples import NAMES, sample_rgb

from .common import ROOT, Result, arguments, cpu_s, drive, encoded, jpeg, out_path, sixteen_by_nine

MODEL = "instance_segmentation"
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}


def frames_of(size: str) -> list[np.ndarray]:
    width, height = SIZES[size]
    bands = [sixteen_by_nine(sample_rgb(n)) for n in NAMES]  # 1280x720
    return [np.asarray(Image.fromarray(b).resize((width, height), Image.BILINEAR)) for b in bands]


def raw(frames: list[np.ndarray], offset: int = 0) -> Callable[[int], list]:
    def inputs(k: int) -> list:
        rgb = frames[(offset + k) % len(frames)][None]
        tensor = triton.InferInput("IMAGE", list(rgb.shape), "UINT8")
        tensor.set_data_from_numpy(rgb)
        return [tensor]
    return inputs


class SharedFrames:
    """Streams' regions of ``window`` slots, made and registered as streams start; request k
    of a stream writes its frame to slot k % window (frame k - window is answered by then)."""

    def __init__(self, client: triton.InferenceServerClient, frames: list[np.ndarray], window: int):
        self.client, self.frames, self.window = client, frames, window
        self.slot = frames[0].nbytes
        self.handles = []

    def stream(self, offset: int) -> Callable[[int], list]:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        handle = shm.create_shared_memory_region(name, f"/{name}", self.slot * self.window)
        self.handles.append(handle)
        self.client.register_system_shared_memory(name, f"/{name}", self.slot * self.window)

        def inputs(k: int) -> list:
            rgb = self.frames[(offset + k) % len(self.frames)][None]
            at = (k % self.window) * self.slot
            shm.set_shared_memory_region(handle, [rgb], offset=at)
            tensor = triton.InferInput("IMAGE", list(rgb.shape), "UINT8")
            tensor.set_shared_memory(name, rgb.nbytes, offset=at)
            return [tensor]
        return inputs

    def close(self) -> None:
        self.client.unregister_system_shared_memory()
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0, help="per way and repeat")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over the ways, interleaved (a row sums its rounds), so a "
                        "neighbour's burst or the server warming up does not favour one way")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--server-args", default="", help="extra flags for the server")
    args = parser.parse_args(argv)

    log = open(out_path("shm_bench_server.log"), "w")
    with local_server("--allow-shared-memory", *args.server_args.split(), log=log, cwd=ROOT) as server:
        control = triton.InferenceServerClient(server.address)
        print(f"# shared memory bench: {args.streams} streams x window {args.window}, "
              f"{args.repeats} x {args.seconds:.0f} s per row, one server ({server.address}), client on the same host")
        print("| frames | sent as | frames/s | p50 ms | p99 ms | errors | server CPU ms/frame | "
              "client CPU ms/frame | vs raw (fps, server CPU) | vs JPEG (fps, server CPU) |")
        print("|---" * 10 + "|")
        for size in args.sizes:
            frames = frames_of(size)
            jpegs = [jpeg(f) for f in frames]
            started = time.process_time()
            for f in frames:
                jpeg(f)
            encode_ms = (time.process_time() - started) * 1e3 / len(frames)
            shared = SharedFrames(control, frames, args.window)
            ways = {"shared memory": shared.stream, "raw": lambda s: raw(frames, 3 * s),
                    "JPEG": lambda s: encoded(jpegs, 3 * s)}
            runs: dict[str, list] = {way: [] for way in ways}
            try:
                for _ in range(args.repeats):
                    for way, stream_inputs in ways.items():
                        server_cpu, own_cpu = cpu_s(server.process.pid), cpu_s(os.getpid())
                        result = drive(server.address, MODEL, stream_inputs, args.streams, args.window,
                                       args.seconds, warm_up=len(frames))
                        runs[way].append((result, cpu_s(server.process.pid) - server_cpu,
                                          cpu_s(os.getpid()) - own_cpu))
            finally:
                shared.close()
            rows = {}
            for way, done in runs.items():
                result = Result(sum(r.frames for r, _, _ in done), sum(r.errors for r, _, _ in done),
                                sum(r.seconds for r, _, _ in done), [x for r, _, _ in done for x in r.latencies_ms])
                frames_done = max(result.frames, 1)
                rows[way] = (result, 1e3 * sum(c for _, c, _ in done) / frames_done,
                             1e3 * sum(c for _, _, c in done) / frames_done)
            for way, (result, server_ms, client_ms) in rows.items():
                ratios = []
                for other in ("raw", "JPEG"):
                    peer, peer_server_ms, _ = rows[other]
                    ratios.append("" if other == way else
                                  f"{result.fps / peer.fps:.2f}x, {server_ms / peer_server_ms:.2f}x")
                print(f"| {size} | {way} | {result.fps:.2f} | {result.percentile(50):.0f} | "
                      f"{result.percentile(99):.0f} | {result.errors} | {server_ms:.1f} | {client_ms:.1f} | "
                      + " | ".join(ratios) + " |", flush=True)
            print(f"({size}: encoding one JPEG took {encode_ms:.1f} ms of client CPU, not counted above)",
                  flush=True)
        control.close()
    print(f"(the server's log: {log.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
