"""HTTP against hostile clients (issue 25): silent and idle connections are closed, open
connections are capped, accept() failures and malformed requests cost a log line per
interval, the token is checked before a body is read, bad input is a 4xx (never a 500), and
the metrics port follows the server's TLS and, on request, its token. Every socket has a
timeout: no test can hang."""

from __future__ import annotations

import base64
import errno
import http.client
import json
import logging
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest

from pipeline.errors import ConfigError
from pipeline.frontends.config import ServerConfig

from ..fakes import png, scene
from .conftest import running_server

MODEL = "instance_segmentation"
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEADER_TIMEOUT_S = 0.5
IDLE_TIMEOUT_S = 1.0
IMAGE = png(scene(120, 160, green=(40, 30, 120, 100)))


@pytest.fixture(scope="module")
def tight(fake_root):
    """Short timeouts and a token, over plain HTTP (raw sockets can speak to it)."""
    with running_server(model_repository=str(fake_root), token=TOKEN,
                        http_header_timeout_s=HEADER_TIMEOUT_S,
                        http_idle_timeout_s=IDLE_TIMEOUT_S) as running:
        yield running


@pytest.fixture(scope="module")
def capped(fake_root):
    with running_server(model_repository=str(fake_root), max_http_connections=3) as running:
        yield running


@pytest.fixture(scope="module")
def locked(fake_root, tls_files):
    key, cert = tls_files
    with running_server(model_repository=str(fake_root), tls_cert=str(cert), tls_key=str(key),
                        token=TOKEN, metrics_token_required=True,
                        http_header_timeout_s=HEADER_TIMEOUT_S) as running:
        yield running, cert


def connect(running, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", running.server.http_port), timeout=timeout)


def seconds_until_closed(sock: socket.socket) -> float:
    """How long the server takes to close ``sock`` (bytes it sends first are skipped);
    socket.timeout if it keeps it open past the socket's timeout."""
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP response read from ``sock`` (within its timeout)."""
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    return reply.status, reply.read()


def request(running, path: str, body: bytes | None = None, headers: dict | None = None,
            method: str | None = None) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{running.server.http_port}{path}"
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def still_serves(running, headers: dict = AUTH) -> None:
    status, body = request(running, f"/{MODEL}/1", base64.b64encode(IMAGE), headers)
    assert status == 200 and json.loads(body)["predictions"], (status, body)


# ------------------------------------------------------------------ item 3: connections


@pytest.mark.parametrize("opening", [b"", b"GET /v2/heal"], ids=["silent", "half a request line"])
def test_a_connection_without_complete_headers_is_closed_after_the_header_timeout(tight, opening):
    with connect(tight) as sock:
        sock.sendall(opening)
        took = seconds_until_closed(sock)
    assert HEADER_TIMEOUT_S * 0.8 <= took < HEADER_TIMEOUT_S + 3, took
    still_serves(tight)


def test_headers_in_time_stop_the_header_timer_and_idle_keep_alive_is_closed(tight):
    with connect(tight) as sock:  # headers at once, the body after the header timeout
        sock.sendall(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Length: 2\r\n\r\n")
        time.sleep(HEADER_TIMEOUT_S * 2)
        sock.sendall(b"{}")
        status, body = response(sock)
        assert status == 200 and json.loads(body)[0]["name"], body
        took = seconds_until_closed(sock)  # kept alive, idle: closed after the idle timeout
    assert IDLE_TIMEOUT_S * 0.8 <= took < IDLE_TIMEOUT_S + 3, took


def test_over_tls_a_silent_connection_is_closed_after_the_header_timeout(locked):
    """With TLS the handshake is due within the header timeout too."""
    running, cert = locked
    with connect(running) as sock:
        took = seconds_until_closed(sock)
    assert HEADER_TIMEOUT_S * 0.8 <= took < HEADER_TIMEOUT_S + 3, took
    url = f"https://localhost:{running.server.http_port}/v2/health/live"
    context = ssl.create_default_context(cafile=str(cert))
    assert urllib.request.urlopen(url, timeout=10, context=context).status == 200


def test_connections_over_the_cap_are_closed_at_once(capped):
    held = [connect(capped) for _ in range(3)]
    try:
        for sock in held:  # admitted: each answers a keep-alive request
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert response(sock)[0] == 200
        with connect(capped) as extra:
            extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            took = seconds_until_closed(extra)  # no answer: closed
        assert took < 3, took
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5  # the server sees the closes within a moment
    while True:
        try:
            if request(capped, "/v2/health/live")[0] == 200:
                break
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)
    still_serves(capped, {})


def test_accept_failures_are_logged_once_per_interval_with_a_count(tight, caplog):
    """What asyncio reports when accept() hits the open-file limit, retried every second,
    as 1,100 silent sockets made it do: one line, not one per attempt."""
    async def fail_accepts():
        loop = tight.server._http._loop
        for _ in range(50):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(errno.EMFILE, "Too many open files")})

    with caplog.at_level(logging.INFO):
        tight.call(fail_accepts())
    lines = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(lines) <= 1 and not any(r.exc_info for r in lines), [r.getMessage() for r in lines]
    still_serves(tight)


def test_malformed_requests_cost_no_traceback_and_at_most_a_line(tight, caplog):
    garbage = [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
               b"GET / HTTP/1.1\r\nHost: x\r\nno colon in this header\r\n\r\n",
               b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"y" * 20000 + b"\r\n\r\n",
               b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"]
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            for opening in garbage:
                with connect(tight) as sock:
                    sock.sendall(opening)
                    assert seconds_until_closed(sock) < 3
        still_serves(tight)
    from_http = [r for r in caplog.records if r.name.startswith(("aiohttp", "pipeline.frontends.http"))]
    assert not any(r.exc_info for r in from_http), [r.getMessage() for r in from_http if r.exc_info]
    assert len(from_http) <= 1, [r.getMessage() for r in from_http]


# ------------------------------------------------------------------ item 6: token before body


@pytest.mark.parametrize("path", ["/infer/instance_segmentation", "/model/add"])
def test_a_body_without_the_token_is_refused_before_it_is_read(tight, path):
    """Headers announcing 20 MB and only 100 KB sent: answered 401 without waiting for the
    rest (today's server read and parsed all of it first)."""
    start = (b'{"model_id": "instance_segmentation/1", "image": {"type": "base64", "value": "'
             + b"A" * 100_000)
    with connect(tight, timeout=3) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {20_000_000}\r\n\r\n".encode() + start)
        started = time.monotonic()
        status, body = response(sock)
    assert status == 401 and "first 64 KiB" in json.loads(body)["message"], body
    assert time.monotonic() - started < 2
    still_serves(tight)


def v1_body(*members: tuple[str, object]) -> bytes:
    """A v1 body with its members in this order (the order matters here)."""
    return ("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in members) + "}").encode()


ID = ("model_id", f"{MODEL}/1")
PICTURE = ("image", {"type": "base64", "value": base64.b64encode(IMAGE).decode()})
BIG = ("padding", "x" * 70_000)


@pytest.mark.parametrize("members, headers, status", [
    ((("api_key", TOKEN), ID, PICTURE), {}, 200),  # the SDK's order
    ((ID, PICTURE, ("api_key", TOKEN)), {}, 200),  # after a small image: still in the prefix
    ((("api_key", "wrong"), ID, PICTURE), {}, 401),
    ((ID, PICTURE), {}, 401),
    ((ID, BIG, ("api_key", TOKEN), PICTURE), {}, 401),  # beyond the first 64 KiB
    ((ID, BIG, PICTURE), AUTH, 200),  # the header carries it: no prefix read
    ((("api_key", TOKEN), ID, PICTURE, ("api_key", "wrong")), {}, 401),  # the parsed body decides
], ids=["sdk-order", "after-image", "wrong", "absent", "too-late", "header", "overridden"])
def test_the_body_api_key_is_read_from_the_first_bytes_and_checked_again_parsed(tight, members, headers, status):
    got, body = request(tight, "/infer/instance_segmentation", v1_body(*members), headers)
    assert got == status, body
    if status == 200:
        assert json.loads(body)["predictions"]


def test_model_add_takes_the_body_api_key(tight):
    got, body = request(tight, "/model/add", v1_body(("api_key", TOKEN), ID))
    assert got == 200 and json.loads(body)["models"][0]["model_id"] == f"{MODEL}/1", body


# ------------------------------------------------------------------ item 8: 4xx, not 500

DEEP = b"[" * 50_000
SEQUENCE = '{"parameters": {"sequence_id": 7, "sequence_start": true, %s}, "inputs": [{"name": ' \
           '"IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": ["%s"]}]}'
IMAGE_B64 = base64.b64encode(IMAGE).decode()


@pytest.mark.parametrize("path, body, content_type, headers, status, words", [
    ("/infer/instance_segmentation", DEEP, None, AUTH, 400, "nests too deeply"),
    ("/infer/instance_segmentation", DEEP, None, {}, 401, "token"),
    ("/model/add", DEEP, None, AUTH, 400, "nests too deeply"),
    (f"/v2/models/{MODEL}/infer", DEEP, None, AUTH, 400, "nests too deeply"),
    ("/v2/repository/index", DEEP, None, AUTH, 400, "nests too deeply"),
    (f"/v2/repository/models/{MODEL}/load", DEEP, None, AUTH, 400, "nests too deeply"),
    ("/v2/repository/index", b"[]", None, AUTH, 400, "JSON object"),
    ("/v2/repository/index", b'"x"', None, AUTH, 400, "JSON object"),
    (f"/v2/repository/models/{MODEL}/load", b"[1]", None, AUTH, 400, "JSON object"),
    (f"/v2/models/{MODEL}/infer", ('{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], '
                                   '"data": ' + "[" * 900 + '"x"' + "]" * 900 + "}]}").encode(),
     None, AUTH, 400, ""),
    (f"/{MODEL}/1", b"AAAA", "multipart/form-data", AUTH, 400, "multipart body is malformed"),
    (f"/{MODEL}/1", b"garbage", "multipart/form-data; boundary=b", AUTH, 400, "multipart body is malformed"),
    (f"/{MODEL}/1", b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nAAAA',
     "multipart/form-data; boundary=b", AUTH, 400, "multipart body is malformed"),
    (f"/{MODEL}/1", b"--b\r\nno colon here\r\n\r\nAAAA\r\n--b--\r\n", "multipart/form-data; boundary=b",
     AUTH, 400, "multipart body is malformed"),
    (f"/{MODEL}/1?confidence=nan", IMAGE_B64.encode(), "text/plain", AUTH, 400, "confidence"),
    (f"/{MODEL}/1?confidence=inf", IMAGE_B64.encode(), "text/plain", AUTH, 400, "confidence"),
    (f"/{MODEL}/1?overlap=-inf", IMAGE_B64.encode(), "text/plain", AUTH, 400, "overlap"),
    ("/infer/instance_segmentation", v1_body(ID, PICTURE)[:-1] + b', "confidence": NaN}', None, AUTH, 400,
     "NaN is not a JSON number"),
    ("/infer/instance_segmentation", v1_body(ID, PICTURE, ("confidence", "nan")), None, AUTH, 400, "confidence"),
    ("/infer/instance_segmentation", v1_body(ID, PICTURE, ("iou_threshold", "inf")), None, AUTH, 400,
     "iou_threshold"),
    (f"/v2/models/{MODEL}/infer", (SEQUENCE % ('"minimum_consecutive_frames": "nan"', IMAGE_B64)).encode(),
     None, AUTH, 400, "minimum_consecutive_frames"),
    (f"/v2/models/{MODEL}/infer", (SEQUENCE % ('"minimum_consecutive_frames": Infinity', IMAGE_B64)).encode(),
     None, AUTH, 400, "Infinity is not a JSON number"),
    (f"/v2/models/{MODEL}/infer", (SEQUENCE % ('"minimum_consecutive_frames": 1e999', IMAGE_B64)).encode(),
     None, AUTH, 400, "minimum_consecutive_frames"),
    (f"/v2/models/{MODEL}/infer", (SEQUENCE % ('"confidence": "nan"', IMAGE_B64)).encode(),
     None, AUTH, 400, "confidence"),
])
def test_bad_input_is_a_4xx_with_a_message_never_a_500(tight, path, body, content_type, headers, status, words):
    headers = {**headers, **({"Content-Type": content_type} if content_type else {})}
    got, answer = request(tight, path, body, headers)
    message = json.loads(answer)
    message = message.get("message", message.get("error"))
    assert got == status and words in message, (got, message)
    still_serves(tight)


# ------------------------------------------------------------------ item 12: the metrics port


def metrics(port: int, scheme: str = "https", cert=None, headers: dict | None = None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(cert)) if cert else None
    req = urllib.request.Request(f"{scheme}://localhost:{port}/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_with_tls_metrics_are_served_over_tls_and_open_by_default(guarded):
    running, _ = guarded
    port = running.server.metrics_port
    cert = running.server.config.tls_cert
    with pytest.raises((OSError, http.client.HTTPException)):
        metrics(port, "http")
    status, text = metrics(port, cert=cert)
    assert status == 200 and "nv_inference_request_success" in text


def test_metrics_token_required_asks_for_the_bearer_token(locked):
    running, cert = locked
    port = running.server.metrics_port
    with pytest.raises((OSError, http.client.HTTPException)):
        metrics(port, "http", headers=AUTH)
    assert metrics(port, cert=cert)[0] == 401
    assert metrics(port, cert=cert, headers={"Authorization": "Bearer wrong"})[0] == 401
    status, text = metrics(port, cert=cert, headers=AUTH)
    assert status == 200 and "nv_inference_request_success" in text


def test_a_silent_client_does_not_stall_tls_metrics(locked):
    """The handshake runs in the connection's own thread: a client that connects and says
    nothing does not hold up the next scrape."""
    running, cert = locked
    port = running.server.metrics_port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        time.sleep(0.2)
        assert metrics(port, cert=cert, headers=AUTH)[0] == 200


@pytest.mark.parametrize("settings, words", [
    ({"metrics_token_required": True}, "--metrics-token-required needs --token"),
    ({"http_header_timeout_s": 0}, "--http-header-timeout-s"),
    ({"http_idle_timeout_s": float("nan")}, "--http-idle-timeout-s"),
    ({"max_http_connections": 0}, "max HTTP connections"),
])
def test_settings_that_cannot_work_are_start_up_errors(settings, words):
    with pytest.raises(ConfigError, match=words):
        ServerConfig(**settings)
