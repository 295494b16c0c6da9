"""Start-up benchmark: the batch size a replica chooses at load, alone and when several
replicas start together on one machine (each measuring while the others load and measure),
and how long each took from its start to readiness.

Each replica is a real ``python -m pipeline serve`` process on loopback; its choice is read
from its log ("-> batches of up to N"). The choice should not depend on the neighbours.
Run: ``python -m benchmarks.startup_bench [--together 3] [--model instance_segmentation]``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline.tools.launch import free_port, wait_until_serving

from .common import ROOT

CHOICE = re.compile(r"per-frame network time by batch size[^:]*: (.*) -> batches of up to (\d+)"
                    r"(?: \(measured in ([\d.]+) s\))?")


def start_together(count: int, repository: Path, model: str, logs: Path) -> list[dict]:
    """``count`` servers started at once; per replica: its choice, what it measured, the
    seconds its measuring took and the seconds from its start to SERVING."""
    results: list[dict] = [{} for _ in range(count)]

    def one(i: int) -> None:
        port, log = free_port(), logs / f"replica-{count}-{i}.log"
        started = time.monotonic()
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "serve", "--model-repository", str(repository),
                 "--model-control-mode", "explicit", "--load-model", model, "--device", "cpu",
                 "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", "-1",
                 "--metrics-port", "0"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                wait_until_serving(f"127.0.0.1:{port}", process, timeout_s=600)
                ready_s = time.monotonic() - started
            finally:
                process.terminate()
                process.wait(120)
        found = CHOICE.search(log.read_text())
        if found is None:
            raise RuntimeError(f"no batch size choice in {log}")
        results[i] = {"limit": int(found[2]), "measured": found[1],
                      "calibration_s": float(found[3]) if found[3] else None, "ready_s": ready_s}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--together", type=int, default=3, help="replicas started at once")
    parser.add_argument("--model", default="instance_segmentation")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as logs:
        runs = {1: start_together(1, args.model_repository.resolve(), args.model, Path(logs)),
                args.together: start_together(args.together, args.model_repository.resolve(),
                                              args.model, Path(logs))}
    for count, replicas in runs.items():
        for i, r in enumerate(replicas):
            calibration = f"{r['calibration_s']:.1f} s" if r["calibration_s"] is not None else "-"
            print(f"{count} started together, replica {i}: batches of up to {r['limit']} "
                  f"({r['measured']}; measuring {calibration}; ready {r['ready_s']:.1f} s after start)")
    alone = runs[1][0]["limit"]
    together = [r["limit"] for r in runs[args.together]]
    print(f"chosen alone: {alone}; {args.together} together: {together} -> "
          f"{'the same' if set(together) == {alone} else 'DIFFERENT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
