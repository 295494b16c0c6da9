"""Soak: does the server's memory settle under sustained overload? Nothing lost?

Starts ``python -m pipeline serve`` and drives it with N tritonclient streams (each keeping
``window`` requests in flight through ModelStreamInfer, real photos) for R rounds of S
seconds. After each round it prints the server's resident memory (VmRSS), frames answered,
errors by status, and requests lost (sent but never answered: must be 0).

    python benchmarks/soak_bench.py --streams 32 --window 2 --rounds 5 --seconds 40

RSS is read at rest after each round: the lowest of readings over 5 s of idle (the server
gives freed memory back after a second idle; single readings swing by tens of MB with what
the last batches left mapped). The verdict compares the mean of the last half of the rounds
with the first half: a plateau grows by less than 5%.
"""

from __future__ import annotations

import argparse
import collections
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

from pipeline.tools.launch import local_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import workload  # noqa: E402 - the same real photos and 16:9 frames

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident MB: VmRSS (all), or RssAnon (heap and other anonymous memory, where a leak
    would show; RssFile, the mapped libraries' pages, is the rest)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settled_rss_mb(pid: int, seconds: float = 5.0, field: str = "VmRSS") -> float:
    """The server's resident memory at rest: the lowest of readings over ``seconds`` of idle
    (it trims freed memory after a second idle; single readings swing with what the last
    batches left mapped)."""
    readings = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        readings.append(rss_mb(pid, field))
        time.sleep(0.25)
    return min(readings)


def one_stream(target: str, images: list[bytes], window: int, stop_at: float, tally: dict,
               lock: threading.Lock) -> None:
    client = triton.InferenceServerClient(target)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error))
    sent = answered = k = in_flight = 0
    errors: collections.Counter = collections.Counter()
    try:
        while time.monotonic() < stop_at or in_flight:
            while in_flight < window and time.monotonic() < stop_at:
                tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[images[k % len(images)]]], dtype=object))
                client.async_stream_infer("instance_segmentation", [tensor], request_id=str(k))
                k += 1
                sent += 1
                in_flight += 1
            try:
                error = answers.get(timeout=120)
            except queue.Empty:
                break
            in_flight -= 1
            answered += 1
            if error is not None:
                errors[error.message().split(":", 1)[0]] += 1  # "STATUS: message"
    finally:
        client.stop_stream()
        client.close()
    with lock:
        tally["sent"] += sent
        tally["answered"] += answered
        tally["errors"].update(errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--workload", default="photos+16:9")
    parser.add_argument("--server-args", default="", help="extra flags for the server")
    args = parser.parse_args(argv)

    (ROOT / "out").mkdir(exist_ok=True)
    log = open(ROOT / "out" / "soak_server.log", "w")
    with local_server(*args.server_args.split(), log=log, cwd=ROOT) as running:
        target, server = running.address, running.process
        images = workload(args.workload)
        print(f"# soak: {args.streams} streams x window {args.window}, {args.rounds} rounds of "
              f"{args.seconds:.0f} s, {args.workload}; server flags: {args.server_args or '(defaults)'}")
        print("| round | RSS MB | RSS growth | anonymous MB | frames answered | frames/s | "
              "errors by status | lost |")
        print("|---|---|---|---|---|---|---|---|")
        previous = settled_rss_mb(server.pid)
        print(f"| start | {previous:.0f} | | {rss_mb(server.pid, 'RssAnon'):.0f} | | | | |", flush=True)
        readings, lost = [], 0
        for r in range(1, args.rounds + 1):
            tally = {"sent": 0, "answered": 0, "errors": collections.Counter()}
            lock = threading.Lock()
            stop_at = time.monotonic() + args.seconds
            threads = [threading.Thread(target=one_stream, args=(target, images, args.window,
                                                                  stop_at, tally, lock))
                       for _ in range(args.streams)]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            now = settled_rss_mb(server.pid)
            anonymous = rss_mb(server.pid, "RssAnon")
            ok = tally["answered"] - sum(tally["errors"].values())
            errors = ", ".join(f"{k} {v}" for k, v in sorted(tally["errors"].items())) or "none"
            print(f"| {r} | {now:.0f} | {100 * (now - previous) / previous:+.1f}% | {anonymous:.0f} | {ok} | "
                  f"{ok / elapsed:.2f} | {errors} | {tally['sent'] - tally['answered']} |", flush=True)
            previous = now
            readings.append(now)
            lost += tally["sent"] - tally["answered"]
        half = len(readings) // 2
        if half:
            first, last = np.mean(readings[:half]), np.mean(readings[-half:])
            verdict = "plateau" if last < 1.05 * first else "GROWING"
            print(f"\nmean RSS, first {half} rounds {first:.0f} MB, last {half} {last:.0f} MB: "
                  f"{100 * (last / first - 1):+.1f}% ({verdict}); highest, first half "
                  f"{max(readings[:half]):.0f} MB, last half {max(readings[-half:]):.0f} MB; "
                  f"requests lost: {lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
