"""Export an untrained YOLO11n-seg (built from ultralytics' own yaml: no weights, no download)
to ONNX and OpenVINO IR, the way its users export theirs, for the YOLOv8/11-seg head's tests.

    .venv-ultralytics/bin/python tests/export_yolo11.py OUT_FOLDER

Writes OUT_FOLDER/yolo11n-seg.onnx and OUT_FOLDER/yolo11n-seg_openvino_model/. Runs in
.venv-ultralytics (AGPL: never imported by the package or its tests)."""

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
out = Path(sys.argv[1]).resolve()
out.mkdir(parents=True, exist_ok=True)
os.chdir(out)

from ultralytics import YOLO  # noqa: E402 - after the offline switch and the folder

for form in ("onnx", "openvino"):
    exported = Path(YOLO("yolo11n-seg.yaml").export(format=form, dynamic=True, imgsz=640))
    if exported.parent != out:
        shutil.move(str(exported), out / exported.name)
print(sorted(p.name for p in out.iterdir()))
