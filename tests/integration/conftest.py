"""Servers for the integration tests (``running_server``, in-process: see tests/conftest.py).
The frontends' tests run them on the fake network (``tests/fakes.py``: known detections in
milliseconds); ``real_server`` serves the real model, for what only it can show (the snippets of
the README and docs/ on real photos)."""

from __future__ import annotations

import subprocess

import pytest
import requests

from ..cameras import scene_clip
from ..conftest import RunningServer, running_server  # noqa: F401 - the tests' import
from ..fakes import fake_repository


def http(server, method: str, path: str, body=None, headers=None) -> tuple[int, object]:
    """One call to an in-process server's HTTP port: (status, its JSON answer)."""
    reply = requests.request(method, f"http://127.0.0.1:{server.server.http_port}{path}", json=body,
                             headers=headers, timeout=60)
    return reply.status_code, reply.json()


def remove_streams(server, headers=None) -> None:
    """Every camera stream of the server removed, each answered 200."""
    for stream in http(server, "GET", "/v1/streams", headers=headers)[1]["streams"]:
        assert http(server, "DELETE", f"/v1/streams/{stream['stream_id']}", headers=headers)[0] == 200


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A file camera's folder (``--stream-source-dir``) holding scene.mp4 (3 s at 10 fps); a
    module that needs other clips defines its own ``clips``."""
    folder = tmp_path_factory.mktemp("clips")
    scene_clip(folder / "scene.mp4")
    return folder


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory):
    """A repository whose pipeline runs the fake network (no delay)."""
    return fake_repository(tmp_path_factory.mktemp("fake"))


@pytest.fixture(scope="session")
def slow_root(tmp_path_factory):
    """A repository whose fake network takes ~100 ms per image (busy, like a real one)."""
    return fake_repository(tmp_path_factory.mktemp("slow"), delay_ms=100)


@pytest.fixture(scope="session")
def fake_pipeline(fake_root):
    from pipeline.engine import Pipeline

    return Pipeline.from_repository(fake_root, device="cpu")


@pytest.fixture(scope="session")
def server(fake_root):
    with running_server(model_repository=str(fake_root)) as running:
        yield running


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "server.key", folder / "server.crt"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a test certificate: {made.stderr[-200:]}")
    return key, cert


@pytest.fixture(scope="session")
def guarded(tls_files, slow_root):
    key, cert = tls_files
    with running_server(model_repository=str(slow_root), tls_cert=str(cert), tls_key=str(key), token="s3cret",
                        stream_window=1, stream_policy="drop_oldest") as running:
        yield running, cert.read_bytes()
