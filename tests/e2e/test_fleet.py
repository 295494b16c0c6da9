"""A fleet on 127.0.0.1: four replicas (``python -m pipeline serve`` processes; the fake
network, as the fleet's behaviour, not the model's, is under test and they share 2 cores),
eight video streams through the client library's round-robin over the four listed addresses.
Connections live 2 s (+1 s grace), so streams are cut and re-placed all along.

(b) a listed replica that starts after the client gets work within max connection age +
grace (+ the client's reconnect back-off); (a) kill -9 of one, a hang (SIGSTOP) of another:
the streams go on on the others within a bound; (c) SIGTERM of a third (drain). Through all
of it every frame of every stream is answered exactly once, in order, without an error.
Then the server's keepalive: clients' pings are accepted, and a client that stops answering
the server's is dropped."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import grpc

from clients.client import MAX_RECONNECT_BACKOFF_S, Backoff, SegmentationClient, to_frame
from pipeline.proto import video_pb2_grpc
from pipeline.tools.launch import free_port, local_server

from ..conftest import ROOT
from ..fakes import fake_repository, scene

REPLICAS = 4
STREAMS = 8
AGE_S, AGE_GRACE_S = 2, 1
KEEPALIVE_S = 1
FRAME = scene(120, 160, green=(20, 20, 80, 90))  # raw RGB: no decoding on 2 shared cores
# The client retries the absent address at least every MAX_RECONNECT_BACKOFF_S; gRPC jitters
# the age by up to +10%; a stream cut at the grace's end reconnects 0.2 s later; 2 s of slack.
JOIN_BOUND_S = MAX_RECONNECT_BACKOFF_S + AGE_S * 1.1 + AGE_GRACE_S + 2
MOVE_BOUND_S = 10  # a stream whose replica died or drained is answered again within this


class Camera(threading.Thread):
    """One stream through the shared client: a frame every 100 ms until told to stop; keeps
    every answer with the time it came."""

    def __init__(self, client: SegmentationClient, name: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.client, self.name, self.stop = client, name, stop
        self.sent = 0
        self.answers: list[tuple[float, object]] = []
        self.failure: Exception | None = None

    def frames(self):
        while not self.stop.is_set():
            self.sent += 1
            yield FRAME
            time.sleep(0.1)

    def run(self):
        try:
            for result in self.client.stream(self.frames(), stream_id=self.name):
                self.answers.append((time.monotonic(), result))
        except Exception as exc:  # noqa: BLE001 - asserted in the test
            self.failure = exc

    def answered_since(self, moment: float) -> bool:
        return bool(self.answers) and self.answers[-1][0] > moment


def metric(metrics_port: int, name: str) -> int:
    """A replica's Prometheus series ``name``, summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(sum(float(v) for v in re.findall(rf"^{name}\{{.*\}} (\S+)$", text, re.M)))


def served(metrics_port: int) -> int:
    """Requests the replica answered."""
    return metric(metrics_port, "nv_inference_request_success")


def within(condition, bound_s: float, what: str) -> float:
    """Seconds until ``condition()`` held; AssertionError naming ``what`` after ``bound_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < bound_s, f"{what}: not within {bound_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def replica(tmp_path: Path, name: str, metrics_port: int, *flags: str, port: int | None = None):
    """One replica on the fake network (in ``tmp_path/models``), small and single-threaded."""
    repository = tmp_path / "models"
    if not repository.exists():
        fake_repository(repository)
    return local_server("--model-repository", str(repository), "--device", "cpu",
                        "--worker-threads", "1", "--network-threads", "1", "--grace-period-s", "5",
                        "--metrics-port", str(metrics_port), *flags, port=port,
                        log=(tmp_path / f"{name}.log").open("w"), cwd=ROOT)


def test_streams_spread_and_survive_a_kill_a_hang_and_a_drain_and_reach_a_joining_replica(tmp_path):
    ports = [free_port() for _ in range(REPLICAS)]
    metrics = [free_port() for _ in range(REPLICAS)]

    def member(i: int):
        return replica(tmp_path, f"replica-{i}", metrics[i], "--grpc-max-connection-age-s", str(AGE_S),
                       "--grpc-max-connection-age-grace-s", str(AGE_GRACE_S),
                       "--grpc-keepalive-s", str(KEEPALIVE_S), port=ports[i])

    counts: dict[str, int] = {}
    moved: dict[str, float] = {}
    stop = threading.Event()
    with ExitStack() as fleet:
        drained, killed, hung = (fleet.enter_context(member(i)) for i in range(3))
        # The fourth address is listed but not serving yet: it joins below.
        client = SegmentationClient([f"127.0.0.1:{p}" for p in ports], backoff=Backoff(0.2, 1.0, 30),
                                    keepalive_s=KEEPALIVE_S)
        fleet.callback(client.close)
        cameras = [Camera(client, f"camera-{i}", stop) for i in range(STREAMS)]
        for camera in cameras:
            camera.start()
        within(lambda: all(len(c.answers) >= 2 for c in cameras), 30, "every stream answered")

        # (b) A replica joins: connections re-made at their age reach it.
        fleet.enter_context(member(3))
        joined_in = within(lambda: served(metrics[3]) > 0, JOIN_BOUND_S, "the joining replica served")

        def take_out(i: int, how: str, action) -> None:
            """Once replica i is serving, ``action`` it; every stream is answered again soon."""
            before = served(metrics[i])
            within(lambda: served(metrics[i]) > before, 10, f"replica-{i} is serving")
            counts[f"replica-{i} (before {how})"] = served(metrics[i])
            action()
            gone = time.monotonic()
            moved[how] = within(lambda: all(c.answered_since(gone) for c in cameras), MOVE_BOUND_S,
                                f"every stream answered again after {how}")

        # (a) kill -9 one: its connections close; its streams move to the others.
        take_out(1, "kill -9", killed.process.kill)
        # A hung one (SIGSTOP: its connections stay open, silent): the client's keepalive
        # gives up on them and the streams move.
        take_out(2, "SIGSTOP", lambda: os.kill(hung.process.pid, signal.SIGSTOP))
        hung.process.kill()
        hung.process.wait()
        # (c) SIGTERM another: it drains; the joined replica takes every stream.
        take_out(0, "SIGTERM", lambda: drained.stop(30))
        assert drained.process.returncode == 0
        stop.set()
        for camera in cameras:
            camera.join(30)
        counts["replica-3 (joined; at the end)"] = served(metrics[3])
    print(f"per-replica requests served: {counts}; the joining replica served {joined_in:.1f} s "
          "after it was SERVING; every stream answered again, seconds after: "
          f"{ {how: round(s, 1) for how, s in moved.items()} }")
    for camera in cameras:
        assert not camera.is_alive() and camera.failure is None, (camera.name, camera.failure)
        results = [r for _, r in camera.answers]
        # Exactly once, in order: nothing lost, nothing repeated, through every cut.
        assert [r.frame_index for r in results] == list(range(camera.sent)), camera.name
        assert [r.error for r in results if r.error] == [] and not any(r.dropped for r in results)
        assert all(r.stream_id == camera.name and r.width == 160 for r in results)
    assert all(n > 0 for n in counts.values()), counts

# A camera that is answered once and then goes quiet; stopped, it answers no pings either.
QUIET_CAMERA = """
import sys, threading
import grpc, numpy as np
from clients.client import to_frame
from pipeline.proto import video_pb2_grpc

def frames():
    yield to_frame(np.zeros((120, 160, 3), np.uint8), "quiet", 0, None)
    threading.Event().wait()

answers = video_pb2_grpc.VideoSegmentationStub(grpc.insecure_channel(sys.argv[1])).StreamFrames(frames())
next(answers)
print("answered", flush=True)
threading.Event().wait()
"""


def test_keepalive_lets_clients_ping_and_drops_a_client_that_stops_answering(tmp_path):
    """--grpc-keepalive-s 1. A client pinging every 0.8 s keeps its idle stream (gRPC's default
    answers the third such ping GOAWAY too_many_pings, cutting the stream); a client process
    that stops answering pings (SIGSTOP) loses its stream within twice the keepalive."""
    metrics_port = free_port()
    with replica(tmp_path, "keepalive", metrics_port, "--grpc-keepalive-s", str(KEEPALIVE_S)) as server:
        options = [("grpc.keepalive_time_ms", 800), ("grpc.http2.max_pings_without_data", 0)]
        with grpc.insecure_channel(server.address, options=options) as channel:
            sending: queue.Queue = queue.Queue()
            answers = video_pb2_grpc.VideoSegmentationStub(channel).StreamFrames(
                iter(sending.get, None), timeout=30)
            sending.put(to_frame(FRAME, "pinging", 0, None))
            assert next(answers).frame_index == 0
            time.sleep(3.5)  # idle, no data either way: four pings
            sending.put(to_frame(FRAME, "pinging", 1, None))
            assert next(answers).frame_index == 1  # the same call, still open
            sending.put(None)
            assert list(answers) == []

        camera = subprocess.Popen([sys.executable, "-c", QUIET_CAMERA, server.address], cwd=ROOT,
                                  stdout=subprocess.PIPE)
        try:
            assert camera.stdout.readline() == b"answered\n"
            within(lambda: metric(metrics_port, "rle_serving_streams_open") == 1, 5,
                   "the quiet camera's stream is open")
            os.kill(camera.pid, signal.SIGSTOP)
            within(lambda: metric(metrics_port, "rle_serving_streams_open") == 0, 2 * KEEPALIVE_S + 3,
                   "the stopped camera's stream closed")
        finally:
            camera.kill()
            camera.wait()
