"""Cameras on the server, in-process, with real parts: a real RTSP server (GStreamer), HLS cut
by ffmpeg, real mosquitto and redis-server, a real HTTP receiver for webhooks, the real gRPC
and HTTP stacks. The network is the fake one (coloured blobs, milliseconds a frame), so the
clips of ``scene_clip`` give known detections; the real model's camera path is in the client
suite and the benchmark.

What is checked: every frame of a file reaches every sink, in order, with track ids, the same
detections an ``infer`` of the decoded frame gives; the gRPC API with subscribers, pause and
resume; a camera that dies and returns while another keeps its rate; a source that never
connects; a broker that goes away and comes back; removing a stream with frames in flight;
HLS; every kind of bad input, each a clear error with the server serving on; the token.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import av
import numpy as np
import pytest
import requests
from PIL import Image

from clients.client import ClientError, SegmentationClient
from pipeline.cameras.spec import StreamSpec
from pipeline.errors import AlreadyExistsError, LimitError

from ..brokers import Mosquitto, MqttSubscriber, RedisServer, WebhookReceiver, make_certificates, unavailable
from ..cameras import HlsServer, RtspServer, free_port, hls_unavailable, make_clip, rtsp_unavailable, scene_clip
from ..conftest import ROOT, holds_for, running_server
from .conftest import http as shared_http
from .conftest import remove_streams

TOKEN = "cam-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    scene_clip(folder / "scene.mp4")
    scene_clip(folder / "long.mp4", seconds=20)  # for a stream that must still run after a few seconds
    (folder / "notes.txt").write_text("not a video")
    return folder


@pytest.fixture(scope="module")
def cam_server(fake_root, clips):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips), allow_stream_urls=True,
                        stream_url_allow=("127.0.0.1",), max_ingest_streams=4, sink_buffer=5,
                        token=TOKEN) as running:
        yield running


@pytest.fixture
def cams(cam_server):
    """The camera server, its streams removed after each test, however it ended."""
    yield cam_server
    remove_all(cam_server)


def http(server, method: str, path: str, body=None, headers=AUTH):
    return shared_http(server, method, path, body, headers)


def wait_for(condition, timeout_s: float = 20.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come within {timeout_s} s")
        time.sleep(0.05)


def status(server, stream_id: str) -> dict:
    code, body = http(server, "GET", f"/v1/streams/{stream_id}")
    assert code == 200, body
    return body


def remove_all(server) -> None:
    remove_streams(server, AUTH)


def need(reason: str | None) -> None:
    if reason:
        pytest.skip(reason)


# ----------------------------------------------------------------------------- delivery


def test_every_frame_of_a_file_reaches_every_sink_in_order_with_track_ids(cams, clips):
    need(unavailable("/usr/sbin/mosquitto") or unavailable("redis-server"))
    with WebhookReceiver() as hook, Mosquitto() as broker, RedisServer() as redis_server, \
            MqttSubscriber(broker.port, "cameras/#") as mqtt:
        code, body = http(cams, "POST", "/v1/streams", {
            "source": "scene.mp4", "realtime": False, "track": True, "stream_id": "lobby",
            "sinks": [hook.url("/frames"), broker.url("cameras"), redis_server.url("frames:{stream_id}")]})
        assert code == 201, body
        assert body["stream_id"] == "lobby" and body["state"] in ("starting", "running")
        done = wait_for(lambda: (s := status(cams, "lobby"))["state"] == "stopped"
                        and s["sinks"][0]["delivered"] == 30 and s, what="the whole file, delivered")
        assert (done["frames_decoded"], done["frames_sampled"], done["frames_out"]) == (30, 30, 30)
        assert done["frames_dropped"] == 0 and done["frame_errors"] == 0  # realtime false: nothing dropped
        assert [sink["dropped"] for sink in done["sinks"]] == [0, 0, 0]  # by the sinks neither
        docs = list(hook.bodies)
        wait_for(lambda: len(mqtt.payloads()) == 30 and len(redis_server.entries("frames:lobby")) == 30,
                 what="MQTT and Redis deliveries")
        published, streamed = mqtt.payloads(), redis_server.entries("frames:lobby")
    assert [d["frame_index"] for d in docs] == list(range(30))
    assert [json.loads(p)["frame_index"] for p in published] == list(range(30))
    assert [json.loads(e["document"])["frame_index"] for e in streamed] == list(range(30))
    first = docs[0]
    assert first["stream_id"] == "lobby" and abs(first["timestamp"] - time.time()) < 120
    assert first["image"] == {"width": 320, "height": 192}
    red = [[p for p in d["predictions"] if p["class"] == "red"] for d in docs]
    assert all(len(r) == 1 for r in red)
    ids = [r[0]["tracker_id"] for r in red]
    assert len(set(ids) - {-1}) == 1 and ids.count(-1) <= 1  # one object, one id (from its second frame)
    assert all(p["rle"]["size"] == [192, 320] for d in docs for p in d["predictions"])
    # The frames went into the batcher as decoded, with no JPEG round trip: the same detections
    # (masks byte for byte) as an infer of the same decoded frame.
    frames = decoded_frames(clips / "scene.mp4")
    with SegmentationClient(cams.address, token=TOKEN) as client:
        for index in (0, 17, 29):
            alone = client.infer(frames[index])
            assert [(p["class"], p["rle"]) for p in docs[index]["predictions"]] == \
                [(p["class"], p["rle"]) for p in alone["predictions"]]
    assert http(cams, "DELETE", "/v1/streams/lobby")[0] == 200
    assert http(cams, "GET", "/v1/streams/lobby")[0] == 404


def test_the_grpc_api_adds_lists_pauses_resumes_subscribes_and_removes(cams):
    with SegmentationClient(cams.address, token=TOKEN) as client:
        added = client.add_stream("long.mp4", max_fps=5, stream_id="grpc-cam", confidence=0.3)
        assert added["max_fps"] == 5 and added["parameters"] == {"confidence": 0.3}
        pictures = client.subscribe("grpc-cam", frames=True)
        results = client.subscribe("grpc-cam")
        first = next(results)
        assert first.stream_id == "grpc-cam" and first.height == 192 and not first.frame_jpeg
        drawn = next(pictures)  # asked for frames: each comes with its frame
        assert np.asarray(Image.open(io.BytesIO(drawn.frame_jpeg))).shape == (192, 320, 3)
        pictures.close()
        assert {d.class_name for d in first.detections} == {"red", "blue"}
        assert first.detections[0].rle.size == [192, 320]
        assert [s["stream_id"] for s in client.streams()] == ["grpc-cam"]
        metrics = requests.get(f"http://127.0.0.1:{cams.server.metrics_port}/metrics", timeout=10).text
        assert 'rle_serving_streams_open{api="camera"} 1.0' in metrics  # the ingest streams gauge
        paused = client.pause_stream("grpc-cam")
        assert paused["state"] == "paused"
        # The frames already past the source when it paused still come out (one in the model,
        # one waiting its turn, one in the queue of one). Wait until they have: every frame
        # taken is answered, and two looks in a row (0.05 s apart) see nothing new taken or
        # decoded.
        looks: list[dict] = []

        def answered_and_still() -> dict | None:
            looks.append(look := client.get_stream("grpc-cam"))
            answered = look["frames_out"] + look["frames_dropped"] + look["frame_errors"] == look["frames_sampled"]
            still = len(looks) > 1 and all(looks[-2][key] == look[key] for key in ("frames_decoded", "frames_sampled"))
            return look if answered and still else None
        before = wait_for(answered_and_still, what="the frames in flight at the pause, answered")["frames_out"]
        # Nothing while paused: a bounded check, since no event says so (were the stream not
        # paused, its 5 fps would bring about 5 frames in this second).
        holds_for(lambda: client.get_stream("grpc-cam")["frames_out"] == before, 1.0, interval_s=0.05)
        client.resume_stream("grpc-cam")
        wait_for(lambda: client.get_stream("grpc-cam")["frames_out"] > before, what="frames after resume")
        removed = client.remove_stream("grpc-cam")
        assert removed["state"] == "stopped"
        assert len(list(results)) <= 64  # the subscription ends with the stream
        with pytest.raises(ClientError, match="NOT_FOUND"):
            client.get_stream("grpc-cam")


def test_a_camera_that_dies_and_returns_reconnects_while_the_others_keep_their_rate(cams):
    need(rtsp_unavailable())
    clip = make_clip(seconds=4, fps=10, size=(320, 192))
    with RtspServer({"a": clip}) as camera_a, RtspServer({"b": clip}) as camera_b:
        http(cams, "POST", "/v1/streams", {"source": camera_a.url("a"), "max_fps": 5, "stream_id": "a"})
        http(cams, "POST", "/v1/streams", {"source": camera_b.url("b"), "max_fps": 5, "stream_id": "b"})
        closed = f"rtsp://127.0.0.1:{free_port()}/nothing"
        code, body = http(cams, "POST", "/v1/streams", {"source": closed, "stream_id": "never"})
        assert code == 201, body
        wait_for(lambda: status(cams, "a")["state"] == "running" and status(cams, "b")["frames_out"] > 5,
                 what="both cameras running")
        camera_a.stop()
        down = wait_for(lambda: (s := status(cams, "a"))["state"] == "reconnecting" and s, what="reconnecting")
        assert down["last_error"]
        b_before, started = status(cams, "b")["frames_out"], time.monotonic()
        time.sleep(3)  # the scenario: camera b's rate is measured over these 3 s of a's outage
        b_rate = (status(cams, "b")["frames_out"] - b_before) / (time.monotonic() - started)
        assert b_rate > 3.5, b_rate  # ~5 a second: camera a's outage costs camera b nothing
        camera_a.start()
        a_before = status(cams, "a")["frames_out"]
        wait_for(lambda: status(cams, "a")["state"] == "running" and status(cams, "a")["frames_out"] > a_before + 3,
                 timeout_s=30, what="camera a back")
        never = status(cams, "never")
        assert never["state"] == "reconnecting" and never["last_error"] and never["frames_out"] == 0
        assert status(cams, "a")["reconnects"] >= 1
    remove_all(cams)


def test_a_broker_that_goes_away_keeps_the_newest_results_up_to_the_bound(cams):
    need(unavailable("/usr/sbin/mosquitto"))
    with Mosquitto() as broker:
        http(cams, "POST", "/v1/streams", {"source": "scene.mp4", "max_fps": 10, "stream_id": "mq",
                                           "sinks": [broker.url("cams")]})
        wait_for(lambda: status(cams, "mq")["sinks"][0]["delivered"] >= 2, what="first deliveries")
        broker.stop()
        gone = wait_for(lambda: (s := status(cams, "mq"))["sinks"][0]["dropped"] > 0 and s, what="drops",
                        timeout_s=30)
        assert gone["sinks"][0]["buffered"] <= 6  # --sink-buffer 5, plus the batch in flight (at 10 fps, one)
        broker.start()
        delivered = gone["sinks"][0]["delivered"]
        # "stopped" is the source's end; the frames read before it are still answered and sent.
        end = wait_for(lambda: (s := status(cams, "mq"))["state"] == "stopped" and s["sinks"][0]["buffered"] == 0
                       and s["sinks"][0]["delivered"] + s["sinks"][0]["dropped"] == s["frames_out"] and s,
                       what="every result delivered or counted dropped", timeout_s=30)
        final = end["sinks"][0]
        assert final["delivered"] > delivered and final["connected"]
    remove_all(cams)


def test_a_file_played_as_fast_as_possible_waits_for_a_sink_that_is_away_and_drops_nothing(cams):
    """realtime false drops nothing: while a sink's target is away the file waits with it
    (the server's --sink-buffer is 5), and a removal still ends the wait."""
    need(unavailable("redis-server"))
    redis_server = RedisServer()  # not started: both sinks' target is away
    try:
        for stream_id in ("late", "gone"):
            code, body = http(cams, "POST", "/v1/streams", {"source": "scene.mp4", "realtime": False,
                                                            "stream_id": stream_id,
                                                            "sinks": [redis_server.url("frames:{stream_id}")]})
            assert code == 201, body
        wait_for(lambda: all(status(cams, name)["sinks"][0]["retries"] >= 2 for name in ("late", "gone")),
                 what="retries")
        time.sleep(1.0)  # time enough to run the whole file, were it not waiting
        for name in ("late", "gone"):
            stalled = status(cams, name)
            assert stalled["state"] == "running" and stalled["frames_out"] < 30, stalled
            sink = stalled["sinks"][0]  # every result is held: the batch taken, and 5 waiting
            assert (sink["dropped"], sink["delivered"], sink["buffered"]) == (0, 0, stalled["frames_out"]), stalled
        started = time.monotonic()
        assert http(cams, "DELETE", "/v1/streams/gone")[0] == 200  # the wait ends; what is held is counted
        assert time.monotonic() - started < 10
        assert http(cams, "GET", "/v1/streams/gone")[0] == 404
        redis_server.start()
        done = wait_for(lambda: (s := status(cams, "late"))["state"] == "stopped"
                        and s["sinks"][0]["delivered"] >= 30 and s, what="the whole file, delivered", timeout_s=30)
        assert (done["frames_out"], done["frames_dropped"], done["sinks"][0]["dropped"]) == (30, 0, 0)
        indexes = [json.loads(entry["document"])["frame_index"] for entry in redis_server.entries("frames:late")]
        assert indexes == list(range(30))
        assert redis_server.entries("frames:gone") == []
    finally:
        redis_server.stop()
    remove_all(cams)


def test_a_slow_model_drops_the_oldest_frames_visibly_and_removing_a_stream_spares_the_others(slow_root, clips):
    with running_server(model_repository=str(slow_root), stream_source_dir=str(clips)) as slow:
        for name in ("x", "y"):
            assert http(slow, "POST", "/v1/streams", {"source": "long.mp4", "stream_id": name, "track": True},
                        headers={})[0] == 201
        # Two cameras of 10 fps and a network of 100 ms a frame: the oldest waiting frames
        # go, counted in the status and in Prometheus, and told to subscribers.
        with SegmentationClient(slow.address) as client:
            told = next(r for r in client.subscribe("y") if r.dropped)
        assert told.stream_id == "y" and not told.detections
        wait_for(lambda: http(slow, "GET", "/v1/streams/x", headers={})[1]["frames_out"] >= 2)
        assert http(slow, "GET", "/v1/streams/y", headers={})[1]["frames_dropped"] >= 1

        def every_drop_in_prometheus() -> bool:  # rle_serving_frames_dropped, read between two looks
            before = sum(http(slow, "GET", f"/v1/streams/{name}", headers={})[1]["frames_dropped"] for name in "xy")
            counted = slow.server.state.ledger.snapshot()[2]
            after = sum(http(slow, "GET", f"/v1/streams/{name}", headers={})[1]["frames_dropped"] for name in "xy")
            return before <= counted <= after
        wait_for(every_drop_in_prometheus, what="every dropped frame counted in Prometheus")
        started = time.monotonic()
        code, removed = http(slow, "DELETE", "/v1/streams/x", headers={})
        assert code == 200 and removed["state"] == "stopped" and time.monotonic() - started < 5
        y_before = http(slow, "GET", "/v1/streams/y", headers={})[1]["frames_out"]
        wait_for(lambda: http(slow, "GET", "/v1/streams/y", headers={})[1]["frames_out"] > y_before + 2)
        state = slow.server.state
        assert [key for key in state.tracks._tracks if key[0] == "camera/x"] == []  # its tracker is freed
        assert state.ledger.snapshot()[1].get("camera") == 1


def test_an_hls_playlist_plays_to_its_end(cams, clips):
    need(hls_unavailable())
    with HlsServer(clips / "scene.mp4") as hls:
        code, body = http(cams, "POST", "/v1/streams", {"source": hls.url, "stream_id": "hls"})
        assert code == 201, body
        done = wait_for(lambda: (s := status(cams, "hls"))["state"] == "stopped" and s, timeout_s=30)
    assert done["frames_decoded"] == 30 and done["frames_out"] >= 20  # live pace: a few may drop
    remove_all(cams)


def test_a_file_that_is_not_a_video_fails_visibly(cams):
    assert http(cams, "POST", "/v1/streams", {"source": "notes.txt", "stream_id": "notes"})[0] == 201
    failed = wait_for(lambda: (s := status(cams, "notes"))["state"] == "failed" and s)
    assert failed["last_error"]
    remove_all(cams)


# ----------------------------------------------------------------------------- bad input


BAD = [
    ({"source": "ftp://host/x.mp4"}, 400, "unknown source scheme"),
    ({"source": "../secret.mp4"}, 400, "outside the stream source directory"),
    ({"source": "/etc/hostname"}, 400, "outside the stream source directory"),
    ({"source": "scene.mp4", "max_fps": 0}, 400, "max_fps"),
    ({"source": "scene.mp4", "max_fps": 10000}, 400, "max_fps"),
    ({"source": "scene.mp4", "model": "nope"}, 404, "unknown model 'nope'"),
    ({"source": "scene.mp4", "sinks": ["amqp://broker/q"]}, 400, "amqp"),
    ({"source": "rtsp://10.1.2.3/cam"}, 400, "--stream-url-allow"),
    ({"source": "scene.mp4", "stream_id": "a/b"}, 400, "stream_id"),
    ("not an object", 400, "JSON object"),
]


@pytest.mark.parametrize("body, code, words", BAD)
def test_bad_streams_get_a_clear_error_and_nothing_else_stops(cams, body, code, words):
    answer = http(cams, "POST", "/v1/streams", body)
    assert answer[0] == code and words in answer[1]["error"], answer
    assert http(cams, "GET", "/v1/streams")[1] == {"streams": []}
    with SegmentationClient(cams.address, token=TOKEN) as client:
        assert client.infer(np.full((64, 96, 3), 128, np.uint8))["predictions"] == []


def test_the_same_mistakes_over_grpc_get_the_same_status(cams):
    with SegmentationClient(cams.address, token=TOKEN) as client:
        for call, status_name in ((lambda: client.add_stream("ftp://h/x"), "INVALID_ARGUMENT"),
                                  (lambda: client.add_stream("scene.mp4", model="nope"), "NOT_FOUND"),
                                  (lambda: client.get_stream("missing"), "NOT_FOUND"),
                                  (lambda: client.remove_stream("missing"), "NOT_FOUND"),
                                  (lambda: client.pause_stream("missing"), "NOT_FOUND"),
                                  (lambda: next(client.subscribe("missing")), "NOT_FOUND")):
            with pytest.raises(ClientError, match=status_name):
                call()


def test_unknown_streams_limits_duplicates_and_the_token(cams):
    for method, path in (("GET", "/v1/streams/missing"), ("DELETE", "/v1/streams/missing"),
                         ("POST", "/v1/streams/missing/pause")):
        code, body = http(cams, method, path)
        assert code == 404 and "no camera stream 'missing'" in body["error"]
    assert http(cams, "GET", "/v1/streams", headers={})[0] == 401
    with pytest.raises(ClientError, match="UNAUTHENTICATED"):
        SegmentationClient(cams.address).streams()
    for i in range(4):
        assert http(cams, "POST", "/v1/streams", {"source": "scene.mp4", "stream_id": f"s{i}"})[0] == 201
    code, body = http(cams, "POST", "/v1/streams", {"source": "scene.mp4"})
    assert code == 429 and "--max-ingest-streams" in body["error"]
    with pytest.raises(ClientError, match="RESOURCE_EXHAUSTED"):
        SegmentationClient(cams.address, token=TOKEN).add_stream("scene.mp4")
    http(cams, "DELETE", "/v1/streams/s3")
    code, body = http(cams, "POST", "/v1/streams", {"source": "scene.mp4", "stream_id": "s0"})
    assert code == 409 and "exists already" in body["error"]
    remove_all(cams)


def test_a_server_without_camera_flags_pulls_nothing(server):
    for source, flag in (("scene.mp4", "--stream-source-dir"), ("rtsp://cam.example/1", "--allow-stream-urls")):
        code, body = http(server, "POST", "/v1/streams", {"source": source}, headers={})
        assert code == 400 and flag in body["error"]


def test_the_readme_example_runs(cams):
    """docs/cameras.md's request (the README's "Cameras on the server" shows the same one),
    pointed at this test's camera and broker."""
    need(rtsp_unavailable() or unavailable("/usr/sbin/mosquitto"))

    def request(page):
        text = (ROOT / page).read_text()
        section = text[text.index("# Cameras on the server"):]
        return json.loads(section[section.index("-d '") + 4:section.index("}'") + 1])
    body = request("docs/cameras.md")
    assert request("README.md") == body
    clip = make_clip(seconds=4, fps=10, size=(320, 192))
    with RtspServer({"stream1": clip}) as camera, Mosquitto() as broker, \
            MqttSubscriber(broker.port, "cameras/#") as mqtt:
        body["source"] = camera.url("stream1")
        body["sinks"] = [url.replace("localhost:1883", f"127.0.0.1:{broker.port}") for url in body["sinks"]]
        code, added = http(cams, "POST", "/v1/streams", body)
        assert code == 201, added
        wait_for(lambda: len(mqtt.payloads()) >= 3, what="results on MQTT")
        doc = json.loads(mqtt.payloads()[0])
        assert doc["stream_id"] == added["stream_id"] and "predictions" in doc
    remove_all(cams)


def test_sinks_trust_the_sink_ca_file_of_the_server(fake_root, clips, tmp_path):
    """--sink-ca-file reaches every stream's sinks: an mqtts:// broker whose certificate only
    that CA vouches for gets the results (tests/integration/test_sinks.py: not without it)."""
    need(unavailable("/usr/sbin/mosquitto") or unavailable("openssl"))
    certificates = make_certificates(tmp_path)
    with Mosquitto(tls=certificates) as broker, MqttSubscriber(broker.port, "secure/#") as mqtt, \
            running_server(model_repository=str(fake_root), stream_source_dir=str(clips),
                           sink_ca_file=str(certificates.ca)) as server:
        code, added = http(server, "POST", "/v1/streams", {"source": "scene.mp4", "realtime": False,
                                                           "stream_id": "tls", "sinks": [broker.tls_url("secure")]},
                           headers={})
        assert code == 201, added
        done = wait_for(lambda: (s := http(server, "GET", "/v1/streams/tls", headers={})[1])["state"] == "stopped"
                        and s["sinks"][0]["delivered"] == 30 and s, what="the file, delivered")
        sink = done["sinks"][0]
        assert (sink["url"], sink["dropped"], sink["retries"], sink["last_error"]) == (broker.tls_url("secure"), 0, 0, None)
        wait_for(lambda: len(mqtt.payloads()) == 30, what="the results on the broker")
    assert [json.loads(p)["frame_index"] for p in mqtt.payloads()] == list(range(30))


def test_a_removal_runs_to_its_end_and_holds_the_id_until_then(cams):
    streams = cams.server.cameras
    with SegmentationClient(cams.address, token=TOKEN) as client:
        client.add_stream("scene.mp4", stream_id="r", max_fps=5)
        wait_for(lambda: client.get_stream("r")["frames_out"] >= 1)

    async def race():
        removing = asyncio.ensure_future(streams.remove("r"))
        await asyncio.sleep(0)
        with pytest.raises(AlreadyExistsError):  # still stopping: the id is not free yet
            await streams.add(StreamSpec.read({"source": "scene.mp4", "stream_id": "r"}, streams.rules))
        removing.cancel()  # a caller that gives up (a gRPC deadline) does not stop the removal

    cams.call(race())
    wait_for(lambda: http(cams, "GET", "/v1/streams/r")[0] == 404, what="the removal, finished")
    assert cams.server.state.ledger.snapshot()[1].get("camera", 0) == 0  # its gauge given back


def test_subscriptions_are_bounded(cams):
    streams = cams.server.cameras

    async def subscribe_all():
        held = [streams.subscribe() for _ in range(64)]
        with pytest.raises(LimitError, match="subscriptions"):
            streams.subscribe()
        for subscription in held:
            streams.unsubscribe(subscription)
        streams.unsubscribe(streams.subscribe())  # room again

    cams.call(subscribe_all())


def test_a_playlist_file_cannot_reach_the_network(cams, clips):
    """A file source opens files only: a playlist in the source folder that names http://
    segments fails instead of making the server fetch them."""
    need(hls_unavailable())
    with HlsServer(clips / "scene.mp4") as hls:
        playlist = requests.get(hls.url, timeout=10).text
        base = hls.url.rsplit("/", 1)[0]
        (clips / "remote.m3u8").write_text(
            "\n".join(f"{base}/{line}" if line.endswith(".ts") else line for line in playlist.splitlines()))
        assert http(cams, "POST", "/v1/streams", {"source": "remote.m3u8", "stream_id": "remote"})[0] == 201
        ended = wait_for(lambda: (s := status(cams, "remote"))["state"] in ("failed", "stopped") and s)
    assert ended["frames_out"] == 0 and ended["state"] == "failed"


def test_pause_and_resume_over_http(cams):
    assert http(cams, "POST", "/v1/streams", {"source": "scene.mp4", "stream_id": "p", "max_fps": 5})[0] == 201
    code, paused = http(cams, "POST", "/v1/streams/p/pause")
    assert code == 200 and paused["state"] == "paused"
    code, resumed = http(cams, "POST", "/v1/streams/p/resume")
    assert code == 200 and resumed["state"] != "paused"


def test_cameras_take_turns_so_frames_wait_where_newer_ones_replace_them(tmp_path, clips):
    """Four cameras of 10 fps on a network of 50 ms a frame in batches of one: the cameras'
    frames in the batcher never pass their turns (two batches' worth), each camera gets its
    share, and the frames a newer one replaced are counted as dropped."""
    from ..fakes import fake_repository

    repository = fake_repository(tmp_path / "models", delay_ms=50, max_batch_size=1)
    with running_server(model_repository=str(repository), stream_source_dir=str(clips)) as busy:
        for i in range(4):
            assert http(busy, "POST", "/v1/streams", {"source": "long.mp4", "stream_id": f"c{i}"},
                        headers={})[0] == 201
        ledger, most, until_s = busy.server.state.ledger, 0, time.monotonic() + 2.5
        while time.monotonic() < until_s:
            load = ledger.totals("instance_segmentation")
            most = max(most, load.queued + load.executing)
            time.sleep(0.002)
        streams = http(busy, "GET", "/v1/streams", headers={})[1]["streams"]
    assert 1 <= most <= 2  # the turns of a batch limit of 1
    out = [s["frames_out"] for s in streams]
    assert min(out) >= 0.5 * max(out) > 0, out  # first come, first served: no camera starves
    assert all(s["frames_dropped"] > 0 for s in streams)
