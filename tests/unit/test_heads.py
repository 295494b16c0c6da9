"""The heads: which one a network has, read from its outputs' shapes and names (or its
config's ``head``); YOLO's two layouts given one; and each family's pre-processing from its
defaults, the file's metadata and config.pbtxt's parameters."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.heads import IMAGENET_MEAN, family_of, find_head, preprocess_for
from pipeline.images import Preprocess

WHERE = "net/config.pbtxt"


def yolo(pred, proto):
    return {"output0": pred, "output1": proto}


@pytest.mark.parametrize("pred, proto, classes, declared, expected", [
    ((1, 25200, 117), (1, 32, 160, 160), 80, None, ("yolov5", True, 80)),   # YOLOv5/v7-seg
    ((1, 25200, 117), (1, 32, 160, 160), None, None, ("yolov5", True, 80)),
    ((1, 116, 8400), (1, 32, 160, 160), 80, None, ("yolov8", False, 80)),   # YOLOv8/11-seg export
    ((1, 116, 8400), (1, 32, 160, 160), None, None, ("yolov8", False, 80)),
    ((1, 8400, 116), (1, 32, 160, 160), 80, None, ("yolov8", True, 80)),    # v8, candidates first
    ((1, 8400, 116), (1, 32, 160, 160), None, "yolov8", ("yolov8", True, 80)),
    ((2, 1000, 40), (2, 32, 64, 64), 3, None, ("yolov5", True, 3)),
    ((1, 25200, 38), (1, 32, 160, 160), None, "yolo", ("yolov5", True, 1)),
])
def test_the_yolo_layout_is_read_from_the_shapes(pred, proto, classes, declared, expected):
    head = find_head(yolo(pred, proto), classes, declared, WHERE)
    assert head.name == "yolo"
    assert (head.layout, head.candidates_first, head.num_classes) == expected


def test_both_yolo_layouts_are_given_yolov5s_layout():
    b, a, c, m = 2, 7, 3, 4
    v8 = torch.arange(b * (4 + c + m) * a, dtype=torch.float32).reshape(b, 4 + c + m, a)
    normal = find_head(yolo(v8.shape, (b, m, 8, 8)), c, None, WHERE).normalize(v8)
    assert normal.shape == (b, a, 5 + c + m)
    rows = v8.transpose(1, 2)
    assert torch.equal(normal[..., :4], rows[..., :4]) and torch.equal(normal[..., 5:], rows[..., 4:])
    assert torch.equal(normal[..., 4], torch.ones(b, a))  # objectness 1: the score is the class's
    v5 = torch.rand(b, 50, 5 + c + m)
    assert find_head(yolo(v5.shape, (b, m, 8, 8)), c, None, WHERE).normalize(v5) is v5


@pytest.mark.parametrize("shapes, classes, declared, end2end, expected", [
    # YOLO26-seg end2end: 300 ranked rows of 6 + 32
    (yolo((1, 300, 38), (1, 32, 160, 160)), None, None, False, "yolo_end2end"),
    (yolo((1, 300, 38), (1, 32, 160, 160)), 80, None, False, "yolo_end2end"),
    # a YOLOv5 with one class has 38 channels too, but thousands of rows
    (yolo((1, 25200, 38), (1, 32, 160, 160)), None, None, False, "yolo"),
    (yolo((1, 500, 38), (1, 32, 160, 160)), None, "yolo", False, "yolo"),
    (yolo((1, 2000, 38), (1, 32, 160, 160)), None, None, True, "yolo_end2end"),  # metadata says so
    # RF-DETR-Seg: dets, labels, masks, in any order, any names
    ({"dets": (1, 100, 4), "labels": (1, 100, 91), "masks": (1, 100, 78, 78)}, None, None, False, "detr"),
    ({"a": (2, 200, 80), "b": (2, 200, 64, 64), "c": (2, 200, 4)}, 80, None, False, "detr"),
])
def test_the_family_is_read_from_the_shapes(shapes, classes, declared, end2end, expected):
    assert find_head(shapes, classes, declared, WHERE, end2end=end2end).name == expected


def test_detr_knows_which_output_is_which():
    head = find_head({"a": (2, 200, 80), "b": (2, 200, 64, 64), "c": (2, 200, 4)}, None, None, WHERE)
    assert (head.boxes, head.labels, head.masks, head.num_classes) == ("c", "a", "b", 80)
    # 4 classes: both 3-D outputs end in 4, and rfdetr's names decide
    head = find_head({"labels": (1, 10, 4), "dets": (1, 10, 4), "masks": (1, 10, 8, 8)}, None, None, WHERE)
    assert (head.boxes, head.labels) == ("dets", "labels")


@pytest.mark.parametrize("shapes, classes, declared, words", [
    (yolo((1, 25200, 117), (1, 32, 160, 160)), 3, None, "fit no YOLO-seg head with 3 classes"),
    (yolo((1, 25200, 20), (1, 32, 160, 160)), None, None, "fit no YOLO-seg head"),
    (yolo((1, 25200), (1, 32, 160, 160)), None, None, "fit no head we know"),
    (yolo((1, 25200, 117), (1, 32, 160, 160)), None, "yolov9", "'parameters.head'"),
    (yolo((1, 25200, 117), (1, 32, 160, 160)), 80, "yolov8", "fit no YOLO-seg head"),
    (yolo((1, 300, 40), (1, 32, 160, 160)), None, "yolo_end2end", "(B, N, 6 + M) rows"),
    ({"dets": (1, 100, 4), "labels": (1, 90, 91), "masks": (1, 100, 78, 78)}, None, None,
     "for the same Q queries"),
    ({"dets": (1, 100, 4), "labels": (1, 100, 91), "masks": (1, 100, 78, 78)}, 80, None,
     "80 class names for the 91 class logits"),
    ({"x": (1, 5), "y": (1, 5)}, None, None, "x [1, 5], y [1, 5] fit no head we know"),
])
def test_shapes_that_fit_no_head_are_a_config_error_naming_the_file_and_shapes(shapes, classes,
                                                                               declared, words):
    with pytest.raises(ConfigError) as info:
        find_head(shapes, classes, declared, WHERE)
    assert WHERE in str(info.value) and words in str(info.value)


def test_the_family_before_running_comes_from_the_output_count_or_the_config():
    assert family_of(3, None, WHERE) == "detr" and family_of(2, None, WHERE) == "yolo"
    assert family_of(2, "detr", WHERE) == "detr" and family_of(3, "yolov8", WHERE) == "yolo"
    with pytest.raises(ConfigError, match="'parameters.head'"):
        family_of(2, "mask-rcnn", WHERE)


@pytest.mark.parametrize("family, params, meta, dims, expected", [
    # a YOLO exported for any size: the file's metadata, else ultralytics' defaults
    ("yolo", {}, (640, 32), [3, -1, -1], Preprocess(640, 32)),
    ("yolo", {}, (None, None), [3, -1, -1], Preprocess(640, 32)),
    ("yolo", {"input_scale": "1280", "stride": "64"}, (None, None), [3, -1, -1], Preprocess(1280, 64)),
    ("yolo", {"pad_value": "0"}, (640, 32), [3, -1, -1], Preprocess(640, 32, pad_value=0.0)),
    ("yolo", {"stride": "0"}, (640, 32), [3, -1, -1], Preprocess(640)),  # served square
    # a fixed square: its dims
    ("yolo", {}, (None, None), [3, 320, 320], Preprocess(320)),
    # DETR: a stretch with ImageNet's normalisation; the config may say otherwise
    ("detr", {}, (None, None), [3, 312, 312],
     Preprocess(312, resize="stretch", mean=IMAGENET_MEAN, std=(0.229, 0.224, 0.225))),
    ("detr", {"mean": "[0.5, 0.5, 0.5]", "std": "0.5 0.5 0.5", "resize": "letterbox"}, (None, None),
     [3, 432, 432], Preprocess(432, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))),
])
def test_preprocessing_from_family_metadata_and_config(family, params, meta, dims, expected):
    got, said = preprocess_for(family, params, *meta, dims, WHERE)
    assert got == expected and said


@pytest.mark.parametrize("params, dims, words", [
    ({"resize": "crop"}, [3, -1, -1], "one of letterbox, stretch"),
    ({"mean": "0.5"}, [3, -1, -1], "three numbers"),
    ({"std": "1 0 1"}, [3, -1, -1], "three numbers"),
    ({"pad_value": "300"}, [3, -1, -1], "[0, 255]"),
    ({"stride": "x"}, [3, -1, -1], "whole number"),
    ({"input_scale": "16"}, [3, -1, -1], "too small"),
    ({"input_scale": "640"}, [3, 320, 320], "fix its size"),
])
def test_bad_preprocessing_parameters_name_the_field(params, dims, words):
    with pytest.raises(ConfigError) as info:
        preprocess_for("yolo", params, None, None, dims, WHERE)
    assert WHERE in str(info.value) and words in str(info.value)


def test_a_stretch_fills_the_square_and_normalises_per_channel():
    import numpy as np

    rgb = np.zeros((30, 90, 3), np.uint8)
    rgb[..., 0] = 255
    tensor, where = Preprocess(64, resize="stretch", mean=(0.5, 0.0, 0.0), std=(0.5, 1.0, 1.0)).tensor(rgb)
    assert tensor.shape == (3, 64, 64) and (where.gain_y, where.gain_x) == (64 / 30, 64 / 90)
    assert torch.allclose(tensor[0], torch.ones(64, 64)) and torch.equal(tensor[1], torch.zeros(64, 64))
    letterboxed, where = Preprocess(64).tensor(rgb)
    assert where.top > 0 and torch.allclose(letterboxed[1, 0, 0], torch.tensor(114 / 255))
