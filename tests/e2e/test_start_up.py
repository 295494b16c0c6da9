"""Start-up as a real process meets it. The ports open before the models load: while a slow
model loads, liveness says yes and readiness no (so a liveness probe never kills a loading
pod), then readiness turns yes once every model is loaded and warmed. A server that cannot
start says why in one line and exits 2, having undone what it started: no traceback from a
half-started gRPC server after the message."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from pipeline.frontends.server import INFERENCE_SERVICE, LIVENESS_SERVICE, VIDEO_SERVICE
from pipeline.tools.launch import PROMPT_RECONNECT, free_port

from ..conftest import ROOT
from ..fakes import PIPELINE, fake_repository, png, scene

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def serve(repository, grpc_port: int, http_port: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--model-repository", str(repository),
         "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
         "--metrics-port", "0", "--device", "cpu"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)


def test_a_port_in_use_or_a_model_that_cannot_load_is_one_clear_line_and_exit_2(tmp_path):
    repository = fake_repository(tmp_path / "models")
    broken = fake_repository(tmp_path / "broken")
    (broken / "fake_seg/1/model.pt").write_bytes(b"not a network")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        starts = {}
        for taken in ("http", "grpc", None):  # side by side; None: the ports are free, the model broken
            ports = {"grpc": free_port(), "http": free_port()}
            if taken:
                ports[taken] = busy
            starts[taken] = serve(repository if taken else broken, ports["grpc"], ports["http"],
                                  subprocess.PIPE)
        ended = {taken: (process.wait(120), process.stderr.read()) for taken, process in starts.items()}
    for taken, (code, stderr) in ended.items():
        assert code == 2, stderr
        # Ours (INFO lines) and gRPC's C core's own log ("E1130 12:00:00.000 ... add_port.cc")
        # aside, one line: no traceback, nothing about an event loop or a coroutine afterwards.
        lines = [ln for ln in stderr.splitlines()
                 if not ln.startswith("INFO ") and not re.match(r"[EWI]\d{4} ", ln)]
        if taken:
            what = "HTTP" if taken == "http" else "gRPC"
            assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen for {what} on 127.0.0.1:{busy}"), stderr
        else:  # it had listened: it was loading when the model failed
            assert "listening for gRPC" in stderr, stderr
            assert len(lines) == 1 and lines[0].startswith("error: ") and \
                "model.pt: not a loadable TorchScript file" in lines[0], stderr


def slow_repository(root):
    """The fake network at half a second a frame (a small CPU's real network's pace), its
    batch size measured at load: the load takes seconds of honest work."""
    repository = fake_repository(root, delay_ms=500)
    config = repository / PIPELINE / "config.pbtxt"
    config.write_text(config.read_text().replace('"calibrate_batch_size" value: { string_value: "false" }',
                                                 '"calibrate_batch_size" value: { string_value: "true" }'))
    return repository


def test_while_a_slow_model_loads_the_server_is_live_and_not_ready_then_ready(tmp_path):
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "server.log"
    process = serve(slow_repository(tmp_path / "models"), grpc_port, http_port, log.open("w"))
    address, http = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}/v2/health"
    client = triton.InferenceServerClient(address)
    image = triton.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[png(scene(red=(10, 20, 60, 90)))]], dtype=object))

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def observe(health) -> dict:
        """What every probe says now (ready last: what it says holds for all the rest)."""
        seen = {service: health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
                for service in (LIVENESS_SERVICE, INFERENCE_SERVICE, VIDEO_SERVICE)}
        seen.update(live=client.is_server_live(), http_live=status(f"{http}/live"),
                    model_ready=client.is_model_ready(PIPELINE), http_ready=status(f"{http}/ready"))
        try:
            seen["infer"] = client.infer(PIPELINE, [image]).as_numpy("NUM_DETECTIONS")[0, 0]
        except InferenceServerException as exc:
            seen["infer"] = (exc.status(), exc.message())
        seen.update(ready=client.is_server_ready(),
                    health=health.Check(health_pb2.HealthCheckRequest(), timeout=30).status)
        return seen

    try:
        with grpc.insecure_channel(address, PROMPT_RECONNECT) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            grpc.channel_ready_future(channel).result(timeout=120)  # the port is open
            history = [observe(health)]
            while history[-1]["health"] != SERVING:
                assert process.poll() is None, log.read_text()
                time.sleep(0.1)  # a probe's pace, not a busy loop beside the load it watches
                history.append(observe(health))
            ready = observe(health)
        loading = history[0]
        assert loading == {LIVENESS_SERVICE: SERVING, INFERENCE_SERVICE: NOT_SERVING,
                           VIDEO_SERVICE: NOT_SERVING, "live": True, "http_live": 200,
                           "model_ready": False, "http_ready": 400, "ready": False, "health": NOT_SERVING,
                           "infer": ("StatusCode.UNAVAILABLE",
                                     f"model '{PIPELINE}' is loading (the server is starting); retry shortly")}
        for seen in history:  # live throughout
            assert seen[LIVENESS_SERVICE] == SERVING and seen["live"] and seen["http_live"] == 200, seen
        readiness = [seen["ready"] for seen in history]
        assert readiness == sorted(readiness), history  # not ready, then ready for good
        assert ready == {LIVENESS_SERVICE: SERVING, INFERENCE_SERVICE: SERVING, VIDEO_SERVICE: SERVING,
                         "live": True, "http_live": 200, "model_ready": True, "http_ready": 200,
                         "infer": 1, "ready": True, "health": SERVING}, ready
    finally:
        client.close()
        process.terminate()
        process.wait(60)
    text = log.read_text()
    # The port was open before the load began its measuring, which took the seconds.
    assert text.index("listening for gRPC") < text.index("per-frame network time by batch size"), text
    assert f"model {PIPELINE} is READY" in text


def test_the_client_sends_nothing_to_a_replica_until_it_is_ready(tmp_path):
    """A listed replica that listens while it loads: the client library's channel watches each
    replica's health and sends calls only to SERVING ones (with retries off, a call sent to
    the loading one would fail UNAVAILABLE "loading"); once it is ready, it gets its share."""
    from clients import Backoff, SegmentationClient
    from pipeline.tools.launch import local_server

    frame = scene(120, 160, red=(10, 20, 60, 90))
    ready_port, loading_port, loading_http = free_port(), free_port(), free_port()
    with local_server("--model-repository", str(fake_repository(tmp_path / "fast")), "--device", "cpu",
                      port=ready_port):
        log = tmp_path / "loading.log"
        loading = serve(slow_repository(tmp_path / "slow"), loading_port, loading_http, log.open("w"))
        try:
            with SegmentationClient([f"127.0.0.1:{ready_port}", f"127.0.0.1:{loading_port}"],
                                    backoff=Backoff(attempts=0)) as client:
                with grpc.insecure_channel(f"127.0.0.1:{loading_port}", PROMPT_RECONNECT) as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    grpc.channel_ready_future(channel).result(timeout=120)  # listening, loading
                    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == NOT_SERVING
                    for _ in range(6):
                        assert client.infer(frame)["predictions"]  # none went to the loading one
                    while health.Check(health_pb2.HealthCheckRequest(), timeout=30).status != SERVING:
                        assert loading.poll() is None, log.read_text()
                        time.sleep(0.2)
                for _ in range(20):
                    assert client.infer(frame)["predictions"]
            stats = f"http://127.0.0.1:{loading_http}/v2/models/{PIPELINE}/stats"
            with urllib.request.urlopen(stats, timeout=30) as reply:
                served = json.loads(reply.read())["model_stats"][0]["inference_stats"]["success"]["count"]
            assert served > 0  # ready now: it gets its turn
        finally:
            loading.terminate()
            loading.wait(60)
