"""Kafka sinks against a real Kafka-protocol broker (tansu, started by the test: tests/brokers.py),
read back with a Kafka client (aiokafka's consumer).

Through the in-process server and a real file camera: every frame of a file arrives, in order,
each record keyed by its stream's id (a stream's records on one partition); the broker killed
and started again mid-stream: drops counted, delivery resumes, delivered + dropped = frames
out; a topic the broker does not have: a clear error in the sink's status, the topic not
created by asking, and delivery once it is made. Sinks on their own: kafkas:// delivers over
TLS to a broker whose certificate the CA vouches for and to no other; the client connects to
the address checked for the URL's name, whatever a fresh lookup would say; a broker that names
brokers elsewhere is refused, saying so.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from pipeline.cameras.sink_targets import checked, parse_sink
from pipeline.cameras.sinks import Sink
from pipeline.serving import url_policy
from pipeline.serving.url_policy import AllowList

from ..brokers import TANSU, Tansu, make_certificates, unavailable
from ..cameras import free_port
from ..conftest import running_server, until, wait_until
from .conftest import http, remove_streams

FRAMES = 30  # of scene.mp4: 3 s at 10 fps
NO_TOPIC = "Kafka: no topic {!r} on the broker (create it: a sink does not create topics)"


@pytest.fixture(scope="module")
def cams(fake_root, clips):
    # A small --sink-buffer, so that a broker away for a second costs drops.
    with running_server(model_repository=str(fake_root), stream_source_dir=str(clips), sink_buffer=5) as running:
        yield running
        remove_streams(running)


@pytest.fixture
def tansu():
    if reason := unavailable(TANSU):
        pytest.skip(reason)
    with Tansu() as broker:
        yield broker


def add(server, stream_id: str, sinks: list[str], **fields) -> dict:
    code, body = http(server, "POST", "/v1/streams", {"source": "scene.mp4", "stream_id": stream_id,
                                                     "sinks": sinks, **fields})
    assert code == 201, body
    return body


def status(server, stream_id: str) -> dict:
    code, body = http(server, "GET", f"/v1/streams/{stream_id}")
    assert code == 200, body
    return body


def finished(server, stream_id: str, timeout_s: float = 30) -> dict:
    """The stream's status once its file has ended, every frame it read is answered (or
    dropped), and its sink holds nothing more ("stopped" is the source's end: the frames read
    before it are still answered and sent)."""
    return wait_until(lambda: (s := status(server, stream_id))["state"] == "stopped"
                      and s["frames_out"] + s["frames_dropped"] + s["frame_errors"] == s["frames_decoded"]
                      and s["sinks"][0]["buffered"] == 0 and s, timeout_s)


def frame_indexes(records) -> list[int]:
    return [json.loads(value)["frame_index"] for _, _, value in records]


def test_a_file_delivers_every_frame_in_order_keyed_by_its_stream_id(cams, tansu):
    tansu.create_topic("cams", partitions=3)
    for stream_id in ("lobby", "gate"):
        add(cams, stream_id, [tansu.url("cams")], realtime=False)
    done = {stream_id: finished(cams, stream_id) for stream_id in ("lobby", "gate")}
    for stopped in done.values():
        sink = stopped["sinks"][0]
        assert stopped["frames_out"] == FRAMES, stopped
        assert (sink["kind"], sink["delivered"], sink["dropped"], sink["retries"], sink["last_error"]) == \
            ("kafka", FRAMES, 0, 0, None), sink
    records = tansu.records("cams")
    for stream_id in ("lobby", "gate"):
        own = [r for r in records if r[1] == stream_id.encode()]
        assert len({partition for partition, _, _ in own}) == 1  # the key's partition: one, so in order
        assert frame_indexes(own) == list(range(FRAMES))
        assert {json.loads(value)["stream_id"] for _, _, value in own} == {stream_id}
    assert len(records) == 2 * FRAMES  # nothing else, nothing twice


def test_a_broker_killed_mid_stream_costs_counted_drops_and_delivery_resumes(cams, tansu):
    tansu.create_topic("cams")
    add(cams, "killed", [tansu.url("cams")], max_fps=10)
    wait_until(lambda: status(cams, "killed")["sinks"][0]["delivered"] >= 2, 30)
    tansu.kill()
    away = wait_until(lambda: (s := status(cams, "killed")["sinks"][0])["dropped"] > 0 and s, 30)
    assert away["connected"] is False and away["buffered"] <= 6  # --sink-buffer 5, and a batch in flight
    assert away["last_error"] in ("connection lost", "connection refused"), away
    tansu.start()  # the same port; tansu keeps topics in memory, so "cams" is gone
    wait_until(lambda: status(cams, "killed")["sinks"][0]["last_error"] == NO_TOPIC.format("cams"), 30)
    tansu.create_topic("cams")
    done = finished(cams, "killed")
    sink = done["sinks"][0]
    assert sink["delivered"] > away["delivered"] and sink["connected"], sink
    assert sink["delivered"] + sink["dropped"] == done["frames_out"], done
    # What came after the restart (the batch cut short by the kill among it), once each, in order.
    after = frame_indexes(tansu.records("cams"))
    assert after and after == sorted(set(after)) and after[-1] >= FRAMES - 3, after


def test_a_topic_the_broker_does_not_have_is_a_clear_error_and_is_not_created(cams, tansu):
    add(cams, "typo", [tansu.url("camz")], realtime=False)  # the file waits for the sink
    told = wait_until(lambda: (s := status(cams, "typo")["sinks"][0])["retries"] >= 2 and s, 30)
    assert (told["delivered"], told["dropped"], told["last_error"]) == (0, 0, NO_TOPIC.format("camz"))
    assert tansu.records("camz") == []  # asked for, not created (tansu creates topics on demand)
    tansu.create_topic("camz")
    done = finished(cams, "typo")
    assert (done["sinks"][0]["delivered"], done["sinks"][0]["dropped"]) == (FRAMES, 0)
    assert frame_indexes(tansu.records("camz")) == list(range(FRAMES))


# ---------------------------------------------------------------- a sink on its own: TLS, addresses

STREAM = "cam-1"
NAMED = "kafka.test"  # a name only this module's lookup knows (and the test CA's certificate names)


def document(index: int) -> bytes:
    return json.dumps({"stream_id": STREAM, "frame_index": index, "predictions": []}).encode()


def deliver(url: str, ca_file: str | None = None, count: int = 5) -> dict:
    """A sink to ``url`` offered ``count`` documents; its status once it delivered them all or
    retried twice."""
    async def main():
        sink = Sink(await checked(parse_sink(url), STREAM, AllowList()), STREAM, ca_file=ca_file,
                    backoff_s=(0.05, 0.1))
        sink.start()
        for i in range(count):
            sink.offer(document(i))
        await until(lambda: sink.delivered == count or sink.retries >= 2, timeout_s=15)
        await sink.close(0.1)
        return sink.status()

    return asyncio.run(asyncio.wait_for(main(), 30))


@pytest.fixture
def lookup(monkeypatch):
    """kafka.test is 127.0.0.1 to the server's lookup (url_policy's), and unknown to the
    system's resolver, which aiokafka would ask were the address not pinned."""
    def known(host, port):
        if host not in (NAMED, "localhost", "127.0.0.1"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(url_policy, "lookup", known)


def test_kafkas_delivers_to_a_broker_the_ca_vouches_for_and_to_no_other(tmp_path, lookup):
    if reason := unavailable(TANSU) or unavailable("openssl"):
        pytest.skip(reason)
    certificates = make_certificates(tmp_path, name=NAMED)
    with Tansu(tls=certificates) as broker:
        broker.create_topic("cams")
        url = broker.tls_url("cams")
        assert parse_sink(url).tls
        sent = deliver(url, str(certificates.ca))
        assert (sent["delivered"], sent["retries"], sent["last_error"]) == (5, 0, None), sent
        assert [(key, i) for (_, key, _), i in zip(broker.records("cams"), frame_indexes(broker.records("cams")))] \
            == [(STREAM.encode(), i) for i in range(5)]
        untrusted = deliver(url, None, count=1)  # the system's CAs do not know the test CA
        assert (untrusted["delivered"], untrusted["last_error"]) == (0, "TLS: certificate not trusted")
        named = deliver(broker.tls_url("cams", host=NAMED), str(certificates.ca), count=1)
        assert (named["delivered"], named["last_error"]) == (1, None), named  # the name verified, at its address
        elsewhere = deliver(broker.tls_url("cams", host="localhost"), str(certificates.ca), count=1)
        assert (elsewhere["delivered"], elsewhere["last_error"]) == (0, "TLS: certificate for another host")


def test_the_client_goes_to_the_checked_address_of_a_broker_advertised_by_name(lookup):
    if reason := unavailable(TANSU):
        pytest.skip(reason)
    port = free_port()
    with Tansu(port=port, advertised=f"{NAMED}:{port}") as broker:
        broker.create_topic("cams")
        sent = deliver(f"kafka://{NAMED}:{port}/cams")
        assert (sent["delivered"], sent["last_error"]) == (5, None), sent


def test_a_broker_that_sends_clients_elsewhere_is_refused_saying_so():
    if reason := unavailable(TANSU):
        pytest.skip(reason)
    with Tansu(advertised=f"127.0.0.1:{free_port()}") as broker:
        refused = deliver(broker.url("cams"), count=1)
    assert (refused["delivered"], refused["connected"]) == (0, False)
    assert refused["last_error"] == ("Kafka: the broker names brokers at other hosts or ports than the URL's "
                                     "(a sink connects to its URL's host only)")


def test_the_docs_kafka_example_runs(cams, clips, tansu, tmp_path):
    """docs/cameras.md's Kafka example, as written but for the addresses: a file's frames,
    keyed by the stream's id, read back with aiokafka."""
    import re
    import subprocess
    import sys

    from ..conftest import ROOT

    (snippet,) = [code for code in re.findall(r"```python\n(.*?)```", (ROOT / "docs/cameras.md").read_text(), re.S)
                  if "kafka://" in code]
    (clips / "clip.mp4").write_bytes((clips / "scene.mp4").read_bytes())
    tansu.create_topic("cameras")
    code = (snippet.replace("localhost:8000", f"127.0.0.1:{cams.server.http_port}")
            .replace("localhost:9092", f"127.0.0.1:{tansu.port}"))
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    finally:
        http(cams, "DELETE", "/v1/streams/door")
    assert run.returncode == 0, run.stderr
    lines = [line.split() for line in run.stdout.splitlines()]
    assert len(lines) == 10 and all(key == "door" for key, _, _ in lines)
    assert [int(index) for _, index, _ in lines] == sorted(int(index) for _, index, _ in lines)
    assert all(int(found) > 0 for _, _, found in lines)  # the clip's blobs, found
