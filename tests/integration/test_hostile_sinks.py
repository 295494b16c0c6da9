"""Sinks that cannot be turned against the host (issue 35, items 4, 8a and 10), through the
real server in-process, its HTTP and gRPC APIs, with real brokers (tests/brokers.py) and a
server that answers every connection with a banner.

What is checked: a sink to a link-local, cloud metadata, multicast, reserved or unspecified
address (however written) is refused when the stream is added, private and loopback ones are
not, and ``--sink-url-allow`` narrows sinks to its list; a sink connects to the address its
host had when it was checked, and to no other, reconnects included; ``last_error`` and the log
say the kind of failure and nothing that the target sent; a webhook that refuses every message
costs a log line per interval; options a broker would refuse forever are refused at once; and a
removal under way is answered OK once, the second caller NOT_FOUND, over HTTP and gRPC alike.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from clients.client import ClientError, SegmentationClient
from pipeline.serving import url_policy
from pipeline.throttle import LOG_INTERVAL_S

from ..brokers import MOSQUITTO, REDIS_SERVER, Mosquitto, MqttSubscriber, RedisServer, WebhookReceiver, unavailable
from ..cameras import free_port
from ..conftest import running_server, wait_until
from .conftest import http, remove_streams

FRAMES = 30  # of scene.mp4: 3 s at 10 fps
# What a target might send back: none of it may reach a status, an error or a log line.
BANNER = b"SSH-2.0-OpenSSH_9.6 banner-7f3a\r\nHTTP/1.0 400 Bad Request\r\nSet-Cookie: s3cret\r\n\r\n"
BANNER_BITS = ("SSH", "banner-7f3a", "HTTP/1.0", "Bad Request", "s3cret")


@pytest.fixture(scope="module")
def server(fake_root, clips):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips)) as running:
        yield running


@pytest.fixture
def cams(server):
    """The server, its streams removed after each test."""
    yield server
    remove_streams(server)




def add(server, sinks: list[str], **fields):
    return http(server, "POST", "/v1/streams", {"source": "scene.mp4", "sinks": sinks, **fields})


def status(server, stream_id: str) -> dict:
    code, body = http(server, "GET", f"/v1/streams/{stream_id}")
    assert code == 200, body
    return body


def need(*binaries: str) -> None:
    for binary in binaries:
        if reason := unavailable(binary):
            pytest.skip(reason)


class BannerServer:
    """A TCP server on 127.0.0.1 that answers every connection with ``BANNER`` whatever is
    asked (an SSH daemon, a foreign protocol) and then reads until the client goes."""

    def __init__(self):
        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.sendall(BANNER)
                self.request.settimeout(5)
                try:
                    while self.request.recv(65536):
                        pass
                except OSError:
                    pass

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------- where a sink may go (item 4)

REFUSED = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "http://[fd00:ec2::254]/latest/",
    "http://metadata.google.internal/computeMetadata/v1/", "http://METADATA.google.internal./",
    "mqtt://169.254.170.2/t", "redis://100.100.100.200/k", "http://169.254.7.7:8080/", "http://[fe80::1]/",
    "http://[::ffff:169.254.169.254]/", "http://[2002:a9fe:a9fe::]/", "mqtt://0.0.0.0:1883/t", "http://[::]:80/",
    "mqtt://224.0.0.1/t", "redis://240.0.0.1/k", "http://255.255.255.255/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_sinks_to_link_local_metadata_and_special_addresses_are_refused(cams, url):
    code, body = add(cams, [url])
    assert code == 400 and body["error"].endswith("see --sink-url-allow"), body
    assert http(cams, "GET", "/v1/streams")[1] == {"streams": []}


@pytest.mark.parametrize("url, address", [
    ("http://2852039166/latest/meta-data/", "169.254.169.254"), ("http://0xa9fea9fe/", "169.254.169.254"),
    ("mqtt://0251.0376.0251.0376/t", "169.254.169.254"), ("redis://2130706433:6379/k", "127.0.0.1"),
])
def test_an_address_written_as_a_number_is_read_as_the_address_it_is(cams, url, address):
    code, body = add(cams, [url])
    assert code == 400 and f"is the IPv4 address {address} written as a number" in body["error"], body


def test_the_same_refusals_over_grpc(cams):
    with SegmentationClient(cams.address) as client:
        for url in (*REFUSED[:4], "http://2852039166/"):
            with pytest.raises(ClientError) as caught:
                client.add_stream("scene.mp4", sinks=[url])
            assert caught.value.code == "INVALID_ARGUMENT", url
        assert client.streams() == []


def test_private_and_loopback_sinks_are_allowed_by_default(cams):
    with WebhookReceiver() as hook:
        code, body = add(cams, [hook.url(), "mqtt://10.255.255.1/t", "redis://[fd12::7]/k"], stream_id="ok",
                         realtime=False)
        assert code == 201, body
        wait_until(lambda: len(hook.bodies) == FRAMES, 30)


def test_sink_url_allow_narrows_sinks_to_what_it_lists(fake_root, clips):
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips),
                        sink_url_allow=("127.0.0.1", "169.254.7.0/24")) as narrow, WebhookReceiver() as hook:
        assert add(narrow, [hook.url()], stream_id="listed", realtime=False)[0] == 201
        wait_until(lambda: len(hook.bodies) == FRAMES, 30)
        assert add(narrow, ["http://169.254.7.7:9/"], stream_id="link-local-listed")[0] == 201
        for url in ("mqtt://10.1.2.3/t", "http://169.254.169.254/", "http://[::1]:8000/"):
            code, body = add(narrow, [url])
            assert code == 400 and "not in --sink-url-allow" in body["error"], (url, body)


def test_sinks_connect_to_the_address_checked_when_the_stream_was_added(cams, monkeypatch):
    """brokers.test is known to this test's lookup only (the system's resolver has never heard
    of it): every kind delivers there, so each connects to the checked address. The lookup then
    answers a metadata address, and the MQTT broker is away until the sink has failed: its next
    connects still go to the address it had, without asking again."""
    need(MOSQUITTO, REDIS_SERVER)
    answers, asked = {"brokers.test": "127.0.0.1"}, []

    def lookup(host, port):
        asked.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    monkeypatch.setattr(url_policy, "lookup", lookup)
    with WebhookReceiver() as hook, Mosquitto() as broker, RedisServer() as redis_server, \
            MqttSubscriber(broker.port, "cams/#") as subscriber:
        sinks = [hook.url(host="brokers.test"), broker.url("cams").replace("127.0.0.1", "brokers.test"),
                 redis_server.url("k").replace("127.0.0.1", "brokers.test")]
        broker.stop()
        code, body = add(cams, sinks, stream_id="pinned", realtime=False)
        assert code == 201, body
        assert asked == ["brokers.test"] * 3  # once per sink, when the stream was added
        answers["brokers.test"] = "169.254.169.254"  # a rebinding answer, never asked for
        wait_until(lambda: status(cams, "pinned")["sinks"][1]["retries"] >= 2, 30)
        broker.start()
        done = wait_until(lambda: (s := status(cams, "pinned"))["state"] == "stopped"
                        and [k["delivered"] for k in s["sinks"]] == [FRAMES] * 3 and s, 30)
        assert asked == ["brokers.test"] * 3
        assert [k["dropped"] for k in done["sinks"]] == [0, 0, 0]
        assert len(hook.bodies) == FRAMES and len(redis_server.entries("k")) == FRAMES
        wait_until(lambda: set(json.loads(p)["frame_index"] for p in subscriber.payloads()) >= set(range(FRAMES)), 30)


# ---------------------------------------------------------------- what last_error says (item 4)


def test_last_error_says_the_kind_of_failure_and_nothing_the_target_sent(cams, caplog):
    closed = free_port()
    with BannerServer() as banner, WebhookReceiver() as hook, caplog.at_level(logging.INFO):
        hook.fail_next(10_000, status=503)
        told = {  # at most 8 sinks a stream
            f"http://127.0.0.1:{banner.port}/": "protocol error (not the server the URL's scheme names?)",
            f"redis://127.0.0.1:{banner.port}/k": "protocol error (not the server the URL's scheme names?)",
            f"https://127.0.0.1:{banner.port}/": "TLS handshake failed",
            hook.url(): "HTTP 503",
            f"http://127.0.0.1:{closed}/": "connection refused",
            f"mqtt://127.0.0.1:{closed}/t": "connection refused",
            f"redis://127.0.0.1:{closed}/k": "connection refused",
        }
        code, body = add(cams, list(told), stream_id="told", max_fps=5)
        assert code == 201, body
        done = wait_until(lambda: (s := status(cams, "told")) and all(k["last_error"] for k in s["sinks"]) and s, 30)
        assert {k["url"]: k["last_error"] for k in done["sinks"]} == told
        listed = json.dumps(http(cams, "GET", "/v1/streams")[1])
        assert http(cams, "DELETE", "/v1/streams/told")[0] == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "connection refused; retrying" in logged
    for bit in BANNER_BITS:
        assert bit not in listed and bit not in logged, bit


def test_a_webhook_refusing_every_message_costs_a_log_line_per_interval(cams, caplog):
    with WebhookReceiver() as hook, caplog.at_level(logging.WARNING, logger="pipeline.cameras.sinks"):
        hook.fail_next(10_000, status=400)
        started = time.monotonic()
        assert add(cams, [hook.url()], stream_id="refused", realtime=False)[0] == 201
        done = wait_until(lambda: (s := status(cams, "refused"))["sinks"][0]["dropped"] == FRAMES and s, 30)
        intervals = 1 + int((time.monotonic() - started) / LOG_INTERVAL_S)  # one, unless the machine crawls
    assert (done["sinks"][0]["delivered"], done["sinks"][0]["last_error"], hook.failed) == (0, "HTTP 400", FRAMES)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refusals) <= intervals and "HTTP 400" in refusals[0], refusals


# ---------------------------------------------------------------- refused at add time (item 10)

FOREVER = [
    ("redis://127.0.0.1:6379/k?db=99999", "db must be a whole number from 0 to 15"),
    ("redis://127.0.0.1:6379/k?db=16", "db must be a whole number from 0 to 15"),
    ("redis://127.0.0.1:6379/k?maxlen=1000000000000", "maxlen must be a whole number from 1 to 10000000"),
    ("mqtt://127.0.0.1:1883/cams%00x", "an MQTT topic has no NUL character"),
    ("mqtt://127.0.0.1:1883/" + "t" * 65_530, "bytes (utf-8, with the stream id in it); MQTT allows at most 65535"),
]


@pytest.mark.parametrize("url, words", FOREVER)
def test_sink_options_a_broker_would_refuse_forever_are_refused_when_the_stream_is_added(cams, url, words):
    code, body = add(cams, [url])
    assert code == 400 and words in body["error"], body
    assert len(body["error"]) < 500  # a message, not the URL sent back
    with SegmentationClient(cams.address) as client:
        with pytest.raises(ClientError) as caught:
            client.add_stream("scene.mp4", sinks=[url])
        assert caught.value.code == "INVALID_ARGUMENT" and words in caught.value.message
        assert client.streams() == []


# ---------------------------------------------------------------- a removal under way (item 10)


def removing(cams, stream_id: str):
    """A stream whose removal lasts (its sink holds results for a target that refuses them:
    the removal flushes for REMOVE_FLUSH_S), ready to be removed."""
    code, body = add(cams, [f"http://127.0.0.1:{free_port()}/"], stream_id=stream_id, max_fps=10)
    assert code == 201, body
    wait_until(lambda: (s := status(cams, stream_id)["sinks"][0])["retries"] >= 1 and s["buffered"] >= 1, 30)


def test_a_removal_under_way_is_answered_ok_once_and_not_found_to_the_others_over_http_and_grpc(cams):
    cameras = cams.server.cameras
    with ThreadPoolExecutor(1) as pool, SegmentationClient(cams.address) as client:
        removing(cams, "over-http")
        first = pool.submit(http, cams, "DELETE", "/v1/streams/over-http")
        wait_until(lambda: cameras.get("over-http")._stopping is not None, 30)
        code, body = http(cams, "DELETE", "/v1/streams/over-http")
        assert code == 404 and "is being removed already" in body["error"], body
        assert not first.done()  # answered at once, not when the removal ended
        code, body = first.result(timeout=30)
        assert code == 200 and body["state"] == "stopped", body

        removing(cams, "over-grpc")
        first = pool.submit(client.remove_stream, "over-grpc")
        wait_until(lambda: cameras.get("over-grpc")._stopping is not None, 30)
        with pytest.raises(ClientError) as caught:
            client.remove_stream("over-grpc")
        assert caught.value.code == "NOT_FOUND" and "is being removed already" in caught.value.message
        assert not first.done()
        assert first.result(timeout=30)["state"] == "stopped"
        assert http(cams, "GET", "/v1/streams")[1] == {"streams": []}
