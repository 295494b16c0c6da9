"""Delivering a camera stream's results to the outside: webhooks, MQTT and Redis Streams.

Vocabulary:

- a **sink URL** names one target; ``parse_sink`` reads it once into a ``SinkTarget`` (every
  mistake a BadInputError that says what is wrong and which schemes are known);
- a **message** is one JSON document (utf-8 bytes): the result of one frame;
- a **Sink** is one target of one stream: a bounded **buffer** of messages, one **delivery
  task** that sends them in order, a **batch** at a time, and counters (``status()``);
- a **transport** is all a kind knows: connect, send a batch, disconnect
  (``WebhookTransport``, ``MqttTransport``, ``RedisStreamTransport``, found by kind in
  ``TRANSPORTS``). A batch is what was waiting, up to the transport's ``batch`` and
  ``BATCH_BYTES``: the MQTT and Redis ones put up to ``IN_FLIGHT`` messages on the wire
  before the first answer comes back (PUBLISHes awaiting their PUBACKs, one pipelined round
  trip of XADDs), so a broker a round trip of 50 ms away still takes a 30 fps camera's
  results; a webhook POSTs one at a time, in order. A batch that fails is halved for its next
  attempt (the rest waits again, first in line), so a link too slow to carry a whole batch
  within ``SEND_TIMEOUT_S`` still carries a part; each success doubles the size again.
  Buffering, batches, retries, counting and closing are the Sink's, the same for every
  kind, so a new kind is one small class. Kafka is not built: no Kafka broker can be run in
  this project's tests, and a kind that no test delivers through is not shipped.

URL forms (``{stream_id}`` in a topic or key is replaced by the stream's id):

    http(s)://[user:pass@]host[:port]/path[?query]   webhook: POST, Content-Type
        application/json, one message per request; user:pass as HTTP Basic authentication
    mqtt(s)://[user:pass@]host[:1883|:8883][/topic]  MQTT 3.1.1 PUBLISH at QoS 1 (acknowledged);
        no topic: "rle-serving/{stream_id}"; a topic without "{stream_id}" gets
        "/{stream_id}" appended (one topic per stream); "+" and "#" are refused
    redis(s)://[user:pass@]host[:6379][/key][?maxlen=N&db=D]   Redis Streams: XADD key MAXLEN ~ N
        (default 10000) with fields stream_id, frame_index, document; default key
        "rle-serving:{stream_id}"; the path is the key, so the database is ``?db=``

The "s" schemes (https, mqtts, rediss) speak TLS and verify the target: its certificate must
chain to a CA the system trusts or to one in ``ca_file`` (the server's ``--sink-ca-file``, for
brokers with a private CA), and name the URL's host. There is no switch to skip verification:
a sink sends a camera's results, and credentials, to whoever answers.

What is retried: a connection that cannot be made or is lost, a send that fails or is not
acknowledged within ``SEND_TIMEOUT_S``, and a webhook answer other than 2xx, except 4xx ones
other than 408 and 429. The batch stays first in line and is sent again (halved) after a pause
that doubles from ``BACKOFF_S[0]`` to ``BACKOFF_S[1]`` (reconnecting first), forever: a broker
that goes away and comes back gets the messages that waited for it, in order. Delivery is at
least once: a message whose acknowledgement was lost, or that was in a batch cut short, is
sent again.

What is dropped, and counted in ``dropped``: the oldest waiting message when one more arrives
and ``buffer`` are waiting (the batch being sent is kept: it is not waiting, so a sink holds
at most ``buffer`` + ``IN_FLIGHT``; a stream that would rather wait awaits ``room()``); a message a
webhook refuses with a 4xx other than 408/429 (``last_error`` says so; sending it again would
be refused again); whatever is still held when ``close(timeout_s)`` runs out of time; and
messages offered after ``close``.

Credentials in a URL (``user:pass@``) are used to connect but shown nowhere: ``redact`` takes
them out of ``status()``'s URL, every log line and every error (a webhook's query values too,
where tokens often travel).

A sink reaches whatever host its URL names, from the server's network: who may create streams
with sinks is the adapters' concern. ``offer``, ``start`` and ``close`` are called on the event
loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp
from yarl import URL

from ...errors import BadInputError

log = logging.getLogger(__name__)

KINDS = {"http": "webhook", "https": "webhook", "mqtt": "mqtt", "mqtts": "mqtt",  # scheme -> kind
         "redis": "redis", "rediss": "redis"}
DEFAULT_PORTS = {"http": 80, "https": 443, "mqtt": 1883, "mqtts": 8883, "redis": 6379, "rediss": 6379}
TLS_SCHEMES = frozenset({"https", "mqtts", "rediss"})
STREAM_ID = "{stream_id}"
DEFAULT_TOPIC = f"rle-serving/{STREAM_ID}"
DEFAULT_KEY = f"rle-serving:{STREAM_ID}"
DEFAULT_MAXLEN = 10_000
BACKOFF_S = (0.2, 5.0)  # the pause after a failure: first, and the most it doubles to
SEND_TIMEOUT_S = 10.0  # one connect, send or disconnect; past it the attempt has failed
IN_FLIGHT = 32  # messages sent before the first is acknowledged, in a batch (MQTT, Redis)
BATCH_BYTES = 1 << 20  # and at most this much of them (a batch has one message at least)
REDIS_OPTIONS = ("maxlen", "db")
RETRIED_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests: "later", not "never"
ERROR_CHARS = 300  # of an error's text kept in last_error and log lines


@dataclass(frozen=True)
class SinkTarget:
    """One sink URL, read: where to connect and what to name.

    kind: "webhook", "mqtt" or "redis". url: as given, credentials and all (never shown: its
    repr is off); redacted: the same without them, for statuses, logs and errors. tls: the
    scheme is https, mqtts or rediss. name: the MQTT topic or Redis key, "{stream_id}" still
    in it ("" for a webhook). maxlen, db: Redis only."""

    kind: str
    url: str = field(repr=False)
    redacted: str
    host: str
    port: int
    tls: bool = False
    username: str | None = field(default=None, repr=False)  # a lone "token@" is a secret too
    password: str | None = field(default=None, repr=False)
    name: str = ""
    maxlen: int = DEFAULT_MAXLEN
    db: int = 0

    def name_for(self, stream_id: str) -> str:
        """The topic or key for ``stream_id``."""
        return self.name.replace(STREAM_ID, stream_id)

    def scrub(self, text: str) -> str:
        """``text`` (an error's) with this URL's secrets taken out: the URL as given or without
        its userinfo becomes the redacted one; a password (or a lone token) anywhere, raw or
        percent-decoded, becomes "***"."""
        scheme, userinfo, rest = _authority(self.url)
        text = text.replace(self.url, self.redacted).replace(f"{scheme}://{rest}", self.redacted)
        secret = userinfo.partition(":")[2] if ":" in userinfo else userinfo
        for each in (secret, unquote(secret)):
            if each:
                text = text.replace(each, "***")
        return text


def redact(url: str) -> str:
    """``url`` without credentials: "user:pass@" becomes "user:***@", a lone "token@" becomes
    "***@", and every query value but a Redis URL's becomes "***". Works on text that is not a
    valid URL too (error messages quote what was given)."""
    scheme, userinfo, rest = _authority(url)
    if userinfo:
        user, colon, _ = userinfo.partition(":")
        url = f"{scheme}://{user}:***@{rest}" if colon else f"{scheme}://***@{rest}"
    if "?" in url and KINDS.get(scheme.lower()) != "redis":  # redis' query is ours (maxlen, db); others carry tokens
        head, _, query = url.partition("?")
        query = query.partition("#")[0]
        url = head + "?" + "&".join(f"{pair.partition('=')[0]}=***" for pair in query.split("&"))
    return url


def _authority(url: str) -> tuple[str, str, str]:
    """(scheme, userinfo, everything after the "@"); userinfo "" when there is none. For
    mqtt and redis, where nothing after the host may hold an "@", the last "@" ends the
    userinfo, so a password with an unescaped "/" is still found whole."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url
    end = len(rest)
    if KINDS.get(scheme.lower()) == "webhook":
        end = min((i for i in map(rest.find, "/?#") if i >= 0), default=end)
    at = rest.rfind("@", 0, end)
    if at < 0:
        return scheme, "", rest
    return scheme, rest[:at], rest[at + 1:]


def parse_sink(url: object) -> SinkTarget:
    """``url`` read as a sink target; BadInputError naming what is wrong (see the module's URL
    forms)."""
    if not isinstance(url, str):
        raise BadInputError(f"a sink is a URL such as mqtt://broker:1883/cameras, got {type(url).__name__}")
    if not url.strip():
        raise BadInputError("a sink is a URL such as mqtt://broker:1883/cameras, got an empty one")
    shown = redact(url)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in KINDS:
        got = f"unknown scheme {scheme!r}" if scheme else "no scheme"
        raise BadInputError(f"sink {shown!r}: {got}; known: {', '.join(f'{s}://' for s in KINDS)} "
                            "(Kafka is not supported)")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise BadInputError(f"sink {shown!r}: a URL has no spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL"
        raise BadInputError(f"sink {shown!r}: the host is not a valid name or [IPv6] address") from None
    if KINDS[scheme] in ("mqtt", "redis") and "@" in url.partition("://")[2][len(parts.netloc):]:
        raise BadInputError(f"sink {shown!r}: a user name or password with / ? # or @ in it must be "
                            "percent-encoded (%2F %3F %23 %40)")
    if not parts.hostname:
        raise BadInputError(f"sink {shown!r}: no host (e.g. {scheme}://broker.example:"
                            f"{DEFAULT_PORTS[scheme]}/...)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # also what urlsplit refused: not a number, or out of range
        raise BadInputError(f"sink {shown!r}: the port must be a number from 1 to 65535")
    if "#" in url:  # a fragment is never sent; in an MQTT topic it would be a wildcard
        raise BadInputError(f"sink {shown!r}: a sink URL has no # (a fragment, or an MQTT wildcard)")
    target = {"kind": KINDS[scheme], "url": url, "redacted": shown, "host": parts.hostname,
              "port": port or DEFAULT_PORTS[scheme], "tls": scheme in TLS_SCHEMES,
              "username": unquote(parts.username) if parts.username else None,
              "password": unquote(parts.password) if parts.password else None}
    if KINDS[scheme] == "mqtt":
        return SinkTarget(**target, name=_topic(parts.path, parts.query, shown))
    if KINDS[scheme] == "redis":
        return SinkTarget(**target, **_redis(parts.path, parts.query, shown))
    return SinkTarget(**target)


def _topic(path: str, query: str, shown: str) -> str:
    if query:
        raise BadInputError(f"sink {shown!r}: an MQTT sink takes no ?options (QoS is 1)")
    topic = unquote(path[1:])  # the first "/" separates; a topic may itself start with one
    if not topic:
        return DEFAULT_TOPIC
    if any(c in topic for c in "+#\0"):
        raise BadInputError(f"sink {shown!r}: an MQTT topic to publish to has no wildcards (+, #)")
    return topic if STREAM_ID in topic else f"{topic.rstrip('/')}/{STREAM_ID}"


def _redis(path: str, query: str, shown: str) -> dict:
    key = unquote(path[1:]) or DEFAULT_KEY
    if key.isdigit():
        raise BadInputError(f"sink {shown!r}: the path of a Redis sink is the stream key, not a "
                            f"database number; write ?db={key} for a database")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise BadInputError(f"sink {shown!r}: the query must be name=value pairs joined by &") from None
    options: dict[str, int] = {}
    for name, value in pairs:
        if name not in REDIS_OPTIONS or name in options:
            problem = "repeated" if name in options else "unknown"
            raise BadInputError(f"sink {shown!r}: {problem} option {name!r}; known: {', '.join(REDIS_OPTIONS)}")
        least = 1 if name == "maxlen" else 0
        if not (value.isascii() and value.isdigit()) or int(value) < least:
            raise BadInputError(f"sink {shown!r}: {name} must be a whole number from {least}, got {value!r}")
        options[name] = int(value)
    return {"name": key, **options}


class Transport(Protocol):
    """What one kind knows, built per Sink as ``kind(target, stream_id, ca_file)`` (ca_file:
    PEM certificates trusted besides the system's, for a TLS target). ``send`` delivers its
    batch (at most ``batch`` messages) in order, or raises. Each call may raise anything: the
    Sink disconnects and retries, unless it is ``Rejected`` (a refusal of the whole batch, so
    only a transport of ``batch`` 1 raises it). ``disconnect`` is also called when not
    connected, and must then do nothing."""

    batch: int

    async def connect(self) -> None: ...

    async def send(self, messages: list[bytes]) -> None: ...

    async def disconnect(self) -> None: ...


class Rejected(Exception):
    """The target refused this message for good (sending it again would be refused again)."""


class WebhookTransport:
    """POST each message; 2xx delivered, 4xx other than 408/429 ``Rejected``, else retried.
    One at a time: concurrent POSTs may arrive out of order, and a refusal is per message."""

    batch = 1

    def __init__(self, target: SinkTarget, stream_id: str, ca_file: str | None):
        self._url = URL(target.url).with_user(None)  # credentials go in a header, not the URL
        self._tls = tls_context(ca_file) if target.tls else None
        self._headers = {"Content-Type": "application/json"}
        if target.username is not None or target.password is not None:  # HTTP Basic (RFC 7617)
            pair = f"{target.username or ''}:{target.password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        self._session: aiohttp.ClientSession | None = None

    async def connect(self) -> None:
        # No proxies from the environment (trust_env off), no redirects: a POST is not repeated
        # somewhere else.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S), headers=self._headers)

    async def send(self, messages: list[bytes]) -> None:
        assert self._session is not None
        (message,) = messages
        async with self._session.post(self._url, data=message, allow_redirects=False,
                                      ssl=self._tls or True) as response:
            status = response.status  # the body is not read: nothing in it is ours to use
        if 200 <= status < 300:
            return
        if 400 <= status < 500 and status not in RETRIED_4XX:
            raise Rejected(f"the webhook answered HTTP {status}")
        raise ConnectionError(f"the webhook answered HTTP {status}")

    async def disconnect(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class MqttTransport:
    """PUBLISH at QoS 1 to the stream's topic, a batch at once, waiting for the broker's PUBACKs
    (paho puts them on the wire in the order they are published)."""

    batch = IN_FLIGHT

    def __init__(self, target: SinkTarget, stream_id: str, ca_file: str | None):
        self._target = target
        self._topic = target.name_for(stream_id)
        self._tls = tls_context(ca_file) if target.tls else None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client = None
        self._lost: asyncio.Task | None = None

    async def connect(self) -> None:
        import aiomqtt

        target, stack = self._target, contextlib.AsyncExitStack()
        # TCP_NODELAY: a batch's last PUBLISH goes at once, not after the first one's ACK (Nagle).
        client = aiomqtt.Client(target.host, target.port, username=target.username, password=target.password,
                                identifier=f"rle-serving-{uuid.uuid4().hex[:12]}", timeout=SEND_TIMEOUT_S,
                                keepalive=30, max_inflight_messages=IN_FLIGHT, tls_context=self._tls,
                                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                logger=log.getChild("mqtt"))
        client.pending_calls_threshold = IN_FLIGHT  # a batch waiting for its PUBACKs is no news
        self._client = await stack.enter_async_context(client)
        self._stack = stack
        # aiomqtt's message iterator is its public way to learn that the connection is lost
        # (we subscribe to nothing, so it only ever ends, raising). A publish waiting for its
        # PUBACK would otherwise wait the whole SEND_TIMEOUT_S when the broker goes away.
        self._lost = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        async for _ in self._client.messages:
            pass

    async def send(self, messages: list[bytes]) -> None:
        assert self._lost is not None
        # Tasks start in the order made, and each hands its message to paho at once.
        publishes = [asyncio.ensure_future(self._client.publish(self._topic, message, qos=1,
                                                                timeout=SEND_TIMEOUT_S)) for message in messages]
        acknowledged = asyncio.gather(*publishes)
        sent = False
        try:
            done, _ = await asyncio.wait((acknowledged, self._lost), return_when=asyncio.FIRST_COMPLETED)
            if acknowledged not in done:
                raise ConnectionError("the connection to the MQTT broker was lost")
            acknowledged.result()
            sent = True
        finally:
            if not sent:  # lost, failed or timed out: no publish of the batch outlives it
                for publish in publishes:
                    publish.cancel()
                # A gather whose children were cancelled ends with CancelledError as its
                # exception: taken here, so asyncio does not log it as never retrieved.
                acknowledged.add_done_callback(lambda gathered: gathered.cancelled() or gathered.exception())

    async def disconnect(self) -> None:
        if self._lost is not None:
            self._lost.cancel()
            await asyncio.gather(self._lost, return_exceptions=True)
            self._lost = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()


class RedisStreamTransport:
    """XADD each message to the stream's key, trimmed to about ``maxlen`` entries: a batch in
    one pipelined round trip (not a transaction: the XADDs run in order)."""

    batch = IN_FLIGHT

    def __init__(self, target: SinkTarget, stream_id: str, ca_file: str | None):
        self._target = target
        # redis-py takes no SSL context; its own is the system's, plus ssl_ca_certs.
        self._tls = dict(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True,
                         ssl_ca_certs=ca_file) if target.tls else {}
        self._stream_id = stream_id
        self._key = target.name_for(stream_id)
        self._redis = None

    async def connect(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        target = self._target
        # redis-py's own retries off: the Sink retries, with its backoff and its counters.
        self._redis = Redis(host=target.host, port=target.port, db=target.db, username=target.username,
                            password=target.password, socket_timeout=SEND_TIMEOUT_S,
                            socket_connect_timeout=SEND_TIMEOUT_S, retry=Retry(NoBackoff(), 0), **self._tls)
        await self._redis.ping()

    async def send(self, messages: list[bytes]) -> None:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            for message in messages:
                fields = {"stream_id": self._stream_id, "frame_index": frame_index(message), "document": message}
                pipe.xadd(self._key, fields, maxlen=self._target.maxlen, approximate=True)
            await pipe.execute()

    async def disconnect(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies the target's certificate and name against the system's
    CAs and those in ``ca_file``."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def frame_index(message: bytes) -> str:
    """The document's "frame_index" as text ("" when it has none): a Redis field of its own,
    so readers can find a frame without parsing every document."""
    try:
        value = json.loads(message).get("frame_index")
    except (ValueError, AttributeError):
        return ""
    return "" if value is None else str(value)


TRANSPORTS: dict[str, Callable[[SinkTarget, str, str | None], Transport]] = {
    "webhook": WebhookTransport, "mqtt": MqttTransport, "redis": RedisStreamTransport}


def backoff_delays(first_s: float, most_s: float) -> Iterator[float]:
    """The pauses after consecutive failures: ``first_s``, doubling, never above ``most_s``."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, most_s)


class Sink:
    """One target of one stream: a bounded buffer, one delivery task, retries with backoff,
    counters. ``offer`` never blocks the stream; a stream that would rather wait than drop
    (a file played as fast as possible) awaits ``room()`` first.

    buffer: how many messages may wait (beside the batch being sent); backoff_s: the first and
    the longest pause between attempts after failures; ca_file: see the module's TLS."""

    def __init__(self, target: SinkTarget, stream_id: str, *, buffer: int = 1000,
                 backoff_s: tuple[float, float] = BACKOFF_S, ca_file: str | None = None):
        if buffer < 1:
            raise BadInputError(f"a sink's buffer holds at least 1 message, got {buffer}")
        self.target = target
        self.stream_id = stream_id
        self._transport = TRANSPORTS[target.kind](target, stream_id, ca_file)
        self._bound = buffer
        self._backoff_s = backoff_s
        self._waiting: deque[bytes] = deque()
        self._sending: list[bytes] = []  # the batch taken from the buffer, not yet delivered
        self._batch = self._transport.batch  # the most the next batch takes: halved by failures
        self._wake = asyncio.Event()  # a message was offered, or close() was called
        self._room = asyncio.Event()  # a batch was taken from the buffer, or close() was called
        self._closing = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._linked = False  # the transport is connected (connect() succeeded, nothing failed since)
        self._connected = False  # the last attempt reached the target (status: a webhook has no link)
        self._dropping = False  # the buffer overflowed since the last delivery (one log line)
        self.delivered = self.dropped = self.retries = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"{self.target.kind} sink {self.target.redacted} of stream {self.stream_id!r}"

    def start(self) -> None:
        """Start the delivery task (on the event loop; once)."""
        if self._task is None and not self._closing.is_set():
            self._task = asyncio.get_running_loop().create_task(self._deliver(), name=repr(self))

    def offer(self, message: bytes) -> None:
        """Queue one message; when ``buffer`` are waiting, the oldest is dropped and counted."""
        if self._closing.is_set():
            self.dropped += 1
            return
        if self.full:
            self._waiting.popleft()
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("%r: %d messages wait already; dropping the oldest (counted in 'dropped')",
                            self, self._bound)
        self._waiting.append(message)
        self._wake.set()

    @property
    def full(self) -> bool:
        """``offer`` would drop the oldest waiting message now."""
        return len(self._waiting) >= self._bound

    async def room(self) -> None:
        """Return once ``offer`` would drop nothing (fewer than ``buffer`` wait), or the sink
        is closing; while its target is away, that is when it returns."""
        while self.full and not self._closing.is_set():
            self._room.clear()
            await self._room.wait()

    async def close(self, timeout_s: float) -> None:
        """Deliver what is held within ``timeout_s`` (retrying as ever; a pause in progress is
        cut short), then stop: what is left is counted dropped, and the connection closed."""
        self._closing.set()
        self._wake.set()
        self._room.set()
        task = self._task
        if task is not None:
            await asyncio.wait((task,), timeout=max(timeout_s, 0))
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        left = len(self._waiting) + len(self._sending)
        if left:
            log.warning("%r: closed with %d messages undelivered (counted in 'dropped')", self, left)
            self.dropped += left
            self._waiting.clear()
            self._sending = []
        await self._disconnect()

    def status(self) -> dict:
        """The counters; the URL without credentials."""
        return {"url": self.target.redacted, "kind": self.target.kind, "connected": self._connected,
                "delivered": self.delivered, "dropped": self.dropped,
                "buffered": len(self._waiting) + len(self._sending),
                "retries": self.retries, "last_error": self.last_error}

    async def _deliver(self) -> None:
        """The delivery task: a batch at a time, in order, until closed and empty."""
        delays = backoff_delays(*self._backoff_s)
        failing = False  # since the last success (one log line per outage)
        while True:
            if not self._sending:
                if not self._waiting:
                    if self._closing.is_set():
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._sending = self._take()
            try:
                if not self._linked:
                    await asyncio.wait_for(self._transport.connect(), SEND_TIMEOUT_S)
                    self._linked = True
                await asyncio.wait_for(self._transport.send(self._sending), SEND_TIMEOUT_S)
            except Rejected as exc:  # a webhook's: a batch of one
                self._connected = True
                self.dropped += len(self._sending)
                self._sending = []
                self.last_error = self._describe(exc)
                log.warning("%r: message refused, dropped: %s", self, self.last_error)
                continue
            except Exception as exc:  # whatever a transport raises is retried
                self.retries += 1
                if len(self._sending) > 1:  # halved; the rest waits again, first in line
                    keep = len(self._sending) // 2
                    self._waiting.extendleft(reversed(self._sending[keep:]))
                    self._sending = self._sending[:keep]
                self._batch = len(self._sending)
                self.last_error = self._describe(exc)
                if not failing:
                    failing = True
                    log.warning("%r: %s; retrying (pauses of %g to %g s), %d messages may wait meanwhile",
                                self, self.last_error, *self._backoff_s, self._bound)
                await self._disconnect()
                await self._pause(next(delays))
                continue
            self._connected = True
            self.delivered += len(self._sending)
            self._sending = []
            self._batch = min(self._transport.batch, 2 * self._batch)
            self._dropping = False
            if failing:
                failing = False
                log.info("%r: delivering again (after %d retries in all)", self, self.retries)
                delays = backoff_delays(*self._backoff_s)

    def _take(self) -> list[bytes]:
        """The next batch: the oldest waiting messages, up to the batch size and BATCH_BYTES
        (one message at least)."""
        batch = [self._waiting.popleft()]
        size = len(batch[0])
        while self._waiting and len(batch) < self._batch and size + len(self._waiting[0]) <= BATCH_BYTES:
            size += len(self._waiting[0])
            batch.append(self._waiting.popleft())
        self._room.set()
        return batch

    async def _pause(self, delay_s: float) -> None:
        if self._closing.is_set():
            await asyncio.sleep(delay_s)
            return
        # close() cuts the pause short: the flush gets one prompt attempt.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay_s)

    async def _disconnect(self) -> None:
        self._linked = self._connected = False
        try:
            await asyncio.wait_for(self._transport.disconnect(), SEND_TIMEOUT_S)
        except Exception as exc:  # a connection already broken may fail to close
            log.debug("%r: disconnect: %s", self, self._describe(exc))

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return self.target.scrub(text)[:ERROR_CHARS]

