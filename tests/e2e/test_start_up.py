"""A server that cannot start says why in one line and exits 2, having undone what it started:
no traceback from a half-started gRPC server after the message."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from pipeline.tools.launch import free_port

from ..conftest import ROOT
from ..fakes import fake_repository


@pytest.mark.parametrize("taken", ["http", "grpc"])
def test_a_port_in_use_is_one_clear_line_and_exit_2(tmp_path, taken):
    repository = fake_repository(tmp_path / "models")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        ports = {"grpc": free_port(), "http": free_port(), taken: busy}
        run = subprocess.run(
            [sys.executable, "-m", "pipeline", "serve", "--model-repository", str(repository),
             "--host", "127.0.0.1", "--grpc-port", str(ports["grpc"]), "--http-port",
             str(ports["http"]), "--metrics-port", "0", "--device", "cpu"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    # Ours (INFO lines) and gRPC's C core's own log ("E1130 12:00:00.000 ... add_port.cc")
    # aside, one line: no traceback, nothing about an event loop or a coroutine afterwards.
    lines = [ln for ln in run.stderr.splitlines()
             if not ln.startswith("INFO ") and not re.match(r"[EWI]\d{4} ", ln)]
    what = "HTTP" if taken == "http" else "gRPC"
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen for {what} on 127.0.0.1:{busy}"), run.stderr
