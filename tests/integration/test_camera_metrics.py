"""Prometheus' view of the camera streams, from a real server in-process (the fake network):
``rle_serving_camera_streams{model,state,code}``, every stream counted by the state and error
code its status shows until it is removed, and ``rle_serving_sink_messages_total{kind,outcome}``,
what the sinks delivered and dropped, which outlives the streams. The streams are real: files
decoded by FFmpeg, a camera on a port nothing listens on; the sinks post to real HTTP
receivers, one of which refuses every message."""

from __future__ import annotations

import socket

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cameras.source_errors import CONNECTION_FAILED

from ..brokers import WebhookReceiver
from ..cameras import scene_clip
from ..conftest import wait_until
from .conftest import http, running_server

MODEL = "instance_segmentation"  # the fake repository's pipeline
FRAMES = 30  # scene_clip's: 3 s at 10 fps


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics-clips")
    scene_clip(folder / "scene.mp4")
    scene_clip(folder / "long.mp4", seconds=60)  # live for longer than the test
    return folder


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LABELS = {"rle_serving_camera_streams": ("model", "state", "code"),
          "rle_serving_sink_messages_total": ("kind", "outcome")}


def scraped(server, name: str) -> dict[tuple, float]:
    """The samples of ``name`` that the server's /metrics renders now, by their labels' values."""
    text = requests.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).text
    return {tuple(s.labels[label] for label in LABELS[name]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def status(server, stream_id: str) -> dict:
    return http(server, "GET", f"/v1/streams/{stream_id}")[1]


def test_streams_by_state_and_code_and_sink_messages_by_outcome(fake_root, clips):
    with WebhookReceiver() as taking, WebhookReceiver() as refusing, running_server(
            model_repository=str(fake_root), stream_source_dir=str(clips), allow_stream_urls=True,
            stream_url_allow=("127.0.0.1",)) as server:
        refusing.fail_next(10 * FRAMES, 400)  # a 4xx: each message refused, dropped and counted
        for body in ({"stream_id": "kept", "source": "scene.mp4", "realtime": False, "sinks": [taking.url()]},
                     {"stream_id": "refused", "source": "scene.mp4", "realtime": False, "sinks": [refusing.url()]},
                     {"stream_id": "off", "source": f"rtsp://127.0.0.1:{closed_port()}/cam"},
                     {"stream_id": "live", "source": "long.mp4"}):
            added, answer = http(server, "POST", "/v1/streams", body)
            assert added == 201, answer
        wait_until(lambda: status(server, "kept")["state"] == "stopped"
                   and status(server, "kept")["sinks"][0]["delivered"] == FRAMES, 30)
        wait_until(lambda: status(server, "refused")["state"] == "stopped"
                   and status(server, "refused")["sinks"][0]["dropped"] == FRAMES, 30)
        wait_until(lambda: status(server, "off")["error_code"] == CONNECTION_FAILED, 20)
        wait_until(lambda: status(server, "live")["frames_out"] > 0, 20)
        assert http(server, "POST", "/v1/streams/live/pause")[0] == 200

        streams = scraped(server, "rle_serving_camera_streams")
        assert streams == {(MODEL, "stopped", ""): 2, (MODEL, "reconnecting", CONNECTION_FAILED): 1,
                           (MODEL, "paused", ""): 1}, streams
        assert scraped(server, "rle_serving_sink_messages_total") == {
            ("webhook", "delivered"): FRAMES, ("webhook", "dropped"): FRAMES}
        assert len(taking.bodies) == FRAMES

        assert http(server, "POST", "/v1/streams/live/resume")[0] == 200
        assert scraped(server, "rle_serving_camera_streams")[MODEL, "running", ""] == 1
        for stream_id in ("kept", "refused", "off", "live"):
            assert http(server, "DELETE", f"/v1/streams/{stream_id}")[0] == 200
        assert scraped(server, "rle_serving_camera_streams") == {}  # removed: counted no more
        assert scraped(server, "rle_serving_sink_messages_total") == {  # their sinks' totals stay
            ("webhook", "delivered"): FRAMES, ("webhook", "dropped"): FRAMES}
