"""The one way to start a server process: ``python -m pipeline serve`` on free loopback ports,
handed back once its gRPC health says SERVING, stopped with SIGTERM (so it drains) afterwards.
``make run``, the client tests, the process tests, the benchmarks and the image test all use
it. It imports neither torch nor the server, so the light client's environment can use it to
start a server from another one (``python``)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gRPC channel options for waiting on a server that is starting: by default a channel backs off
# 1 s, 1.6 s, 2.6 s ... between attempts to reach a port not yet open, and so notices a server
# that came up a second or two late.
PROMPT_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 200)]


def wait_until_serving(address: str, server: subprocess.Popen | None = None, timeout_s: float = 180,
                       tls_root_cert: Path | None = None) -> None:
    """Poll a server's gRPC health until SERVING; raise RuntimeError if ``server`` exits
    first or the time runs out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    if tls_root_cert is None:
        channel = grpc.insecure_channel(address, PROMPT_RECONNECT)
    else:
        credentials = grpc.ssl_channel_credentials(Path(tls_root_cert).read_bytes())
        channel = grpc.secure_channel(address, credentials, PROMPT_RECONNECT)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)  # NOT_SERVING while it loads: ask again later, not in a busy loop
    raise RuntimeError(f"the server did not become SERVING within {timeout_s:.0f} s")


@dataclass
class ServerProcess:
    """A running server: its gRPC address and port, HTTP port (None without HTTP), process."""

    address: str
    port: int
    http_port: int | None
    process: subprocess.Popen

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM (the server drains), then its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


@contextlib.contextmanager
def local_server(*flags: str, python: str | Path = sys.executable, log=subprocess.DEVNULL,
                 cwd: Path | None = None, env: dict | None = None, port: int | None = None,
                 http: bool = False, tls_root_cert: Path | None = None, timeout_s: float = 180):
    """``python -m pipeline serve`` on free loopback ports, yielded as a ServerProcess once
    SERVING; stopped with SIGTERM when done (its exit code is then ``process.returncode``).

    flags: more server flags; a flag given again overrides the defaults here. port: the gRPC
    port (default: a free one). http: serve HTTP on a free port too (else none). log: where
    the server's stderr goes.
    tls_root_cert: the CA to check the server's TLS certificate with (with --tls-* flags).
    """
    port = port or free_port()
    http_port = free_port() if http else None
    process = subprocess.Popen(
        [str(python), "-m", "pipeline", "serve", "--host", "127.0.0.1", "--grpc-port", str(port),
         "--metrics-port", "0", "--http-port", str(http_port if http else -1), *flags],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    running = ServerProcess(f"127.0.0.1:{port}", port, http_port, process)
    try:
        wait_until_serving(f"localhost:{port}" if tls_root_cert else running.address, process,
                           timeout_s, tls_root_cert)
        yield running
    finally:
        try:
            running.stop()
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
