"""Tracking through the server on a clip cut from a synthetic world (the fake network's
coloured objects, ``tests/fakes.py``): the video API's ``track`` option, KServe sequences with
the official tritonclient, and the bounds."""

from __future__ import annotations

import json
import queue
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc

from ..fakes import scene
from .conftest import running_server

MODEL = "instance_segmentation"
# A camera's world, wider than its view: blue at the left edge leaves the view as the camera
# pans right and comes back as it pans back; red and green stay in view throughout.
WORLD = scene(240, 560, blue=(4, 80, 44, 130), red=(225, 10, 315, 100), green=(225, 130, 315, 220))


def pan(f: int, frames: int = 24, step: int = 20) -> int:
    """The crop's left edge at frame f: right for half the clip, then back."""
    return step * (f if f < frames // 2 else frames - 1 - f)


def panned_clip(frames: int = 24, width: int = 320):
    """A camera panning right across the world and back: objects move 20 pixels per frame,
    and blue, at the world's left edge, leaves the view and comes back."""
    return [np.ascontiguousarray(WORLD[:, pan(f, frames) : pan(f, frames) + width]) for f in range(frames)]


def box_iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def frames_for(clip, dropped=(), stream_id="walk"):
    for index, rgb in enumerate(clip):
        if index in dropped:
            continue  # never sent: a gap in time, as drop_oldest leaves
        yield vpb.Frame(stream_id=stream_id, frame_index=index, timestamp=index / 10,
                        raw=vpb.RawImage(height=rgb.shape[0], width=rgb.shape[1], rgb=rgb.tobytes()),
                        options=vpb.InferOptions(track=True, frame_rate=10))


def detections(result):
    return [((d.x1, d.y1, d.x2, d.y2), d.class_name, d.tracker_id) for d in result.detections]


def test_tracked_video_keeps_ids_for_moving_objects_and_frees_its_state(server):
    clip = panned_clip()
    with grpc.insecure_channel(server.address) as channel:
        stub = video_pb2_grpc.VideoSegmentationStub(channel)
        results = list(stub.StreamFrames(frames_for(clip, dropped={5, 6, 17}), timeout=600))
    assert [r.frame_index for r in results] == [i for i in range(len(clip)) if i not in {5, 6, 17}]
    assert all(not r.error for r in results)
    assert all(d.HasField("tracker_id") for r in results for d in r.detections)
    switches, matched = 0, 0
    for previous, current in zip(results, results[1:]):
        shift = pan(current.frame_index) - pan(previous.frame_index)  # the camera's move
        ids = [t for _, _, t in detections(current) if t >= 0]
        assert len(ids) == len(set(ids)), "two objects share an id"
        for box, name, tracker_id in detections(current):
            for old_box, old_name, old_id in detections(previous):
                moved = [old_box[0] - shift, old_box[1], old_box[2] - shift, old_box[3]]
                if name == old_name and tracker_id >= 0 and old_id >= 0 and box_iou(box, moved) > 0.6:
                    matched += 1
                    switches += tracker_id != old_id
    assert matched >= 30 and switches == 0, (matched, switches)
    greens = {t for r in results[1:] for _, name, t in detections(r) if name == "green"}
    assert len(greens) == 1 and min(greens) >= 0  # in view throughout: one id, gaps and all
    blues = [{t for _, name, t in detections(r) if name == "blue" and t >= 0} for r in results]
    # Blue, at the world's left edge, leaves the view mid-pan and comes back: tracked again.
    away = [i for i, ids in enumerate(blues) if not ids]
    assert blues[1] and away and blues[-1]
    assert len(server.server.state.tracks) == 0  # the stream's tracker went with it


def test_untracked_video_has_no_tracker_ids(server):
    rgb = panned_clip()[0]
    frame = vpb.Frame(stream_id="plain", raw=vpb.RawImage(height=rgb.shape[0], width=rgb.shape[1],
                                                         rgb=rgb.tobytes()))
    with grpc.insecure_channel(server.address) as channel:
        (result,) = video_pb2_grpc.VideoSegmentationStub(channel).StreamFrames(iter([frame]))
    assert result.detections and not any(d.HasField("tracker_id") for d in result.detections)


def bytes_input(rgb: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [1, *rgb.shape], "UINT8")
    tensor.set_data_from_numpy(rgb[None])
    return tensor


def test_sequences_with_the_official_tritonclient_share_a_tracker(server):
    clip = panned_clip(frames=8)
    client = triton.InferenceServerClient(server.address)
    docs, tensors = [], []
    for i, rgb in enumerate(clip):
        result = client.infer(MODEL, [bytes_input(rgb)], sequence_id=4242, sequence_start=i == 0,
                              sequence_end=i == len(clip) - 1)
        docs.append(json.loads(result.as_numpy("DETECTIONS")[0, 0]))
        tensors.append(result.as_numpy("TRACKER_IDS"))
    assert all("tracker_id" in p for d in docs for p in d["predictions"])
    for doc, ids in zip(docs, tensors):  # the typed output carries the same ids
        assert ids[0, : len(doc["predictions"])].tolist() == [p["tracker_id"] for p in doc["predictions"]]
    red_ids = {p["tracker_id"] for d in docs[1:] for p in d["predictions"] if p["class"] == "red"}
    assert len(red_ids) == 1 and min(red_ids) >= 0
    assert len(server.server.state.tracks) == 0  # sequence_end freed it
    plain = client.infer(MODEL, [bytes_input(clip[0])])  # no sequence id: nothing changes
    assert plain.as_numpy("TRACKER_IDS") is None
    assert "tracker_id" not in json.loads(plain.as_numpy("DETECTIONS")[0, 0])["predictions"][0]
    client.close()


def test_a_sequence_over_kserve_rest_with_tritonclient_http(server):
    import tritonclient.http as http_client

    clip = panned_clip(frames=5)
    client = http_client.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    ids = []
    for i, rgb in enumerate(clip):
        tensor = http_client.InferInput("IMAGE", [1, *rgb.shape], "UINT8")
        tensor.set_data_from_numpy(rgb[None], binary_data=True)
        result = client.infer(MODEL, [tensor], sequence_id=9, sequence_start=i == 0,
                              sequence_end=i == len(clip) - 1)
        doc = json.loads(result.as_numpy("DETECTIONS")[0, 0])
        assert result.as_numpy("TRACKER_IDS")[0, : len(doc["predictions"])].tolist() == \
            [p["tracker_id"] for p in doc["predictions"]]
        ids.append({p["tracker_id"] for p in doc["predictions"] if p["class"] == "red"})
    client.close()
    assert len(set().union(*ids[1:])) == 1 and min(set().union(*ids[1:])) >= 0
    assert len(server.server.state.tracks) == 0


def test_a_sequence_over_a_kserve_stream(server):
    clip = panned_clip(frames=6)
    answers: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(server.address)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i, rgb in enumerate(clip):
        client.async_stream_infer(MODEL, [bytes_input(rgb)], request_id=str(i), sequence_id=77,
                                  sequence_start=i == 0, sequence_end=i == len(clip) - 1)
    got = [answers.get(timeout=300) for _ in clip]
    client.stop_stream()
    client.close()
    assert all(error is None for _, error in got)
    docs = [json.loads(r.as_numpy("DETECTIONS")[0, 0]) for r, _ in got]
    reds = {p["tracker_id"] for d in docs[1:] for p in d["predictions"] if p["class"] == "red"}
    assert len(reds) == 1 and min(reds) >= 0


def test_too_many_tracked_streams_is_a_clear_error(fake_root):
    rgb = panned_clip()[0]
    with running_server(model_repository=str(fake_root), max_tracked_streams=1) as small:
        client = triton.InferenceServerClient(small.address)
        client.infer(MODEL, [bytes_input(rgb)], sequence_id=1, sequence_start=True)
        with pytest.raises(triton.InferenceServerException) as info:
            client.infer(MODEL, [bytes_input(rgb)], sequence_id=2, sequence_start=True)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "1 tracked streams are live (the limit is 1)" in info.value.message()
        client.infer(MODEL, [bytes_input(rgb)], sequence_id=1, sequence_end=True)  # frees it
        client.infer(MODEL, [bytes_input(rgb)], sequence_id=2, sequence_start=True)
        client.close()


# ------------------------------------------------------------------ no hang, no lock-out


@pytest.fixture(scope="module")
def slow_server(slow_root):
    """The fake network at ~100 ms per image, so requests overlap."""
    with running_server(model_repository=str(slow_root), max_tracked_streams=4,
                        max_tracked_streams_per_client=3) as running:
        yield running


def test_a_sequence_restarted_while_its_request_runs_answers_both(slow_server):
    """sequence_start with the id of a sequence whose request is still in flight: the old
    request is answered (without ids: its tracker is gone), never left waiting."""
    rgb = panned_clip()[0]
    client = triton.InferenceServerClient(slow_server.address)
    answers: queue.Queue = queue.Queue()
    for i in range(3):  # three sequences start with one id while the first still runs
        client.async_infer(MODEL, [bytes_input(rgb)], request_id=str(i), sequence_id=5,
                           sequence_start=True, callback=lambda result, error: answers.put((result, error)))
    got = [answers.get(timeout=20) for _ in range(3)]
    assert all(error is None for _, error in got), [str(e) for _, e in got]
    result = client.infer(MODEL, [bytes_input(rgb)], sequence_id=5, sequence_end=True, client_timeout=20)
    assert result.as_numpy("TRACKER_IDS") is not None
    assert len(slow_server.server.state.tracks) == 0
    client.close()


def test_two_video_streams_with_one_stream_id_do_not_stall_each_other(slow_server):
    """Stream ids are the stream call's own: one call ending frees its tracker, not the one
    another call (same id) is using mid-stream."""
    clip = panned_clip(frames=12)
    results: dict[str, list] = {}

    def watch(name: str, frames: int):
        with grpc.insecure_channel(slow_server.address) as channel:
            stub = video_pb2_grpc.VideoSegmentationStub(channel)
            results[name] = list(stub.StreamFrames(frames_for(clip[:frames], stream_id="cam"), timeout=30))

    threads = [threading.Thread(target=watch, args=("long", 12)), threading.Thread(target=watch, args=("short", 3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert [len(results.get(name, ())) for name in ("long", "short")] == [12, 3]
    assert not any(r.error for name in results for r in results[name])
    reds = {d.tracker_id for r in results["long"][1:] for d in r.detections if d.class_name == "red"}
    assert len(reds) == 1 and min(reds) >= 0  # its tracker was never restarted by the other


def test_garbage_with_fresh_sequence_ids_does_not_lock_tracking_out(slow_server):
    """Unreadable images under distinct sequence ids hold no tracker; a client's share of the
    table is capped (3 of 4 here: another address keeps a place, see the unit tests)."""
    rgb = panned_clip()[0]
    client = triton.InferenceServerClient(slow_server.address)
    garbage = triton.InferInput("IMAGE", [1, 1], "BYTES")
    garbage.set_data_from_numpy(np.array([[b"not an image"]], dtype=object))
    for sequence in range(1000, 1040):
        with pytest.raises(triton.InferenceServerException) as info:
            client.infer(MODEL, [garbage], sequence_id=sequence, sequence_start=True, client_timeout=20)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert len(slow_server.server.state.tracks) == 0
    for sequence in (1, 2, 3):
        client.infer(MODEL, [bytes_input(rgb)], sequence_id=sequence, sequence_start=True, client_timeout=20)
    with pytest.raises(triton.InferenceServerException) as info:
        client.infer(MODEL, [bytes_input(rgb)], sequence_id=4, sequence_start=True, client_timeout=20)
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "this client has 3 tracked streams live (the limit per client is 3)" in info.value.message()
    for sequence in (1, 2, 3):
        client.infer(MODEL, [bytes_input(rgb)], sequence_id=sequence, sequence_end=True, client_timeout=20)
    assert len(slow_server.server.state.tracks) == 0
    client.close()
