"""A second YOLO-seg network (yolov7-seg, from the same wheel) is served by dropping it into a
repository with a config.pbtxt: no code changes. `make test` converts it once (with the same
converter as the default model) into .cache/models."""

from __future__ import annotations

import shutil

from pipeline.engine import Pipeline
from pipeline.tools.samples import sample_bytes

from ..conftest import MODEL_REPOSITORY, ROOT, without_batch_calibration

CONVERTED = ROOT / ".cache/models/yolov7_seg/1/model.pt"


def test_yolov7_seg_drops_in(tmp_path):
    assert CONVERTED.is_file(), f"{CONVERTED} is missing: `make test` converts it"
    (tmp_path / "yolov7_seg/1").mkdir(parents=True)
    shutil.copy(CONVERTED, tmp_path / "yolov7_seg/1/model.pt")
    config = (MODEL_REPOSITORY / "yolov5s_seg/config.pbtxt").read_text()
    (tmp_path / "yolov7_seg/config.pbtxt").write_text(  # one image: no batch sizes to measure
        without_batch_calibration(config.replace("yolov5s_seg", "yolov7_seg")))
    shutil.copy(MODEL_REPOSITORY / "yolov5s_seg/labels.txt", tmp_path / "yolov7_seg/labels.txt")
    pipeline = Pipeline.from_repository(tmp_path, model="yolov7_seg", device="cpu")
    (doc,) = pipeline.infer([sample_bytes("bus")])
    found = [p["class"] for p in doc["predictions"]]
    assert found.count("person") >= 4 and "bus" in found
    assert doc["predictions"][0]["confidence"] > 0.9  # the larger model is surer than v5s
