"""Client mask helpers: area, bbox and IoU straight from RLE equal what dense masks say."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from clients import area, bbox, iou, to_mask, to_supervision
from pipeline import rle

from ..strategies import mask_stacks


def dense_bbox(m):
    ys, xs = np.nonzero(m)
    if not len(ys):
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))


@settings(max_examples=200, deadline=None)
@given(mask_stacks(max_side=30))
def test_area_bbox_decode_from_runs(masks):
    for m, r in zip(masks, rle.encode(masks)):
        assert area(r) == int(m.sum())
        assert bbox(r) == dense_bbox(m)
        if m.size:
            np.testing.assert_array_equal(to_mask(r), m.astype(np.uint8))
        uncompressed = {"size": r["size"], "counts": rle.run_lengths(m).counts.tolist()}
        assert area(uncompressed) == int(m.sum())


@settings(max_examples=100, deadline=None)
@given(mask_stacks(max_side=30))
def test_iou_without_decoding(masks):
    if len(masks) < 2 or masks[0].size == 0:
        return
    a, b = rle.encode(masks[:2])
    inter = np.logical_and(masks[0], masks[1]).sum()
    union = np.logical_or(masks[0], masks[1]).sum()
    expected = inter / union if union else 0.0
    assert iou(a, b) == pytest.approx(expected)


def test_supervision_is_optional_and_says_how_to_get_it():
    doc = {"image": {"width": 4, "height": 3}, "predictions": []}
    try:
        import supervision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install supervision"):
            to_supervision(doc)
    else:
        assert len(to_supervision(doc)) == 0
