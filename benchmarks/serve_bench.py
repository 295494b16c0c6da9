"""End to end through the server, side by side with a peer: N tritonclient streams per run.

Starts our server (``python -m pipeline serve``) on free ports, then for each run (streams x
window) and each workload drives it, and the peer target if one is given, with the same load:
every stream keeps ``window`` frames in flight through KServe's ``ModelStreamInfer`` (as the
official tritonclient does), cycling through real photos. Prints frames/s, p50 and p99
latency, and for our server the mean batch size and milliseconds per frame per stage (read
from its Prometheus endpoint before and after the run). Loopback only; bounded in time.

    python -m benchmarks.serve_bench --peer 127.0.0.1:8101 --peer-model peer_seg \\
        --runs 1x1 4x2 --workloads photos photos+16:9 --seconds 30

Workloads: ``photos`` are the real sample photos (bus, zidane, astronaut, coffee, chelsea);
``16:9`` are 1280x720 frames cut from them; ``photos+16:9`` interleaves both.
The peer in ../shared/tools/peer-triton (the real Triton 2.51 with per-mask pycocotools) is
launched with its launch.sh; see docs/benchmarks.md for the commands used.
"""

from __future__ import annotations

import sys

from pipeline.tools.launch import free_port, local_server

from .common import ROOT, Scrape, arguments, drive, encoded, out_path, scrape, workload

STAGES = ("preprocess", "network", "postprocess", "rle")


def our_breakdown(before: Scrape, after: Scrape, model: str) -> dict[str, float]:
    """Mean batch size and ms per frame per stage between two scrapes of our /metrics."""
    delta = after - before
    frames = max(delta.get("nv_inference_count", model=model, version="1"), 1.0)
    batches = max(delta.get("nv_inference_exec_count", model=model, version="1"), 1.0)
    out = {"mean batch": frames / batches}
    for stage in STAGES:
        out[stage] = 1e3 * delta.get("rle_serving_stage_seconds_total", model=model, stage=stage) / frames
    out["response"] = delta.get("nv_inference_compute_output_duration_us", model=model, version="1") / 1e3 / frames
    return out


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
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
    log = open(out_path("serve_bench_server.log"), "w")
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
