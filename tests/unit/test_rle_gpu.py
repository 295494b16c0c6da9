"""The device path (CuPy; torch CUDA through DLPack) gives the host path's bytes exactly.

Marked ``gpu``: skipped with the reason where no CUDA device is visible (CI never has one);
run on a lent GPU machine with ``make test-gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from pipeline import rle
from pipeline.rle.runs import NotBinaryError

from .test_rle import boxes_for, clear_outside, coco, counts_of, mask_stacks

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@settings(max_examples=200, deadline=None)
@given(masks=mask_stacks(max_side=80))
def test_cupy_equals_host_and_pycocotools(cp, masks):
    assert counts_of(rle.encode(cp.asarray(masks))) == counts_of(rle.encode(masks)) == coco(masks)


def test_torch_cuda_tensors_cross_by_dlpack(cp):
    import torch

    rng = np.random.default_rng(0)
    masks = rng.random((6, 480, 640)) < 0.01
    masks[0, 100:300, 50:400] = True
    expected = coco(masks)
    cuda = torch.from_numpy(masks).cuda()
    assert counts_of(rle.encode(cuda)) == expected
    assert counts_of(rle.encode(cuda.to(torch.uint8))) == expected


def test_full_hd_batch_on_device(cp):
    rng = np.random.default_rng(1)
    masks = np.zeros((20, 1080, 1920), bool)
    for i in range(20):
        t, l = rng.integers(0, 800), rng.integers(0, 1500)
        masks[i, t : t + 200, l : l + 300] = rng.random((200, 300)) < 0.9
    masks[-1, -1, -1] = True
    assert counts_of(rle.encode(cp.asarray(masks))) == coco(masks)


@settings(max_examples=100, deadline=None)
@given(data=__import__("hypothesis").strategies.data())
def test_device_boxes_and_crops(cp, data):
    masks = data.draw(mask_stacks(max_side=40))
    boxes = data.draw(boxes_for(masks))
    windows = rle.box_windows(boxes, masks.shape[1:])
    expected = coco(clear_outside(masks, windows))
    assert counts_of(rle.encode(cp.asarray(masks), boxes)) == expected
    crops = [cp.asarray(masks[i, t:b, l:r]) for i, (t, l, b, r) in enumerate(windows)]
    assert counts_of(rle.encode_crops(crops, windows[:, :2], masks.shape[1:])) == expected


def test_device_refuses_non_binary(cp):
    m = cp.zeros((2, 8, 8), cp.uint8)
    m[1, 2, 2] = 3
    with pytest.raises(NotBinaryError, match="value 3"):
        rle.encode(m)
