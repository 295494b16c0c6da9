"""rfdetr's own ``predict()`` loop, the peer ``families_bench`` measures our server against: N
threads (a camera each), each decoding its next JPEG and calling ``model.predict`` on it, for
a fixed time, on the seeded RF-DETR-Seg-Nano that tests/export_rfdetr.py exported (the same
weights our server runs from its ONNX file). Runs in .venv-rfdetr; prints one JSON line.

    .venv-rfdetr/bin/python -m benchmarks.rfdetr_peer --streams 4 --seconds 20 FRAME.jpg ...

``--optimize`` calls rfdetr's ``inference()`` first (its model traced by TorchScript for
batch 1), as a user after speed would.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from pathlib import Path

from PIL import Image

from tests.export_rfdetr import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="+", type=Path)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--optimize", action="store_true")
    args = parser.parse_args()
    model = build()
    if args.optimize:
        model.inference()
    frames = [path.read_bytes() for path in args.frames]
    for data in frames:  # warm-up, one of each
        model.predict(Image.open(io.BytesIO(data)), threshold=0.25, include_source_image=False)
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def camera(offset: int) -> None:
        k = offset
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            image = Image.open(io.BytesIO(frames[k % len(frames)])).convert("RGB")
            model.predict(image, threshold=0.25, include_source_image=False)
            with lock:
                latencies.append((time.perf_counter() - started) * 1e3)
            k += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=camera, args=(3 * s,)) for s in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"frames": len(latencies), "seconds": time.perf_counter() - start,
                      "latencies_ms": latencies}))


if __name__ == "__main__":
    main()
