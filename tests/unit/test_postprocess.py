"""Post-processing per batch, on crafted network outputs of each head: host copies and
run-length calls are counted per batch (the same code runs on a GPU, where each would be a
device sync); DETR's top-k, boxes and whole-image masks, and YOLO26's ranked rows, against
their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import postprocess as pp
from pipeline.errors import InvalidOptionError
from pipeline.heads.detr import DetrHead
from pipeline.heads.yolo import YoloHead
from pipeline.heads.yolo_end2end import EndToEndHead
from pipeline.images import Preprocess, letterbox_geometry
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


YOLO = YoloHead("yolov5", True, NUM_CLASSES)


def run(pred, proto, geos, options):
    return pp.postprocess({"pred": pred, "proto": proto}, YOLO, geos, options)


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
    dets = run(pred, proto, geometries(batch), [PostprocessOptions()] * batch)
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
    together = run(pred, proto, geos, options)
    for b in range(4):
        (alone,) = run(pred[b : b + 1], proto[b : b + 1], [geos[b]], [options[b]])
        np.testing.assert_array_equal(alone.boxes, together[b].boxes)
        np.testing.assert_array_equal(alone.class_ids, together[b].class_ids)
        assert alone.counts == together[b].counts
        assert together[b].image_size == (geos[b].height, geos[b].width)
    assert len(together[2]) <= 2


def test_masks_lie_inside_their_boxes_and_decode_to_their_frame():
    from pipeline import rle

    pred, proto = fake_outputs(2, seed=5)
    for det in run(pred, proto, geometries(2), [PostprocessOptions()] * 2):
        masks = rle.decode(det.rles())
        assert masks.shape[1:] == det.image_size
        for mask, (x1, y1, x2, y2) in zip(masks, det.boxes):
            ys, xs = np.nonzero(mask)
            if len(ys):
                assert xs.min() >= np.floor(x1) and xs.max() < np.ceil(x2)
                assert ys.min() >= np.floor(y1) and ys.max() < np.ceil(y2)


QUERIES, CLASSES, MASK = 12, 5, 16  # a DETR's queries, class logits, mask side (input / 4)


def detr_outputs(batch: int, seed: int = 0):
    """rfdetr's three outputs: a few queries confident for one class (query 1 for two),
    small boxes, and masks that reach far outside them."""
    g = torch.Generator().manual_seed(seed)
    dets = torch.rand(batch, QUERIES, 4, generator=g) * 0.2 + torch.tensor([0.4, 0.4, 0.05, 0.05])
    labels = torch.randn(batch, QUERIES, CLASSES, generator=g) - 4  # sigmoid ~0.02
    labels[:, :4, 2] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    labels[:, 1, 4] = 2.5  # one query, two classes
    masks = torch.randn(batch, QUERIES, MASK, MASK, generator=g) * 0.5 - 2.0
    masks[:, :, :2, :] = 3.0  # every mask's top band: outside its box
    masks[:, 0, 9:11, 5:12] = 2.0  # and a blob for the first
    masks[:, 3] = -5.0  # an empty mask
    return {"dets": dets, "labels": labels, "masks": masks}


DETR = DetrHead("dets", "labels", "masks", CLASSES)


def stretched(batch: int):
    sizes = [(100, 80), (48, 64), (37, 91)]
    return [Preprocess(INPUT, resize="stretch").place(*sizes[b % len(sizes)]) for b in range(batch)]


def test_detr_keeps_the_top_query_class_pairs_above_confidence_with_normalised_boxes():
    outputs, geos = detr_outputs(2), stretched(2)
    options = [PostprocessOptions(confidence=0.5), PostprocessOptions(confidence=0.5, max_detections=2)]
    dets = pp.postprocess(outputs, DETR, geos, options)
    scores = outputs["labels"][0].sigmoid()
    pairs = [(float(scores[q, c]), q, c) for q in range(QUERIES) for c in range(CLASSES)
             if scores[q, c] > 0.5]
    pairs.sort(reverse=True)
    assert [int(c) for c in dets[0].class_ids] == [c for _, _, c in pairs]
    np.testing.assert_allclose(dets[0].scores, [s for s, _, _ in pairs], rtol=1e-6)
    H, W = geos[0].height, geos[0].width
    for box, (_, q, _) in zip(dets[0].boxes, pairs):
        cx, cy, w, h = outputs["dets"][0, q].tolist()
        np.testing.assert_allclose(box, [(cx - w / 2) * W, (cy - h / 2) * H,
                                         (cx + w / 2) * W, (cy + h / 2) * H], rtol=1e-5)
    assert len(dets[1]) == 2  # its own max_detections
    twice = [i for i, (_, q, _) in enumerate(pairs) if q == 1]  # query 1, two classes: one mask
    assert len(twice) == 2 and dets[0].counts[twice[0]] == dets[0].counts[twice[1]]
    many = pp.postprocess(outputs, DETR, geos, [PostprocessOptions(confidence=0.0)] * 2)
    assert len(many[0]) == QUERIES  # top-k is at most the query count, as rfdetr's num_select


@pytest.mark.parametrize("batch", [1, 3])
def test_detr_masks_are_the_whole_image_upsampled_and_not_cut_to_their_boxes(batch):
    """Each mask equals its logits upsampled bilinearly to the whole image (as rfdetr does it)
    and thresholded at 0: bytes-equal, though it is sampled only inside its window."""
    import torch.nn.functional as F

    from pipeline import rle

    outputs, geos = detr_outputs(batch, seed=batch), stretched(batch)
    dets = pp.postprocess(outputs, DETR, geos, [PostprocessOptions(confidence=0.5)] * batch)
    for b, det in enumerate(dets):
        scores = outputs["labels"][b].sigmoid().reshape(-1)
        top = scores.topk(len(det)).indices
        expected = F.interpolate(outputs["masks"][b, top // CLASSES][:, None],
                                 size=det.image_size, mode="bilinear", align_corners=False)[:, 0] > 0
        decoded = rle.decode(det.rles()).astype(bool)
        np.testing.assert_array_equal(decoded, expected.numpy())
        assert decoded[0, :2].any() and not decoded[0, -1:].any()  # the band above the box
        y1 = det.boxes[0, 1]
        assert y1 > 10 and decoded[0, : int(y1)].any()  # mask pixels outside the box


def test_detr_host_copies_are_per_batch(monkeypatch):
    copies = []
    real = pp.to_host
    monkeypatch.setattr(pp, "to_host", lambda t: copies.append(tuple(t.shape)) or real(t))
    pp.postprocess(detr_outputs(3), DETR, stretched(3), [PostprocessOptions(confidence=0.5)] * 3)
    assert len(copies) == 3, copies  # kept images, kept detections, mask windows


def end2end_outputs():
    """YOLO26's rows: x1, y1, x2, y2 (input pixels), score, class, coefficients; not all
    ranked, one below any confidence."""
    rows = torch.zeros(2, 6, 6 + COEFFICIENTS)
    rows[..., :4] = torch.tensor([10.0, 12.0, 40.0, 50.0])
    rows[0, :, 4] = torch.tensor([0.9, 0.3, 0.95, 0.1, 0.6, 0.05])
    rows[1, :, 4] = torch.tensor([0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    rows[..., 5] = torch.tensor([0.0, 1.0, 2.0, 77.0, 4.0, 5.0])
    rows[..., 6:] = 1.0
    proto = torch.ones(2, COEFFICIENTS, INPUT // 4, INPUT // 4)  # every logit positive
    return {"output0": rows, "output1": proto}


def test_end_to_end_rows_are_kept_by_score_and_limit_without_nms_and_masks_cut_to_boxes():
    from pipeline import rle

    geos = [letterbox_geometry(64, 64, INPUT)] * 2
    dets = pp.postprocess(end2end_outputs(), EndToEndHead(None), geos,
                          [PostprocessOptions(confidence=0.25), PostprocessOptions(max_detections=3)])
    assert dets[0].class_ids.tolist() == [2, 0, 4, 1]  # best first; overlapping, all kept
    np.testing.assert_allclose(dets[0].scores, [0.95, 0.9, 0.6, 0.3])
    assert dets[1].class_ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(dets[0].boxes[0], [10, 12, 40, 50])
    mask = rle.decode(dets[0].rles()[:1])[0]
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 39, 12, 49)


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
