"""Sinks delivering to real servers (tests/brokers.py): a webhook receiver, Mosquitto and
redis-server on 127.0.0.1. Messages arrive in order; refusals are retried or dropped as the
module says; a target that goes away keeps up to ``buffer`` messages waiting (the excess
counted as dropped) and gets them when it comes back; ``close`` flushes; credentials are used
and never shown; https://, mqtts:// and rediss:// deliver over TLS to a target whose
certificate chains to the given CA and names the URL's host, and to no other, at the address
checked when the sink was made; ``last_error`` says what went wrong in our words."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import socket
import time

import pytest

from pipeline.cameras import sinks
from pipeline.cameras.sink_targets import checked, parse_sink
from pipeline.cameras.sinks import Sink
from pipeline.serving import url_policy
from pipeline.serving.url_policy import AllowList

from ..brokers import (
    MOSQUITTO,
    REDIS_SERVER,
    Mosquitto,
    MqttSubscriber,
    RedisServer,
    WebhookReceiver,
    make_certificates,
    unavailable,
)
from ..conftest import settle, until

STREAM = "cam-1"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def made(url: str, **options) -> Sink:
    """A Sink to ``url``, its host checked (and pinned) as a stream's are when it is added."""
    return Sink(await checked(parse_sink(url), STREAM, AllowList()), STREAM, **options)


def document(index: int) -> bytes:
    return json.dumps({"stream_id": STREAM, "frame_index": index, "predictions": []}).encode()


def indexes(payloads) -> list[int]:
    return [json.loads(p)["frame_index"] for p in payloads]


@pytest.fixture
def webhook():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def mosquitto():
    if reason := unavailable(MOSQUITTO):
        pytest.skip(reason)
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def redis_server():
    if reason := unavailable(REDIS_SERVER):
        pytest.skip(reason)
    with RedisServer() as server:
        yield server


# ---------------------------------------------------------------- webhooks


def test_webhook_gets_every_document_in_order_with_basic_auth(webhook):
    url = webhook.url("/hook").replace("http://", "http://alice:s3cr%3Aet@") + "?token=t0ken"

    async def main():
        sink = await made(url)
        sink.start()
        for i in range(20):
            sink.offer(document(i))
        await until(lambda: sink.delivered == 20)
        await sink.close(1)
        return sink.status()

    status = run(main())
    assert [body["frame_index"] for body in webhook.bodies] == list(range(20))
    assert set(webhook.paths) == {"/hook?token=t0ken"}
    assert {h["authorization"] for h in webhook.headers} == {"Basic " + base64.b64encode(b"alice:s3cr:et").decode()}
    assert {h["content-type"] for h in webhook.headers} == {"application/json"}
    assert status == {"url": f"http://alice:***@127.0.0.1:{webhook.port}/hook?token=***", "kind": "webhook",
                      "connected": False, "delivered": 20, "dropped": 0, "buffered": 0, "retries": 0,
                      "last_error": None}


def test_webhook_answering_500_is_retried_until_it_takes_them(webhook):
    webhook.fail_next(3, status=500)

    async def main():
        sink = await made(webhook.url())
        sink.start()
        for i in range(5):
            sink.offer(document(i))
        await until(lambda: sink.delivered == 5)
        await sink.close(1)
        return sink.status()

    status = run(main())
    assert webhook.failed == 3 and [body["frame_index"] for body in webhook.bodies] == list(range(5))
    assert (status["retries"], status["dropped"]) == (3, 0)
    assert status["last_error"] == "HTTP 500"


def test_webhook_4xx_drops_the_message_but_429_is_retried(webhook):
    webhook.fail_next(1, status=400)
    webhook.fail_next(1, status=429)

    async def main():
        sink = await made(webhook.url())
        sink.start()
        for i in range(3):
            sink.offer(document(i))
        await until(lambda: sink.delivered == 2)
        await sink.close(1)
        return sink.status()

    status = run(main())
    assert [body["frame_index"] for body in webhook.bodies] == [1, 2]  # 0 refused for good, 1 retried
    assert (status["dropped"], status["retries"], webhook.failed) == (1, 1, 2)


def test_close_flushes_to_a_webhook_that_came_back(webhook):
    async def main():
        webhook.stop()
        sink = await made(webhook.url())
        sink.start()
        for i in range(5):
            sink.offer(document(i))
        await until(lambda: sink.retries >= 2)
        assert sink.status()["connected"] is False and sink.status()["last_error"] == "connection refused"
        webhook.start()  # the same port
        await sink.close(5)  # the pause in progress is cut short
        return sink.status()

    status = run(main())
    assert [body["frame_index"] for body in webhook.bodies] == list(range(5))
    assert (status["delivered"], status["dropped"], status["buffered"]) == (5, 0, 0)


# ---------------------------------------------------------------- MQTT


def test_mqtt_topics_get_every_document_in_order(mosquitto):
    urls = [mosquitto.url("cams"), mosquitto.url(""), mosquitto.url("site/{stream_id}/results")]

    async def main():
        sinks_ = [await made(url) for url in urls]
        for sink in sinks_:
            sink.start()
        for i in range(20):
            for sink in sinks_:
                sink.offer(document(i))
        await until(lambda: all(sink.delivered == 20 for sink in sinks_))
        await asyncio.gather(*(sink.close(1) for sink in sinks_))

    with MqttSubscriber(mosquitto.port, "#") as subscriber:
        run(main())
        topics = ["cams/cam-1", "rle-serving/cam-1", "site/cam-1/results"]
        deadline = time.monotonic() + 10  # acknowledged by the broker is not yet received by its subscribers
        while len(subscriber.messages) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        for topic in topics:
            assert indexes(p for t, p in subscriber.messages if t == topic) == list(range(20))
        assert {t for t, _ in subscriber.messages} == set(topics)


def test_mqtt_broker_away_and_back(mosquitto):
    with MqttSubscriber(mosquitto.port, "cams/#") as subscriber:
        async def main():
            sink = await made(mosquitto.url("cams"), buffer=5)
            sink.start()
            for i in range(3):
                sink.offer(document(i))
            await until(lambda: sink.delivered == 3)
            mosquitto.stop()
            for i in range(3, 12):  # 9 while it is away: the newest 5 wait, 4 are dropped
                sink.offer(document(i))
            await until(lambda: sink.retries >= 2)
            away = sink.status()
            mosquitto.start()  # the same port
            await until(lambda: sink.delivered == 8)
            back = sink.status()
            await sink.close(1)
            return away, back

        away, back = run(main())
        assert (away["connected"], away["buffered"], away["dropped"], away["delivered"]) == (False, 5, 4, 3)
        assert away["last_error"]
        assert (back["connected"], back["buffered"], back["dropped"]) == (True, 0, 4)
        # The subscriber's session outlives the restart, so it gets what was sent after it.
        # QoS 1 is at least once: the broker may send again what it had not seen acknowledged.
        sent = [0, 1, 2, 7, 8, 9, 10, 11]
        run(until(lambda: set(indexes(subscriber.payloads())) >= set(sent)))
        assert list(dict.fromkeys(indexes(subscriber.payloads()))) == sent  # in order, and the dropped never


def test_an_mqtt_broker_refusing_the_connection_says_so_and_the_sink_still_closes_at_once():
    if reason := unavailable(MOSQUITTO):
        pytest.skip(reason)
    with Mosquitto(anonymous=False) as broker:
        async def main():
            sink = await made(broker.url("cams"), backoff_s=(0.05, 0.1))
            sink.start()
            sink.offer(document(0))
            await until(lambda: sink.retries >= 2)  # refused at once, again and again
            started = time.monotonic()
            await sink.close(0)
            return sink.status(), time.monotonic() - started

        status, closing_s = run(main())
    assert (status["delivered"], status["last_error"]) == (0, "MQTT: the broker refused the connection (Not authorized)")
    assert closing_s < 2  # a cancel that Python 3.11's wait_for lost once left it retrying for ever


async def delivered_one_then_frozen(broker: Mosquitto) -> Sink:
    """A started sink that delivered document 0 to ``broker``, now frozen: the connection
    stays open and nothing is answered."""
    sink = await made(broker.url("cams"))
    sink.start()
    sink.offer(document(0))
    await until(lambda: sink.delivered == 1)
    broker.freeze()
    return sink


def test_mqtt_publish_waiting_for_its_puback_is_sent_again_when_the_broker_dies(mosquitto):
    async def main():
        sink = await delivered_one_then_frozen(mosquitto)
        sink.offer(document(1))
        await settle(50)  # 1 is published; no PUBACK comes
        assert (sink.delivered, sink.retries) == (1, 0)
        mosquitto.kill()
        # Noticed when the connection is lost, not after SEND_TIMEOUT_S (10 s) without a PUBACK.
        await until(lambda: sink.retries == 1, timeout_s=2)
        lost = sink.status()
        mosquitto.start()
        await until(lambda: sink.delivered == 2)
        await sink.close(1)
        return lost

    lost = run(main())
    assert lost["last_error"] == "connection lost"
    assert (lost["connected"], lost["buffered"]) == (False, 1)


def test_a_batch_cut_short_by_close_leaves_nothing_behind(mosquitto, caplog):
    async def main():
        sink = await delivered_one_then_frozen(mosquitto)
        for i in range(1, 6):
            sink.offer(document(i))
        await settle(50)  # one batch of 5 is published; no PUBACK comes
        await sink.close(0)
        await settle(50)
        return sink.status()

    caplog.set_level(logging.CRITICAL, logger=sinks.__name__)  # its records would hold the sink (their arguments)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        status = run(main())
        gc.collect()  # a future whose exception nobody took says so when collected
    mosquitto.kill()
    assert (status["delivered"], status["dropped"], status["buffered"]) == (1, 5, 0)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_close_flushes_to_mqtt(mosquitto):
    with MqttSubscriber(mosquitto.port, "cams/#") as subscriber:
        async def main():
            sink = await made(mosquitto.url("cams"))
            sink.start()
            for i in range(50):
                sink.offer(document(i))
            await sink.close(5)  # at once: everything is still buffered
            return sink.status()

        status = run(main())
        assert (status["delivered"], status["dropped"], status["buffered"]) == (50, 0, 0)
        run(until(lambda: len(subscriber.messages) == 50))
        assert indexes(subscriber.payloads()) == list(range(50))


# ---------------------------------------------------------------- Redis Streams


def test_redis_stream_gets_every_document_in_order(redis_server):
    async def main():
        sink = await made(redis_server.url())
        trimmed = await made(redis_server.url("short", "maxlen=10"))
        for s in (sink, trimmed):
            s.start()
        for i in range(20):
            sink.offer(document(i))
        for i in range(300):
            trimmed.offer(document(i))
        await until(lambda: sink.delivered == 20 and trimmed.delivered == 300)
        await asyncio.gather(sink.close(1), trimmed.close(1))

    run(main())
    entries = redis_server.entries("rle-serving:cam-1")
    assert [e["frame_index"] for e in entries] == [str(i).encode() for i in range(20)]
    assert {e["stream_id"] for e in entries} == {b"cam-1"}
    assert [e["document"] for e in entries] == [document(i) for i in range(20)]
    # MAXLEN ~ 10: Redis trims whole nodes (100 entries each), keeping at least the newest 10.
    kept = redis_server.entries("short")
    assert 10 <= len(kept) < 300 and kept[-1]["frame_index"] == b"299"


def test_redis_away_and_back(redis_server):
    async def main():
        sink = await made(redis_server.url("k"), buffer=5)
        sink.start()
        for i in range(3):
            sink.offer(document(i))
        await until(lambda: sink.delivered == 3)
        redis_server.stop()
        for i in range(3, 12):
            sink.offer(document(i))
        await until(lambda: sink.retries >= 2)
        away = sink.status()
        redis_server.start()  # the same port, empty (nothing is saved)
        await until(lambda: sink.delivered == 8)
        await sink.close(1)
        return away, sink.status()

    away, back = run(main())
    assert (away["connected"], away["buffered"], away["dropped"]) == (False, 5, 4)
    assert (back["delivered"], back["buffered"], back["dropped"]) == (8, 0, 4)
    assert [e["frame_index"] for e in redis_server.entries("k")] == [b"7", b"8", b"9", b"10", b"11"]


def test_redis_credentials_are_used_and_never_shown(caplog):
    if reason := unavailable(REDIS_SERVER):
        pytest.skip(reason)
    password = "p@ss/w:rd"
    encoded = "p%40ss%2Fw%3Ard"
    with RedisServer(password=password) as server:
        good = server.url("k").replace("redis://", f"redis://default:{encoded}@")
        bad = server.url("k").replace("redis://", "redis://default:wr0ng-s3cret@")

        async def main():
            right, wrong = await made(good), await made(bad)
            for s in (right, wrong):
                s.start()
                s.offer(document(0))
            await until(lambda: right.delivered == 1 and wrong.retries >= 1)
            await asyncio.gather(right.close(1), wrong.close(0.1))
            return right.status(), wrong.status()

        with caplog.at_level(logging.DEBUG, logger=sinks.__name__):
            right, wrong = run(main())
        assert [e["frame_index"] for e in server.entries("k")] == [b"0"]
    assert right["url"] == f"redis://default:***@127.0.0.1:{server.port}/k"
    assert (wrong["delivered"], wrong["dropped"]) == (0, 1)
    assert wrong["last_error"] == "authentication failed"
    shown = json.dumps([right, wrong]) + "\n".join(r.getMessage() for r in caplog.records)
    assert "wr0ng" in bad and "***" in shown
    for secret in (password, encoded, "wr0ng-s3cret"):
        assert secret not in shown


def test_a_sink_tries_each_checked_address_in_turn(webhook, mosquitto, redis_server, monkeypatch):
    """two.test has two addresses, the first of which nothing answers on (127.0.0.2): each kind
    goes on to the second in the same attempt, as a connection by name would."""
    monkeypatch.setattr(url_policy, "lookup", lambda host, port: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in ("127.0.0.2", "127.0.0.1")])

    async def main():
        urls = [webhook.url(host="two.test"), mosquitto.url("cams").replace("127.0.0.1", "two.test"),
                redis_server.url("k").replace("127.0.0.1", "two.test")]
        each = [await made(url) for url in urls]
        assert [[a["host"] for a in s.target.addresses] for s in each] == [["127.0.0.2", "127.0.0.1"]] * 3
        for sink in each:
            sink.start()
            sink.offer(document(0))
        await until(lambda: all(s.delivered == 1 for s in each))
        await asyncio.gather(*(s.close(1) for s in each))
        return [s.status() for s in each]

    assert [(s["retries"], s["last_error"]) for s in run(main())] == [(0, None)] * 3
    assert [body["frame_index"] for body in webhook.bodies] == [0]
    assert [e["frame_index"] for e in redis_server.entries("k")] == [b"0"]


# ---------------------------------------------------------------- TLS


NAMED = "sinks.test"  # a name the test CA's certificate carries, besides 127.0.0.1


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    if reason := unavailable("openssl"):
        pytest.skip(reason)
    return make_certificates(tmp_path_factory.mktemp("tls"), name=NAMED)


def deliver_over_tls(urls: list[str], ca_file: str | None, count: int = 5) -> list[dict]:
    """Offer ``count`` documents to a sink per URL; the statuses once each delivered them all,
    or retried at least twice."""
    async def main():
        each = [await made(url, ca_file=ca_file, backoff_s=(0.05, 0.1)) for url in urls]
        for sink in each:
            sink.start()
            for i in range(count):
                sink.offer(document(i))
        await until(lambda: all(s.delivered == count or s.retries >= 2 for s in each), timeout_s=15)
        await asyncio.gather(*(sink.close(0.1) for sink in each))
        return [sink.status() for sink in each]

    return run(main())


def test_tls_sinks_deliver_to_targets_that_the_ca_vouches_for(certificates):
    for binary in (MOSQUITTO, REDIS_SERVER):
        if reason := unavailable(binary):
            pytest.skip(reason)
    with (WebhookReceiver(tls=certificates) as webhook, Mosquitto(tls=certificates) as broker,
          RedisServer(tls=certificates) as redis_server, MqttSubscriber(broker.port, "cams/#") as subscriber):
        urls = [webhook.url("/hook"), broker.tls_url("cams"), redis_server.tls_url("k")]
        assert [parse_sink(url).tls for url in urls] == [True, True, True]
        statuses = deliver_over_tls(urls, str(certificates.ca))
        assert [(s["delivered"], s["retries"], s["last_error"]) for s in statuses] == [(5, 0, None)] * 3
        assert [body["frame_index"] for body in webhook.bodies] == list(range(5))
        until_received = time.monotonic() + 10  # acknowledged by the broker is not yet received
        while len(subscriber.messages) < 5 and time.monotonic() < until_received:
            time.sleep(0.01)
        assert indexes(subscriber.payloads()) == list(range(5))
        assert [e["frame_index"] for e in redis_server.entries("k")] == [b"0", b"1", b"2", b"3", b"4"]


def test_tls_sinks_refuse_a_certificate_the_ca_does_not_vouch_for_or_for_another_name(certificates):
    for binary in (MOSQUITTO, REDIS_SERVER):
        if reason := unavailable(binary):
            pytest.skip(reason)
    with (WebhookReceiver(tls=certificates) as webhook, Mosquitto(tls=certificates) as broker,
          RedisServer(tls=certificates) as redis_server):
        urls = [webhook.url("/hook"), broker.tls_url("cams"), redis_server.tls_url("k")]
        # The system's CAs alone do not know the test CA: nothing is sent, and the error says why.
        for status in deliver_over_tls(urls, None, count=1):
            assert (status["delivered"], status["connected"]) == (0, False), status
            assert status["last_error"] == "TLS: certificate not trusted", status
        # The certificate is for 127.0.0.1: another name for the same server is refused.
        elsewhere = [webhook.url("/hook", host="localhost"), broker.tls_url("cams", host="localhost"),
                     redis_server.tls_url("k", host="localhost")]
        for status in deliver_over_tls(elsewhere, str(certificates.ca), count=1):
            assert status["delivered"] == 0, status
            assert status["last_error"] == "TLS: certificate for another host", status
        assert webhook.bodies == [] and redis_server.entries("k") == []


def test_tls_sinks_verify_the_urls_name_at_the_address_checked_for_it(certificates, monkeypatch):
    """A sink connects to the address its name had when checked (here a lookup only this test
    answers: the system's resolver knows no such names), and TLS verifies the name, not the
    address: the certificate names sinks.test, so that is delivered; elsewhere.test, at the
    same address, is not."""
    for binary in (MOSQUITTO, REDIS_SERVER):
        if reason := unavailable(binary):
            pytest.skip(reason)
    def lookup(host, port):
        if host not in (NAMED, "elsewhere.test"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(url_policy, "lookup", lookup)
    with (WebhookReceiver(tls=certificates) as webhook, Mosquitto(tls=certificates) as broker,
          RedisServer(tls=certificates) as redis_server, MqttSubscriber(broker.port, "cams/#") as subscriber):
        named = [webhook.url("/hook", host=NAMED), broker.tls_url("cams", host=NAMED),
                 redis_server.tls_url("k", host=NAMED)]
        statuses = deliver_over_tls(named, str(certificates.ca))
        assert [(s["delivered"], s["retries"], s["last_error"]) for s in statuses] == [(5, 0, None)] * 3
        assert [body["frame_index"] for body in webhook.bodies] == list(range(5))
        run(until(lambda: len(subscriber.messages) == 5))
        assert [e["frame_index"] for e in redis_server.entries("k")] == [b"0", b"1", b"2", b"3", b"4"]
        elsewhere = [url.replace(NAMED, "elsewhere.test") for url in named]
        for status in deliver_over_tls(elsewhere, str(certificates.ca), count=1):
            assert (status["delivered"], status["last_error"]) == (0, "TLS: certificate for another host"), status
