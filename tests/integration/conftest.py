"""An in-process server on a free port, running its own event loop in a thread, so tests can
use the real (blocking) tritonclient against it. The frontends' tests run it on the fake
network (``tests/fakes.py``: known detections in milliseconds); ``real_server`` serves the
real model, for what only it can show (the README's snippets on real photos)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from contextlib import contextmanager

import pytest

from pipeline.frontends.server import PipelineServer, ServerConfig

from ..conftest import MODEL_REPOSITORY
from ..fakes import fake_repository


class RunningServer:
    def __init__(self, server: PipelineServer, loop: asyncio.AbstractEventLoop):
        self.server = server
        self.loop = loop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def running_server(**settings):
    settings = {"model_repository": str(MODEL_REPOSITORY), "host": "127.0.0.1", "grpc_port": 0,
                "metrics_port": 0, "http_port": 0, "device": "cpu", "grace_period_s": 5, **settings}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = PipelineServer(ServerConfig(**settings))
    running = RunningServer(server, loop)
    running.call(server.start(), timeout=120)
    try:
        yield running
    finally:
        if not server.state.draining:
            running.call(server.drain(grace_s=2))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


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
def real_server():
    with running_server() as running:
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
