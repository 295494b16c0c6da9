"""Client tests run against real server processes, so they also run in the light client
environment (`make test` runs them in .venv-client, which has no torch, model or server pins).

The servers are ``python -m pipeline serve`` from the server's environment (``.venv``, or
``RLE_SERVING_SERVER_PYTHON``); the sample photos are written by that environment too.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.tools.launch import local_server

from ..conftest import MODEL_REPOSITORY, ROOT

SERVER_PYTHON = Path(os.environ.get("RLE_SERVING_SERVER_PYTHON", ROOT / ".venv/bin/python"))


@contextmanager
def server_process(tmp_path: Path, *args: str, port: int | None = None):
    """A real ``python -m pipeline serve`` from the server's environment (``local_server``),
    its log kept in ``tmp_path`` and shown if it fails to start."""
    if not SERVER_PYTHON.exists():
        pytest.fail(f"{SERVER_PYTHON} is missing: the client tests need the server's venv "
                    "(`make setup model`), or set RLE_SERVING_SERVER_PYTHON")
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    tls_cert = Path(args[args.index("--tls-cert") + 1]) if "--tls-cert" in args else None
    try:
        with local_server("--model-repository", str(MODEL_REPOSITORY), "--device", "cpu",
                          "--grace-period-s", "5", "--model-control-mode", "explicit",
                          "--load-model", "instance_segmentation", *args, python=SERVER_PYTHON, log=log.open("w"),
                          cwd=ROOT, port=port, tls_root_cert=tls_cert) as running:
            yield running
    except RuntimeError as exc:
        raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with server_process(tmp_path_factory.mktemp("server"), "--allow-shared-memory") as running:
        yield running


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, bytes]:
    """name -> encoded bytes of the real sample photos, written by the server's environment."""
    folder = tmp_path_factory.mktemp("photos")
    subprocess.run([str(SERVER_PYTHON), "-m", "pipeline.tools.samples", "--out", str(folder)],
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
    """A certificate for the name localhost only (no IP): a client that resolved the name
    itself must still check the certificate against the name."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "server.key", folder / "server.crt"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        capture_output=True, text=True)
    if made.returncode != 0:
        pytest.fail(f"openssl could not make a test certificate: {made.stderr[-200:]}")
    return key, cert

