"""SIGTERM under load, counted: 8 video streams and unary requests against a real server
process (on the fake network, 50 ms of busy work per image: ``tests/fakes.py``). Every request the server read gets its result or a clear UNAVAILABLE, in order;
what it did not read is covered by the stream ending UNAVAILABLE; health turns NOT_SERVING
at once; the process exits 0 within its grace period."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc
from pipeline.tools.launch import local_server

from ..conftest import ROOT
from ..fakes import fake_repository, png, scene

STREAMS = 8
GRACE_S = 30
FRAME = png(scene(240, 320, green=(100, 60, 260, 220)))


class VideoStream(threading.Thread):
    """A camera: sends frames until the server ends the stream; records every answer."""

    def __init__(self, address: str, name: str, frame: bytes):
        super().__init__(daemon=True)
        self.address, self.name, self.frame = address, name, frame
        self.sent = 0
        self.results: list[vpb.FrameResult] = []
        self.status: grpc.StatusCode | None = None
        self.details = ""

    def frames(self):
        while True:
            yield vpb.Frame(stream_id=self.name, frame_index=self.sent, encoded=self.frame)
            self.sent += 1
            time.sleep(0.02)

    def run(self):
        with grpc.insecure_channel(self.address) as channel:
            stub = video_pb2_grpc.VideoSegmentationStub(channel)
            try:
                for result in stub.StreamFrames(self.frames(), timeout=120):
                    self.results.append(result)
                self.status = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                self.status, self.details = exc.code(), exc.details() or ""


def test_sigterm_under_load_answers_everything_read_and_exits_zero(tmp_path):
    # Queue timeouts off the table (30 s), so every answer here is the drain's doing.
    repository = fake_repository(tmp_path / "models", delay_ms=50, queue_timeout_s=30)
    log = tmp_path / "server.log"
    with local_server("--model-repository", str(repository), "--device", "cpu",
                      "--grace-period-s", str(GRACE_S), "--stream-window", "2",
                      log=log.open("w"), cwd=ROOT) as server:
        address, process = server.address, server.process
        streams = [VideoStream(address, f"camera-{i}", FRAME) for i in range(STREAMS)]
        for s in streams:
            s.start()
        unary: dict[str, object] = {}

        def one_unary(key):
            client = triton.InferenceServerClient(address)
            tensor = triton.InferInput("IMAGE", [2, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[FRAME]] * 2, dtype=object))
            try:
                unary[key] = client.infer("instance_segmentation", [tensor]).as_numpy("NUM_DETECTIONS")
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                unary[key] = exc

        loaded = time.monotonic() + 60  # under load: every stream served and sending more
        while not all(len(s.results) >= 2 for s in streams) and time.monotonic() < loaded:
            time.sleep(0.05)
        assert all(len(s.results) >= 2 for s in streams), [len(s.results) for s in streams]
        callers = [threading.Thread(target=one_unary, args=(k,)) for k in ("a", "b")]
        for c in callers:
            c.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)

        with grpc.insecure_channel(address) as channel:  # health goes NOT_SERVING at once
            health = health_pb2_grpc.HealthStub(channel)
            status = None
            while time.monotonic() - signalled < 2:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - signalled < 1.0
            # The pod is draining, not hung: a liveness probe must not restart it meanwhile.
            alive = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=1).status
            assert alive == health_pb2.HealthCheckResponse.SERVING

        for s in streams:
            s.join(GRACE_S + 30)
        for c in callers:
            c.join(GRACE_S + 30)
        code = process.wait(GRACE_S + 30)
        took = time.monotonic() - signalled
    assert code == 0 and took < GRACE_S
    text = log.read_text()
    assert "draining" in text and "stopped" in text
    # The unary requests accepted before the signal got their answers.
    assert all(isinstance(unary[k], np.ndarray) and unary[k].shape == (2, 1) for k in "ab"), \
        {k: str(v) for k, v in unary.items()}
    for s in streams:
        indices = [r.frame_index for r in s.results]
        assert indices == list(range(len(indices))), s.name  # every frame read, in order
        served = [r for r in s.results if not r.error]
        refused = [r for r in s.results if r.error]
        assert served, s.name
        assert all(r.error.startswith("UNAVAILABLE: server is shutting down") for r in refused)
        # Whatever the server did not read is covered by the stream ending UNAVAILABLE.
        assert s.status == grpc.StatusCode.UNAVAILABLE and "reconnect" in s.details, (s.status, s.details)
        assert s.sent >= len(s.results)
    # Frames waiting to start when the signal came were answered UNAVAILABLE, not dropped.
    assert sum(1 for s in streams for r in s.results if r.error) > 0
