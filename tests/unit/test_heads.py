"""The YOLO-seg heads: which one a network has, read from its output shapes, and the one
layout (YOLOv5's) both are given for post-processing."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.heads import find_head

WHERE = "net/config.pbtxt"


@pytest.mark.parametrize("pred, proto, classes, declared, expected", [
    ((1, 25200, 117), (1, 32, 160, 160), 80, None, ("yolov5", True, 80)),   # YOLOv5/v7-seg
    ((1, 25200, 117), (1, 32, 160, 160), None, None, ("yolov5", True, 80)),
    ((1, 116, 8400), (1, 32, 160, 160), 80, None, ("yolov8", False, 80)),   # YOLOv8/11-seg export
    ((1, 116, 8400), (1, 32, 160, 160), None, None, ("yolov8", False, 80)),
    ((1, 8400, 116), (1, 32, 160, 160), 80, None, ("yolov8", True, 80)),    # v8, candidates first
    ((1, 8400, 116), (1, 32, 160, 160), None, "yolov8", ("yolov8", True, 80)),
    ((2, 1000, 40), (2, 32, 64, 64), 3, None, ("yolov5", True, 3)),
])
def test_the_head_is_read_from_the_shapes(pred, proto, classes, declared, expected):
    head = find_head(pred, proto, classes, declared, WHERE)
    assert (head.name, head.candidates_first, head.num_classes) == expected


def test_both_heads_are_given_yolov5s_layout():
    b, a, c, m = 2, 7, 3, 4
    v8 = torch.arange(b * (4 + c + m) * a, dtype=torch.float32).reshape(b, 4 + c + m, a)
    normal = find_head(v8.shape, (b, m, 8, 8), c, None, WHERE).normalize(v8)
    assert normal.shape == (b, a, 5 + c + m)
    rows = v8.transpose(1, 2)
    assert torch.equal(normal[..., :4], rows[..., :4]) and torch.equal(normal[..., 5:], rows[..., 4:])
    assert torch.equal(normal[..., 4], torch.ones(b, a))  # objectness 1: the score is the class's
    v5 = torch.rand(b, 50, 5 + c + m)
    assert find_head(v5.shape, (b, m, 8, 8), c, None, WHERE).normalize(v5) is v5


@pytest.mark.parametrize("pred, proto, classes, declared, words", [
    ((1, 25200, 117), (1, 32, 160, 160), 3, None, "fit no YOLO-seg head with 3 classes"),
    ((1, 25200, 20), (1, 32, 160, 160), None, None, "fit no YOLO-seg head"),
    ((1, 25200), (1, 32, 160, 160), None, None, "returns detections (B, A, channels)"),
    ((1, 25200, 117), (1, 32, 160, 160), None, "yolov9", "'parameters.head'"),
    ((1, 25200, 117), (1, 32, 160, 160), 80, "yolov8", "fit no YOLO-seg head"),
])
def test_shapes_that_fit_no_head_are_a_config_error_naming_the_file(pred, proto, classes, declared, words):
    with pytest.raises(ConfigError) as info:
        find_head(pred, proto, classes, declared, WHERE)
    assert WHERE in str(info.value) and words in str(info.value)
