"""A second YOLO-seg network (yolov7-seg, from the same wheel) is served by dropping it into a
repository with a config.pbtxt: no code changes."""

from __future__ import annotations

import shutil

from pipeline.engine import Pipeline
from pipeline.tools.convert import export
from pipeline.tools.fetch import DEFAULT_CACHE
from pipeline.tools.samples import sample_bytes

from ..conftest import MODEL_REPOSITORY, ROOT


def test_yolov7_seg_drops_in(tmp_path):
    export("yolov7_seg", tmp_path, ROOT / DEFAULT_CACHE)
    config = (MODEL_REPOSITORY / "yolov5s_seg/config.pbtxt").read_text()
    (tmp_path / "yolov7_seg/config.pbtxt").write_text(config.replace("yolov5s_seg", "yolov7_seg"))
    shutil.copy(MODEL_REPOSITORY / "yolov5s_seg/labels.txt", tmp_path / "yolov7_seg/labels.txt")
    pipeline = Pipeline.from_repository(tmp_path, model="yolov7_seg", device="cpu")
    (doc,) = pipeline.infer([sample_bytes("bus")])
    found = [p["class"] for p in doc["predictions"]]
    assert found.count("person") >= 4 and "bus" in found
    assert doc["predictions"][0]["confidence"] > 0.9  # the larger model is surer than v5s
