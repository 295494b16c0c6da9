"""What each kind of sink knows: connect, send a batch, disconnect (``WebhookTransport``,
``MqttTransport``, ``RedisStreamTransport``, ``KafkaTransport``, found by kind in ``TRANSPORTS``). Buffering,
batches, retries, counting and closing are the ``sinks.Sink``'s, the same for every kind, so
a new kind is one small class.

A batch is what was waiting, up to the transport's ``batch`` (and ``sinks.BATCH_BYTES``): the
MQTT, Redis and Kafka ones put up to ``IN_FLIGHT`` messages on the wire before the first answer
comes back (PUBLISHes awaiting their PUBACKs, one pipelined round trip of XADDs, records the
Kafka producer packs into produce requests), so a broker a round trip of 50 ms away still takes
a 30 fps camera's results; a webhook POSTs one at a time, in order.

Where: the target's ``addresses``, looked up and allowed once, when its stream was added
(``sink_targets.checked``), tried in order; no transport looks the name up again, on a
reconnect neither (a name whose addresses change later is the operator's to allow-list), and a
target never checked is refused when its transport is made.

TLS (https, mqtts, rediss, kafkas) verifies the target: its certificate must chain to a CA the system
trusts or to one in ``ca_file`` (the server's ``--sink-ca-file``, for brokers with a private
CA), and name the URL's host, whichever of its addresses was reached (``tls_context``). There
is no switch to skip verification: a sink sends a camera's results, and credentials, to
whoever answers.

A webhook answer other than 2xx is an error to retry, except a 4xx other than 408 and 429:
that message is ``Rejected`` (sending it again would be refused again); so is a Kafka record
the broker calls too large, once its batch is down to that one record.

What went wrong is told in our words (``failure``: "connection refused", "timed out", "TLS:
certificate not trusted", "HTTP 503", ...), never in the target's: not its banner, status
text or error replies, nor an exception's text, which may quote them. Whoever may add streams
reads ``last_error``; it must not make the server a port scanner that reads other servers'
answers back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import json
import logging
import socket
import ssl
import uuid
from collections.abc import Callable
from typing import Protocol

import aiohttp
from aiohttp.abc import ResolveResult
from yarl import URL

from ..serving.url_policy import pinned_connector
from .sink_targets import SinkTarget

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0  # one connect, send or disconnect; past it the attempt has failed
IN_FLIGHT = 32  # messages sent before the first is acknowledged, in a batch (MQTT, Redis)
RETRIED_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests: "later", not "never"
LOST = "connection lost"
PROTOCOL = "protocol error (not the server the URL's scheme names?)"
TLS_UNTRUSTED = "TLS: certificate not trusted"
TLS_OTHER_NAME = "TLS: certificate for another host"
TLS_FAILED = "TLS handshake failed"
UNKNOWN_TOPIC, TOPIC_NOT_AUTHORIZED = 3, 29  # Kafka's UNKNOWN_TOPIC_OR_PARTITION, TOPIC_AUTHORIZATION_FAILED
_HOST_MISMATCH = frozenset({62, 64})  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
_ERRNOS = {errno.ECONNREFUSED: "connection refused", errno.ETIMEDOUT: "timed out",
           errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable",
           errno.ECONNRESET: LOST, errno.EPIPE: LOST, errno.ECONNABORTED: LOST}


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


# Kafka's MESSAGE_TOO_LARGE and RECORD_LIST_TOO_LARGE: a record over the broker's
# message.max.bytes (1 MB by default), which no retry delivers.
TOO_LARGE = {10, 18}


class Failed(Exception):
    """A failure whose text is ours (``failure`` shows it as it is)."""


class Rejected(Failed):
    """The target refused this message for good (sending it again would be refused again)."""


class WebhookTransport:
    """POST each message; 2xx delivered, 4xx other than 408/429 ``Rejected``, else retried.
    One at a time: concurrent POSTs may arrive out of order, and a refusal is per message."""

    batch = 1

    def __init__(self, target: SinkTarget, stream_id: str, ca_file: str | None):
        self._url = URL(target.url).with_user(None)  # credentials go in a header, not the URL
        self._addresses = checked_addresses(target)
        self._tls = tls_context(ca_file, target.host) if target.tls else None
        self._headers = {"Content-Type": "application/json"}
        if target.username is not None or target.password is not None:  # HTTP Basic (RFC 7617)
            pair = f"{target.username or ''}:{target.password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        self._session: aiohttp.ClientSession | None = None

    async def connect(self) -> None:
        # No proxies from the environment (trust_env off), no redirects: a POST is not repeated
        # somewhere else; no lookup: the checked addresses only.
        self._session = aiohttp.ClientSession(
            connector=pinned_connector(self._url.raw_host, self._addresses),
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
            raise Rejected(f"HTTP {status}")
        raise Failed(f"HTTP {status}")

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
        self._addresses = checked_addresses(target)
        self._topic = target.name_for(stream_id)
        self._tls = tls_context(ca_file, target.host) if target.tls else None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client = None
        self._lost: asyncio.Task | None = None

    async def connect(self) -> None:
        import aiomqtt
        from aiomqtt.exceptions import MqttConnectError

        target = self._target
        for address in self._addresses:  # in the resolver's order, as a connection by name tries them
            stack = contextlib.AsyncExitStack()
            # TCP_NODELAY: a batch's last PUBLISH goes at once, not after the first one's ACK (Nagle).
            client = aiomqtt.Client(address["host"], target.port, username=target.username,
                                    password=target.password, identifier=f"rle-serving-{uuid.uuid4().hex[:12]}",
                                    timeout=SEND_TIMEOUT_S, keepalive=30, max_inflight_messages=IN_FLIGHT,
                                    tls_context=self._tls, logger=log.getChild("mqtt"),
                                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
            client.pending_calls_threshold = IN_FLIGHT  # a batch waiting for its PUBACKs is no news
            try:
                self._client = await stack.enter_async_context(client)
            except MqttConnectError as exc:  # the broker's CONNACK said no: a code, named by paho
                failed = Failed(f"MQTT: the broker refused the connection ({exc.rc})")
                continue
            except aiomqtt.MqttError as exc:  # raised "from None", yet the error it stands for is its
                failed = exc  # __context__, which ``failure`` reads (never the text)
                continue
            self._stack = stack
            # aiomqtt's message iterator is its public way to learn that the connection is lost
            # (we subscribe to nothing, so it only ever ends, raising). A publish waiting for its
            # PUBACK would otherwise wait the whole SEND_TIMEOUT_S when the broker goes away.
            self._lost = asyncio.get_running_loop().create_task(self._watch())
            return
        raise failed

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
                raise Failed(LOST)
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
        self._addresses = checked_addresses(target)
        self._tls = tls_context(ca_file, target.host) if target.tls else None
        self._stream_id = stream_id
        self._key = target.name_for(stream_id)
        self._redis = None

    async def connect(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.connection import ConnectionPool
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        target = self._target
        for address in self._addresses:  # in the resolver's order, as a connection by name tries them
            # redis-py's own retries off: the Sink retries, with its backoff and its counters.
            client = Redis.from_pool(ConnectionPool(
                connection_class=_redis_connection(), tls=self._tls, host=address["host"], port=target.port,
                db=target.db, username=target.username, password=target.password, socket_timeout=SEND_TIMEOUT_S,
                socket_connect_timeout=SEND_TIMEOUT_S, retry=Retry(NoBackoff(), 0)))
            try:
                await client.ping()
            except RedisError as exc:
                await client.aclose()
                failed = _redis_failure(exc) or exc
                continue
            self._redis = client
            return
        raise failed

    async def send(self, messages: list[bytes]) -> None:
        from redis.exceptions import RedisError

        assert self._redis is not None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for message in messages:
                    fields = {"stream_id": self._stream_id, "frame_index": frame_index(message), "document": message}
                    pipe.xadd(self._key, fields, maxlen=self._target.maxlen, approximate=True)
                await pipe.execute()
        except RedisError as exc:
            if (told := _redis_failure(exc)) is None:
                raise
            raise told from exc

    async def disconnect(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()


class KafkaTransport:
    """A batch as one produce request of records to the target's topic, each record's key the
    stream's id, on the partition Kafka's default partitioner gives that key (murmur2, as every
    Kafka client computes it: a stream's records share a partition, in order), acknowledged by
    every in-sync replica (acks=all).

    The client is aiokafka (asyncio, as the server is: no thread of its own, as librdkafka has
    under confluent-kafka), its connection and protocol layer only: its producer queues and
    retries records itself, and would hold a connection lost for its whole request timeout
    (and its stop() as long) before a failure reached the Sink. Here a batch is one request,
    answered or failed (a lost connection fails it at once), and every retry is the Sink's.

    A sink never creates a topic: brokers that create topics on demand would make one of a
    mistyped URL. It asks for its topic without creating it, on each connect, and a topic the
    broker does not have is an error that says so, retried like any other (a topic created
    later is delivered to).

    Kafka clients connect where the broker says brokers are (its advertised listeners): only
    brokers at the URL's host (its name or a checked address) and port are allowed, each
    reached at the checked address (``_pin``); a cluster that names any other is refused with
    an error that says so."""

    batch = IN_FLIGHT

    def __init__(self, target: SinkTarget, stream_id: str, ca_file: str | None):
        self._target = target
        self._addresses = checked_addresses(target)
        self._tls = tls_context(ca_file, target.host) if target.tls else None
        self._topic = target.name_for(stream_id)
        self._key = stream_id.encode()
        self._client = None
        self._partition = self._leader = -1

    async def connect(self) -> None:
        from aiokafka import AIOKafkaClient
        from aiokafka.errors import KafkaError

        target = self._target
        for address in self._addresses:  # in the resolver's order, as a connection by name tries them
            host = address["host"]
            try:  # TCP and TLS first, on their own: aiokafka's bootstrap error keeps no cause to tell
                _, writer = await asyncio.open_connection(host, target.port, ssl=self._tls)
            except OSError as exc:  # ssl.SSLError is one
                failed = exc
                continue
            writer.close()
            client = AIOKafkaClient(
                bootstrap_servers=f"[{host}]:{target.port}" if ":" in host else f"{host}:{target.port}",
                client_id="rle-serving", request_timeout_ms=int(SEND_TIMEOUT_S * 1000),
                security_protocol="SSL" if self._tls else "PLAINTEXT", ssl_context=self._tls)
            try:
                await client.bootstrap()
            except KafkaError:  # TCP (and TLS) were answered: the server does not speak Kafka
                await client.close()
                failed = Failed(PROTOCOL)
                continue
            self._client = client
            try:
                self._pin(host)
                await self._find_partition()
            except BaseException:
                await self.disconnect()
                raise
            return
        raise failed

    def _pin(self, address: str) -> None:
        """Send the client to ``address`` (a checked one) for every broker the cluster names,
        all of which must be at the URL's host and port."""
        cluster = self._client.cluster
        ours = {self._target.host, *(a["host"] for a in self._addresses)}
        if any(b.host not in ours or b.port != self._target.port for b in cluster.brokers()):
            raise Failed("Kafka: the broker names brokers at other hosts or ports than the URL's "
                         "(a sink connects to its URL's host only)")
        named = cluster.broker_metadata

        def pinned(node_id):
            broker = named(node_id)
            if broker is None or broker.host not in ours or broker.port != self._target.port:
                return None  # to aiokafka: a broker it does not know
            return broker._replace(host=address)

        # The one seam aiokafka has: the client asks the cluster where a broker is before each
        # connection; a name looked up again there could answer an address never checked.
        cluster.broker_metadata = pinned

    async def _find_partition(self) -> None:
        """The topic's partition for our key and its leader, asked without creating the topic."""
        from aiokafka.partitioner import DefaultPartitioner
        from aiokafka.protocol.metadata import MetadataRequest

        answer = await self._ask(self._client.get_random_node(),
                                 MetadataRequest([self._topic], allow_auto_topic_creation=False))
        # A topic is (error_code, name, ..., partitions); a partition (error_code, id, leader, ...).
        found = [(topic[0], topic[-1]) for topic in answer.topics if topic[1] == self._topic]
        code, partitions = found[0] if found else (UNKNOWN_TOPIC, [])
        if code == UNKNOWN_TOPIC:
            raise Failed(f"Kafka: no topic {self._topic!r} on the broker (create it: a sink does not create topics)")
        if code == TOPIC_NOT_AUTHORIZED:
            raise Failed(f"Kafka: not authorized for the topic {self._topic!r}")
        if code != 0 or not partitions:
            raise Failed(f"Kafka: the broker refused the topic {self._topic!r}")
        leaders = {partition[1]: partition[2] for partition in partitions}
        led = [partition for partition, leader in leaders.items() if leader >= 0]
        self._partition = DefaultPartitioner()(self._key, sorted(leaders), led)
        self._leader = leaders[self._partition]
        if self._leader < 0:
            raise Failed("Kafka: the topic's partition has no leader now")

    async def _ask(self, node_id, request):
        """The broker's answer to ``request``; its failures as ``failure`` tells them."""
        from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NodeNotReadyError

        try:
            return await self._client.send(node_id, request)
        except (KafkaConnectionError, NodeNotReadyError) as exc:
            raise Failed(LOST) from exc
        except KafkaTimeoutError as exc:
            raise TimeoutError() from exc
        except KafkaError as exc:  # by kind only: a broker's error texts are its own
            raise Failed(f"Kafka: {type(exc).__name__}") from exc

    async def send(self, messages: list[bytes]) -> None:
        from aiokafka.protocol.produce import ProduceRequest
        from aiokafka.record.default_records import DefaultRecordBatchBuilder

        assert self._client is not None
        records = DefaultRecordBatchBuilder(2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1,
                                            base_sequence=-1, batch_size=1 << 30)  # the Sink bounds a batch
        for offset, message in enumerate(messages):
            records.append(offset, None, key=self._key, value=message, headers=[])
        request = ProduceRequest(transactional_id=None, required_acks=-1, timeout=int(SEND_TIMEOUT_S * 1000),
                                 topics=[(self._topic, [(self._partition, bytes(records.build()))])])
        answer = await self._ask(self._leader, request)
        # Each partition's answer is (id, error_code, ...); ours is the only one asked.
        codes = {partition[1] for _, partitions in answer.topics for partition in partitions}
        if codes != {0}:
            names = sorted(kafka_error_name(code) for code in codes - {0})
            refused = f"Kafka: the broker refused the records ({', '.join(names) or 'no answer'})"
            if len(messages) == 1 and codes & TOO_LARGE:  # it would be refused again, for ever
                raise Rejected(refused)
            raise Failed(refused)  # a batch too large is halved and sent again (the Sink)

    async def disconnect(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


def kafka_error_name(code: int) -> str:
    """A Kafka error code's name as aiokafka's table has it (e.g. NotLeaderForPartitionError)."""
    from aiokafka.errors import for_code

    return for_code(code).__name__


def checked_addresses(target: SinkTarget) -> list[ResolveResult]:
    """Where ``target``'s transport may connect: the addresses ``sink_targets.checked`` allowed.
    ValueError for a target never checked (a mistake of the code that made the Sink)."""
    if not target.addresses:
        raise ValueError(f"{target.redacted}: a sink connects only to the addresses checked when "
                         "its stream is added (sink_targets.checked)")
    return list(target.addresses)


class _NamedContext(ssl.SSLContext):
    """A client context that verifies the certificate against ``server_name`` whatever the
    client passes: the MQTT and Redis clients connect to a checked address, and would name
    that (paho wraps a socket, asyncio a BIO)."""

    server_name = ""

    def wrap_socket(self, *args, **kwargs):
        return super().wrap_socket(*args, **{**kwargs, "server_hostname": self.server_name})

    def wrap_bio(self, *args, **kwargs):
        return super().wrap_bio(*args, **{**kwargs, "server_hostname": self.server_name})


def tls_context(ca_file: str | None, server_name: str) -> ssl.SSLContext:
    """A client context that verifies the target's certificate against the system's CAs and
    those in ``ca_file``, and that it names ``server_name`` (the URL's host)."""
    context = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname, as create_default_context's
    context.load_default_certs()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.server_name = server_name.rstrip(".")
    return context


@functools.cache
def _redis_connection() -> type:
    """redis-py's TCP connection, with TLS from our context when given one: its own TLS
    connection makes its context itself, which would name the address it connects to."""
    from redis.asyncio.connection import Connection

    class PinnedConnection(Connection):
        def __init__(self, *, tls: ssl.SSLContext | None = None, **kwargs):
            self._tls = tls
            super().__init__(**kwargs)

        def _connection_arguments(self):
            return {**super()._connection_arguments(), "ssl": self._tls}

    return PinnedConnection


def failure(exc: BaseException) -> str:
    """What went wrong with a sink's target, in our words only (see the module): the exception
    and those it was raised from are matched by kind, and none of their texts is used."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for each in chain:
        if isinstance(each, Failed):
            return str(each)
    certificates = [e for e in chain if isinstance(e, ssl.SSLCertVerificationError)]
    if certificates:
        mismatch = any(getattr(e, "verify_code", None) in _HOST_MISMATCH for e in certificates)
        return TLS_OTHER_NAME if mismatch else TLS_UNTRUSTED
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return TLS_FAILED
    if any(isinstance(e, socket.gaierror) for e in chain):
        return "name not resolved"
    for each in chain:
        if isinstance(each, OSError) and each.errno in _ERRNOS:
            return _ERRNOS[each.errno]
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    if any(isinstance(e, TimeoutError) for e in chain):
        return "timed out"
    if any(isinstance(e, (ConnectionError, aiohttp.ServerDisconnectedError)) for e in chain):
        return LOST
    if any(isinstance(e, aiohttp.ClientResponseError) for e in chain):  # not an HTTP answer
        return PROTOCOL
    return f"failed ({type(chain[0]).__name__})"


def _redis_failure(exc: Exception) -> Exception | None:
    """A redis-py error as one ``failure`` knows (their texts quote the server's replies);
    None where ``failure`` reads it as it is (a connection error raised from an OSError)."""
    from redis import exceptions

    if isinstance(exc, exceptions.AuthenticationError):
        return Failed("authentication failed")
    if isinstance(exc, exceptions.InvalidResponse):
        return Failed(PROTOCOL)
    if isinstance(exc, exceptions.ResponseError):
        return Failed("Redis refused the command")
    if isinstance(exc, exceptions.TimeoutError):
        return TimeoutError()
    if isinstance(exc, exceptions.ConnectionError) and not isinstance(exc.__cause__ or exc.__context__, OSError):
        return Failed(LOST)
    return None


def frame_index(message: bytes) -> str:
    """The document's "frame_index" as text ("" when it has none): a Redis field of its own,
    so readers can find a frame without parsing every document."""
    try:
        value = json.loads(message).get("frame_index")
    except (ValueError, AttributeError):
        return ""
    return "" if value is None else str(value)


TRANSPORTS: dict[str, Callable[[SinkTarget, str, str | None], Transport]] = {
    "webhook": WebhookTransport, "mqtt": MqttTransport, "redis": RedisStreamTransport, "kafka": KafkaTransport}

