"""Client mask helpers: area, bbox and IoU straight from RLE equal what dense masks say."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# Anything JSON can hold, plus near-misses of real RLE: the helpers' inputs come off the wire.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2000, 2000) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
near_rle = st.fixed_dictionaries({
    "size": st.one_of(json_values, st.lists(st.integers(-3, 40), min_size=0, max_size=3)),
    "counts": st.one_of(
        json_values,
        st.text(alphabet=[chr(c) for c in range(40, 120)], max_size=20),
        st.binary(max_size=20),
        st.lists(st.integers(-5, 2000), max_size=8),
    ),
})
rle_like = st.one_of(json_values, near_rle)


@settings(max_examples=600, deadline=None)
@given(rle_like, rle_like)
def test_helpers_refuse_malformed_rle_with_value_error_only(a, b):
    for helper in (area, bbox, to_mask, lambda r: iou(r, r), lambda r: iou(r, b)):
        try:
            out = helper(a)
        except ValueError:
            continue
        # Accepted: then it was well-formed, and the answer is consistent with the mask.
        (h, w), runs = rle.parse(a)
        assert int(runs.sum()) == h * w
        if isinstance(out, float):
            assert 0.0 <= out <= 1.0


def test_garbage_the_old_helpers_accepted_is_refused():
    hostile = {"size": [3, 3], "counts": [100, 200, 300]}  # runs add up to 600, not 9
    for helper in (area, bbox, to_mask, lambda r: iou(r, r)):
        with pytest.raises(ValueError, match="add up to 600"):
            helper(hostile)
    with pytest.raises(ValueError, match="'size' and 'counts'"):
        bbox({"counts": "<"})
    with pytest.raises(ValueError, match=r"\[height, width\]"):
        bbox({"size": "3x4", "counts": "<"})
    for size in ([float("inf")], [3, float("inf")], [float("nan"), 4]):  # found by the property above
        with pytest.raises(ValueError, match=r"\[height, width\]"):
            area({"size": size, "counts": ""})
    with pytest.raises(ValueError, match="different sizes"):
        iou({"size": [3, 4], "counts": "<"}, {"size": [4, 3], "counts": "<"})
    assert iou({"size": [3, 4], "counts": "<"}, {"size": [3, 4], "counts": "<"}) == 0.0
