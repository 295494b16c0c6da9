"""The gRPC frontend with the REAL tritonclient (sync and stream), on the fake network's
synthetic scenes (``tests/fakes.py``): known detections, exact masks."""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
import urllib.request
import zlib

import numpy as np
import pytest
import tritonclient.grpc as triton
from pycocotools import mask as coco_mask
from tritonclient.utils import InferenceServerException

from ..fakes import png, scene

MODEL = "instance_segmentation"


def bytes_input(*images: bytes) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[img] for img in images], dtype=object))
    return tensor


def documents(result) -> list[dict]:
    return [json.loads(d[0]) for d in result.as_numpy("DETECTIONS")]


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def bus():
    """A 640x480 scene of three objects (named for the photo it stands in for)."""
    return png(scene(480, 640, red=(40, 60, 200, 400), green=(300, 100, 420, 220),
                     blue=(500, 300, 620, 460)))


@pytest.fixture(scope="module")
def small_png():
    return png(scene(240, 320, red=(20, 40, 100, 120), blue=(200, 100, 300, 200)))


def assert_still_serves(client, image):
    (doc,) = documents(client.infer(MODEL, [bytes_input(image)]))
    assert doc["predictions"], "a valid request after a bad one must succeed"


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("fake_seg")
    assert client.get_server_metadata().name == "rle-serving"
    meta = client.get_model_metadata(MODEL)
    assert [(t.name, t.datatype) for t in meta.inputs] == [("IMAGE", "BYTES")]
    assert {"DETECTIONS", "BOXES", "SCORES", "CLASS_IDS", "RLE_COUNTS"} <= {t.name for t in meta.outputs}
    config = client.get_model_config(MODEL).config
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 5000
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"instance_segmentation": "READY", "fake_seg": "UNAVAILABLE"}


def test_infer_matches_the_engine_and_pycocotools(client, bus, fake_pipeline):
    result = client.infer(MODEL, [bytes_input(bus)])
    (doc,) = documents(result)
    (expected,) = fake_pipeline.infer([bus])
    assert sorted(p["class"] for p in doc["predictions"]) == ["blue", "green", "red"]
    assert [p["class"] for p in doc["predictions"]] == [p["class"] for p in expected["predictions"]]
    assert [p["rle"] for p in doc["predictions"]] == [p["rle"] for p in expected["predictions"]]
    H, W = doc["image"]["height"], doc["image"]["width"]
    for p in doc["predictions"]:
        mask = coco_mask.decode({"size": [H, W], "counts": p["rle"]["counts"].encode()})
        assert mask.sum() > 0
    # Typed tensors agree with the JSON.
    k = int(result.as_numpy("NUM_DETECTIONS")[0, 0])
    assert k == len(doc["predictions"])
    boxes = result.as_numpy("BOXES")[0]
    scores = result.as_numpy("SCORES")[0]
    counts = [c.decode() for c in result.as_numpy("RLE_COUNTS")[0]]
    assert counts == [p["rle"]["counts"] for p in doc["predictions"]]
    np.testing.assert_allclose(scores, [p["confidence"] for p in doc["predictions"]], rtol=1e-6)
    np.testing.assert_allclose((boxes[:, 0] + boxes[:, 2]) / 2, [p["x"] for p in doc["predictions"]], rtol=1e-5)
    assert list(result.as_numpy("IMAGE_SIZE")[0]) == [480, 640]
    red = next(p for p in doc["predictions"] if p["class"] == "red")  # the rectangle itself
    assert (red["x"], red["y"], red["width"], red["height"]) == (120.0, 230.0, 160.0, 340.0)
    names = {p["class_id"] for p in doc["predictions"]}
    assert set(result.as_numpy("CLASS_IDS")[0].tolist()) == names


def test_raw_uint8_batch_and_requested_outputs(client, small_png):
    rgb = scene(240, 320, red=(20, 40, 100, 120), blue=(200, 100, 300, 200))
    raw = triton.InferInput("IMAGE", [2, *rgb.shape], "UINT8")
    raw.set_data_from_numpy(np.stack([rgb, rgb]))
    result = client.infer(MODEL, [raw], outputs=[triton.InferRequestedOutput("DETECTIONS")])
    docs = documents(result)
    assert len(docs) == 2 and result.as_numpy("BOXES") is None
    (encoded,) = documents(client.infer(MODEL, [bytes_input(small_png)]))
    for doc in docs:  # PNG is lossless: the raw pixels give the same masks
        assert [p["rle"] for p in doc["predictions"]] == [p["rle"] for p in encoded["predictions"]]


def test_parameters(client, bus):
    result = client.infer(MODEL, [bytes_input(bus)],
                          parameters={"response_mask_format": "polygon", "confidence": 0.8,
                                      "max_detections": 2})
    (doc,) = documents(result)
    assert len(doc["predictions"]) == 2
    assert all(p["mask_format"] == "polygon" and p["confidence"] > 0.8 for p in doc["predictions"])
    red = next(p for p in doc["predictions"] if p["class"] == "red")
    xs, ys = [q["x"] for q in red["points"]], [q["y"] for q in red["points"]]
    assert (min(xs), min(ys), max(xs), max(ys)) == (40, 60, 199, 399)  # the rectangle's outline


def test_stream_infer_answers_in_order(server, bus, small_png):
    answers: queue.Queue = queue.Queue()
    c = triton.InferenceServerClient(server.address)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    frames = [bus, small_png, bus]
    for i, frame in enumerate(frames):
        c.async_stream_infer(MODEL, [bytes_input(frame)], request_id=f"frame-{i}")
    got = [answers.get(timeout=120) for _ in frames]
    c.stop_stream()
    c.close()
    assert [r.get_response().id for r, e in got] == ["frame-0", "frame-1", "frame-2"]
    assert all(e is None for _, e in got)
    assert [documents(r)[0]["image"]["width"] for r, _ in got] == [640, 320, 640]


def test_concurrent_clients_share_the_batcher(slow_root, small_png):
    from .conftest import running_server

    with running_server(model_repository=str(slow_root)) as server:
        def one():
            c = triton.InferenceServerClient(server.address)
            try:
                return documents(c.infer(MODEL, [bytes_input(small_png)]))[0]
            finally:
                c.close()

        results = []
        threads = [threading.Thread(target=lambda: results.append(one())) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        sizes = server.server.ledger.totals(MODEL).batch_sizes
    assert len(results) == 6
    assert len({json.dumps([p["rle"] for p in r["predictions"]]) for r in results}) == 1
    assert max(sizes) > 1, sizes


def test_the_batch_size_limit_is_measured_bounded_and_exported(server):
    pipe = server.server.state.pipelines[MODEL]
    assert 1 <= pipe.batch_limit <= pipe.max_batch_size == 8
    assert server.server.ledger.totals(MODEL).batch_limit == pipe.batch_limit
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f'rle_serving_batch_size_limit{{model="{MODEL}"}} {float(pipe.batch_limit)}' in text


def test_statistics_count_real_work(client):
    (stats,) = client.get_inference_statistics(MODEL).model_stats
    assert stats.inference_count >= 1 and stats.execution_count >= 1
    assert stats.inference_stats.success.count >= 1 and stats.inference_stats.compute_infer.ns > 0


def test_prometheus_metrics(server, client, small_png):
    assert_still_serves(client, small_png)
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                 "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                 "rle_serving_batch_size_bucket", "rle_serving_rle_seconds_total"):
        assert name in text, name
    line = next(l for l in text.splitlines() if l.startswith("nv_inference_request_success{"))
    assert 'model="instance_segmentation"' in line and float(line.split()[-1]) >= 1


# ------------------------------------------------------------------ bad input, still serving


def raw_input(shape, dtype="UINT8", data=None):
    tensor = triton.InferInput("IMAGE", shape, dtype)
    if data is not None:
        tensor.set_data_from_numpy(data)
    return tensor


@pytest.mark.parametrize(
    "make_call, code, words",
    [
        (lambda c, img: c.infer("no_such_model", [bytes_input(img)]), "NOT_FOUND", "unknown model"),
        (lambda c, img: c.infer(MODEL, [bytes_input(img)], model_version="7"), "NOT_FOUND", "no version '7'"),
        (lambda c, img: c.infer("fake_seg", [bytes_input(img)]), "NOT_FOUND", "inside instance_segmentation"),
        (lambda c, img: c.infer(MODEL, [raw_input([1, 2], "FP32", np.zeros((1, 2), np.float32))]), "INVALID_ARGUMENT", "BYTES"),
        (lambda c, img: c.infer(MODEL, [bytes_input(img), _named("EXTRA", img)]), "INVALID_ARGUMENT", "unexpected input"),
        (lambda c, img: c.infer(MODEL, [_named("PICTURE", img)]), "INVALID_ARGUMENT", "missing input 'IMAGE'"),
        (lambda c, img: c.infer(MODEL, [bytes_input(b"GIF89a garbage")]), "INVALID_ARGUMENT", "not a decodable image"),
        (lambda c, img: c.infer(MODEL, [bytes_input(img[: len(img) // 3])]), "INVALID_ARGUMENT", "truncated"),
        (lambda c, img: c.infer(MODEL, [bytes_input(b"")]), "INVALID_ARGUMENT", "empty"),
        (lambda c, img: c.infer(MODEL, [raw_input([1, 0, 0, 3], data=np.zeros((1, 0, 0, 3), np.uint8))]), "INVALID_ARGUMENT", "no pixels"),
        (lambda c, img: c.infer(MODEL, [raw_input([1, 4, 5, 2], data=np.zeros((1, 4, 5, 2), np.uint8))]), "INVALID_ARGUMENT", "[B, H, W, 3]"),
        (lambda c, img: c.infer(MODEL, [bytes_input(*[img] * 9)]), "INVALID_ARGUMENT", "max_batch_size 8"),
        (lambda c, img: c.infer(MODEL, [bytes_input(img)], parameters={"response_mask_format": "bitmap"}), "INVALID_ARGUMENT", "unknown mask format"),
        (lambda c, img: c.infer(MODEL, [bytes_input(img)], parameters={"confidence": "lots"}), "INVALID_ARGUMENT", "must be a number"),
        (lambda c, img: c.infer(MODEL, [bytes_input(img)], outputs=[triton.InferRequestedOutput("MASKS")]), "INVALID_ARGUMENT", "unknown output"),
    ],
)
def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(client, small_png, make_call, code, words):
    with pytest.raises(InferenceServerException) as info:
        make_call(client, small_png)
    assert info.value.status() == f"StatusCode.{code}", info.value
    assert words in info.value.message()
    assert_still_serves(client, small_png)


def _named(name, image):
    tensor = triton.InferInput(name, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=object))
    return tensor


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: what a decompression bomb shows
    before it is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


def test_gigantic_image_is_refused_before_decoding(client, small_png):
    with pytest.raises(InferenceServerException) as info:  # 20000 x 20000: 1.2 GB decoded
        client.infer(MODEL, [bytes_input(png_header(20000, 20000))])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "exceeds" in info.value.message()
    assert_still_serves(client, small_png)


def test_stream_with_garbage_then_valid_frames(server, small_png):
    answers: queue.Queue = queue.Queue()
    c = triton.InferenceServerClient(server.address)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    c.async_stream_infer(MODEL, [bytes_input(b"not an image")], request_id="bad")
    c.async_stream_infer(MODEL, [bytes_input(small_png)], request_id="good")
    first, second = answers.get(timeout=120), answers.get(timeout=120)
    c.stop_stream()
    c.close()
    assert first[1] is not None and "not a decodable image" in first[1].message()
    assert second[1] is None and documents(second[0])[0]["predictions"]


def test_client_disconnecting_mid_stream(server, client, bus, small_png):
    c = triton.InferenceServerClient(server.address)
    c.start_stream(callback=lambda result, error: None)
    for i in range(3):
        c.async_stream_infer(MODEL, [bytes_input(bus)], request_id=str(i))
    c.close()  # gone without waiting for answers
    assert_still_serves(client, small_png)


def test_message_size_limit_is_resource_exhausted(fake_root, small_png):
    from .conftest import running_server

    with running_server(model_repository=str(fake_root), max_message_mb=1) as small:
        c = triton.InferenceServerClient(small.address)
        with pytest.raises(InferenceServerException) as info:
            c.infer(MODEL, [bytes_input(b"\xff" * (2 * 1024 * 1024))])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert_still_serves(c, small_png)
        c.close()


def test_the_thread_budget_is_applied_at_start(fake_root):
    import asyncio

    import torch

    from pipeline import rle
    from pipeline.frontends.server import ThreadBudget

    from .conftest import running_server

    before = torch.get_num_threads(), rle.threads()
    try:
        with running_server(model_repository=str(fake_root), network_threads=1, worker_threads=1) as server:
            assert server.server.threads == ThreadBudget(network=1, workers=1, arenas_capped=True)
            assert rle.threads() == 1

            async def worker_threads():  # what the loop's executor (decoding, responses) runs on
                return set(await asyncio.gather(*(asyncio.to_thread(
                    lambda: (time.sleep(0.05), threading.current_thread().name,
                             torch.get_num_threads())[1:]) for _ in range(4))))

            # One worker; and torch, whose thread count is set per thread as each starts
            # (OpenMP), gives every thread started after the budget one intra-op thread.
            assert server.call(worker_threads()) == {("rle-worker_0", 1)}
            client = triton.InferenceServerClient(server.address)
            (doc,) = documents(client.infer(MODEL, [bytes_input(png(scene(red=(10, 10, 50, 50))))]))
            assert [p["class"] for p in doc["predictions"]] == ["red"]  # and it serves
            client.close()
    finally:
        torch.set_num_threads(before[0])
        rle.set_threads(before[1])
