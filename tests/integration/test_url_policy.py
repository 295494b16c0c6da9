"""Images by URL through the real HTTP frontend (``--allow-image-urls``): a loopback image server is
refused unless ``--image-url-allow`` names it, redirects are re-checked, the upstream's answers
are never echoed, and the connection goes to the address that was checked."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading

import pytest

from pipeline.serving import url_policy
from pipeline.serving.url_policy import NOT_ALLOWED, AllowList, fetch_image

from .conftest import running_server
from .test_http import MODEL, http_url, post, sample_bytes

SECRET = "db-admin password=hunter2"  # what an internal service might answer


class _Upstream(http.server.BaseHTTPRequestHandler):
    hosts: list[str] = []  # the Host header of every request

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hosts.append(self.headers["Host"])
        if self.path == "/coffee.jpg":
            return self._answer(200, sample_bytes("coffee"))
        if self.path in ("/missing", "/boom"):
            return self._answer(404 if self.path == "/missing" else 500, SECRET.encode())
        targets = {"/to-metadata": "http://169.254.169.254/latest/meta-data/",
                   "/to-coffee": "/coffee.jpg", "/loop": "/loop"}
        self.send_response(302)
        self.send_header("Location", targets.get(self.path, "/missing"))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _answer(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def upstream():
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{files.server_address[1]}"
    files.shutdown()


def infer(server, url: str) -> tuple[int, dict]:
    body = json.dumps({"model_id": f"{MODEL}/1", "image": {"type": "url", "value": url}}).encode()
    return post(http_url(server, "/infer/instance_segmentation"), body)


def test_a_loopback_image_url_is_refused_unless_allow_listed(fake_root, upstream):
    _Upstream.hosts.clear()
    with running_server(model_repository=str(fake_root), allow_image_urls=True) as server:
        assert infer(server, f"{upstream}/coffee.jpg") == (400, {"message": NOT_ALLOWED})
        assert _Upstream.hosts == []  # refused before connecting
        got, doc = post(http_url(server, f"/{MODEL}/1?image={upstream}/coffee.jpg"), b"")  # v0 too
        assert (got, doc) == (400, {"message": NOT_ALLOWED})


def test_allow_listed_urls_are_served_and_checked_at_every_hop(fake_root, upstream):
    generic = url_policy.not_fetched(64 * 1024 * 1024)
    with running_server(model_repository=str(fake_root), allow_image_urls=True,
                        image_url_allow=("127.0.0.1",)) as server:
        for path in ("/coffee.jpg", "/to-coffee"):  # a redirect to an allowed host is followed
            got, doc = infer(server, upstream + path)
            assert got == 200 and [p["class"] for p in doc["predictions"]] == ["green"]
        # allowed host -> 169.254.169.254: the redirect's target is checked, and refused
        assert infer(server, f"{upstream}/to-metadata") == (400, {"message": NOT_ALLOWED})
        # the upstream's status and body never reach the client
        for path in ("/missing", "/boom", "/loop"):
            assert infer(server, upstream + path) == (400, {"message": generic})


def test_the_connection_goes_to_the_checked_address(upstream, monkeypatch):
    """DNS rebinding: a name that answers 127.0.0.1 (allowed) when checked and 10.255.255.1 after
    is fetched from 127.0.0.1, with one lookup, and the Host header keeps the name."""
    port = int(upstream.rsplit(":", 1)[1])
    lookups = []

    def rebinding(host, port):
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "10.255.255.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(url_policy, "lookup", rebinding)
    _Upstream.hosts.clear()
    data = asyncio.run(fetch_image(f"http://rebind.test:{port}/coffee.jpg", max_body=1 << 20,
                                   allow=AllowList.parse(["127.0.0.1"])))
    assert data == sample_bytes("coffee")
    assert lookups == ["rebind.test"] and _Upstream.hosts == [f"rebind.test:{port}"]
