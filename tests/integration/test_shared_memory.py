"""Triton's system shared-memory extension with the REAL tritonclient (gRPC and HTTP) and real
POSIX shared memory, as tritonclient's own shared-memory examples use it: frames read from a
region answer exactly what the same frames sent in the message answer, outputs written to a
region equal the ones sent back, and every misuse gets its own clear status while the server
keeps serving."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc

from ..fakes import scene
from .conftest import running_server

MODEL = "instance_segmentation"
FRAME = scene(240, 320, red=(20, 40, 100, 120), blue=(200, 100, 300, 200))[None]  # (1, H, W, 3)


@pytest.fixture(scope="module")
def shared_server(fake_root):
    with running_server(model_repository=str(fake_root), allow_shared_memory=True,
                        max_shared_memory_regions=4) as running:
        yield running


@pytest.fixture(scope="module")
def client(shared_server):
    c = triton.InferenceServerClient(shared_server.address)
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture(scope="module")
def rest(shared_server):
    c = triton_http.InferenceServerClient(f"127.0.0.1:{shared_server.server.http_port}")
    yield c
    c.close()


@pytest.fixture
def region():
    """A fresh region (name, key, handle) of the frame's size, holding the frame; unregistered
    by the test, destroyed after it."""
    name = f"frame_{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region(name, f"/{name}", FRAME.nbytes)
    shm.set_shared_memory_region(handle, [FRAME])
    yield name, f"/{name}", handle
    shm.destroy_shared_memory_region(handle)


def raw_input(module=triton) -> triton.InferInput:
    tensor = module.InferInput("IMAGE", list(FRAME.shape), "UINT8")
    tensor.set_data_from_numpy(FRAME)
    return tensor


def shared_input(name: str, module=triton, byte_size: int = FRAME.nbytes, offset: int = 0):
    tensor = module.InferInput("IMAGE", list(FRAME.shape), "UINT8")
    tensor.set_shared_memory(name, byte_size, offset)
    return tensor


def detections(result) -> list[dict]:
    return [json.loads(d[0]) for d in result.as_numpy("DETECTIONS")]


def status_code(error: InferenceServerException) -> str:
    return (error.status() or "").replace("StatusCode.", "")


def test_a_frame_in_shared_memory_answers_as_the_frame_in_the_message(client, region):
    name, key, _ = region
    client.register_system_shared_memory(name, key, FRAME.nbytes)
    from_memory = detections(client.infer(MODEL, [shared_input(name)]))
    from_message = detections(client.infer(MODEL, [raw_input()]))
    assert [p["class"] for p in from_memory[0]["predictions"]] == ["red", "blue"]
    for a, b in zip(from_memory[0]["predictions"], from_message[0]["predictions"], strict=True):
        assert a["rle"] == b["rle"] and a["class"] == b["class"]
    client.unregister_system_shared_memory(name)


def test_outputs_are_written_to_the_region_the_request_names(client, region):
    """BOXES and RLE_COUNTS in a second region: byte-equal to the ones sent back in the
    message; the outputs still in the message keep their contents (DETECTIONS)."""
    name, key, _ = region
    out_name = f"out_{uuid.uuid4().hex[:8]}"
    out = shm.create_shared_memory_region(out_name, f"/{out_name}", 4096)
    try:
        client.register_system_shared_memory(name, key, FRAME.nbytes)
        client.register_system_shared_memory(out_name, f"/{out_name}", 4096)
        boxes = triton.InferRequestedOutput("BOXES")
        boxes.set_shared_memory(out_name, 1024)
        counts = triton.InferRequestedOutput("RLE_COUNTS")
        counts.set_shared_memory(out_name, 3072, offset=1024)
        wanted = [triton.InferRequestedOutput("DETECTIONS"), boxes, counts]
        result = client.infer(MODEL, [shared_input(name)], outputs=wanted)
        sent = client.infer(MODEL, [raw_input()], outputs=[triton.InferRequestedOutput(n)
                                                           for n in ("BOXES", "RLE_COUNTS")])
        shape = list(result.get_output("BOXES").shape)
        assert shape == [1, 2, 4]
        assert np.array_equal(shm.get_contents_as_numpy(out, np.float32, shape), sent.as_numpy("BOXES"))
        written = shm.get_contents_as_numpy(out, np.object_, list(result.get_output("RLE_COUNTS").shape),
                                            offset=1024)
        assert written.tolist() == sent.as_numpy("RLE_COUNTS").tolist()
        assert [p["class"] for p in detections(result)[0]["predictions"]] == ["red", "blue"]
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(out)


def test_http_registers_reads_and_writes_regions_too(rest, client, region):
    """tritonclient.http: register, infer from a region, output to one, status, unregister.
    A region registered over HTTP is the same server's: gRPC sees it."""
    name, key, _ = region
    out_name = f"out_{uuid.uuid4().hex[:8]}"
    out = shm.create_shared_memory_region(out_name, f"/{out_name}", 1024)
    try:
        rest.register_system_shared_memory(name, key, FRAME.nbytes)
        rest.register_system_shared_memory(out_name, f"/{out_name}", 1024)
        assert {r["name"]: r for r in rest.get_system_shared_memory_status()}[name] == {
            "name": name, "key": key, "offset": 0, "byte_size": FRAME.nbytes}
        assert name in client.get_system_shared_memory_status().regions
        boxes = triton_http.InferRequestedOutput("BOXES")
        boxes.set_shared_memory(out_name, 1024)
        result = rest.infer(MODEL, [shared_input(name, triton_http)],
                            outputs=[triton_http.InferRequestedOutput("DETECTIONS", binary_data=False), boxes])
        sent = client.infer(MODEL, [raw_input()], outputs=[triton.InferRequestedOutput("BOXES")])
        shape = result.get_output("BOXES")["shape"]
        assert np.array_equal(shm.get_contents_as_numpy(out, np.float32, shape), sent.as_numpy("BOXES"))
        assert [p["class"] for p in detections(result)[0]["predictions"]] == ["red", "blue"]
        rest.unregister_system_shared_memory(name)
        assert [r["name"] for r in rest.get_system_shared_memory_status()] == [out_name]
        with pytest.raises(InferenceServerException, match="no shared memory region"):
            rest.infer(MODEL, [shared_input(name, triton_http)])
    finally:
        rest.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(out)
    assert rest.get_system_shared_memory_status() == []


def test_status_and_unregister_as_triton_has_them(client, region):
    name, key, _ = region
    client.register_system_shared_memory(name, key, FRAME.nbytes - 6, offset=6)
    (status,) = client.get_system_shared_memory_status(name).regions.values()
    assert (status.name, status.key, status.offset, status.byte_size) == (name, key, 6, FRAME.nbytes - 6)
    assert "system_shared_memory" in client.get_server_metadata().extensions
    client.unregister_system_shared_memory("never-registered")  # no error, as Triton's
    client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status().regions
    with pytest.raises(InferenceServerException) as missing:
        client.get_system_shared_memory_status(name)
    assert status_code(missing.value) == "NOT_FOUND"


@pytest.mark.parametrize(("case", "code", "words"), [
    ("registered twice", "ALREADY_EXISTS", "already registered"),
    ("unknown region", "NOT_FOUND", "no shared memory region"),
    ("window past the region", "INVALID_ARGUMENT", "do not fit region"),
    ("byte size not the shape's", "INVALID_ARGUMENT", "needs 230400 bytes"),
    ("region past the object", "INVALID_ARGUMENT", "does not fit object"),
    ("no such object", "NOT_FOUND", "no shared memory object"),
    ("key with a path", "INVALID_ARGUMENT", "not a path"),
    ("key of dots", "INVALID_ARGUMENT", "not a path"),
    ("key through a link", "INVALID_ARGUMENT", "cannot open"),
    ("output region too small", "INVALID_ARGUMENT", "cannot hold it"),
    ("data and a region", "INVALID_ARGUMENT", "carries data too"),
    ("raw contents and a region", "INVALID_ARGUMENT", "1 raw_input_contents for 0 inputs"),
    ("CUDA region", "UNAVAILABLE", "CUDA shared memory is not offered"),
])
def test_misuse_gets_a_clear_status_and_the_server_keeps_serving(client, region, tmp_path, case, code,
                                                                  words):
    name, key, _ = region
    client.register_system_shared_memory(name, key, FRAME.nbytes)
    link = Path("/dev/shm") / f"link_{uuid.uuid4().hex[:8]}"
    link.symlink_to(Path("/dev/shm") / key.lstrip("/"))
    small = triton.InferRequestedOutput("DETECTIONS")
    small.set_shared_memory(name, 8)
    doubled, extra_raw = shared_input(name), shared_input(name)  # what hand-made messages carry
    doubled._input.contents.uint_contents.extend([1, 2, 3])
    extra_raw._raw_content = FRAME.tobytes()
    calls = {
        "registered twice": lambda: client.register_system_shared_memory(name, key, FRAME.nbytes),
        "unknown region": lambda: client.infer(MODEL, [shared_input("nowhere")]),
        "window past the region": lambda: client.infer(MODEL, [shared_input(name, offset=6)]),
        "byte size not the shape's": lambda: client.infer(MODEL, [shared_input(name, byte_size=1000)]),
        "region past the object": lambda: client.register_system_shared_memory("big", key, FRAME.nbytes + 1),
        "no such object": lambda: client.register_system_shared_memory("gone", "/no_such_key_x", 8),
        "key with a path": lambda: client.register_system_shared_memory("p", "/../../etc/passwd", 8),
        "key of dots": lambda: client.register_system_shared_memory("p", "..", 8),
        "key through a link": lambda: client.register_system_shared_memory("p", link.name, 8),
        "output region too small": lambda: client.infer(MODEL, [shared_input(name)], outputs=[small]),
        "data and a region": lambda: client.infer(MODEL, [doubled]),
        "raw contents and a region": lambda: client.infer(MODEL, [extra_raw]),
        "CUDA region": lambda: client.register_cuda_shared_memory("c", base64.b64encode(b"handle"), 0, 8),
    }
    try:
        with pytest.raises(InferenceServerException) as refused:
            calls[case]()
    finally:
        link.unlink()
    assert status_code(refused.value) == code, refused.value
    assert words in refused.value.message()
    assert detections(client.infer(MODEL, [shared_input(name)]))[0]["predictions"]
    client.unregister_system_shared_memory()


def test_more_regions_than_the_bound_are_refused(client, region):
    name, key, _ = region
    for i in range(4):
        client.register_system_shared_memory(f"{name}-{i}", key, FRAME.nbytes)
    with pytest.raises(InferenceServerException) as refused:
        client.register_system_shared_memory(f"{name}-4", key, FRAME.nbytes)
    assert status_code(refused.value) == "RESOURCE_EXHAUSTED" and "limit is 4" in refused.value.message()
    client.unregister_system_shared_memory()


def test_a_region_that_shrinks_fails_that_request_only(client, region):
    """The client truncates the object under a registered region: a copy from it would
    fault the server (SIGBUS); the size check answers INVALID_ARGUMENT instead."""
    name, key, handle = region
    client.register_system_shared_memory(name, key, FRAME.nbytes)
    other = f"other_{uuid.uuid4().hex[:8]}"
    intact = shm.create_shared_memory_region(other, f"/{other}", FRAME.nbytes)
    shm.set_shared_memory_region(intact, [FRAME])
    try:
        client.register_system_shared_memory(other, f"/{other}", FRAME.nbytes)
        os.truncate(Path("/dev/shm") / key.lstrip("/"), 100)
        with pytest.raises(InferenceServerException, match="shrank below region") as failed:
            client.infer(MODEL, [shared_input(name)])
        assert status_code(failed.value) == "INVALID_ARGUMENT"
        assert detections(client.infer(MODEL, [shared_input(other)]))[0]["predictions"]
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(intact)


def test_video_frames_from_a_region(shared_server, client, region):
    """The typed video API's SharedImage: two frames at two offsets of one region, answered
    in order with what the raw frames get."""
    name, key, handle = region
    two = f"two_{uuid.uuid4().hex[:8]}"
    pair = shm.create_shared_memory_region(two, f"/{two}", 2 * FRAME.nbytes)
    flipped = np.ascontiguousarray(FRAME[:, :, ::-1])
    shm.set_shared_memory_region(pair, [FRAME, flipped])
    _, h, w, _ = FRAME.shape
    try:
        client.register_system_shared_memory(two, f"/{two}", 2 * FRAME.nbytes)
        stub = video_pb2_grpc.VideoSegmentationStub(client._channel)
        frames = [vpb.Frame(stream_id="s", frame_index=i, shared=vpb.SharedImage(
            region=two, offset=i * FRAME.nbytes, height=h, width=w)) for i in range(2)]
        raw = [vpb.Frame(stream_id="r", frame_index=i, raw=vpb.RawImage(
            height=h, width=w, rgb=image.tobytes())) for i, image in enumerate([FRAME, flipped])]
        shared_results = list(stub.StreamFrames(iter(frames)))
        raw_results = list(stub.StreamFrames(iter(raw)))
        assert [r.error for r in shared_results] == ["", ""]
        for a, b in zip(shared_results, raw_results, strict=True):
            assert [(d.x1, d.x2, d.rle.counts) for d in a.detections] == [
                (d.x1, d.x2, d.rle.counts) for d in b.detections]
        assert shared_results[0].detections[0].x1 != shared_results[1].detections[0].x1  # flipped
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(pair)


def test_shared_memory_is_off_by_default(server):
    """Without --allow-shared-memory registering answers UNAVAILABLE, saying how to turn it on,
    and the extension is not listed."""
    c = triton.InferenceServerClient(server.address)
    try:
        with pytest.raises(InferenceServerException) as refused:
            c.register_system_shared_memory("r", "/anything", 8)
        assert status_code(refused.value) == "UNAVAILABLE"
        assert "--allow-shared-memory" in refused.value.message()
        assert "system_shared_memory" not in c.get_server_metadata().extensions
    finally:
        c.close()


def test_http_misuse_gets_triton_errors(rest, shared_server):
    """Over HTTP the same rules answer with statuses and {"error": ...} bodies."""
    import urllib.error
    import urllib.request

    with pytest.raises(InferenceServerException, match="CUDA shared memory is not offered"):
        rest.register_cuda_shared_memory("c", base64.b64encode(b"handle"), 0, 8)
    assert rest.get_cuda_shared_memory_status() == []
    url = f"http://127.0.0.1:{shared_server.server.http_port}/v2/systemsharedmemory/region/r/register"
    for body, status, words in [(b'{"byte_size": 8}', 400, "needs ['key']"),
                                (b'{"key": "/a/b", "byte_size": 8}', 400, "not a path"),
                                (b'[1]', 400, "JSON object")]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=10)
        assert refused.value.code == status
        assert words in json.loads(refused.value.read())["error"]
    assert rest.is_server_ready()
