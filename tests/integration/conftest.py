"""An in-process server on a free port, running its own event loop in a thread, so tests can
use the real (blocking) tritonclient against it."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import pytest

from pipeline.server import PipelineServer, ServerConfig

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
                "metrics_port": 0, "device": "cpu", "grace_period_s": 5, **settings}
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
