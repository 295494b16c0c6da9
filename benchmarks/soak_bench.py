"""Soak: under sustained overload, is a frame that cannot be served refused at once, and does
the server's memory settle? Nothing lost?

Starts ``python -m pipeline serve`` and drives it with N tritonclient streams (each keeping
``window`` requests in flight through ModelStreamInfer, real photos) for R rounds of S
seconds. After each round it prints the server's resident memory at rest (VmRSS), frames
served and refused, the time a refused frame waited for its answer (p50; the goal is under
100 ms: a frame that cannot start within its deadline is refused on arrival), the served
frames' p99, errors by status, and requests lost (sent but never answered: must be 0).

    python -m benchmarks.soak_bench --streams 32 --window 2 --rounds 4 --seconds 60

RSS is read at rest after each round: the lowest of readings over 5 s of idle (the server
gives freed memory back after a second idle; single readings swing by tens of MB with what
the last batches left mapped). The verdict: every round after the second within 10% of the
second's resting RSS.
"""

from __future__ import annotations

import collections
import os
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

from pipeline.tools.launch import local_server

from .common import ROOT, arguments, cpu_s, out_path, workload


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
    sent_at: deque[float] = deque()  # a stream is answered in order: the oldest is answered next
    served_s, refused_s = [], []
    ended = False  # by the server: its unanswered requests count as lost
    try:
        while not ended and (time.monotonic() < stop_at or in_flight):
            while in_flight < window and time.monotonic() < stop_at:
                tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[images[k % len(images)]]], dtype=object))
                try:
                    client.async_stream_infer("instance_segmentation", [tensor], request_id=str(k))
                except triton.InferenceServerException:
                    errors["STREAM ENDED"] += 1
                    ended = True
                    break
                sent_at.append(time.monotonic())
                k += 1
                sent += 1
                in_flight += 1
            if ended:
                break
            try:
                error = answers.get(timeout=120)
            except queue.Empty:
                break
            waited = time.monotonic() - sent_at.popleft()
            in_flight -= 1
            answered += 1
            if error is not None:
                errors[error.message().split(":", 1)[0]] += 1  # "STATUS: message"
                errors["of which refused at once"] += "refused at once" in error.message()
                refused_s.append(waited)
            else:
                served_s.append(waited)
    finally:
        client.stop_stream()
        client.close()
    with lock:
        tally["sent"] += sent
        tally["answered"] += answered
        tally["errors"].update(errors)
        tally["served_s"] += served_s
        tally["refused_s"] += refused_s


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workload", default="photos+16:9")
    parser.add_argument("--server-args", default="", help="extra flags for the server")
    args = parser.parse_args(argv)

    log = open(out_path("soak_server.log"), "w")
    with local_server(*args.server_args.split(), log=log, cwd=ROOT) as running:
        target, server = running.address, running.process
        images = workload(args.workload)
        print(f"# soak: {args.streams} streams x window {args.window}, {args.rounds} rounds of "
              f"{args.seconds:.0f} s, {args.workload}; server flags: {args.server_args or '(defaults)'}")
        print("| round | RSS MB at rest | vs round 2 | anonymous MB | frames served | served/s | "
              "refused | refusal p50 ms | served p99 ms | errors by status | lost | "
              "server CPU cores | clients' CPU cores |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| start | {settled_rss_mb(server.pid):.0f} | | {rss_mb(server.pid, 'RssAnon'):.0f} "
              "| | | | | | | | | |", flush=True)
        readings, lost = [], 0
        for r in range(1, args.rounds + 1):
            tally = {"sent": 0, "answered": 0, "errors": collections.Counter(), "served_s": [],
                     "refused_s": []}
            lock = threading.Lock()
            stop_at = time.monotonic() + args.seconds
            threads = [threading.Thread(target=one_stream, args=(target, images, args.window,
                                                                  stop_at, tally, lock))
                       for _ in range(args.streams)]
            start, server_cpu, own_cpu = time.monotonic(), cpu_s(server.pid), cpu_s(os.getpid())
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            server_cores = (cpu_s(server.pid) - server_cpu) / elapsed
            client_cores = (cpu_s(os.getpid()) - own_cpu) / elapsed
            now = settled_rss_mb(server.pid)
            anonymous = rss_mb(server.pid, "RssAnon")
            ok = tally["answered"] - sum(n for k, n in tally["errors"].items() if k.isupper())
            errors = ", ".join(f"{k} {v}" for k, v in sorted(tally["errors"].items())) or "none"
            readings.append(now)
            versus = f"{100 * (now / readings[1] - 1):+.1f}%" if len(readings) > 2 else ""
            refused = tally["refused_s"]
            print(f"| {r} | {now:.0f} | {versus} | {anonymous:.0f} | {ok} | {ok / elapsed:.2f} | "
                  f"{len(refused)} | {ms(refused, 50)} | {ms(tally['served_s'], 99)} | {errors} | "
                  f"{tally['sent'] - tally['answered']} | {server_cores:.2f} | {client_cores:.2f} |",
                  flush=True)
            lost += tally["sent"] - tally["answered"]
        if len(readings) > 2:
            spread = max(abs(x / readings[1] - 1) for x in readings[2:])
            verdict = "settled" if spread <= 0.10 else "NOT SETTLED"
            print(f"\nresting RSS after round 2 within {100 * spread:.1f}% of round 2's ({verdict}, "
                  f"goal 10%); requests lost: {lost}")
    return 0


def ms(seconds: list[float], percentile: int) -> str:
    return f"{1e3 * np.percentile(seconds, percentile):.0f}" if seconds else "-"


if __name__ == "__main__":
    sys.exit(main())
