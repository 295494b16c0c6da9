"""A server that cannot start says why in one line and exits 2, having undone what it started:
no traceback from a half-started gRPC server after the message."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

from pipeline.tools.launch import free_port

from ..conftest import ROOT
from ..fakes import fake_repository


def test_a_port_in_use_is_one_clear_line_and_exit_2(tmp_path):
    repository = fake_repository(tmp_path / "models")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        starts = {}
        for taken in ("http", "grpc"):  # side by side: each start loads the model first
            ports = {"grpc": free_port(), "http": free_port(), taken: busy}
            starts[taken] = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "serve", "--model-repository", str(repository),
                 "--host", "127.0.0.1", "--grpc-port", str(ports["grpc"]), "--http-port",
                 str(ports["http"]), "--metrics-port", "0", "--device", "cpu"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ended = {taken: (process.wait(120), process.stderr.read()) for taken, process in starts.items()}
    for taken, (code, stderr) in ended.items():
        assert code == 2, stderr
        # Ours (INFO lines) and gRPC's C core's own log ("E1130 12:00:00.000 ... add_port.cc")
        # aside, one line: no traceback, nothing about an event loop or a coroutine afterwards.
        lines = [ln for ln in stderr.splitlines()
                 if not ln.startswith("INFO ") and not re.match(r"[EWI]\d{4} ", ln)]
        what = "HTTP" if taken == "http" else "gRPC"
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen for {what} on 127.0.0.1:{busy}"), stderr
