"""Client tests run against real server processes, so they also run in the light client
environment (`make test` runs them in .venv-client, which has no torch, model or server pins).

The servers are ``python -m pipeline serve`` from the server's environment (``.venv``, or
``RLE_SERVING_SERVER_PYTHON``); the sample photos are written by that environment too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients.demo import free_port, wait_until_serving

from ..conftest import MODEL_REPOSITORY, ROOT

SERVER_PYTHON = Path(os.environ.get("RLE_SERVING_SERVER_PYTHON", ROOT / ".venv/bin/python"))


@dataclass
class ServerProcess:
    address: str
    port: int
    process: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@contextmanager
def server_process(tmp_path: Path, *args: str, port: int | None = None):
    """A real ``python -m pipeline serve`` on a free port, stopped (SIGTERM) afterwards."""
    if not SERVER_PYTHON.exists():
        pytest.fail(f"{SERVER_PYTHON} is missing: the client tests need the server's venv "
                    "(`make setup model`), or set RLE_SERVING_SERVER_PYTHON")
    port = port or free_port()
    log = tmp_path / f"server-{port}-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [str(SERVER_PYTHON), "-m", "pipeline", "serve", "--model-repository",
         str(MODEL_REPOSITORY), "--host", "127.0.0.1", "--grpc-port", str(port),
         "--metrics-port", "0", "--http-port", "0", "--device", "cpu", "--grace-period-s", "5", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    running = ServerProcess(f"127.0.0.1:{port}", port, process, log)
    tls_cert = Path(args[args.index("--tls-cert") + 1]) if "--tls-cert" in args else None
    try:
        wait_until_serving(f"localhost:{port}" if tls_cert else running.address, process,
                           tls_root_cert=tls_cert)
        yield running
    except RuntimeError as exc:
        raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None
    finally:
        try:
            running.stop(30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with server_process(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, bytes]:
    """name -> encoded bytes of the real sample photos, written by the server's environment."""
    folder = tmp_path_factory.mktemp("photos")
    subprocess.run([str(SERVER_PYTHON), "-m", "pipeline.samples", "--out", str(folder)],
                   cwd=ROOT, check=True, capture_output=True)
    return {path.stem: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture(scope="session")
def rgb(photos) -> dict:
    """name -> (H, W, 3) uint8 RGB of the sample photos (decoded here, with Pillow)."""
    import io

    import numpy as np
    from PIL import Image

    return {name: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            for name, data in photos.items()}


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
        pytest.fail(f"openssl could not make a test certificate: {made.stderr[-200:]}")
    return key, cert

