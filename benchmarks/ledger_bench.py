"""What the latency histograms cost per frame: the ledger's writes for one frame (one batch
of 1, one answered request, the batcher's two live-gauge moves), with the histograms and with
their ``observe`` made a no-op, against the server's CPU per frame measured in the same
breath by ``shm_bench`` (pass it with ``--frame-ms``).

    python -m benchmarks.ledger_bench --frame-ms 186 --frame-ms 6.3
"""

from __future__ import annotations

import argparse
import sys
import timeit
from unittest import mock

from pipeline.telemetry import BatchReport, Histogram, Ledger


def per_frame_us(ledger: Ledger, rounds: int) -> float:
    report = BatchReport(1, (0.004,), 0.180, {"preprocess": 0.003, "network": 0.170, "rle": 0.002},
                         failed=False)

    def one_frame() -> None:
        ledger.add_load("m", 1, 0)
        ledger.add_load("m", -1, 1)
        ledger.record_batch("m", report)
        ledger.add_load("m", 0, -1)
        ledger.record_request("m", images=1, duration_s=0.2, output_s=0.001)

    return min(timeit.repeat(one_frame, number=rounds, repeat=7)) / rounds * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--frame-ms", type=float, action="append", default=[],
                        help="the server's CPU milliseconds per frame to compare with (repeatable)")
    args = parser.parse_args(argv)
    with_histograms = per_frame_us(Ledger(), args.rounds)
    with mock.patch.object(Histogram, "observe", lambda self, seconds, weight=1: None):
        without = per_frame_us(Ledger(), args.rounds)
    cost = with_histograms - without
    print(f"ledger writes per frame: {with_histograms:.2f} us with histograms, {without:.2f} us "
          f"without: the histograms add {cost:.2f} us per frame")
    for frame_ms in args.frame_ms:
        print(f"  = {100 * cost / (frame_ms * 1e3):.4f}% of a frame costing {frame_ms} ms of server CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
