"""End to end through the server, side by side with a peer: N tritonclient streams per run.

Starts our server (``python -m pipeline serve``) on free ports, then for each run (streams x
window) and each workload drives it, and the peer target if one is given, with the same load:
every stream keeps ``window`` frames in flight through KServe's ``ModelStreamInfer`` (as the
official tritonclient does), cycling through real photos. Prints frames/s, p50 and p99
latency, and for our server the mean batch size and milliseconds per frame per stage (read
from its Prometheus endpoint before and after the run). Loopback only; bounded in time.

    python benchmarks/serve_bench.py --peer 127.0.0.1:8101 --peer-model peer_seg \\
        --runs 1x1 4x2 --workloads photos photos+16:9 --seconds 30

Workloads: ``photos`` are the real sample photos (bus, zidane, astronaut, coffee, chelsea);
``16:9`` are 1280x720 frames cut from them; ``photos+16:9`` interleaves both.
The peer in ../shared/tools/peer-triton (the real Triton 2.51 with per-mask pycocotools) is
launched with its launch.sh; see docs/benchmarks.md for the commands used.
"""

from __future__ import annotations

import argparse
import io
import queue
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from PIL import Image

from pipeline.tools.launch import free_port, local_server
from pipeline.tools.samples import NAMES, sample_rgb

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("preprocess", "network", "postprocess", "rle")


def jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sixteen_by_nine(rgb: np.ndarray) -> np.ndarray:
    """A 1280x720 frame: the photo's central 16:9 band, resized."""
    h, w = rgb.shape[:2]
    crop_h = min(h, w * 9 // 16)
    crop_w = crop_h * 16 // 9
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    band = Image.fromarray(rgb[top : top + crop_h, left : left + crop_w])
    return np.asarray(band.resize((1280, 720), Image.BILINEAR))


def workload(name: str) -> list[bytes]:
    photos = [sample_rgb(n) for n in NAMES]
    if name == "photos":
        return [jpeg(p) for p in photos]
    if name == "16:9":
        return [jpeg(sixteen_by_nine(p)) for p in photos]
    if name == "photos+16:9":
        return [jpeg(f) for p in photos for f in (p, sixteen_by_nine(p))]
    raise SystemExit(f"unknown workload {name!r}: photos, 16:9 or photos+16:9")


@dataclass
class Result:
    frames: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def encoded(images: list[bytes], offset: int = 0) -> Callable[[int], list]:
    """Request k's inputs: image ``offset + k`` (cycling) as a BYTES tensor."""
    def inputs(k: int) -> list:
        tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[images[(offset + k) % len(images)]]], dtype=object))
        return [tensor]
    return inputs


def one_stream(target: str, model: str, inputs: Callable[[int], list], window: int, stop_at: float,
               out: list, max_frames: int | None = None) -> None:
    """A video client: at most ``window`` frames in flight on one ModelStreamInfer stream,
    sending ``inputs(k)`` for k = 0, 1, ... until ``stop_at`` (time.monotonic) or ``max_frames``.
    Answers come in order, so when frame k goes out, frame k - window has been answered."""
    client = triton.InferenceServerClient(target)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((time.perf_counter(), result, error)))
    sent: dict[str, float] = {}
    latencies, errors, k, in_flight = [], 0, 0, 0
    try:
        def sending() -> bool:
            return time.monotonic() < stop_at and (max_frames is None or k < max_frames)

        while sending() or in_flight:
            while in_flight < window and sending():
                request = inputs(k)
                sent[str(k)] = time.perf_counter()
                client.async_stream_infer(model, request, request_id=str(k),
                                          parameters={"response_mask_format": "rle"})
                k += 1
                in_flight += 1
            try:
                arrived, result, error = answers.get(timeout=120)
            except queue.Empty:
                errors += in_flight
                break
            in_flight -= 1
            if error is not None:
                errors += 1
                continue
            latencies.append((arrived - sent.pop(result.get_response().id)) * 1e3)
    finally:
        client.stop_stream()
        client.close()
    out.append((latencies, errors))


def drive(target: str, model: str, stream_inputs: Callable[[int], Callable[[int], list]], streams: int,
          window: int, seconds: float, warm_up: int = 5) -> Result:
    """``streams`` streams at once for ``seconds``, stream s sending ``stream_inputs(s)(k)``,
    after ``warm_up`` frames of stream 0's alone."""
    one_stream(target, model, stream_inputs(0), 1, time.monotonic() + 300, [], max_frames=warm_up)
    out: list = []
    start = time.perf_counter()
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=one_stream, args=(target, model, stream_inputs(s), window,
                                                         stop_at, out)) for s in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies = [x for lat, _ in out for x in lat]
    return Result(len(latencies), sum(e for _, e in out), elapsed, latencies)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def our_breakdown(before: dict, after: dict, model: str) -> dict[str, float]:
    """Mean batch size and ms per frame per stage between two scrapes of our /metrics."""
    labels = f'{{model="{model}",version="1"}}'
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    frames = max(delta.get(f"nv_inference_count{labels}", 0.0), 1.0)
    batches = max(delta.get(f"nv_inference_exec_count{labels}", 0.0), 1.0)
    out = {"mean batch": frames / batches}
    for stage in STAGES:
        out[stage] = 1e3 * delta.get(f'rle_serving_stage_seconds_total{{model="{model}",stage="{stage}"}}', 0) / frames
    out["response"] = delta.get(f"nv_inference_compute_output_duration_us{labels}", 0.0) / 1e3 / frames
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--peer", help="host:port of a peer KServe v2 gRPC server (loopback)")
    parser.add_argument("--peer-model", default="peer_seg", help="the peer's model name")
    parser.add_argument("--runs", nargs="+", default=["1x1", "4x2"], help="STREAMSxWINDOW ...")
    parser.add_argument("--workloads", nargs="+", default=["photos", "photos+16:9"])
    parser.add_argument("--seconds", type=float, default=30.0, help="per run and target")
    parser.add_argument("--server-args", default="", help="extra flags for our server")
    parser.add_argument("--model", action="append",
                        help="our pipeline model(s) to drive, each a row of its own "
                        "(default: instance_segmentation)")
    args = parser.parse_args(argv)
    if args.peer and not args.peer.startswith(("127.", "localhost")):
        raise SystemExit("--peer must be a loopback address")

    metrics_port = free_port()
    (ROOT / "out").mkdir(exist_ok=True)
    log = open(ROOT / "out" / "serve_bench_server.log", "w")
    with local_server("--metrics-port", str(metrics_port), *args.server_args.split(), log=log,
                      cwd=ROOT) as server:
        targets = [("ours" if model == "instance_segmentation" else f"ours {model}", server.address, model)
                   for model in args.model or ["instance_segmentation"]]
        if args.peer:
            targets.append(("peer", args.peer, args.peer_model))
        print(f"# serve bench: {args.seconds:.0f} s per row, KServe ModelStreamInfer streams, "
              f"real photos; our server flags: {args.server_args or '(defaults)'}")
        print("| streams x window | workload | target | frames/s | p50 ms | p99 ms | errors | "
              "ratio vs peer | mean batch | " + " | ".join(f"{s} ms" for s in (*STAGES, "response")) + " |")
        print("|---" * (10 + len(STAGES)) + "|")
        for run in args.runs:
            streams, window = (int(v) for v in run.lower().split("x"))
            for name in args.workloads:
                images = workload(name)
                rows = {}
                for label, target, model in targets:
                    before = scrape(metrics_port) if label.startswith("ours") else None
                    result = drive(target, model, lambda s: encoded(images, 3 * s), streams, window,
                                   args.seconds, warm_up=len(images))
                    extra = our_breakdown(before, scrape(metrics_port), model) if before else None
                    rows[label] = (result, extra)
                for label, (result, extra) in rows.items():
                    peer = rows.get("peer", (None,))[0]
                    ratio = ""
                    if peer and label.startswith("ours"):
                        p50 = result.percentile(50) / peer.percentile(50)
                        p99 = result.percentile(99) / peer.percentile(99)
                        ratio = f"{result.fps / peer.fps:.2f}x fps, p50 {p50:.2f}x, p99 {p99:.2f}x"
                    cells = ([f"{extra['mean batch']:.2f}"] + [f"{extra[s]:.1f}" for s in (*STAGES, "response")]
                             if extra else [""] * (2 + len(STAGES)))
                    print(f"| {streams} x {window} | {name} | {label} | {result.fps:.2f} | "
                          f"{result.percentile(50):.0f} | {result.percentile(99):.0f} | {result.errors} | "
                          f"{ratio} | " + " | ".join(cells) + " |", flush=True)
        print(f"(our server's log: {log.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
