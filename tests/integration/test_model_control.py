"""Model control, Triton's repository extension, with the official tritonclient (gRPC and HTTP):
explicit loading, a failed load that leaves the serving version alone, a reload under a
running stream that loses no frame, networks unloaded with their pipelines, the refusals."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc

from ..fakes import NETWORK, PIPELINE, fake_repository, png, scene
from .conftest import running_server

PICTURE = png(scene(240, 320, red=(20, 40, 100, 120), blue=(200, 100, 300, 200)))


def detections(client, model=PIPELINE) -> list[dict]:
    tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[PICTURE]], dtype=object))
    return json.loads(client.infer(model, [tensor]).as_numpy("DETECTIONS")[0, 0])["predictions"]


def refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def a_second_pipeline(root, name="other"):
    text = (root / PIPELINE / "config.pbtxt").read_text().replace(f'name: "{PIPELINE}"', f'name: "{name}"')
    (root / name).mkdir(exist_ok=True)
    (root / name / "config.pbtxt").write_text(text)


def set_max_detections(root, n: int, model=PIPELINE):
    config = root / model / "config.pbtxt"
    text = config.read_text().split('parameters { key: "max_detections"')[0]
    config.write_text(text + f'parameters {{ key: "max_detections" value: {{ string_value: "{n}" }} }}\n')


@pytest.fixture()
def explicit(tmp_path):
    """A server in explicit mode over a fake repository of two pipelines, one loaded at start."""
    root = fake_repository(tmp_path / "models", delay_ms=20)
    a_second_pipeline(root)
    with running_server(model_repository=str(root), model_control_mode="explicit",
                        load_model=(PIPELINE,)) as server:
        client = triton.InferenceServerClient(server.address)
        yield server, client, root
        client.close()


def test_explicit_mode_loads_what_it_is_told_and_the_rest_on_request(explicit):
    server, client, root = explicit
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {PIPELINE: "READY", "other": "UNAVAILABLE", NETWORK: "UNAVAILABLE"}
    error = refused(lambda: detections(client, "other"))
    assert error.status() == "StatusCode.UNAVAILABLE" and "not loaded" in error.message()
    client.load_model("other")
    assert client.is_model_ready("other") and len(detections(client, "other")) == 2
    rest = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    rest.unload_model("other")  # over HTTP too
    assert not rest.is_model_ready("other")
    error = refused(lambda: detections(client, "other"))
    assert error.status() == "StatusCode.UNAVAILABLE" and "'other' is unloaded" in error.message()
    rest.load_model("other")
    assert len(detections(client, "other")) == 2
    rest.close()


def test_a_load_that_fails_leaves_the_serving_version_serving(explicit):
    server, client, root = explicit
    network = root / NETWORK / "1" / "model.pt"
    saved = network.read_bytes()
    network.write_bytes(b"not a network")
    error = refused(lambda: client.load_model(PIPELINE))
    assert "model.pt: not a loadable TorchScript file" in error.message()
    assert len(detections(client)) == 2  # the version that was serving still is
    network.write_bytes(saved)
    set_max_detections(root, 1)
    client.load_model(PIPELINE)  # the fixed repository, with a new default
    assert len(detections(client)) == 1
    error = refused(lambda: client.load_model("nope"))
    assert error.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in error.message()
    error = refused(lambda: client.load_model(PIPELINE, config='{"max_batch_size": 2}'))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "config.pbtxt" in error.message()


def frames(count: int, pause: threading.Event | None = None):
    for i in range(count):
        if pause is not None and i == count // 3:
            pause.set()  # a third of the stream is sent: the test reloads now
        yield vpb.Frame(stream_id="cam", frame_index=i, encoded=PICTURE)
        time.sleep(0.01)


def test_reloading_while_a_stream_runs_loses_no_frame(explicit):
    server, client, root = explicit
    started, results = threading.Event(), []

    def watch():
        with grpc.insecure_channel(server.address) as channel:
            stub = video_pb2_grpc.VideoSegmentationStub(channel)
            results.extend(stub.StreamFrames(frames(60, started), timeout=120))

    viewer = threading.Thread(target=watch)
    viewer.start()
    assert started.wait(60)
    set_max_detections(root, 1)
    client.load_model(PIPELINE)  # mid-stream: the old version finishes what it accepted
    viewer.join(120)
    assert [r.frame_index for r in results] == list(range(60))
    assert not any(r.error or r.dropped for r in results)
    assert len(results[0].detections) == 2 and len(results[-1].detections) == 1  # the new one took over
    error = refused(lambda: client.unload_model("nope"))
    assert error.status() == "StatusCode.NOT_FOUND"


def test_a_model_a_stream_uses_is_not_unloaded_until_the_stream_ends(explicit):
    server, client, root = explicit
    release = threading.Event()

    def held_open():
        yield vpb.Frame(stream_id="s", frame_index=0, encoded=PICTURE)
        release.wait(30)

    with grpc.insecure_channel(server.address) as channel:
        stream = video_pb2_grpc.VideoSegmentationStub(channel).StreamFrames(held_open())
        assert not next(stream).error
        error = refused(lambda: client.unload_model(PIPELINE))
        assert error.status() == "StatusCode.FAILED_PRECONDITION"
        assert f"'{PIPELINE}' is in use by 1 open stream(s)" in error.message()
        release.set()
        list(stream)
    client.unload_model(PIPELINE)
    assert not client.is_model_ready(PIPELINE)


def test_a_network_unloaded_takes_its_pipelines_with_it_saying_why(explicit):
    server, client, root = explicit
    client.unload_model(NETWORK)
    error = refused(lambda: detections(client))
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert f"its network '{NETWORK}' is unloaded" in error.message()
    client.load_model(NETWORK)  # back, with the pipelines that use it
    assert len(detections(client)) == 2


def test_mode_none_serves_everything_and_refuses_changes(tmp_path):
    root = fake_repository(tmp_path / "models")
    a_second_pipeline(root)
    with running_server(model_repository=str(root)) as server:
        client = triton.InferenceServerClient(server.address)
        assert client.is_model_ready(PIPELINE) and client.is_model_ready("other")
        error = refused(lambda: client.unload_model("other"))
        assert error.status() == "StatusCode.FAILED_PRECONDITION"
        assert "--model-control-mode explicit" in error.message()
        assert client.is_model_ready("other")
        client.close()


def test_a_broken_model_in_the_repository_is_named_and_the_rest_serves(explicit):
    server, client, root = explicit
    shutil.copytree(root / NETWORK, root / "broken_net")
    (root / "broken_net" / "config.pbtxt").write_text(
        (root / NETWORK / "config.pbtxt").read_text().replace(f'"{NETWORK}"', '"broken_net"')
        .replace("dims: [ -1, 40 ]", "dims: [ -1, 41 ]"))
    a_second_pipeline(root, "uses_broken")
    config = root / "uses_broken" / "config.pbtxt"
    config.write_text(config.read_text().replace(f'string_value: "{NETWORK}"', 'string_value: "broken_net"'))
    error = refused(lambda: client.load_model("uses_broken"))
    assert "broken_net/config.pbtxt" in error.message() and "output[0].dims" in error.message()
    assert len(detections(client)) == 2
