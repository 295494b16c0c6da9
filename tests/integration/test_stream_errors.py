"""A stream's ``error_code``, each produced by a real server against a real server in-process
(the fake network): a closed port, GStreamer's RTSP server asking for a password, HTTPS
servers with a certificate nobody vouches for or one for another host, a server that answers
the ClientHello with no TLS, an HLS server without the playlist, a file in a codec FFmpeg has
no decoder for, a server that accepts and says nothing. Each code is the same over HTTP and
gRPC, counted in Prometheus by code, and each such stream is removed with a 200 at once, a
camera that died included (Roboflow inference #685: a pipeline whose camera died could not be
terminated)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from clients.client import SegmentationClient
from pipeline.cameras.source_errors import (
    AUTH_FAILED,
    CODEC_UNSUPPORTED,
    CODES,
    CONNECTION_FAILED,
    NOT_FOUND,
    TIMEOUT,
    TLS_CERTIFICATE,
    TLS_HANDSHAKE,
)

from ..brokers import make_certificates
from ..cameras import HlsServer, RtspServer, free_port, hls_unavailable, make_clip, rtsp_unavailable
from ..conftest import wait_until
from .conftest import http, remove_streams, running_server

USER = ("admin", "right-password")
MODEL = "instance_segmentation"
TIMEOUT_S = 5.0  # a source's open and read timeout (sources.Source's default)


@contextmanager
def tcp_server(answer: bytes | None):
    """A TCP port on 127.0.0.1 that accepts, reads what comes and answers ``answer`` (then
    closes), or, for None, never says a word (a camera that hangs)."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    held: list[socket.socket] = []

    def serve():
        while True:
            try:
                connection, _ = listening.accept()
            except OSError:  # closed: the test is over
                return
            held.append(connection)
            if answer is not None:
                try:
                    connection.recv(4096)
                    connection.sendall(answer)
                finally:
                    connection.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listening.getsockname()[1]
    finally:
        listening.close()
        for connection in held:
            connection.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that vouches for itself: no CA the server trusts made it."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", "self.key", "-out", "self.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], cwd=folder, check=True, capture_output=True)
    return folder / "self.pem", folder / "self.key"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    reason = hls_unavailable() or rtsp_unavailable()  # ffmpeg on PATH, GStreamer's RTSP server
    if reason is not None:
        pytest.skip(reason)
    return tmp_path_factory.mktemp("stream-errors")


@pytest.fixture(scope="module")
def clip():
    return make_clip(seconds=2, fps=10, size=(320, 192))


@pytest.fixture(scope="module")
def certificates(base):
    folder = base / "tls"
    folder.mkdir()
    return make_certificates(folder), self_signed(folder)


@pytest.fixture(scope="module")
def sources(base, clip, certificates):
    """Where each code comes from: code -> (a source that gives it, words in its last_error)."""
    trusted, untrusted = certificates
    clips = base / "clips"
    clips.mkdir()
    # a64multi: FFmpeg encodes it (for Commodore 64 demos) and has no decoder for it.
    made = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                           "testsrc=size=160x120:rate=10", "-t", "1", "-c:v", "a64multi", str(clips / "c64.mkv")],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    with (RtspServer({"cam": clip}, user=USER) as rtsp,
          HlsServer(clip, base / "hls") as hls,
          HlsServer(clip, base / "hls-self-signed", tls=untrusted) as self_signed_hls,
          HlsServer(clip, base / "hls-trusted", tls=(certificates[0].cert, certificates[0].key)) as trusted_hls,
          tcp_server(b"HTTP/1.0 400 Bad Request\r\n\r\nno TLS here\r\n") as not_tls,
          tcp_server(None) as silent):
        yield {
            CONNECTION_FAILED: (f"rtsp://127.0.0.1:{free_port()}/cam", "cannot open: Connection refused"),
            AUTH_FAILED: (rtsp.url("cam", user=(USER[0], "wrong")), "401 Unauthorized"),
            TLS_CERTIFICATE: (self_signed_hls.url, "cannot open: TLS: certificate not trusted"),
            "another host": (trusted_hls.url.replace("127.0.0.1", "localhost"),
                             "cannot open: TLS: certificate for another host"),
            TLS_HANDSHAKE: (f"rtsps://127.0.0.1:{not_tls}/cam", "cannot open: TLS handshake failed"),
            NOT_FOUND: (hls.url.replace("index.m3u8", "gone.m3u8"), "404 Not Found"),
            CODEC_UNSUPPORTED: ("c64.mkv", "cannot decode: no decoder for its codec"),
            TIMEOUT: (f"rtsp://127.0.0.1:{silent}/cam", f"cannot open: no answer within {TIMEOUT_S:g} s"),
            "trusted": (trusted_hls.url, None),
            "right password": (rtsp.url("cam", user=USER), None),
            "rtsp": rtsp,
        }


@pytest.fixture(scope="module")
def cam_server(fake_root, base, sources, certificates):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(base / "clips"),
                        allow_stream_urls=True, stream_url_allow=("127.0.0.1", "localhost"),
                        stream_ca_file=str(certificates[0].ca)) as running:
        yield running


@pytest.fixture
def cams(cam_server):
    yield cam_server
    remove_streams(cam_server)


def status(server, stream_id: str) -> dict:
    return http(server, "GET", f"/v1/streams/{stream_id}")[1]


def errors_counted(server) -> dict[str, float]:
    """rle_serving_stream_errors_total of the server's model, by code, as Prometheus reads it."""
    text = requests.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).text
    return {s.labels["code"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "rle_serving_stream_errors_total" and s.labels["model"] == MODEL}


CASES = {CONNECTION_FAILED: CONNECTION_FAILED, AUTH_FAILED: AUTH_FAILED, TLS_CERTIFICATE: TLS_CERTIFICATE,
         "another host": TLS_CERTIFICATE, TLS_HANDSHAKE: TLS_HANDSHAKE, NOT_FOUND: NOT_FOUND,
         CODEC_UNSUPPORTED: CODEC_UNSUPPORTED, TIMEOUT: TIMEOUT}


@pytest.mark.parametrize("case", list(CASES))
def test_each_code_from_a_real_server_in_the_status_the_metric_and_grpc(cams, sources, case):
    code = CASES[case]
    source, words = sources[case]
    before = errors_counted(cams).get(code, 0)
    added, body = http(cams, "POST", "/v1/streams", {"source": source, "stream_id": "bad"})
    assert added == 201 and body["error_code"] is None, body
    told = wait_until(lambda: (s := status(cams, "bad"))["error_code"] and s, TIMEOUT_S + 15)
    assert told["error_code"] == code and words in told["last_error"], told
    assert told["state"] == ("failed" if code == CODEC_UNSUPPORTED else "reconnecting")
    assert USER[1] not in told["last_error"] and told["frames_out"] == 0
    if code != CODEC_UNSUPPORTED:  # a network source: its second retry has failed too
        wait_until(lambda: status(cams, "bad")["reconnects"] >= 2, 3 * TIMEOUT_S + 15)
    with SegmentationClient(cams.address) as client:
        assert client.get_stream("bad")["error_code"] == code
    assert errors_counted(cams)[code] == before + 1  # counted once, however often it retries
    started = time.monotonic()
    assert http(cams, "DELETE", "/v1/streams/bad")[0] == 200
    assert time.monotonic() - started < TIMEOUT_S + 2  # a camera inside FFmpeg ends by its timeout
    assert http(cams, "GET", "/v1/streams")[1] == {"streams": []}


def test_a_trusted_certificate_and_the_right_password_play_with_no_code(cams, sources):
    """The faults above are the certificate's and the password's: the same servers with the
    CA of --stream-ca-file, or the right password, play."""
    for stream_id, case in (("tls", "trusted"), ("password", "right password")):
        added, body = http(cams, "POST", "/v1/streams", {"source": sources[case][0], "stream_id": stream_id})
        assert added == 201, body
    for stream_id in ("tls", "password"):
        running = wait_until(lambda name=stream_id: (s := status(cams, name))["frames_out"] > 0 and s, 20)
        assert (running["state"], running["error_code"], running["last_error"]) == ("running", None, None), running
    with SegmentationClient(cams.address) as client:
        assert client.get_stream("password")["error_code"] == ""  # proto3: no code is ""


def test_a_camera_that_dies_says_so_then_runs_again_with_no_code_and_is_removed(cams, sources):
    rtsp: RtspServer = sources["rtsp"]
    http(cams, "POST", "/v1/streams", {"source": rtsp.url("cam", user=USER), "stream_id": "cam"})
    wait_until(lambda: status(cams, "cam")["frames_out"] > 0, 20)
    rtsp.stop()  # SIGKILL: the camera loses power
    try:
        down = wait_until(lambda: (s := status(cams, "cam"))["state"] == "reconnecting" and s, 20)
        assert down["error_code"] in (CONNECTION_FAILED, TIMEOUT), down  # refused, or no frame in time
    finally:
        rtsp.start()
    back = wait_until(lambda: (s := status(cams, "cam"))["state"] == "running" and s, 30)
    assert back["error_code"] is None and back["last_error"] == down["last_error"]  # the code is now's
    rtsp.stop()
    try:
        wait_until(lambda: status(cams, "cam")["state"] == "reconnecting", 20)
        assert http(cams, "DELETE", "/v1/streams/cam")[0] == 200  # its camera gone: removed all the same
        assert http(cams, "GET", "/v1/streams/cam")[0] == 404
    finally:
        rtsp.start()


def test_every_code_is_a_documented_one():
    page = (Path(__file__).resolve().parents[2] / "docs" / "cameras.md").read_text()
    assert all(f"| `{code}` |" in page for code in CODES)
