"""Exports that carry none of our metadata, as a new user brings them: the default network's
ONNX file converted by OpenVINO's own converter (``openvino.convert_model``, what ``ovc``
runs), with a minimal config (name, backend, max_batch_size). It serves with the YOLO
family's conventional input (scale 640, stride 32, said in the log), finds what the default
pipeline finds, reports classes by number until a ``labels.txt`` beside its config names
them, and its config's parameters override the defaults."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from benchmarks.common import sixteen_by_nine
from pipeline.engine import Pipeline
from pipeline.tools.quantize import box_iou

from ..conftest import ROOT
from .test_runtimes import pipeline_over

ONNX = ROOT / "model_repository/yolov5s_seg_onnx"
MINIMAL = 'name: "{name}"\nbackend: "openvino"\nmax_batch_size: 8\n'


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    import openvino as ov

    root = tmp_path_factory.mktemp("plain")
    converted = ov.convert_model(str(ONNX / "1/model.onnx"))
    for name, extra in (("plain_ir", ""), ("labelled_ir", "labels"), ("scaled_ir", "scale")):
        folder = root / name
        (folder / "1").mkdir(parents=True)
        ov.save_model(converted, str(folder / "1/model.xml"), compress_to_fp16=False)
        config = MINIMAL.format(name=name)
        if extra == "labels":
            shutil.copy(ONNX / "labels.txt", folder / "labels.txt")
        if extra == "scale":
            config += 'parameters { key: "input_scale" value: { string_value: "320" } }\n'
        (folder / "config.pbtxt").write_text(config)
        pipeline_over(root, name)
    shutil.copytree(ONNX, root / "yolov5s_seg_onnx")
    pipeline_over(root, "yolov5s_seg_onnx")
    return root


def test_the_converted_file_has_none_of_our_metadata(repository):
    import openvino as ov

    model = ov.Core().read_model(str(repository / "plain_ir/1/model.xml"))
    assert not any(model.has_rt_info([key]) for key in ("names", "input_size", "stride"))


def test_a_converted_ir_with_a_minimal_config_finds_what_the_default_finds(repository, samples, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.runners"):
        plain = Pipeline.from_repository(repository, model="over_plain_ir", device="cpu")
    assert (plain.info.input_size, plain.info.stride) == (640, 32)
    assert "scale 640, stride 32: the yolo family's defaults" in caplog.text
    assert "classes are reported by number" in caplog.text
    default = Pipeline.from_repository(repository, model="over_yolov5s_seg_onnx", device="cpu")
    images = [samples[n] for n in ("bus", "zidane", "astronaut", "coffee")]
    images += [sixteen_by_nine(samples[n]) for n in ("bus", "chelsea")]
    ious, matched = [], 0
    for ours, theirs in zip(plain.infer(images), default.infer(images)):
        a, b = ours["predictions"], theirs["predictions"]
        assert len(a) == len(b) and len(a) > 0
        H, W = ours["image"]["height"], ours["image"]["width"]
        for p, q in zip(a, b):
            assert p["class_id"] == q["class_id"] and p["class"] == str(q["class_id"])
            assert box_iou(p, q) >= 0.9
            masks = [{"size": [H, W], "counts": d["rle"]["counts"].encode()} for d in (p, q)]
            ious.append(float(coco_mask.iou(masks[:1], masks[1:], [0])[0, 0]))
            matched += 1
    assert matched >= 15
    assert np.mean(np.array(ious) >= 0.97) >= 0.95, sorted(ious)[:5]


def test_labels_txt_beside_the_config_names_the_classes(repository, samples, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.runners"):
        labelled = Pipeline.from_repository(repository, model="over_labelled_ir", device="cpu")
    assert labelled.class_names[0] == "person" and len(labelled.class_names) == 80
    assert "labels.txt" in caplog.text
    (doc,) = labelled.infer([samples["bus"]])
    assert {"person", "bus"} <= {p["class"] for p in doc["predictions"]}


def test_config_parameters_override_the_family_defaults(repository, samples):
    scaled = Pipeline.from_repository(repository, model="over_scaled_ir", device="cpu")
    assert (scaled.info.input_size, scaled.info.stride) == (320, 32)
    accepted = scaled.accept(samples["zidane"])  # 1280x720 -> 320x192 at stride 32
    assert (accepted.geometry.input_h, accepted.geometry.input_w) == (192, 320)
    (doc,) = scaled.infer([samples["zidane"]])
    assert doc["image"] == {"width": 1280, "height": 720} and doc["predictions"]
