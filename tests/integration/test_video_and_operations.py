"""The typed video API (order, errors, flow control) and the operational surface: health,
reflection, bearer token, TLS, drain. On the fake network (``tests/fakes.py``)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc

from ..fakes import png, scene
from .conftest import running_server


def small_frames():
    """A frame (PNG) with a green object, and its pixels."""
    rgb = scene(240, 320, green=(100, 60, 260, 220))
    return png(rgb), rgb


def stream(channel, frames, timeout=300):
    stub = video_pb2_grpc.VideoSegmentationStub(channel)
    return list(stub.StreamFrames(iter(frames), timeout=timeout))


def test_video_stream_in_order_with_a_bad_frame_in_the_middle(server):
    jpeg, rgb = small_frames()
    frames = [
        vpb.Frame(stream_id="cam-1", frame_index=0, timestamp=0.0, encoded=jpeg),
        vpb.Frame(stream_id="cam-1", frame_index=1, timestamp=0.04, encoded=b"garbage"),
        vpb.Frame(stream_id="cam-1", frame_index=2, timestamp=0.08,
                  raw=vpb.RawImage(height=rgb.shape[0], width=rgb.shape[1], rgb=rgb.tobytes())),
        vpb.Frame(stream_id="cam-1", frame_index=3, timestamp=0.12, encoded=jpeg,
                  options=vpb.InferOptions(confidence=0.9)),
    ]
    with grpc.insecure_channel(server.address) as channel:
        results = stream(channel, frames)
    assert [r.frame_index for r in results] == [0, 1, 2, 3]
    assert all(r.stream_id == "cam-1" for r in results)
    assert [r.timestamp for r in results] == [0.0, 0.04, 0.08, 0.12]
    assert results[1].error.startswith("INVALID_ARGUMENT") and not results[1].detections
    ok = results[0]
    assert not ok.error and not ok.dropped and (ok.height, ok.width) == rgb.shape[:2]
    (green,) = ok.detections
    assert green.class_name == "green" and list(green.rle.size) == [ok.height, ok.width]
    assert (green.x1, green.y1, green.x2, green.y2) == (100, 60, 260, 220) and green.rle.counts
    assert [d.rle.counts for d in results[2].detections] == [green.rle.counts]  # raw RGB too
    assert all(d.score > 0.9 for d in results[3].detections)


def test_wait_policy_never_drops(server):
    jpeg, _ = small_frames()
    frames = [vpb.Frame(stream_id="s", frame_index=i, encoded=jpeg) for i in range(5)]
    with grpc.insecure_channel(server.address) as channel:
        results = stream(channel, frames)
    assert [r.frame_index for r in results] == list(range(5))
    assert not any(r.dropped or r.error for r in results)


def test_video_client_leaving_mid_stream(server):
    jpeg, _ = small_frames()
    with grpc.insecure_channel(server.address) as channel:
        stub = video_pb2_grpc.VideoSegmentationStub(channel)
        call = stub.StreamFrames(iter([vpb.Frame(stream_id="gone", frame_index=i, encoded=jpeg)
                                       for i in range(12)]))
        first = next(call)
        call.cancel()  # the client goes away with frames still queued
    assert first.frame_index == 0
    with grpc.insecure_channel(server.address) as channel:
        results = stream(channel, [vpb.Frame(stream_id="next", frame_index=0, encoded=jpeg)])
    assert [r.frame_index for r in results] == [0] and not results[0].error
    deadline = time.monotonic() + 60
    while server.server.state.active and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.server.state.active == 0  # the abandoned stream was cleaned up


def secure_channel(guarded, with_token=True):
    running, cert = guarded
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    if with_token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials("s3cret"))
    return grpc.secure_channel(f"localhost:{running.server.grpc_port}", credentials)


def test_drop_oldest_reports_every_dropped_frame_in_order(guarded):
    jpeg, _ = small_frames()
    frames = [vpb.Frame(stream_id="live", frame_index=i, encoded=jpeg) for i in range(8)]
    with secure_channel(guarded) as channel:
        results = stream(channel, frames)
    assert [r.frame_index for r in results] == list(range(8))  # one result per frame, in order
    dropped = [r.frame_index for r in results if r.dropped]
    served = [r.frame_index for r in results if not r.dropped]
    assert dropped, "a window of 1 fed 8 frames at once must drop some"
    assert served[0] == 0 and served[-1] == 7  # the newest frame is never the one dropped
    assert all(not r.error for r in results)
    running, _ = guarded
    _, _, frames_dropped = running.server.ledger.snapshot()
    assert frames_dropped >= len(dropped)


def test_token_and_tls(guarded):
    running, cert = guarded
    url = f"localhost:{running.server.grpc_port}"
    client = triton.InferenceServerClient(url, ssl=True, root_certificates=_write(cert))
    with pytest.raises(InferenceServerException) as info:
        client.is_server_live()
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "bearer token" in info.value.message()
    assert client.is_server_live(headers={"authorization": "Bearer s3cret"})
    with pytest.raises(InferenceServerException):
        client.is_server_live(headers={"authorization": "Bearer wrong"})
    client.close()
    # Probes carry no token: health stays open.
    with secure_channel(guarded, with_token=False) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _write(data: bytes) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile(delete=False, suffix=".crt")
    f.write(data)
    f.close()
    return f.name


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "rleserving.v1.VideoSegmentation",
            "grpc.health.v1.Health"} <= services


def test_health_serving_then_not_serving_while_draining(fake_root):
    with running_server(model_repository=str(fake_root)) as running:
        with grpc.insecure_channel(running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "inference.GRPCInferenceService", "rleserving.v1.VideoSegmentation"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                    health_pb2.HealthCheckResponse.SERVING
            running.server.state.draining = True  # what drain() sets first
            client = triton.InferenceServerClient(running.address)
            assert not client.is_server_ready()
            jpeg, _ = small_frames()
            tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[jpeg]], dtype=object))
            with pytest.raises(InferenceServerException) as info:
                client.infer("instance_segmentation", [tensor])
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            client.close()
            running.call(running.server._health.enter_graceful_shutdown())
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
        running.call(running.server.drain(grace_s=1))
        time.sleep(0.1)
