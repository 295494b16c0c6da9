"""Shared fixtures and markers. Tests are marked by folder (unit / integration / e2e /
client); GPU tests are marked ``gpu`` and skipped, with the reason, where no CUDA device is
visible."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """None when CuPy sees a CUDA device, else why the GPU tests cannot run."""
    try:
        import cupy
    except Exception as exc:  # not installed, or built for another CUDA
        return f"CuPy is not importable ({type(exc).__name__}: {exc}); install the 'gpu' extra"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:
        return f"no usable CUDA device ({exc})"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts[0] in ("unit", "integration", "e2e", "client"):
            item.add_marker(getattr(pytest.mark, parts[0]))
        if item.get_closest_marker("gpu") is not None:
            reason = cuda_unavailable_reason()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {reason}"))


MODEL_REPOSITORY = ROOT / "model_repository"


async def until(condition, timeout_s: float = 5.0) -> None:
    """Wait (on the event loop) until ``condition()`` holds: tests order events by what has
    happened, not by how long they slept. AssertionError after ``timeout_s``."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout_s} s: {condition}")
        await asyncio.sleep(0.001)


async def settle(turns: int = 20) -> None:
    """Let the event loop run ``turns`` times (to show that something does NOT happen)."""
    import asyncio

    for _ in range(turns):
        await asyncio.sleep(0)


def wait_until(condition, timeout_s: float = 5.0):
    """``until`` for a test's own thread, where real threads do the work and no event loop
    runs: poll ``condition()`` until it holds. Returns its value; AssertionError after
    ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout_s} s: {condition}")
        time.sleep(0.001)
    return value


def holds_for(condition, seconds: float, interval_s: float = 0.005) -> None:
    """A bounded check that something does NOT happen in another thread (``settle`` shows it
    on the event loop): ``condition()`` holds at every look for ``seconds``. AssertionError at
    the first look where it does not."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        if not condition():
            raise AssertionError(f"stopped holding within {seconds} s: {condition}")
        if time.monotonic() > deadline:
            return
        time.sleep(interval_s)


def waiting_in(thread, function: str) -> bool:
    """Whether ``thread`` is blocked in ``threading.Condition.wait`` (what Event, Queue and
    Semaphore wait in too) called, however deep, from a function named ``function``: what a
    test waits for (``wait_until``) before it checks what wakes the thread. Once a thread is
    in ``Condition.wait``, a ``notify`` made under the condition's lock reaches it."""
    import sys

    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code.co_name != "wait" or frame.f_globals.get("__name__") != "threading":
        return False
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


@pytest.fixture(scope="session")
def pipeline_cpu(real_server):
    """The real default model (yolov5s-seg, COCO) on the CPU, loaded once per session: the
    real server's own (its synchronous API runs beside the server's batches safely)."""
    return real_server.server.state.pipelines["instance_segmentation"]


@pytest.fixture(scope="session")
def samples():
    """name -> (H, W, 3) uint8 RGB of the real sample photos (see pipeline.tools.samples)."""
    from pipeline.tools.samples import NAMES, sample_rgb

    return {name: sample_rgb(name) for name in NAMES}


def copy_repository(target: Path, **edits) -> Path:
    """The shipped model repository under ``target``, its converted models linked (every
    form), and each model's config.pbtxt passed through ``edits[model_name](text)`` where
    given."""
    import shutil

    model_files = ("*.pt", "*.onnx", "*.xml", "*.bin")
    for folder in MODEL_REPOSITORY.iterdir():
        if not (folder / "config.pbtxt").is_file():
            continue
        shutil.copytree(folder, target / folder.name, ignore=shutil.ignore_patterns(*model_files))
        for model_file in (f for pattern in model_files for f in folder.glob(f"*/{pattern}")):
            (target / model_file.relative_to(MODEL_REPOSITORY)).symlink_to(model_file)
        config = target / folder.name / "config.pbtxt"
        if folder.name in edits:
            config.write_text(edits[folder.name](config.read_text()))
    return target


class RunningServer:
    """An in-process server (its own event loop in a thread), so tests can use the real,
    blocking tritonclient against it."""

    def __init__(self, server, loop):
        self.server = server
        self.loop = loop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def call(self, coro, timeout=60):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def running_server(**settings):
    """A PipelineServer on free ports in this process (the real model unless settings say)."""
    import asyncio
    import threading

    from pipeline.frontends.config import ServerConfig
    from pipeline.frontends.server import PipelineServer

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
def real_server():
    """The real model (yolov5s-seg), served in-process once per session (shared memory on, as
    the shared-memory example in docs/shared-memory.md asks)."""
    with running_server(allow_shared_memory=True) as running:
        yield running


def pointed_at(network: str):
    """An edit of a pipeline config (for ``copy_repository``) that makes it run ``network``."""
    import re

    def edit(text: str) -> str:
        return re.sub(r'(key: "network" value: \{ string_value: ")[^"]*(")', rf"\g<1>{network}\g<2>", text)
    return edit


def without_batch_calibration(text: str) -> str:
    """A pipeline config that batches up to max_batch_size whatever the hardware measures."""
    return text + '\nparameters { key: "calibrate_batch_size" value: { string_value: "false" } }\n'
