"""A stream's sinks count what became of each message in the server's ledger too (Prometheus'
``rle_serving_sink_messages_total{kind,outcome}``), at every place their own status counts it:
delivered, pushed out of a full buffer, refused, left at close, offered after close. Through
the in-memory transport of test_sinks; a MemorySink (an inference pipeline's) counts alike."""

from __future__ import annotations

import asyncio

from pipeline.cameras.sinks import MemorySink
from pipeline.telemetry import Ledger

from ..conftest import until
from .test_sinks import make_sink, memory, messages, run  # noqa: F401 - memory: a fixture


def test_a_sinks_every_outcome_is_in_the_ledger_as_in_its_status(memory):  # noqa: F811
    async def main():
        ledger = Ledger()
        sink, target = make_sink(buffer=2)
        target.gate = asyncio.Event()
        sink.start(ledger)
        sink.offer(messages(0)[0])
        await until(lambda: target.in_flight == messages(0))
        for m in messages(*range(1, 6)):  # 1..3 pushed out; 4 and 5 wait
            sink.offer(m)
        target.refuse.add(messages(4)[0])
        target.gate.set()
        await until(lambda: sink.delivered == 2)  # 0 and 5; 4 refused
        assert target.received == messages(0, 5)
        target.up = False
        sink.offer(messages(6)[0])
        await until(lambda: sink.retries >= 1)
        await sink.close(0.05)  # 6 left behind
        sink.offer(messages(7)[0])  # after close
        assert (sink.delivered, sink.dropped) == (2, 6)
        assert ledger.sink_message_counts() == {("webhook", "delivered"): 2, ("webhook", "dropped"): 6}
    run(main())


def test_a_memory_sink_counts_what_its_reader_took_and_what_it_dropped():
    async def main():
        ledger = Ledger()
        sink = MemorySink("pipe.0", buffer=2)
        sink.start(ledger)
        for m in messages(0, 1, 2):  # 0 pushed out
            sink.offer(m)
        assert [sink.take(), sink.take(), sink.take()] == [*messages(1, 2), None]
        await sink.close(0)
        sink.offer(messages(3)[0])
        assert sink.status()["delivered"] == 2 and sink.status()["dropped"] == 2
        assert ledger.sink_message_counts() == {("memory", "delivered"): 2, ("memory", "dropped"): 2}
    run(main())
