"""Sinks far from the server: a camera's results to MQTT, Redis, Kafka and a webhook a round trip away.

A camera stream offers one result document per frame to its sink at ``--rate`` per second for
``--seconds``. The broker (mosquitto, redis-server, tansu for Kafka) or webhook receiver
(``tests/brokers.py``) runs here, reached through ``DelayedLink``: a TCP relay that holds every byte half the round
trip each way, as a broker in another region or across a VPN would. Two ways, in one run:

- **batched** (the sinks as shipped): what waits goes as one batch of up to
  ``sinks.IN_FLIGHT``: MQTT PUBLISHes sent before their PUBACKs come, Redis XADDs in one
  pipelined round trip, Kafka records in one produce request; a webhook POSTs one at a time
  either way (ordered delivery);
- **one at a time**: the same sinks with batches of one, as a hand-written paho
  ``publish`` + ``wait_for_publish`` or redis-py ``xadd`` loop sends: one round trip per result.

Printed per kind, document size and round trip: results delivered per second, the backlog
left at the end (results still waiting; a sink that keeps up has none), and the latency from
offer to acknowledgement, p50 / p99; then batched against one at a time.

    python -m benchmarks.sink_bench --rtt-ms 0 20 50 100 --sizes 2000 40000 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

from pipeline.cameras import sinks
from pipeline.cameras.sink_targets import checked, parse_sink
from pipeline.cameras.sinks import Sink
from pipeline.serving.url_policy import AllowList
from pipeline.tools.launch import free_port
from tests.brokers import (
    MOSQUITTO,
    REDIS_SERVER,
    TANSU,
    DelayedLink,
    Mosquitto,
    RedisServer,
    Tansu,
    WebhookReceiver,
    unavailable,
)

from .common import percentile

KINDS = {"mqtt": (MOSQUITTO, Mosquitto), "redis": (REDIS_SERVER, RedisServer), "kafka": (TANSU, Tansu),
         "webhook": (None, WebhookReceiver)}
WAYS = ("batched", "one at a time")


def document(index: int, size: int) -> bytes:
    """A result document of about ``size`` bytes (its RLE counts are filler)."""
    head = {"stream_id": "cam", "frame_index": index, "predictions": [{"rle": {"size": [720, 1280], "counts": ""}}]}
    filler = max(0, size - len(json.dumps(head)))
    head["predictions"][0]["rle"]["counts"] = "x" * filler
    return json.dumps(head).encode()


async def drive(url: str, rate: float, seconds: float, size: int) -> dict:
    """Offer ``rate`` documents a second for ``seconds``; what the sink made of them."""
    sink = Sink(await checked(parse_sink(url), "cam", AllowList()), "cam", buffer=100_000)
    offered: dict[int, float] = {}
    latencies: list[float] = []
    send = sink._transport.send  # timed here: when each batch is acknowledged

    async def timed(batch: list[bytes]) -> None:
        await send(batch)
        now = time.monotonic()
        latencies.extend(now - offered[json.loads(m)["frame_index"]] for m in batch)

    sink._transport.send = timed
    sink.start()
    started = time.monotonic()
    index = 0
    while (now := time.monotonic()) < started + seconds:
        offered[index] = now
        sink.offer(document(index, size))
        index += 1
        await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
    status = sink.status()
    elapsed = time.monotonic() - started
    await sink.close(0)
    return {"offered": index, "per_s": status["delivered"] / elapsed, "backlog": status["buffered"],
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99)}


@contextlib.contextmanager
def far_target(kind: str, rtt_ms: float):
    """The sink URL of a ``kind`` target ``rtt_ms`` away (its server running, until the end)."""
    with contextlib.ExitStack() as stack:
        if kind == "kafka":  # Kafka clients go where the broker says it is: the far end of the link
            port = free_port()
            link = stack.enter_context(DelayedLink(port, rtt_ms / 2000))
            broker = stack.enter_context(Tansu(port=port, advertised=f"127.0.0.1:{link.port}"))
            broker.create_topic("bench")
            yield link.url_of(broker.url("bench"))
            return
        server = stack.enter_context(KINDS[kind][1]())
        link = stack.enter_context(DelayedLink(server.port, rtt_ms / 2000))
        yield link.url_of(server.url("/hook") if kind == "webhook" else server.url("bench"))


def one_way(way: str, kind: str, url: str, args) -> dict:
    transport = sinks.TRANSPORTS[kind]
    shipped = transport.batch
    transport.batch = shipped if way == "batched" else 1
    try:
        return asyncio.run(drive(url, args.rate, args.seconds, args.size))
    finally:
        transport.batch = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--rtt-ms", nargs="+", type=float, default=[0, 20, 50, 100],
                        help="round trips to the target to measure")
    parser.add_argument("--sizes", nargs="+", type=int, default=[2000, 40000],
                        help="result document sizes in bytes (few small masks; many large ones)")
    parser.add_argument("--rate", type=float, default=30.0, help="results offered per second (a camera's fps)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per kind, size, round trip and way")
    args = parser.parse_args()

    rows = []
    plan = [(k, s, r) for k in args.kinds for s in args.sizes for r in args.rtt_ms]
    for step, (kind, size, rtt_ms) in enumerate(plan, 1):
        binary = KINDS[kind][0]
        if binary and (reason := unavailable(binary)):
            print(f"skipping {kind}: {reason}")
            continue
        args.size = size
        with far_target(kind, rtt_ms) as url:
            result = {way: one_way(way, kind, url, args) for way in WAYS}
        rows.append((kind, size, rtt_ms, result))
        b, o = result["batched"], result["one at a time"]
        print(f"[{step}/{len(plan)}] {kind} {size} B, {rtt_ms:g} ms: {b['per_s']:.1f} vs {o['per_s']:.1f} "
              f"results/s, backlog {b['backlog']} vs {o['backlog']}", flush=True)

    print(f"\n{args.rate:g} results/s offered for {args.seconds:g} s each; batched / one at a time\n")
    print("| sink | document | round trip | results/s | backlog at end | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for kind, size, rtt_ms, result in rows:
        b, o = result["batched"], result["one at a time"]
        ratio = b["per_s"] / o["per_s"] if o["per_s"] else float("nan")
        print(f"| {kind} | {size / 1000:g} KB | {rtt_ms:g} ms | {b['per_s']:.1f} / {o['per_s']:.1f} = "
              f"**{ratio:.2f}x** | {b['backlog']} / {o['backlog']} | {b['p50_ms']:.0f} / {o['p50_ms']:.0f} | "
              f"{b['p99_ms']:.0f} / {o['p99_ms']:.0f} |")


if __name__ == "__main__":
    main()
