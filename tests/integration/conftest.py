"""An in-process server on a free port, running its own event loop in a thread, so tests can
use the real (blocking) tritonclient against it."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from contextlib import contextmanager

import pytest

from pipeline.frontends.server import PipelineServer, ServerConfig

from ..conftest import MODEL_REPOSITORY


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
def server():
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
def guarded(tls_files):
    key, cert = tls_files
    with running_server(tls_cert=str(cert), tls_key=str(key), token="s3cret",
                        stream_window=1, stream_policy="drop_oldest") as running:
        yield running, cert.read_bytes()
