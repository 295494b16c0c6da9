"""The YOLOv8/11-seg head, from a real ultralytics export: YOLO11n-seg (built from ultralytics'
yaml, untrained; `make test` exports it in .venv-ultralytics) dropped into a repository as its
users export it, ONNX and OpenVINO, with a config that names only its runtime. It is read as
the v8 head (candidates in columns, no objectness, 80 classes, 32 coefficients), runs at any
size its export allows, and what it finds comes back as valid documents with exact RLE."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from pipeline.engine import Pipeline

from ..conftest import ROOT
from .test_runtimes import pipeline_over

EXPORTS = ROOT / ".cache/models"
FILES = {"onnx": ("yolo11n-seg.onnx", 'platform: "onnxruntime_onnx"', ""),
         "openvino": ("yolo11n-seg_openvino_model", 'backend: "openvino"',
                      'default_model_filename: "yolo11n-seg.xml"\n')}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo11")
    for form, (exported, runtime, filename) in FILES.items():
        assert (EXPORTS / exported).exists(), "`make test` exports YOLO11n-seg (tests/export_yolo11.py)"
        folder = root / f"yolo11n_seg_{form}"
        (folder / "1").mkdir(parents=True)
        if form == "onnx":
            shutil.copy(EXPORTS / exported, folder / "1" / "model.onnx")
        else:
            for path in (EXPORTS / exported).iterdir():  # the IR, and ultralytics' metadata.yaml
                shutil.copy(path, folder / "1" / path.name)
        (folder / "config.pbtxt").write_text(f'name: "{folder.name}"\n{runtime}\nmax_batch_size: 8\n{filename}')
        pipeline_over(root, folder.name)
    return root


@pytest.mark.parametrize("form", FILES)
def test_a_yolo11_export_is_read_as_the_v8_head_and_served(repository, form, samples):
    pipe = Pipeline.from_repository(repository, model=f"over_yolo11n_seg_{form}", device="cpu")
    head = pipe.runner.head
    assert (head.name, head.layout, head.candidates_first, head.num_classes) == ("yolo", "yolov8", False, 80)
    assert (pipe.info.input_size, pipe.info.stride) == (640, 32)
    photo = samples["zidane"]  # 1280x720: a 640x384 input, not the 640x640 it was exported at
    docs = pipe.infer([photo, samples["bus"]], confidence=0.0, max_detections=20)
    assert [d["image"] for d in docs] == [{"width": 1280, "height": 720}, {"width": 810, "height": 1080}]
    untrained = [p for d in docs for p in d["predictions"]]
    assert untrained, "with no confidence floor, an untrained network's candidates come through"
    for doc in docs:
        H, W = doc["image"]["height"], doc["image"]["width"]
        for p in doc["predictions"]:
            assert 0 <= p["class_id"] < 80 and 0 < p["confidence"] <= 1
            mask = coco_mask.decode({"size": [H, W], "counts": p["rle"]["counts"].encode()})
            assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 1}
