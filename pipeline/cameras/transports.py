"""What each kind of sink knows: connect, send a batch, disconnect (``WebhookTransport``,
``MqttTransport``, ``RedisStreamTransport``, found by kind in ``TRANSPORTS``). Buffering,
batches, retries, counting and closing are the ``sinks.Sink``'s, the same for every kind, so
a new kind is one small class.

A batch is what was waiting, up to the transport's ``batch`` (and ``sinks.BATCH_BYTES``): the
MQTT and Redis ones put up to ``IN_FLIGHT`` messages on the wire before the first answer comes
back (PUBLISHes awaiting their PUBACKs, one pipelined round trip of XADDs), so a broker a round
trip of 50 ms away still takes a 30 fps camera's results; a webhook POSTs one at a time, in
order. Kafka is not built: no Kafka broker can be run in this project's tests, and a kind that
no test delivers through is not shipped.

TLS (https, mqtts, rediss) verifies the target: its certificate must chain to a CA the system
trusts or to one in ``ca_file`` (the server's ``--sink-ca-file``, for brokers with a private
CA), and name the URL's host. There is no switch to skip verification: a sink sends a camera's
results, and credentials, to whoever answers.

A webhook answer other than 2xx is an error to retry, except a 4xx other than 408 and 429:
that message is ``Rejected`` (sending it again would be refused again).
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
from collections.abc import Callable
from typing import Protocol

import aiohttp
from yarl import URL

from .sink_targets import SinkTarget

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0  # one connect, send or disconnect; past it the attempt has failed
IN_FLIGHT = 32  # messages sent before the first is acknowledged, in a batch (MQTT, Redis)
RETRIED_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests: "later", not "never"


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

