"""Sinks without a network: reading sink URLs (every scheme, defaults, ``{stream_id}``, bad
inputs), redaction, where a sink may connect (``checked``: the address policy, lookups faked),
failures told in our words, and the Sink's own mechanism (order, the bounded buffer, backoff,
close, logs that a flood does not grow) through a transport kept in memory.
tests/integration/test_sinks.py delivers to real servers."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import logging
import socket
import ssl
import time

import aiohttp
import pytest

from pipeline.cameras import sinks
from pipeline.cameras.sink_targets import MAX_TOPIC_BYTES, checked, parse_sink, redact
from pipeline.cameras.sinks import Sink
from pipeline.cameras.transports import PROTOCOL, TRANSPORTS, Failed, Rejected, failure, frame_index
from pipeline.errors import BadInputError
from pipeline.serving import url_policy
from pipeline.serving.url_policy import SINK_NOT_ALLOWED, SINK_NOT_LISTED, AllowList

from ..conftest import settle, until

SECRET = "s3cr%2Fet"  # as written in the URL; the password itself is "s3cr/et"
URL = f"http://alice:{SECRET}@example.test:8080/hook"


@pytest.mark.parametrize("url, kind, host, port, name", [
    ("http://example.test/hook", "webhook", "example.test", 80, ""),
    ("https://example.test/hook?x=1", "webhook", "example.test", 443, ""),
    ("HTTPS://Example.TEST:8443", "webhook", "example.test", 8443, ""),
    ("http://[::1]:9000/h", "webhook", "::1", 9000, ""),
    ("mqtt://broker", "mqtt", "broker", 1883, "rle-serving/{stream_id}"),
    ("mqtt://broker:1884/", "mqtt", "broker", 1884, "rle-serving/{stream_id}"),
    ("mqtt://broker/cameras", "mqtt", "broker", 1883, "cameras/{stream_id}"),
    ("mqtt://broker/cameras/", "mqtt", "broker", 1883, "cameras/{stream_id}"),
    ("mqtt://broker/site/{stream_id}/results", "mqtt", "broker", 1883, "site/{stream_id}/results"),
    ("mqtt://broker/site/%7Bstream_id%7D", "mqtt", "broker", 1883, "site/{stream_id}"),
    ("mqtt://broker//leading", "mqtt", "broker", 1883, "/leading/{stream_id}"),
    ("redis://cache", "redis", "cache", 6379, "rle-serving:{stream_id}"),
    ("redis://cache:7000/results", "redis", "cache", 7000, "results"),
    ("redis://cache/cams:{stream_id}", "redis", "cache", 6379, "cams:{stream_id}"),
    ("mqtts://broker/cameras", "mqtt", "broker", 8883, "cameras/{stream_id}"),
    ("MQTTS://broker:8884", "mqtt", "broker", 8884, "rle-serving/{stream_id}"),
    ("rediss://cache/results", "redis", "cache", 6379, "results"),
    ("kafka://broker", "kafka", "broker", 9092, "rle-serving"),
    ("kafka://broker:9093/cams", "kafka", "broker", 9093, "cams"),
    ("kafka://broker/site.{stream_id}_results", "kafka", "broker", 9092, "site.{stream_id}_results"),
    ("KAFKAS://broker/cams", "kafka", "broker", 9092, "cams"),
])
def test_every_scheme_reads_with_its_defaults(url, kind, host, port, name):
    target = parse_sink(url)
    assert (target.kind, target.host, target.port, target.name) == (kind, host, port, name)
    assert target.tls == url.lower().startswith(("https", "mqtts", "rediss", "kafkas"))
    assert (target.maxlen, target.db, target.username, target.password) == (10_000, 0, None, None)
    assert target.url == url and target.redacted == redact(url)


def test_stream_id_is_put_in_topics_and_keys():
    assert parse_sink("mqtt://b/site/{stream_id}/out").name_for("cam-1") == "site/cam-1/out"
    assert parse_sink("mqtt://b/cams").name_for("cam-1") == "cams/cam-1"
    assert parse_sink("mqtt://b").name_for("cam-1") == "rle-serving/cam-1"
    assert parse_sink("redis://r").name_for("cam-1") == "rle-serving:cam-1"
    assert parse_sink("redis://r/all-cameras").name_for("cam-1") == "all-cameras"  # one key: stream_id is a field
    assert parse_sink("kafka://k/cams").name_for("cam-1") == "cams"  # one topic: stream_id is the record's key
    assert parse_sink("kafka://k/cams-{stream_id}").name_for("cam-1") == "cams-cam-1"


def test_redis_options_and_credentials_are_read():
    target = parse_sink("redis://user:p%40ss@r:6380/k?maxlen=500&db=3")
    assert (target.maxlen, target.db, target.username, target.password) == (500, 3, "user", "p@ss")
    assert parse_sink("redis://:pw@r").username is None and parse_sink("redis://:pw@r").password == "pw"
    assert parse_sink("mqtt://token@b").username == "token"


@pytest.mark.parametrize("url, message", [
    (None, "a sink is a URL such as mqtt://broker:1883/cameras, got NoneType"),
    (42, "got int"),
    ("  ", "got an empty one"),
    ("amqp://broker/q", "unknown scheme 'amqp'; known: http://, https://, mqtt://, mqtts://, "
                        "redis://, rediss://, kafka://, kafkas://$"),
    ("broker:1883", "no scheme; known: http://"),
    ("ftp://h/x", "unknown scheme 'ftp'"),
    ("mqtt://", "no host .e.g. mqtt://broker.example:1883/"),
    ("http:///hook", "no host"),
    ("redis://:pw@/k", "no host"),
    ("mqtt://b:notaport/x", "the port must be a number from 1 to 65535"),
    ("mqtt://b:65536", "the port must be a number from 1 to 65535"),
    ("redis://b:0", "the port must be a number from 1 to 65535"),
    ("http://[::1/x", "not a valid name or .IPv6. address"),
    ("http://h/a b", "no spaces or control characters"),
    ("mqtt://b/x\n", "no spaces or control characters"),
    ("http://h/x#top", "no # .a fragment"),
    ("mqtt://b/cams/+/x", "no wildcards"),
    ("mqtt://b/cams/#", "no # .a fragment, or an MQTT wildcard"),
    ("mqtt://b/cams/%23", "no wildcards"),
    ("mqtt://b/cams%2B", "no wildcards"),
    ("mqtt://b/cams?qos=2", "takes no .options"),
    ("redis://r/0", "not a database number; write .db=0"),
    ("redis://r/k?maxlen=0", "maxlen must be a whole number from 1 to 10000000, got '0'"),
    ("redis://r/k?maxlen=-5", "maxlen must be a whole number from 1"),
    ("redis://r/k?maxlen=1e3", "maxlen must be a whole number"),
    ("redis://r/k?maxlen=10000001", "maxlen must be a whole number from 1 to 10000000, got '10000001'"),
    ("redis://r/k?maxlen=" + "9" * 5000, "maxlen must be a whole number from 1 to 10000000, got '9{20}'$"),
    ("redis://r/k?db=x", "db must be a whole number from 0"),
    ("redis://r/k?db=16", "db must be a whole number from 0 to 15, got '16'"),  # redis-server's default
    ("redis://r/k?db=99999", "db must be a whole number from 0 to 15, got '99999'"),
    ("mqtt://b/cams%00x", "an MQTT topic has no NUL character"),
    ("mqtt://b/caf%E9", "an MQTT topic is UTF-8 text"),  # Latin-1's é, not UTF-8's
    ("http://2130706433:8080/hook", "the host '2130706433' is the IPv4 address 127.0.0.1 written as a number"),
    ("mqtt://0xa9fea9fe/t", "is the IPv4 address 169.254.169.254 written as a number"),
    ("redis://0251.0376.0251.0376/k", "is the IPv4 address 169.254.169.254 written as a number"),
    ("http://127.1/", "is the IPv4 address 127.0.0.1 written as a number"),
    ("redis://r/k?maxlen=5&maxlen=6", "repeated option 'maxlen'"),
    ("redis://r/k?ttl=5", "unknown option 'ttl'; known: maxlen, db"),
    ("redis://r/k?maxlen", "name=value pairs"),
    ("redis://:pa/ss@r/k", "must be percent-encoded"),
    ("rediss://:pa/ss@r/k", "must be percent-encoded"),
    ("mqtts://b/cams/+", "no wildcards"),
    ("mqtts://b/cams?qos=2", "takes no .options"),
    ("rediss://r/3", "not a database number; write .db=3"),
    ("kafka://k/cams/today", "a Kafka topic is letters, digits, '.', '_' and '-'"),
    ("kafka://k/caf%C3%A9", "a Kafka topic is letters, digits"),
    ("kafka://k/..", "not '.' or '..'"),
    ("kafka://k/" + "t" * 250, "a Kafka topic is at most 249 characters"),
    ("kafka://k/cams?acks=1", "a Kafka sink takes no .options"),
    ("kafka://user:pw@k/cams", "a Kafka sink takes no user name or password .SASL is not supported."),
    ("kafkas://token@k/cams", "a Kafka sink takes no user name or password"),
    ("kafka://k:0/cams", "the port must be a number from 1 to 65535"),
])
def test_bad_sink_urls_say_what_is_wrong(url, message):
    with pytest.raises(BadInputError, match=message):
        parse_sink(url)


@pytest.mark.parametrize("url", ["mqtt://b/" + "t" * 70_000 + "+", "redis://r/k?" + "x" * 70_000 + "=1",
                                 "http://h:" + "9" * 70_000])
def test_an_error_repeats_the_start_of_a_long_url_only(url):
    with pytest.raises(BadInputError) as caught:
        parse_sink(url)
    assert str(caught.value).startswith(f"sink {url[:100]!r}"[:-1] + "...'") and len(str(caught.value)) < 400


@pytest.mark.parametrize("url, shown", [
    ("mqtt://user:pw@b:1883/t", "mqtt://user:***@b:1883/t"),
    ("redis://:pw@r/k?maxlen=5", "redis://:***@r/k?maxlen=5"),
    ("rediss://:pw@r/k?maxlen=5", "rediss://:***@r/k?maxlen=5"),
    ("mqtts://user:pw@b/t", "mqtts://user:***@b/t"),
    ("rtsp://cam/live?user=admin&password=x", "rtsp://cam/live?user=***&password=***"),  # a camera's login
    ("mqtt://token@b/t", "mqtt://***@b/t"),
    ("redis://:pa/ss@r/k", "redis://:***@r/k"),  # not a valid URL, still redacted whole
    ("redis://:p@ss@r/k", "redis://:***@r/k"),
    ("https://u:pw@h/hook?token=abc&x", "https://u:***@h/hook?token=***&x=***"),
    ("http://h/p@th", "http://h/p@th"),  # an "@" in a webhook's path is not a credential
    ("mqtt://b/t", "mqtt://b/t"),
    ("kafkas://user:pw@k/cams", "kafkas://user:***@k/cams"),
    ("kafka://k/cams?x=1", "kafka://k/cams?x=***"),
    ("not a url", "not a url"),
])
def test_redaction_keeps_secrets_out(url, shown):
    assert redact(url) == shown


def test_secrets_appear_in_no_repr_or_error():
    target = parse_sink(URL)
    assert (target.username, target.password) == ("alice", "s3cr/et")
    assert SECRET not in repr(target) and "s3cr/et" not in repr(target)
    with pytest.raises(BadInputError) as caught:
        parse_sink(f"mqtt://alice:{SECRET}@b/t/+")
    assert SECRET not in str(caught.value) and "alice:***@b" in str(caught.value)


@pytest.mark.parametrize("message, index", [
    (b'{"stream_id":"c","frame_index":17,"predictions":[]}', "17"),
    (b'{"stream_id":"c"}', ""), (b"[1, 2]", ""), (b"not json", ""),
])
def test_frame_index_is_read_from_the_document(message, index):
    assert frame_index(message) == index


# ---------------------------------------------------------------- where a sink may connect


@pytest.fixture
def dns(monkeypatch):
    """Fake lookups: host -> addresses (an IP literal is itself); every host asked recorded."""
    answers, asked = {}, []

    def getaddrinfo(host, port):
        asked.append(host)
        try:
            answers.setdefault(host, [str(ipaddress.ip_address(host))])
        except ValueError:
            pass
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]

    monkeypatch.setattr(url_policy, "lookup", getaddrinfo)
    return answers, asked


def check(url: str, allow: AllowList = AllowList(), stream_id: str = "cam-1"):
    return asyncio.run(checked(parse_sink(url), stream_id, allow))


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "mqtt://[fd00:ec2::254]/t", "redis://100.100.100.200/k",
    "http://169.254.170.2/v2/credentials", "http://169.254.7.7:8080/", "http://[fe80::1]/",
    "http://[::ffff:169.254.169.254]/", "http://[2002:a9fe:a9fe::]/", "http://[64:ff9b::a9fe:a9fe]/",
    "http://0.0.0.0:6379/", "http://[::]/", "mqtt://224.0.0.1/t", "mqtt://[ff02::1]/t", "redis://240.0.0.1/k",
    "http://255.255.255.255/", "http://wrapped.example/",  # a name with a metadata address among its own
    "kafka://169.254.169.254/t", "kafkas://[fe80::1]:9093/t",
])
def test_link_local_metadata_and_other_special_addresses_are_refused_by_default(url, dns):
    answers, _ = dns
    answers["wrapped.example"] = ["10.0.0.5", "169.254.169.254"]
    with pytest.raises(BadInputError) as caught:
        check(url)
    assert str(caught.value) == f"sink {url!r}: {SINK_NOT_ALLOWED}"  # which address: the log's, not the client's


@pytest.mark.parametrize("host", ["metadata.google.internal", "METADATA.Google.Internal.", "metadata.goog",
                                  "metadata", "instance-data.ec2.internal"])
def test_cloud_metadata_names_are_refused_without_a_lookup(host, dns):
    _, asked = dns
    with pytest.raises(BadInputError, match="not allowed"):
        check(f"http://{host}/computeMetadata/v1/")
    assert asked == []


@pytest.mark.parametrize("url, addresses", [
    ("mqtt://127.0.0.1:1883/t", ["127.0.0.1"]), ("redis://[::1]/k", ["::1"]),
    ("http://10.20.0.7/hook", ["10.20.0.7"]), ("mqtt://broker.lan/t", ["192.168.1.20", "fd12::20"]),
    ("https://hooks.example/x", ["93.184.216.34"]), ("redis://cgnat.example/k", ["100.64.3.4"]),
    ("kafka://broker.lan/cams", ["192.168.1.20", "fd12::20"]),
])
def test_private_loopback_and_public_hosts_are_allowed_and_pinned_by_default(url, addresses, dns):
    answers, asked = dns
    answers["broker.lan"] = ["192.168.1.20", "fd12::20"]
    answers["hooks.example"] = ["93.184.216.34"]
    answers["cgnat.example"] = ["100.64.3.4"]
    target = check(url)
    assert [a["host"] for a in target.addresses] == addresses  # what the transport connects to
    assert {a["port"] for a in target.addresses} == {target.port}
    assert asked == [target.host]  # once


def test_sink_url_allow_narrows_sinks_to_its_hosts_and_networks(dns):
    answers, _ = dns
    answers.update({"broker.internal": ["192.168.1.9"], "other.internal": ["10.1.2.3", "192.168.1.9"],
                    "metadata.google.internal": ["169.254.169.254"]})
    allow = AllowList.parse(["10.0.0.0/8", "broker.internal", "169.254.169.254", "metadata.google.internal"])
    assert [a["host"] for a in check("mqtt://10.1.2.3/t", allow).addresses] == ["10.1.2.3"]
    assert [a["host"] for a in check("mqtt://broker.internal/t", allow).addresses] == ["192.168.1.9"]
    # listed, a metadata address or name is allowed like any other
    assert check("http://169.254.169.254/", allow).addresses[0]["host"] == "169.254.169.254"
    assert check("http://metadata.google.internal/", allow).addresses[0]["host"] == "169.254.169.254"
    for url in ("mqtt://127.0.0.1/t", "http://93.184.216.34/", "mqtt://other.internal/t",  # one address unlisted
                "http://169.254.169.253/"):
        with pytest.raises(BadInputError) as caught:
            check(url, allow)
        assert str(caught.value) == f"sink {url!r}: {SINK_NOT_LISTED}"


def test_the_refusal_is_logged_for_the_operator_with_the_address(dns, caplog):
    answers, _ = dns
    answers["rebound.example"] = ["169.254.169.254"]
    with caplog.at_level(logging.WARNING, logger=url_policy.__name__), pytest.raises(BadInputError):
        check("http://rebound.example:8080/")
    assert [r.getMessage() for r in caplog.records] == [
        "sink refused: host 'rebound.example': 169.254.169.254 is cloud metadata"]


def test_a_host_that_does_not_resolve_is_refused_when_the_stream_is_added(dns):
    with pytest.raises(BadInputError, match="sink 'mqtt://nowhere.example/t': its host 'nowhere.example' "
                                            "could not be resolved"):
        check("mqtt://nowhere.example/t")


def test_an_mqtt_topic_is_refused_over_65535_bytes_with_the_stream_id_in_it(dns):
    fits = "é" * ((MAX_TOPIC_BYTES - len("/cam-1")) // 2)  # two bytes each in UTF-8
    url = f"mqtt://127.0.0.1/{fits}"
    assert len(check(url).name_for("cam-1").encode()) == MAX_TOPIC_BYTES - 1
    with pytest.raises(BadInputError, match="the MQTT topic is 65536 bytes .utf-8, with the stream id in it.; "
                                            "MQTT allows at most 65535"):
        check(url, stream_id="cam-123")


def test_a_kafka_topic_is_refused_over_249_characters_with_the_stream_id_in_it(dns):
    url = "kafka://127.0.0.1/" + "t" * (249 - len("cam-1")) + "{stream_id}"
    assert len(check(url).name_for("cam-1")) == 249
    with pytest.raises(BadInputError, match="the Kafka topic is 251 characters .with the stream id in it.; "
                                            "Kafka allows at most 249"):
        check(url, stream_id="cam-123")


@pytest.mark.parametrize("kind, url", [("webhook", "http://h/x"), ("mqtt", "mqtt://b/t"), ("redis", "redis://r/k"),
                                       ("kafka", "kafka://k/t")])
def test_a_transport_refuses_a_target_never_checked(kind, url):
    with pytest.raises(ValueError, match="only to the addresses checked"):
        TRANSPORTS[kind](parse_sink(url), "cam-1", None)


# ---------------------------------------------------------------- failures, in our words

BANNER = "SSH-2.0-OpenSSH_9.6 HTTP/1.0 400 Bad Request s3cr/et"  # what a target might send back


def raised(error: BaseException, cause: BaseException | None = None) -> BaseException:
    """``error`` as raised: from ``cause`` when given (its __cause__ and __context__ set)."""
    try:
        try:
            if cause is not None:
                raise cause
        except BaseException as inner:
            raise error from inner
        raise error
    except BaseException as caught:
        return caught


def certificate_error(code: int) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {BANNER}")
    error.verify_code = code
    return error


@pytest.mark.parametrize("error, told", [
    (ConnectionRefusedError(errno.ECONNREFUSED, BANNER), "connection refused"),
    (ConnectionRefusedError(BANNER), "connection refused"),
    (raised(RuntimeError(f"Error 111 connecting to {BANNER}"), ConnectionRefusedError(errno.ECONNREFUSED, "x")),
     "connection refused"),  # redis-py's way: its own error, raised while handling the OSError
    (OSError(errno.EHOSTUNREACH, BANNER), "host unreachable"),
    (OSError(errno.ENETUNREACH, BANNER), "network unreachable"),
    (ConnectionResetError(errno.ECONNRESET, BANNER), "connection lost"),
    (BrokenPipeError(errno.EPIPE, BANNER), "connection lost"),
    (ConnectionError(BANNER), "connection lost"),
    (aiohttp.ServerDisconnectedError(BANNER), "connection lost"),
    (TimeoutError(BANNER), "timed out"),
    (asyncio.TimeoutError(), "timed out"),
    (socket.gaierror(socket.EAI_NONAME, BANNER), "name not resolved"),
    (certificate_error(20), "TLS: certificate not trusted"),  # unable to get local issuer certificate
    (certificate_error(62), "TLS: certificate for another host"),  # hostname mismatch
    (raised(aiohttp.ClientConnectorCertificateError(None, certificate_error(64)), certificate_error(64)),
     "TLS: certificate for another host"),  # IP address mismatch, as aiohttp raises it
    (ssl.SSLError(1, f"[SSL: TLSV1_ALERT_INTERNAL_ERROR] {BANNER}"), "TLS handshake failed"),
    (aiohttp.ClientResponseError(None, (), status=400, message=f"Invalid status line {BANNER!r}"), PROTOCOL),
    (Failed("HTTP 503"), "HTTP 503"), (Rejected("HTTP 404"), "HTTP 404"),
    (ValueError(BANNER), "failed (ValueError)"),  # an error of no known kind: its name, never its text
])
def test_a_failure_says_its_kind_in_our_words_never_the_targets(error, told):
    assert failure(error) == told


# ---------------------------------------------------------------- the Sink, in memory


class MemoryTarget:
    """A transport kept in memory. ``up`` False: connects and sends fail (their errors quote
    the URL's password, which the Sink must not repeat); ``refuse``: messages rejected for
    good; ``gate``: when set to an Event, a send waits for it (a batch held in flight);
    ``batch``: the most messages a send takes (1, as a webhook, unless a test says more)."""

    made: list[MemoryTarget] = []
    batch = 1

    def __init__(self, target, stream_id, _ca_file):
        self.target, self.stream_id = target, stream_id
        self.up = True
        self.refuse: set[bytes] = set()
        self.gate: asyncio.Event | None = None
        self.received: list[bytes] = []
        self.sends: list[list[bytes]] = []  # the batches delivered
        self.in_flight: list[bytes] = []  # what a send holds now
        self.attempts: list[float] = []  # monotonic times of each connect or send tried
        self.connected = False
        self.disconnects = 0
        MemoryTarget.made.append(self)

    async def connect(self):
        self.attempts.append(time.monotonic())
        if not self.up:
            raise ConnectionRefusedError(f"{self.target.url} refused alice with s3cr/et")
        self.connected = True

    async def send(self, batch):
        assert 1 <= len(batch) <= self.batch
        self.in_flight = batch
        if self.gate is not None:
            await self.gate.wait()
        self.in_flight = []
        if not self.up:
            self.attempts.append(time.monotonic())
            raise ConnectionResetError("lost")
        if set(batch) & self.refuse:
            raise Rejected("HTTP 400")
        self.received.extend(batch)
        self.sends.append(batch)

    async def disconnect(self):
        self.connected = False
        self.disconnects += 1


@pytest.fixture
def memory(monkeypatch):
    MemoryTarget.made.clear()
    monkeypatch.setitem(sinks.TRANSPORTS, "webhook", MemoryTarget)
    return MemoryTarget.made


def make_sink(buffer=3, backoff_s=(0.01, 0.04), batch=1) -> tuple[Sink, MemoryTarget]:
    MemoryTarget.batch = batch  # the class's: a Sink reads its transport's batch when made
    sink = Sink(parse_sink(URL), "cam-1", buffer=buffer, backoff_s=backoff_s)
    return sink, MemoryTarget.made[-1]


async def message_0_in_flight(buffer: int, batch: int = 1) -> tuple[Sink, MemoryTarget]:
    """A started sink whose send of message 0 hangs until ``target.gate`` is set."""
    sink, target = make_sink(buffer=buffer, batch=batch)
    target.gate = asyncio.Event()
    sink.start()
    sink.offer(messages(0)[0])
    await until(lambda: target.in_flight == messages(0))
    return sink, target


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def messages(*indexes) -> list[bytes]:
    return [b'{"frame_index":%d}' % i for i in indexes]


def test_messages_are_delivered_in_order_and_counted(memory):
    async def main():
        sink, target = make_sink(buffer=100)
        sink.start()
        for m in messages(*range(50)):
            sink.offer(m)
        await until(lambda: sink.delivered == 50)
        assert target.received == messages(*range(50))
        assert sink.status() == {"url": "http://alice:***@example.test:8080/hook", "kind": "webhook",
                                 "connected": True, "delivered": 50, "dropped": 0, "buffered": 0,
                                 "retries": 0, "last_error": None}
        await sink.close(1)
        assert target.disconnects == 1 and sink.status()["connected"] is False
    run(main())


def test_a_full_buffer_drops_the_oldest_waiting_never_the_one_in_flight(memory):
    async def main():
        sink, target = await message_0_in_flight(buffer=3)
        for m in messages(*range(1, 9)):
            sink.offer(m)
        assert (sink.dropped, sink.status()["buffered"]) == (5, 4)  # 1..5 dropped; 0 in flight, 6..8 wait
        target.gate.set()
        await until(lambda: sink.delivered == 4)
        assert target.received == messages(0, 6, 7, 8)
        assert (sink.dropped, sink.status()["buffered"]) == (5, 0)
        await sink.close(1)
    run(main())


def test_room_waits_while_the_buffer_is_full_and_returns_when_a_batch_is_taken_or_on_close(memory):
    async def main():
        sink, target = await message_0_in_flight(buffer=2)
        for m in messages(1, 2):
            sink.offer(m)
        assert sink.full and sink.status()["buffered"] == 3
        waiting = asyncio.ensure_future(sink.room())
        await settle()
        assert not waiting.done()  # no room while full
        held, target.gate = target.gate, asyncio.Event()  # the next sends hang
        held.set()  # 0 is delivered, 1 taken: room for one
        await asyncio.wait_for(waiting, 2)
        assert not sink.full and (sink.delivered, sink.dropped) == (1, 0)
        sink.offer(messages(3)[0])
        assert sink.full
        waiting = asyncio.ensure_future(sink.room())
        await settle()
        assert not waiting.done()
        await sink.close(0)  # a closing sink waits for nothing
        await asyncio.wait_for(waiting, 1)
        assert (sink.delivered, sink.dropped) == (1, 3)
    run(main())


def test_what_waits_goes_in_batches_of_the_transports_size_and_a_failed_batch_goes_again_halved(memory):
    async def main():
        sink, target = await message_0_in_flight(buffer=10, batch=4)
        for m in messages(*range(1, 7)):
            sink.offer(m)
        assert sink.status()["buffered"] == 7  # 1 in flight, 6 waiting
        target.gate.set()
        await until(lambda: sink.delivered == 7)
        assert target.sends == [messages(0), messages(1, 2, 3, 4), messages(5, 6)]
        target.gate.clear()
        for m in messages(7, 8, 9):
            sink.offer(m)
        await until(lambda: target.in_flight == messages(7, 8, 9))
        target.up = False  # the batch fails: counted once, then its first half goes again
        target.gate.set()
        await until(lambda: sink.retries == 1)
        assert sink.status()["buffered"] == 3 and sink.delivered == 7
        target.up = True
        await until(lambda: sink.delivered == 10)
        assert target.sends[-2:] == [messages(7), messages(8, 9)] and target.received == messages(*range(10))
        await sink.close(1)
    run(main())


def test_a_failing_batch_is_halved_down_to_one_and_regrows_by_doubling(memory):
    async def main():
        sink, target = make_sink(buffer=100, batch=8)
        target.up = False
        for m in messages(*range(16)):
            sink.offer(m)
        sink.start()
        await until(lambda: sink.retries >= 4)  # batches of 8, 4, 2, 1 refused
        assert sink.status()["buffered"] == 16 and sink.dropped == 0
        target.up = True
        await until(lambda: sink.delivered == 16)
        await sink.close(1)
        return target

    target = run(main())
    assert [len(batch) for batch in target.sends] == [1, 2, 4, 8, 1]
    assert target.received == messages(*range(16))  # in order, each once


def test_a_batch_holds_one_megabyte_at_most_and_one_message_at_least(memory):
    async def main():
        sink, target = make_sink(buffer=100, batch=32)
        big = [bytes([i]) * 400_000 for i in range(5)] + [b"x" * 1_500_000]  # the last: over the cap alone
        for m in big:
            sink.offer(m)
        sink.start()
        await until(lambda: sink.delivered == 6)
        await sink.close(1)
        return target, big

    target, big = run(main())
    assert [len(batch) for batch in target.sends] == [2, 2, 1, 1] and target.received == big


def test_offers_before_the_task_runs_keep_the_newest(memory):
    async def main():
        sink, target = make_sink(buffer=3)
        sink.start()
        for m in messages(*range(10)):  # one go: the delivery task has not run yet
            sink.offer(m)
        await until(lambda: sink.delivered == 3)
        assert target.received == messages(7, 8, 9) and sink.dropped == 7
        await sink.close(1)
    run(main())


def test_failures_are_retried_with_growing_pauses_then_delivery_resumes(memory, caplog):
    async def main():
        sink, target = make_sink(buffer=10, backoff_s=(0.02, 0.08))
        target.up = False
        sink.start()
        for m in messages(0, 1, 2):
            sink.offer(m)
        # Five failures handled: each is counted, then closes what may be half open (retries
        # is counted before the disconnect, so it is the disconnects that say a failure is done).
        await until(lambda: target.disconnects >= 5)
        status = sink.status()
        assert status["retries"] >= 5
        assert (status["connected"], status["delivered"], status["buffered"]) == (False, 0, 3)
        assert status["last_error"] == "connection refused"  # not the error's text, which quotes the URL
        gaps = [b - a for a, b in itertools.pairwise(target.attempts[:5])]
        assert all(gap >= least * 0.9 for gap, least in zip(gaps, [0.02, 0.04, 0.08, 0.08]))
        target.up = True
        await until(lambda: sink.delivered == 3)
        assert target.received == messages(0, 1, 2) and sink.dropped == 0
        assert sink.status()["connected"] is True
        await sink.close(1)

    with caplog.at_level(logging.DEBUG, logger=sinks.__name__):
        run(main())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "connection refused; retrying" in logged and "delivering again" in logged
    assert "s3cr" not in logged and "refused alice" not in logged
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line per outage, not one per retry


def test_a_lost_connection_is_made_again_before_the_next_send(memory):
    async def main():
        sink, target = make_sink(buffer=10)
        sink.start()
        sink.offer(messages(0)[0])
        await until(lambda: sink.delivered == 1)
        target.up = False
        sink.offer(messages(1)[0])
        await until(lambda: sink.retries == 1)
        target.up = True
        await until(lambda: sink.delivered == 2)
        assert target.received == messages(0, 1) and target.connected
        await sink.close(1)
    run(main())


def test_a_rejected_message_is_dropped_and_the_next_one_sent_at_once(memory):
    async def main():
        sink, target = make_sink(buffer=10, backoff_s=(5.0, 5.0))
        target.refuse = set(messages(1))
        sink.start()
        for m in messages(0, 1, 2):
            sink.offer(m)
        await until(lambda: sink.delivered == 2, timeout_s=1)  # no 5 s pause
        assert target.received == messages(0, 2)
        status = sink.status()
        assert (status["dropped"], status["retries"], status["connected"]) == (1, 0, True)
        assert status["last_error"] == "HTTP 400"
        await sink.close(1)
    run(main())


def test_a_target_refusing_every_message_costs_a_log_line_per_interval_and_each_is_counted(memory, caplog):
    async def main():
        sink, target = make_sink(buffer=1000)
        target.refuse = set(messages(*range(200)))
        sink.start()
        for m in messages(*range(200)):
            sink.offer(m)
        await until(lambda: sink.dropped == 200)
        await sink.close(1)
        return sink.status()

    with caplog.at_level(logging.DEBUG, logger=sinks.__name__):
        status = run(main())
    assert (status["delivered"], status["dropped"], status["last_error"]) == (0, 200, "HTTP 400")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "webhook sink http://alice:***@example.test:8080/hook of stream 'cam-1': a message was refused "
        "(HTTP 400) and dropped (counted in 'dropped')"]


def test_close_delivers_what_is_buffered(memory):
    async def main():
        sink, target = make_sink(buffer=100)
        sink.start()
        for m in messages(*range(20)):
            sink.offer(m)
        await sink.close(2)
        assert target.received == messages(*range(20))
        assert (sink.delivered, sink.dropped, sink.status()["buffered"]) == (20, 0, 0)
        assert not target.connected
    run(main())


def test_close_cuts_a_pause_short_so_a_returned_target_gets_the_flush(memory):
    async def main():
        sink, target = make_sink(buffer=10, backoff_s=(30.0, 30.0))
        target.up = False
        sink.start()
        sink.offer(messages(0)[0])
        await until(lambda: target.disconnects == 1)  # the failure handled: next, a pause of 30 s
        await settle()  # the few turns from the disconnect into the pause (no timer: all run now)
        assert (sink.retries, len(target.attempts)) == (1, 1)  # pausing: no second attempt
        target.up = True
        started = time.monotonic()
        await sink.close(5)
        assert time.monotonic() - started < 1
        assert target.received == messages(0) and sink.dropped == 0
    run(main())


def test_close_counts_what_it_could_not_deliver_in_time_as_dropped(memory):
    async def main():
        sink, target = make_sink(buffer=10)
        target.up = False
        sink.start()
        for m in messages(*range(5)):
            sink.offer(m)
        await until(lambda: sink.retries >= 1)
        started = time.monotonic()
        await sink.close(0.2)
        assert 0.15 < time.monotonic() - started < 1
        assert (sink.delivered, sink.dropped, sink.status()["buffered"]) == (0, 5, 0)
        sink.offer(messages(5)[0])  # after close: dropped at once
        assert sink.dropped == 6 and sink.status()["buffered"] == 0
    run(main())


def test_close_cancels_a_send_that_hangs(memory):
    async def main():
        sink, target = make_sink(buffer=10)
        target.gate = asyncio.Event()  # never set: the send never completes
        sink.start()
        for m in messages(0, 1):
            sink.offer(m)
        await until(lambda: target.in_flight == messages(0))
        await sink.close(0.1)
        assert (sink.delivered, sink.dropped, sink.status()["buffered"]) == (0, 2, 0)
    run(main())


def test_a_sink_never_started_drops_what_it_holds_on_close(memory):
    async def main():
        sink, target = make_sink(buffer=10)
        for m in messages(0, 1):
            sink.offer(m)
        await sink.close(1)
        assert (sink.delivered, sink.dropped) == (0, 2) and target.attempts == []
        tasks = asyncio.all_tasks()
        sink.start()  # after close: nothing starts
        assert asyncio.all_tasks() == tasks
        await settle()
        assert target.attempts == []
    run(main())


def test_the_buffer_holds_at_least_one_message(memory):
    with pytest.raises(BadInputError, match="at least 1 message"):
        Sink(parse_sink(URL), "cam-1", buffer=0)


@pytest.mark.parametrize("count, code, refused_for_good", [
    (1, 10, True),    # MESSAGE_TOO_LARGE: that record is never taken
    (1, 18, True),    # RECORD_LIST_TOO_LARGE
    (4, 10, False),   # a batch: the Sink halves it and sends again
    (1, 7, False),    # REQUEST_TIMED_OUT: retried
])
def test_a_kafka_record_too_large_is_refused_for_good_not_retried_for_ever(count, code, refused_for_good):
    """A fake answer in place of the broker's: a record over its size limit would block its
    stream's sink for ever if it were retried (tansu takes any size, so a unit test)."""
    import asyncio
    from types import SimpleNamespace

    from pipeline.cameras import transports

    transport = transports.KafkaTransport.__new__(transports.KafkaTransport)
    transport._client, transport._topic, transport._key = object(), "cams", b"door"
    transport._partition = transport._leader = 0

    async def ask(leader, request):
        return SimpleNamespace(topics=[("cams", [(0, code, -1)])])

    transport._ask = ask
    with pytest.raises(transports.Failed) as info:
        asyncio.run(transport.send([b"{}"] * count))
    assert isinstance(info.value, transports.Rejected) == refused_for_good
    assert "the broker refused the records" in str(info.value)
