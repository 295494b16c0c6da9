"""SIGTERM with cameras running, against a real server process: every source stops, the
frames already read are answered, each sink delivers what it holds (a webhook that was
failing gets its backlog) within the grace period, and the process exits 0."""

from __future__ import annotations

import re
import signal
import time

import requests

from pipeline.tools.launch import local_server

from ..brokers import WebhookReceiver
from ..cameras import scene_clip
from ..fakes import fake_repository

GRACE_S = 20


def test_sigterm_with_cameras_running_flushes_every_sink_and_exits_zero(tmp_path):
    repository = fake_repository(tmp_path / "models", delay_ms=20)
    clips = tmp_path / "clips"
    clips.mkdir()
    scene_clip(clips / "scene.mp4", seconds=10)
    log = tmp_path / "server.log"
    with WebhookReceiver() as hook:
        with local_server("--model-repository", str(repository), "--device", "cpu",
                          "--stream-source-dir", str(clips), "--grace-period-s", str(GRACE_S),
                          http=True, log=log.open("w")) as server:
            base = f"http://127.0.0.1:{server.http_port}/v1/streams"
            for name in ("one", "two"):
                added = requests.post(base, json={"source": "scene.mp4", "stream_id": name,
                                                  "sinks": [hook.url(f"/{name}")]}, timeout=10)
                assert added.status_code == 201, added.text
            deadline = time.monotonic() + 30
            while len(hook.bodies) < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            hook.fail_next(4)  # a backlog for the drain to flush (retried with back-off)
            time.sleep(0.5)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(GRACE_S + 10) == 0
            assert time.monotonic() - started < GRACE_S
    text = log.read_text()
    for name in ("one", "two"):
        line = re.search(rf"camera stream {name} stopped: (\d+) results; sinks: (\d+) delivered, "
                         rf"(\d+) dropped, (\d+) left", text)
        assert line, text[-3000:]
        results, delivered, dropped, left = map(int, line.groups())
        assert results > 0 and delivered == results and dropped == left == 0
        received = [body["frame_index"] for body in hook.bodies if body["stream_id"] == name]
        assert len(received) == delivered and received == sorted(received)
