"""The families people deploy now, on this machine: RF-DETR-Seg-Nano through our server
against rfdetr's own ``predict()`` loop on the same weights and frames, and RF-DETR-Seg-Nano,
YOLO26n-seg and yolov5s-seg side by side.

    python -m benchmarks.families_bench --seconds 20

Uses the exports `make test` makes (.cache/models: tests/export_rfdetr.py, export_yolo26.py)
and the default model's ONNX and OpenVINO forms, each dropped into a fresh repository with a
minimal config, as a user brings them, with a pipeline over it (batch size calibrated at
load, as by default). Prints:

1. frames/s and latency at 1 and 4 streams (KServe gRPC streams, one frame in flight each)
   for our server on RF-DETR (ONNX Runtime, OpenVINO) and for rfdetr's predict() in
   .venv-rfdetr (one thread per stream, decoding each JPEG as our server does; plain, and
   after its ``inference()`` optimisation), with the ratio against the plain loop;
2. per model, the network's milliseconds per frame (``pipeline.tools.runtimes``: a square
   photo and a 16:9 frame as its pre-processing places them) and frames/s through our
   server at 1 stream on photos.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.repository import ModelRepository, runtime_of
from pipeline.tools.launch import local_server
from pipeline.tools.runtimes import measure, table

from .common import ROOT, Result, arguments, drive, encoded, out_path, workload

EXPORTS = ROOT / ".cache/models"
RFDETR_PYTHON = ROOT / ".venv-rfdetr/bin/python"
DEFAULT = ROOT / "model_repository"
NETWORKS = {  # name -> (runtime line, the file or folder as exported)
    "rfdetr_onnx": ('platform: "onnxruntime_onnx"', EXPORTS / "rfdetr-seg-nano.onnx"),
    "rfdetr_openvino": ('backend: "openvino"', EXPORTS / "rfdetr-seg-nano_openvino"),
    "yolo26_onnx": ('platform: "onnxruntime_onnx"', EXPORTS / "yolo26n-seg.onnx"),
    "yolov5s_onnx": ('platform: "onnxruntime_onnx"', DEFAULT / "yolov5s_seg_onnx/1/model.onnx"),
    "yolov5s_openvino": ('backend: "openvino"', DEFAULT / "yolov5s_seg_openvino/1"),
}


def repository(root: Path) -> Path:
    """Each network with a config of three lines (and the default's labels for yolov5s), and
    a pipeline ``over_<network>`` like the default one over it."""
    pipeline = (DEFAULT / "instance_segmentation/config.pbtxt").read_text()
    for name, (runtime, source) in NETWORKS.items():
        folder = root / name
        (folder / "1").mkdir(parents=True)
        extra = ""
        if source.is_dir():
            for path in source.iterdir():
                shutil.copy(path, folder / "1" / path.name)
            extra = f'default_model_filename: "{next(source.glob("*.xml")).name}"\n'
        else:
            shutil.copy(source, folder / "1" / "model.onnx")
        if name.startswith("yolov5s"):
            shutil.copy(DEFAULT / "yolov5s_seg_onnx/labels.txt", folder / "labels.txt")
        (folder / "config.pbtxt").write_text(f'name: "{name}"\n{runtime}\nmax_batch_size: 8\n{extra}')
        over = root / f"over_{name}"
        over.mkdir()
        text = pipeline.replace('name: "instance_segmentation"', f'name: "over_{name}"')
        lines = [f'parameters {{ key: "network" value: {{ string_value: "{name}" }} }}'
                 if 'key: "network"' in line else line for line in text.splitlines()]
        (over / "config.pbtxt").write_text("\n".join(lines) + "\n")
    return root


def peer(frames: list[Path], streams: int, seconds: float, optimize: bool) -> Result:
    command = [str(RFDETR_PYTHON), "-m", "benchmarks.rfdetr_peer", "--streams", str(streams),
               "--seconds", str(seconds), *(["--optimize"] if optimize else []), *map(str, frames)]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    return Result(found["frames"], 0, found["seconds"], found["latencies_ms"])


def row(label: str, streams: int, name: str, result: Result, base: Result | None) -> str:
    ratio = f"{result.fps / base.fps:.2f}x" if base and base is not result else ""
    return (f"| {streams} | {name} | {label} | {result.fps:.2f} | {result.percentile(50):.0f} | "
            f"{result.percentile(99):.0f} | {ratio} |")


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="per row")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--workloads", nargs="+", default=["photos", "16:9"])
    args = parser.parse_args(argv)
    for needed in (EXPORTS / "rfdetr-seg-nano.json", EXPORTS / "yolo26n-seg.json", RFDETR_PYTHON):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: `make exports` makes it")
    with tempfile.TemporaryDirectory() as tmp:
        root = repository(Path(tmp) / "repository")
        log = open(out_path("families_bench_server.log"), "w")
        with local_server("--model-repository", str(root), log=log, cwd=ROOT,
                          timeout_s=600) as server:
            print(f"# RF-DETR-Seg-Nano: our server against rfdetr's predict() loop, same weights "
                  f"and JPEG frames, {args.seconds:.0f} s per row")
            print("| streams | frames | who | frames/s | p50 ms | p99 ms | vs predict() |")
            print("|---|---|---|---|---|---|---|")
            for name in args.workloads:
                images = workload(name)
                files = []
                for i, data in enumerate(images):
                    path = Path(tmp) / f"{name.replace(':', 'x')}-{i}.jpg"
                    path.write_bytes(data)
                    files.append(path)
                for streams in args.streams:
                    base = peer(files, streams, args.seconds, optimize=False)
                    rows = [("rfdetr predict()", base),
                            ("rfdetr predict() after inference()",
                             peer(files, streams, args.seconds, optimize=True))]
                    for network in ("rfdetr_onnx", "rfdetr_openvino"):
                        rows.append((f"ours, {network}", drive(
                            server.address, f"over_{network}", lambda s: encoded(images, 3 * s),
                            streams, 1, args.seconds, warm_up=len(images))))
                    for label, result in rows:
                        print(row(label, streams, name, result, base), flush=True)
            print("\n# per model: the network alone (ms per frame, this machine's threads) and our "
                  "server at 1 stream on photos")
            times = measure(root, list(NETWORKS), rounds=5)
            for name, timed in times.items():
                timed["runtime"] = runtime_of(ModelRepository.load(root).get(name))
            print(table(times))
            print("\n| model | frames/s | p50 ms | p99 ms |\n|---|---|---|---|")
            images = workload("photos")
            for network in NETWORKS:
                result = drive(server.address, f"over_{network}", lambda s: encoded(images, 3 * s),
                               1, 1, args.seconds, warm_up=len(images))
                print(f"| {network} | {result.fps:.2f} | {result.percentile(50):.0f} | "
                      f"{result.percentile(99):.0f} |", flush=True)
        print(f"(our server's log: {log.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
