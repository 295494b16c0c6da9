"""Post-processing per batch, on fake network outputs: host copies and run-length calls are
counted per batch (the same code runs on a GPU, where each would be a device sync)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import postprocess as pp
from pipeline.errors import InvalidOptionError
from pipeline.images import letterbox_geometry
from pipeline.postprocess import PostprocessOptions

NUM_CLASSES, COEFFICIENTS, INPUT = 3, 4, 64


def fake_outputs(batch: int, seed: int = 0):
    """(pred, proto) like a YOLO-seg head's: a few confident boxes per image, noise else."""
    g = torch.Generator().manual_seed(seed)
    anchors = 60
    pred = torch.zeros(batch, anchors, 5 + NUM_CLASSES + COEFFICIENTS)
    pred[..., 0:2] = torch.rand(batch, anchors, 2, generator=g) * INPUT
    pred[..., 2:4] = 4 + torch.rand(batch, anchors, 2, generator=g) * 20
    pred[..., 4] = torch.rand(batch, anchors, generator=g) * 0.2
    pred[..., 5 : 5 + NUM_CLASSES] = torch.rand(batch, anchors, NUM_CLASSES, generator=g)
    pred[..., 5 + NUM_CLASSES :] = torch.randn(batch, anchors, COEFFICIENTS, generator=g)
    pred[:, :6, 4] = 0.95  # six confident candidates per image, some overlapping
    proto = torch.randn(batch, COEFFICIENTS, INPUT // 4, INPUT // 4, generator=g)
    return pred, proto


def geometries(batch: int):
    sizes = [(100, 80), (48, 64), (64, 64), (30, 90)]
    return [letterbox_geometry(*sizes[b % len(sizes)], INPUT) for b in range(batch)]


@pytest.mark.parametrize("batch", [1, 4])
def test_host_copies_and_run_length_calls_are_per_batch_not_per_image(monkeypatch, batch):
    copies, calls = [], []
    real_to_host, real_runs = pp.to_host, pp.rle.batch_run_lengths

    def counting_to_host(tensor):
        copies.append(tuple(tensor.shape))
        return real_to_host(tensor)

    def counting_runs(*args, **kwargs):
        calls.append(1)
        return real_runs(*args, **kwargs)

    monkeypatch.setattr(pp, "to_host", counting_to_host)
    monkeypatch.setattr(pp.rle, "batch_run_lengths", counting_runs)
    pred, proto = fake_outputs(batch)
    dets = pp.postprocess(pred, proto, geometries(batch), [PostprocessOptions()] * batch,
                          NUM_CLASSES)
    assert len(dets) == batch and all(len(d) > 0 for d in dets)
    # Candidates per image, NMS overlaps, kept detections: 3 copies for the whole batch, plus
    # the codec's own single copy inside its one call.
    assert len(copies) == 3, copies
    assert len(calls) == 1


def test_a_batch_equals_its_images_one_by_one():
    pred, proto = fake_outputs(4, seed=3)
    geos = geometries(4)
    options = [PostprocessOptions(), PostprocessOptions(confidence=0.5),
               PostprocessOptions(max_detections=2), PostprocessOptions(iou_threshold=0.1)]
    together = pp.postprocess(pred, proto, geos, options, NUM_CLASSES)
    for b in range(4):
        (alone,) = pp.postprocess(pred[b : b + 1], proto[b : b + 1], [geos[b]], [options[b]],
                                  NUM_CLASSES)
        np.testing.assert_array_equal(alone.boxes, together[b].boxes)
        np.testing.assert_array_equal(alone.class_ids, together[b].class_ids)
        assert alone.counts == together[b].counts
        assert together[b].image_size == (geos[b].height, geos[b].width)
    assert len(together[2]) <= 2


def test_masks_lie_inside_their_boxes_and_decode_to_their_frame():
    from pipeline import rle

    pred, proto = fake_outputs(2, seed=5)
    for det in pp.postprocess(pred, proto, geometries(2), [PostprocessOptions()] * 2, NUM_CLASSES):
        masks = rle.decode(det.rles())
        assert masks.shape[1:] == det.image_size
        for mask, (x1, y1, x2, y2) in zip(masks, det.boxes):
            ys, xs = np.nonzero(mask)
            if len(ys):
                assert xs.min() >= np.floor(x1) and xs.max() < np.ceil(x2)
                assert ys.min() >= np.floor(y1) and ys.max() < np.ceil(y2)


def test_options_from_params_parse_strings_and_numbers_and_keep_the_base():
    base = PostprocessOptions(confidence=0.4, max_detections=7)
    got = PostprocessOptions.from_params(
        {"confidence": "0.5", "iou_threshold": 0.3, "response_mask_format": "polygon",
         "unrelated": "ignored"}, base)
    assert got == PostprocessOptions(0.5, 0.3, 7, "polygon")
    assert PostprocessOptions.from_params({"max_detections": 12.0}).max_detections == 12
    assert PostprocessOptions.from_params({}, base) == base


@pytest.mark.parametrize("params, key, words", [
    ({"confidence": "lots"}, "confidence", "must be a number"),
    ({"confidence": 1.5}, "confidence", "in [0, 1]"),
    ({"confidence": "nan"}, "confidence", "in [0, 1]"),
    ({"iou_threshold": -0.1}, "iou_threshold", "in [0, 1]"),
    ({"max_detections": "3.5"}, "max_detections", "whole number"),
    ({"max_detections": 20000}, "max_detections", "10000"),
    ({"response_mask_format": "bitmap"}, "response_mask_format", "unknown mask format"),
])
def test_bad_options_name_the_key(params, key, words):
    with pytest.raises(InvalidOptionError, match=words.replace("[", r"\[")) as info:
        PostprocessOptions.from_params(params)
    assert info.value.key == key
