"""SIGTERM with clients on keep-alive HTTP connections, against a real server process (on the
fake network, 50 ms of busy work per image: ``tests/fakes.py``), several times over. Whatever
the clients do, the drain ends at its grace period and the process exits 0; every request the
server read is answered (200, or 503 once it drains: at once, its body unread, and with
``Connection: close``) unless its body never came, and then its connection is closed at the
deadline; a client that leaves during the drain logs no error."""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import threading
import time

import grpc

from pipeline.proto import video_pb2 as vpb
from pipeline.proto import video_pb2_grpc
from pipeline.tools.launch import local_server

from ..conftest import ROOT
from ..fakes import PIPELINE, fake_repository, png, scene

GRACE_S = 3
RUNS = 3
# Past the grace period: the interpreter's own exit (about a second here, with or without
# clients: native modules torn down).
EXIT_MARGIN_S = 3.0
LOOPERS = 4
BODY = base64.b64encode(png(scene(240, 320, green=(100, 60, 260, 220))))


def request_head() -> bytes:
    """A Roboflow v0 request's head, for BODY."""
    return (f"POST /{PIPELINE}/1 HTTP/1.1\r\nHost: test\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode()


class Connection:
    """One keep-alive HTTP/1.1 connection spoken by hand, so that a client can stop halfway
    through a body. ``answer`` reads one response: its status and whether the server asked to
    close, or None when the server closed the connection without answering."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=GRACE_S + 30)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def answer(self) -> tuple[int, bool] | None:
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            if not self._more():
                return None
        self.buffer = self.buffer[length:]
        return int(lines[0].split()[1]), headers.get("connection") == "close"

    def closed_by_server(self) -> bool:
        """Whether the server closes the connection (the next read is its end)."""
        return not self._more() and not self.buffer

    def infer(self) -> tuple[int, bool] | None:
        self.send(request_head() + BODY)
        return self.answer()

    def close(self) -> None:
        self.sock.close()


class Looper(threading.Thread):
    """Sends requests one after another on one keep-alive connection until the server says it
    closes it (or does); records every outcome."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.connection = Connection(port)
        self.outcomes: list[tuple[int, bool] | None] = []
        self.closed = False  # after an answer that said so

    def run(self):
        while True:
            outcome = self.connection.infer()
            self.outcomes.append(outcome)
            if outcome is None:
                return
            if outcome[1]:
                self.closed = self.connection.closed_by_server()
                return


class Awaiting(threading.Thread):
    """Waits for one answer on a connection: its outcome, and when it came."""

    def __init__(self, connection: Connection):
        super().__init__(daemon=True)
        self.connection = connection
        self.outcome: tuple[int, bool] | None | str = "nothing yet"
        self.at = float("inf")

    def run(self):
        self.outcome = self.connection.answer()
        self.at = time.monotonic()


def grpc_leaver(address: str, frames_sent: threading.Event, leave: threading.Event) -> None:
    """A video stream that its client cancels while the server drains."""
    def frames():
        for i in range(1000):
            if leave.is_set():
                return
            yield vpb.Frame(stream_id="leaver", frame_index=i, encoded=base64.b64decode(BODY))
            frames_sent.set()
            time.sleep(0.02)

    with grpc.insecure_channel(address) as channel:
        call = video_pb2_grpc.VideoSegmentationStub(channel).StreamFrames(frames(), timeout=60)
        leave.wait()
        call.cancel()


def drain_once(tmp_path, run: int) -> None:
    repository = fake_repository(tmp_path / f"models-{run}", delay_ms=50, queue_timeout_s=30)
    log = tmp_path / f"server-{run}.log"
    with local_server("--model-repository", str(repository), "--device", "cpu",
                      "--grace-period-s", str(GRACE_S), http=True, log=log.open("w"),
                      cwd=ROOT) as server:
        port, process = server.http_port, server.process
        loopers = [Looper(port) for _ in range(LOOPERS)]
        fresh, late = Connection(port), Connection(port)  # keep-alive, idle at the signal
        for connection in (fresh, late):
            assert connection.infer() == (200, False)
        stalled, slow, leaving = Connection(port), Connection(port), Connection(port)
        leave, frames_sent = threading.Event(), threading.Event()
        streamer = threading.Thread(target=grpc_leaver, args=(server.address, frames_sent, leave),
                                    daemon=True)
        streamer.start()
        for looper in loopers:
            looper.start()
        while not all(looper.outcomes for looper in loopers) or not frames_sent.is_set():
            time.sleep(0.02)
        # Requests read before the signal, half their bodies in: the rest of one never
        # comes, of one it comes after the signal, and one's client leaves.
        for connection in (stalled, slow, leaving):
            connection.send(request_head() + BODY[:len(BODY) // 2])
        answers = {name: Awaiting(connection) for name, connection in
                   (("stalled", stalled), ("slow", slow), ("fresh", fresh), ("late", late))}
        for waiter in answers.values():
            waiter.start()
        time.sleep(0.2)

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        leaving.close()
        leave.set()
        sent = time.monotonic()
        fresh.send(request_head() + BODY)  # a new request on a keep-alive connection
        late.send(request_head() + BODY[:100])  # ... one whose body stalls
        time.sleep(0.2)
        slow.send(BODY[len(BODY) // 2:])
        try:
            code = process.wait(GRACE_S + EXIT_MARGIN_S)
        except subprocess.TimeoutExpired:
            code = None
            process.kill()  # so the clients below end: the assertion on the exit reports it
        took = time.monotonic() - signalled
        for thread in (*loopers, *answers.values(), streamer):
            thread.join(5)
    text = log.read_text()
    assert code == 0 and took < GRACE_S + EXIT_MARGIN_S, (run, code, took, text[-3000:])
    assert "draining" in text and "stopped" in text
    assert "ERROR" not in text and "Traceback" not in text, text[-5000:]
    for looper in loopers:  # served; the request in flight or the next answered, then closed
        assert looper.outcomes[-1] in ((200, True), (503, True)) and looper.closed, looper.outcomes
        assert all(outcome == (200, False) for outcome in looper.outcomes[:-1]), looper.outcomes
    outcomes = {name: waiter.outcome for name, waiter in answers.items()}
    assert outcomes == {"stalled": None, "slow": (503, True), "fresh": (503, True),
                        "late": (503, True)}, outcomes
    # Refused at once, not after a body that would not come.
    assert answers["fresh"].at - sent < 1.0 and answers["late"].at - sent < 1.0
    # The body that never came held its connection open until the deadline, not past it.
    assert GRACE_S <= answers["stalled"].at - signalled < GRACE_S + EXIT_MARGIN_S


def test_sigterm_with_keepalive_clients_exits_within_grace_answering_what_it_read(tmp_path):
    for run in range(RUNS):
        drain_once(tmp_path, run)
