"""The codec against pycocotools, byte for byte: goldens, properties, crops, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from pipeline import rle
from pipeline.rle.packing import pack_counts, pack_runs_python, unpack_counts
from pipeline.rle.runs import NotBinaryError, crop_stack_run_lengths, pad_crops

from ..strategies import mask_stacks


def coco(masks) -> list[str]:
    """pycocotools' counts for (N, H, W) or (H, W) masks, as ASCII."""
    m = np.asarray(masks, dtype=np.uint8)
    if m.ndim == 2:
        m = m[None]
    return [r["counts"].decode("ascii") for r in coco_mask.encode(np.asfortranarray(m.transpose(1, 2, 0)))]


def counts_of(rles) -> list[str]:
    return [r["counts"] for r in rles]


def column_major(runs, shape):
    """A mask whose column-major runs are ``runs`` (starting with zeros)."""
    values = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
    return values.reshape(shape[1], shape[0]).T


# Hand-derived (see docs in pipeline/packing.py for the 5-bit scheme), then confirmed with
# pycocotools 2.0.11 in test_goldens_match_pycocotools.
GOLDENS = {
    "empty 3x4": (np.zeros((3, 4)), "<"),  # one zero-run of 12: chr(48 + 12)
    "full 3x4": (np.ones((3, 4)), "0<"),  # zero-run 0, then 12 ones
    "first pixel set": (np.eye(1, 12).reshape(4, 3).T, "01;"),  # runs 0, 1, 11
    "1x1 empty": (np.zeros((1, 1)), "1"),
    "1x1 set": (np.ones((1, 1)), "01"),
    "H = 1": (np.array([[0, 1, 1, 0, 1]]), "121O"),  # runs 1,2,1,1; 1 - 2 = -1 -> 'O'
    "W = 1": (np.array([[0, 1, 1, 0, 1]]).T, "121O"),
    # A band 4 columns wide in a 3x10 frame (width not a multiple of 8).
    "band 3x10": (np.pad(np.ones((3, 4)), ((0, 0), (3, 3))), "9<9"),
    # runs 500000, 1, 499999: four 5-bit groups each ("PYX?" = 0|32, 9|32, 8|32, 15).
    "many chunks": (column_major([500000, 1, 499999], (1000, 1000)), "PYX?1oXX?"),
    # runs 10, 100, 10, 5, 75: index 3 is 5 - 100 = -95 ("QM"), index 4 is 75 - 10 = 65.
    "negative delta": (column_major([10, 100, 10, 5, 75], (10, 20)), ":T3:QMQ2"),
}


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_goldens(name):
    mask, expected = GOLDENS[name]
    for dtype in (bool, np.uint8):
        assert counts_of(rle.encode(mask.astype(dtype))) == [expected]


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_goldens_match_pycocotools(name):
    mask, expected = GOLDENS[name]
    assert coco(mask) == [expected]


def test_result_schema():
    out = rle.encode(np.zeros((2, 3, 4), bool))
    assert out == [{"size": [3, 4], "counts": "<"}, {"size": [3, 4], "counts": "<"}]
    assert all(type(r["counts"]) is str for r in out)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_zero_sized_frames_match_pycocotools(shape):
    masks = np.zeros((2, *shape), np.uint8)
    expected = [r["counts"].decode() for r in coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0)))]
    assert counts_of(rle.encode(masks)) == expected == ["0", "0"]
    assert [r["size"] for r in rle.encode(masks)] == [list(shape)] * 2


def test_no_masks():
    assert rle.encode(np.zeros((0, 10, 10), bool)) == []
    assert rle.encode_crops([], np.zeros((0, 2)), (10, 10)) == []


def test_two_dimensional_input_is_one_mask():
    m = np.zeros((5, 7), bool)
    m[1:3, 2:6] = True
    assert counts_of(rle.encode(m)) == coco(m)


def test_torch_cpu_tensors_bool_and_uint8():
    m = torch.zeros(3, 50, 60, dtype=torch.bool)
    m[0, 10:20, 5:9] = True
    m[2, :, 59] = True
    assert counts_of(rle.encode(m)) == coco(m.numpy())
    assert counts_of(rle.encode(m.to(torch.uint8))) == coco(m.numpy())


def test_non_contiguous_input():
    m = np.zeros((40, 30, 3), bool)
    m[5:25, 3:9, 1] = True
    view = m.transpose(2, 0, 1)  # (3, 40, 30) with odd strides
    assert counts_of(rle.encode(view)) == coco(view)


# -------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(mask_stacks())
def test_encode_matches_pycocotools(masks):
    assert counts_of(rle.encode(masks)) == coco(masks)


@settings(max_examples=150, deadline=None)
@given(mask_stacks(max_side=160))
def test_encode_matches_pycocotools_large(masks):
    # Rows long enough for the host kernel's 32-byte blocks, then words, then byte tails.
    assert counts_of(rle.encode(masks)) == coco(masks)


@settings(max_examples=200, deadline=None)
@given(mask_stacks())
def test_batched_array_module_path_on_numpy_matches_host_path(masks):
    n, h, w = masks.shape
    batched = crop_stack_run_lengths(np, masks, np.zeros((n, 2), np.int64), (h, w))
    assert counts_of(rle.to_coco(batched)) == coco(masks)


@settings(max_examples=200, deadline=None)
@given(mask_stacks())
def test_round_trip(masks):
    encoded = rle.encode(masks)
    if len(masks) and masks.shape[1] * masks.shape[2]:
        np.testing.assert_array_equal(rle.decode(encoded), masks.astype(np.uint8))
        ours = rle.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in encoded])
        theirs = coco_mask.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in encoded])
        np.testing.assert_array_equal(ours, theirs.transpose(2, 0, 1))


@st.composite
def boxes_for(draw, masks):
    n, h, w = masks.shape
    out = []
    for _ in range(n):
        x1, x2 = sorted(draw(st.floats(-5, w + 5)) for _ in range(2))
        y1, y2 = sorted(draw(st.floats(-5, h + 5)) for _ in range(2))
        out.append((x1, y1, x2, y2))
    return np.array(out, dtype=np.float64).reshape(n, 4)


def clear_outside(masks, windows):
    cleared = np.zeros_like(masks)
    for i, (t, l, b, r) in enumerate(windows):
        cleared[i, t:b, l:r] = masks[i, t:b, l:r]
    return cleared


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_boxes_equal_masks_cleared_outside_their_box(data):
    masks = data.draw(mask_stacks(max_side=40))
    boxes = data.draw(boxes_for(masks))
    windows = rle.box_windows(boxes, masks.shape[1:])
    assert counts_of(rle.encode(masks, boxes)) == coco(clear_outside(masks, windows))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_crops_equal_full_masks(data):
    masks = data.draw(mask_stacks(max_side=40))
    boxes = data.draw(boxes_for(masks))
    windows = rle.box_windows(boxes, masks.shape[1:])
    crops = [masks[i, t:b, l:r].copy() for i, (t, l, b, r) in enumerate(windows)]
    expected = coco(clear_outside(masks, windows))
    assert counts_of(rle.encode_crops(crops, windows[:, :2], masks.shape[1:])) == expected
    # The padded tile stack the device path uses, run through the batched path on NumPy.
    stack, tiles = pad_crops(np, crops, windows[:, :2], masks.shape[1:])
    got = crop_stack_run_lengths(np, stack, tiles, masks.shape[1:])
    assert counts_of(rle.to_coco(got)) == expected


def test_crops_mixed_sizes_keep_their_order():
    rng = np.random.default_rng(7)
    H, W = 700, 900
    crops, origins = [], []
    for h, w in [(600, 500), (20, 30), (300, 300), (5, 800), (700, 900), (1, 1)]:
        crops.append(rng.random((h, w)) < 0.3)
        origins.append((rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)))
    full = np.zeros((len(crops), H, W), bool)
    for i, (c, (t, l)) in enumerate(zip(crops, origins)):
        full[i, t : t + c.shape[0], l : l + c.shape[1]] = c
    assert counts_of(rle.encode_crops(crops, origins, (H, W))) == coco(full)


def test_crop_stack_input():
    masks = np.zeros((3, 30, 40), bool)
    masks[:, 10:20, 5:15] = np.random.default_rng(1).random((3, 10, 10)) < 0.5
    stack = masks[:, 8:22, 4:16]
    origins = np.tile([8, 4], (3, 1))
    assert counts_of(rle.encode_crops(stack, origins, (30, 40))) == coco(masks)


def test_full_height_crops_touching_both_edges():
    # Columns meet top-to-bottom: the exit of one column and the entry of the next coincide.
    m = np.ones((6, 5), bool)
    m[2, 1] = False
    for stack in (m[None], np.ones((1, 6, 5), bool)):
        assert counts_of(rle.encode_crops(stack, [(0, 0)], (6, 5))) == coco(stack)
    assert counts_of(rle.encode_crops([m[:, 1:4]], [(0, 1)], (6, 5))) == coco(
        np.pad(m[:, 1:4], ((0, 0), (1, 1)))
    )


def test_full_hd_batch_uses_every_path():
    # 5 x 1080p crosses the multi-core threshold; one mask is noise (grows the buffers).
    rng = np.random.default_rng(3)
    masks = np.zeros((5, 1080, 1920), bool)
    masks[0, 100:900, 200:1700] = True
    masks[1] = rng.random((1080, 1920)) < 0.05
    masks[2, :, -1] = True
    masks[3, -1, -1] = True
    masks[4, 0, 0] = True
    assert counts_of(rle.encode(masks)) == coco(masks)


# --------------------------------------------------------------------------- packing


run_lists = st.lists(st.lists(st.integers(0, 2**29 - 1), min_size=1, max_size=12), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(run_lists)
def test_pack_matches_pycocotools_and_round_trips(runs_per_mask):
    counts = np.concatenate([np.array(r, np.int64) for r in runs_per_mask])
    offsets = np.cumsum([0] + [len(r) for r in runs_per_mask])
    packed = pack_counts(counts, offsets, (1, 1))
    for text, runs in zip(packed, runs_per_mask):
        assert text == pack_runs_python(runs)
        assert set(text) <= set(map(chr, range(48, 112)))
        np.testing.assert_array_equal(unpack_counts(text), runs)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=12))
def test_frames_beyond_the_c_packer_round_trip(runs):
    # Runs past 2^29 need a 7th character, which pycocotools' 6-per-run buffer cannot hold.
    (text,) = pack_counts(np.array(runs), np.array([0, len(runs)]), (1 << 15, 1 << 15))
    assert text == pack_runs_python(runs)
    np.testing.assert_array_equal(unpack_counts(text), runs)


# ------------------------------------------------------------------------- bad input


def test_uint8_values_other_than_zero_one_are_refused_and_named():
    m = np.zeros((2, 20, 20), np.uint8)
    m[1, 3, 4] = 255
    with pytest.raises(NotBinaryError, match="255"):
        rle.encode(m)
    with pytest.raises(ValueError, match="mask 1 holds the value 255"):
        rle.encode(m)
    with pytest.raises(ValueError, match="value 2"):
        rle.encode_crops([np.full((3, 3), 2, np.uint8)], [(0, 0)], (5, 5))
    with pytest.raises(ValueError, match="value 7"):
        crop_stack_run_lengths(np, np.full((1, 3, 3), 7, np.uint8), np.zeros((1, 2), np.int64), (3, 3))
    with pytest.raises(ValueError, match="mask 1 holds the value 255"):  # a bool view's bytes
        rle.encode(m.view(bool))


@pytest.mark.parametrize(
    "masks, message",
    [
        (np.zeros((2, 3, 4), np.float32), "dtype float32"),
        (np.zeros((2, 3, 4), np.int64), "dtype int64"),
        (np.zeros((1, 2, 3, 4), bool), r"\(N, H, W\) or \(H, W\)"),
        (np.zeros(5, bool), r"\(N, H, W\) or \(H, W\)"),
    ],
)
def test_bad_masks(masks, message):
    with pytest.raises(ValueError, match=message):
        rle.encode(masks)


def test_bad_boxes_and_crops():
    with pytest.raises(ValueError, match="2 boxes for 3 masks"):
        rle.encode(np.zeros((3, 4, 4), bool), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="finite"):
        rle.encode(np.zeros((1, 4, 4), bool), [[0, 0, np.nan, 2]])
    with pytest.raises(ValueError, match="does not fit"):
        rle.encode_crops([np.ones((3, 3), bool)], [(2, 0)], (4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        rle.encode_crops([np.ones((3, 3), bool)], [(-1, 0)], (4, 4))
    with pytest.raises(ValueError, match="1 crops but 2 origins"):
        rle.encode_crops([np.ones((3, 3), bool)], [(0, 0), (0, 0)], (4, 4))
    with pytest.raises(ValueError, match="2-D"):
        rle.encode_crops([np.ones((3, 3, 1), bool)], [(0, 0)], (4, 4))


@pytest.mark.parametrize(
    "rle_in, message",
    [
        ({"size": [3, 4], "counts": "0<x"}, "'x' at position 2"),
        ({"size": [3, 4], "counts": "0< "}, "' ' at position 2"),
        ({"size": [3, 4], "counts": "0\u00e9"}, "ASCII"),
        ({"size": [3, 4], "counts": "0P"}, "truncated"),  # 'P' = 32 | 0: more groups promised
        ({"size": [3, 4], "counts": "0;"}, "add up to 11 pixels"),
        ({"size": [3, 4], "counts": "0="}, "add up to 13 pixels"),
        ({"size": [3, 4], "counts": [13, -1]}, "negative"),
        ({"size": [3, 4], "counts": [5, 5]}, "add up to 10"),
        ({"size": [3, 4], "counts": "PPPPPPPPP0"}, "too large"),
        ({"size": [3], "counts": "<"}, r"\[height, width\]"),
        ({"size": [-3, -4], "counts": "<"}, "non-negative"),
        ({"size": [100000, 100000], "counts": "0"}, "add up"),
        ({"counts": "<"}, "'size' and 'counts'"),
        ("not a dict", "'size' and 'counts'"),
        ({"size": [3, 4], "counts": [1.5, 10.5]}, "integers"),
        ({"size": [3, 4], "counts": ["a"]}, "string or a list of integers"),
    ],
)
def test_decode_refuses_malformed_rle(rle_in, message):
    with pytest.raises(ValueError, match=message):
        rle.decode([rle_in])


def test_decode_refuses_absurd_sizes_before_allocating():
    huge = {"size": [200000, 200000], "counts": [200000 * 200000]}
    with pytest.raises(ValueError, match="exceeds the limit"):
        rle.decode(huge)
    with pytest.raises(ValueError, match="exceeds the limit"):
        rle.decode([{"size": [100, 100], "counts": [10000]}] * 3, max_pixels=20000)


def test_decode_forms():
    expected = np.array([[[0, 1], [1, 1]]], np.uint8)
    encoded = rle.encode(expected)[0]
    for counts in (encoded["counts"], encoded["counts"].encode(), [1, 3]):
        np.testing.assert_array_equal(rle.decode({"size": [2, 2], "counts": counts}), expected)
    assert rle.decode([]).shape == (0, 0, 0)
    with pytest.raises(ValueError, match="different sizes"):
        rle.decode([{"size": [1, 2], "counts": [2]}, {"size": [2, 1], "counts": [2]}])


def test_noise_outgrows_the_host_kernels_buffers_and_stays_exact():
    from pipeline.rle.host_kernel import initial_capacity

    rng = np.random.default_rng(11)
    noise = rng.random((3, 256, 333)) < 0.1
    noise[1, 0, 0] = True  # first pixel set: the runs start with a zero-length run
    noise[2, -1, -1] = True  # last pixel set
    runs = rle.run_lengths(noise)
    assert min(len(runs.runs(i)) for i in range(3)) > initial_capacity(256, 333)
    for masks in (noise, noise.astype(np.uint8), noise[:, ::-1], noise[:, :, ::2]):
        assert counts_of(rle.encode(masks)) == coco(masks)


def test_host_kernel_reads_crops_in_place_and_splits_batches_across_threads(monkeypatch):
    from pipeline.rle import host_kernel, runs

    rng = np.random.default_rng(12)
    masks = np.zeros((6, 720, 1280), bool)
    for i, m in enumerate(masks):
        m[50 + i : 600, 100 : 1100 - 7 * i] = rng.random((550 - i, 1000 - 7 * i)) < 0.98
    boxes = np.tile([90.0, 40.0, 1110.0, 610.0], (6, 1))
    calls = []
    real = host_kernel.run_lengths

    def spy(windows, *args):
        calls.append((len(windows), all(np.shares_memory(c, masks) for c in windows.crops)))
        return real(windows, *args)

    monkeypatch.setattr(host_kernel, "run_lengths", spy)
    runs.set_threads(2)
    try:
        assert counts_of(rle.encode(masks, boxes)) == coco(masks)
        assert counts_of(rle.encode(masks)) == coco(masks)
        separate = [m.copy() for m in masks]
        assert counts_of(rle.encode_crops(separate, [(0, 0)] * 6, (720, 1280))) == coco(masks)
    finally:
        runs.set_threads(None)
    # Box windows and whole masks are read where they lie. The windows (3.5M pixels) stay
    # below the parallel threshold: one call. Six whole 720p masks pass it: two pieces of
    # three, one per thread; so do six separate arrays.
    assert calls == [(6, True), (3, True), (3, True), (3, False), (3, False)]


def test_masks_that_would_overflow_pycocotools_packer_are_packed_in_python():
    from pipeline.rle.packing import _overflowing_masks

    # rleToString's buffer is 6 characters per run; its NUL goes past it when every value
    # needs 6 (|x| >= 2^24), and a value needing 7 (|x| >= 2^29) overflows outright.
    runs = [[2**25, 2**24, 2**25, 2**26],  # every value (deltas from index 3) needs 6
            [5, 2**25, 2**25],             # the first needs 1: safe
            [2**24],                       # an empty 4096 x 4096 mask: 6 characters + NUL
            [3, 2**29, 1],                 # a 7-group value
            [1, 2, 3]]
    flat = np.concatenate([np.array(r, np.uint32) for r in runs])
    bounds = np.cumsum([0] + [len(r) for r in runs])
    assert _overflowing_masks(flat, bounds).tolist() == [True, False, True, True, False]
    packed = pack_counts(flat, bounds, (1, 1))
    assert packed == [pack_runs_python(r) for r in runs]
    empty = rle.encode(np.zeros((1, 4096, 4096), bool))
    assert counts_of(empty) == coco(np.zeros((1, 4096, 4096), bool)) == ["PPPP`0"]  # 6 characters


def test_host_kernel_compiles_without_a_cache_where_no_directory_is_writable(monkeypatch):
    from pipeline.rle import host_kernel

    built = []

    def njit(**options):
        if options["cache"]:  # what numba raises when no cache locator can write
            raise RuntimeError("cannot cache function 'f': no locator available for file")
        built.append(options)
        return lambda fn: fn

    monkeypatch.setattr(host_kernel, "njit", njit)
    assert host_kernel._jit(len) is len
    assert built == [{"nogil": True, "cache": False, "boundscheck": False}]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_without_numba_the_host_encodes_through_numpy_with_the_same_bytes(data):
    """A light client without numba: whole masks, boxes, crops and batches still match
    pycocotools, through the array-module path on NumPy."""
    from unittest import mock

    from pipeline.rle import runs

    masks = data.draw(mask_stacks(max_side=40))
    boxes = data.draw(boxes_for(masks))
    windows = rle.box_windows(boxes, masks.shape[1:])
    crops = [masks[i, t:b, l:r] for i, (t, l, b, r) in enumerate(windows)]
    with mock.patch.object(runs, "compiled", lambda: False), \
            mock.patch.object(runs, "_host_batch", side_effect=AssertionError("compiled path")):
        assert counts_of(rle.encode(masks)) == coco(masks)
        assert counts_of(rle.encode(masks, boxes)) == coco(clear_outside(masks, windows))
        assert counts_of(rle.encode_crops(crops, windows[:, :2], masks.shape[1:])) == \
            coco(clear_outside(masks, windows))
        tiles = [rle.Tiles(masks, np.zeros((len(masks), 2), np.int64), np.arange(len(masks)))]
        (batch,) = rle.batch_run_lengths(tiles, [masks.shape[1:]], np.zeros(len(masks), np.int64))
        assert counts_of(rle.to_coco(batch)) == coco(masks)
