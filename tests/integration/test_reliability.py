"""Under load and faults: bounded queue time, a failing batch fails only itself, and one
connection cannot take the whole server. The fake network (``tests/fakes.py``) stands in for
the real one, with 100 ms of busy work per image."""

from __future__ import annotations

import json
import queue
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc

from ..fakes import fake_repository, png, scene
from .conftest import running_server

MODEL = "instance_segmentation"
SCENES = {"bus": scene(480, 640, red=(40, 60, 200, 400), green=(300, 100, 420, 220), blue=(500, 300, 620, 460)),
          "coffee": scene(240, 320, green=(100, 60, 260, 220)),
          "portrait": scene(320, 240, red=(20, 20, 120, 120)),
          "landscape": scene(240, 320, red=(20, 20, 120, 120), blue=(200, 100, 300, 200))}


def sample_bytes(name: str) -> bytes:
    return png(SCENES[name])


def image_input(*images: bytes) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[i] for i in images], dtype=object))
    return tensor


@pytest.fixture(scope="module")
def short_queue(tmp_path_factory):
    """A server whose requests may wait at most 0.3 s for a network that takes one image
    (0.1 s) at a time."""
    root = fake_repository(tmp_path_factory.mktemp("short"), delay_ms=100, queue_timeout_s=0.3,
                           max_batch_size=1)
    with running_server(model_repository=str(root)) as running:
        yield running


@pytest.fixture(scope="module")
def patient_queue(tmp_path_factory):
    """A server whose requests may wait 10 s, or less where a request asks for less."""
    root = fake_repository(tmp_path_factory.mktemp("patient"), delay_ms=100, queue_timeout_s=10)
    with running_server(model_repository=str(root)) as running:
        yield running


def busy(server, requests: int = 2) -> list[threading.Thread]:
    """Occupy the network for ~1.6 s (requests of 8 images each, 0.1 s per image)."""
    def one():
        client = triton.InferenceServerClient(server.address)
        client.infer(MODEL, [image_input(*[sample_bytes("bus")] * 8)], client_timeout=120)

    workers = [threading.Thread(target=one, daemon=True) for _ in range(requests)]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    return workers


def test_requests_past_the_queue_timeout_are_answered_at_once_and_never_run(short_queue):
    server = short_queue
    bus = sample_bytes("bus")
    before = server.server.ledger.totals(MODEL)
    outcomes: queue.Queue = queue.Queue()

    def one():
        client = triton.InferenceServerClient(server.address)
        start = time.monotonic()
        try:
            client.infer(MODEL, [image_input(bus)])
            outcomes.put(("ok", time.monotonic() - start, ""))
        except InferenceServerException as exc:
            outcomes.put((exc.status(), time.monotonic() - start, exc.message()))
        finally:
            client.close()

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    results = [outcomes.get_nowait() for _ in range(8)]
    late = [r for r in results if r[0] == "StatusCode.DEADLINE_EXCEEDED"]
    served = [r for r in results if r[0] == "ok"]
    assert late and served and len(late) + len(served) == 8, results
    assert all("past instance_segmentation's queue timeout of 0.30 s" in m and "not run" in m
               for _, _, m in late)
    after = server.server.ledger.totals(MODEL)
    assert after.queue_timeouts - before.queue_timeouts == len(late)
    assert after.images - before.images == len(served)  # the late ones never reached the model
    assert after.requests_failed["deadline_exceeded"] - before.requests_failed["deadline_exceeded"] == len(late)
    client = triton.InferenceServerClient(server.address)
    assert client.infer(MODEL, [image_input(bus)]).as_numpy("NUM_DETECTIONS")[0, 0] == 3
    client.close()


def test_a_request_may_ask_for_a_shorter_timeout(patient_queue):
    client = triton.InferenceServerClient(patient_queue.address)
    assert client.is_server_live()  # connected before timing
    workers = busy(patient_queue)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        # Another input shape than the busy work's, so it cannot join their batches.
        client.infer(MODEL, [image_input(sample_bytes("portrait"))], timeout=50_000)  # 50 ms
    answered_after = time.monotonic() - start
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "queue timeout of 0.05 s" in info.value.message()
    assert answered_after < 1.0  # at its deadline, long before the ~1.6 s of busy work ends
    assert all(w.is_alive() for w in workers)
    for w in workers:
        w.join(120)
    client.close()


def test_a_grpc_deadline_is_honoured_in_the_queue(patient_queue):
    before = patient_queue.server.ledger.totals(MODEL).images
    workers = busy(patient_queue)
    client = triton.InferenceServerClient(patient_queue.address)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [image_input(sample_bytes("portrait"))], client_timeout=0.3)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    for w in workers:
        w.join(120)
    # Never run: the network saw the busy work's 16 images and not this one. (Whether the
    # queue's timer or gRPC's own cancellation answered it first is a race; either way.)
    assert patient_queue.server.ledger.totals(MODEL).images == before + 16
    client.close()


# ------------------------------------------------------------------ faults inside a batch


@pytest.fixture(scope="module")
def fails_on_portraits(tmp_path_factory):
    """A network that raises on 256-wide inputs (portraits, at its 320 scale)."""
    root = fake_repository(tmp_path_factory.mktemp("faulty"), fails_on_width=256)
    with running_server(model_repository=str(root)) as running:
        yield running


def test_a_failing_batch_fails_only_its_requests_and_the_next_batch_runs(fails_on_portraits):
    client = triton.InferenceServerClient(fails_on_portraits.address)
    for _ in range(2):
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [image_input(sample_bytes("portrait"))])  # 240x320 -> 256x320
        assert info.value.status() == "StatusCode.INTERNAL"
        assert "fake_seg failed on a batch of 1" in info.value.message()
        assert "cannot run 256-wide inputs" in info.value.message()
        doc = json.loads(client.infer(MODEL, [image_input(sample_bytes("landscape"))])
                         .as_numpy("DETECTIONS")[0, 0])  # 320x240 -> 320x256: fine
        assert {p["class"] for p in doc["predictions"]} == {"red", "blue"}
    client.close()


# ------------------------------------------------------------------ one client's share


def test_requests_in_flight_per_client_are_capped(slow_root):
    with running_server(model_repository=str(slow_root), max_in_flight_per_client=1) as server:
        answers: queue.Queue = queue.Queue()
        client = triton.InferenceServerClient(server.address)
        client.start_stream(callback=lambda result, error: answers.put(error))
        for i in range(3):
            client.async_stream_infer(MODEL, [image_input(sample_bytes("coffee"))], request_id=str(i))
        errors = [answers.get(timeout=120) for _ in range(3)]
        client.stop_stream()
        refused = [e for e in errors if e is not None]
        assert errors[0] is None and len(refused) == 2
        assert all(e.message().startswith("RESOURCE_EXHAUSTED: this client already has 1 "
                                          "requests in flight") for e in refused)
        assert client.infer(MODEL, [image_input(sample_bytes("coffee"))]).as_numpy("DETECTIONS") is not None
        client.close()


def test_a_second_connection_gives_a_client_no_larger_share(slow_root):
    """The cap is per client address, not per TCP connection: a request held on one
    connection counts against the same client's request on another."""
    with running_server(model_repository=str(slow_root), max_in_flight_per_client=1) as server:
        first, second = (triton.InferenceServerClient(server.address) for _ in range(2))
        answers: queue.Queue = queue.Queue()
        first.async_infer(MODEL, [image_input(*[sample_bytes("coffee")] * 8)],
                          callback=lambda result, error: answers.put(error))
        time.sleep(0.2)  # the first connection's request is in flight (0.8 s of network)
        with pytest.raises(InferenceServerException, match="this client already has 1 requests"):
            second.infer(MODEL, [image_input(sample_bytes("coffee"))])
        assert answers.get(timeout=60) is None
        assert second.infer(MODEL, [image_input(sample_bytes("coffee"))]).as_numpy("DETECTIONS") is not None
        first.close()
        second.close()


def test_the_bytes_in_flight_are_bounded_server_wide(slow_root):
    """Memory is bounded in bytes: a raw frame that would take the requests in flight past
    --max-bytes-in-flight-mb is refused at once, and served once the others are answered."""
    with running_server(model_repository=str(slow_root), max_bytes_in_flight_mb=1,
                        max_message_mb=1) as server:
        frame = np.zeros((1, 360, 480, 3), np.uint8)  # 0.5 MB
        raw = triton.InferInput("IMAGE", list(frame.shape), "UINT8")
        raw.set_data_from_numpy(frame)
        clients = [triton.InferenceServerClient(server.address) for _ in range(2)]
        answers: queue.Queue = queue.Queue()
        busy_frame = triton.InferInput("IMAGE", [4, 240, 360, 3], "UINT8")
        busy_frame.set_data_from_numpy(np.zeros((4, 240, 360, 3), np.uint8))  # 1.0 MB, 0.4 s
        clients[0].async_infer(MODEL, [busy_frame], callback=lambda result, error: answers.put(error))
        time.sleep(0.15)
        with pytest.raises(InferenceServerException, match="MB of requests in flight") as info:
            clients[1].infer(MODEL, [raw])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert answers.get(timeout=60) is None
        assert clients[1].infer(MODEL, [raw]).as_numpy("DETECTIONS") is not None
        for client in clients:
            client.close()


def test_streams_per_client_are_capped(fake_root):
    with running_server(model_repository=str(fake_root), max_streams_per_client=1) as server:
        release = threading.Event()

        def slow_frames():
            yield vpb.Frame(stream_id="a", frame_index=0, encoded=sample_bytes("coffee"))
            release.wait(60)

        with grpc.insecure_channel(server.address) as channel:
            stub = video_pb2_grpc.VideoSegmentationStub(channel)
            first = stub.StreamFrames(slow_frames())
            assert not next(first).error  # the first stream is open and served
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamFrames(iter([vpb.Frame(stream_id="b", encoded=sample_bytes("coffee"))])))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 streams" in info.value.details()
            release.set()
            list(first)
            second = list(stub.StreamFrames(iter([vpb.Frame(stream_id="c", encoded=sample_bytes("coffee"))])))
            assert len(second) == 1 and not second[0].error  # the slot came back
