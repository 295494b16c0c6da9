"""Choosing a network's batch size at load, on this machine (``choose_batch_size``): the
size with the least time per frame, measured on runs that had our cores to themselves
(``busy_s`` reads /proc/stat), so replicas started together do not mistake each other's load
for the cost of small batches. Pure but for the clock and /proc/stat; tested with fakes."""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

LOG = logging.getLogger(__name__)

# A CPU run counts when other processes used at most this share of our cores meanwhile.
NEIGHBOURS_SHARE = 0.10
# How long calibration waits for runs without neighbours before it takes runs as they come.
PATIENCE_S = 20.0


@dataclass(frozen=True)
class Run:
    """One timed batch: wall seconds, and whether it ran without neighbours busy on our cores
    (always True where that cannot be told: on a GPU, off Linux)."""

    seconds: float
    alone: bool = True


def busy_s() -> float | None:
    """CPU seconds every process has spent on this process's cores since boot (/proc/stat);
    None where there is no /proc/stat."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    mine = {f"cpu{c}" for c in (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ())}
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name in mine:  # user nice system idle iowait irq softirq steal ...: all but idle, iowait
            ticks += sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))
    return ticks / os.sysconf("SC_CLK_TCK")


def choose_batch_size(run: Callable[[int], Run], max_batch_size: int, *, patience_s: float = PATIENCE_S,
                      clock: Callable[[], float] = time.monotonic,
                      pause: Callable[[float], None] = time.sleep) -> tuple[int, dict[int, float]]:
    """The batch size (a power of two up to ``max_batch_size``) with the least time per frame,
    and the best seconds per frame seen at each size tried. ``run(b)``: one timed batch of b
    frames (batch 1 already warm: the load check ran it).

    Doubling stops once it no longer saves 5% per frame: on a small CPU, batching makes every
    frame slower; on a GPU it keeps paying up to large batches. Each step compares the size
    so far (A) with its double (B) side by side: one untimed run of B (a size's first run pays
    for allocation and kernel choice), then A B B A A B B A, each size keeping its fastest
    run per frame, so a load that rises, fades or comes in bursts through the step does not
    favour one size.

    Replicas started together on one machine measure while the others load and measure, and
    sharing cores does not only slow every run: it slows small batches most (each batch's
    threads wait on one another, and on the others' threads), so fastest-of-runs alone still
    chose batches of 4 where a replica alone chose 1. So sizes are compared on runs that had
    our cores to themselves (``Run.alone``) only, two of each at least (one slow sample
    would make the other size look good): a run that had neighbours is run again
    after a random pause that grows, so replicas measuring at once fall into turns. A step
    that has not had such a run of both sizes within ``patience_s`` ends the doubling: the
    smaller size is kept (no batching chosen on evidence it could not trust; pin
    ``batch_limit`` in config.pbtxt to choose instead).
    """
    give_up, wait = clock() + patience_s, 0.5
    best, seen = 1, {}
    while best * 2 <= max_batch_size:
        pair = (best, best * 2)
        run(pair[1])
        alone: dict[int, list[float]] = {b: [] for b in pair}  # seconds per frame
        for tried, batch in enumerate(itertools.cycle((*pair, *pair[::-1])), 1):
            result = run(batch)
            if result.alone:
                alone[batch].append(result.seconds / batch)
                wait = 0.5
            if tried >= 8 and min(map(len, alone.values())) >= 2 or clock() >= give_up:
                break
            if not result.alone:
                pause(wait * (0.5 + random.random()))  # spread wider than a run: turns form
                wait = min(2 * wait, 2.0)
        if not all(alone.values()):
            LOG.warning("neighbours kept every core busy for %.0f s: batch %d not measured against %d "
                        "on its own, so batches stay at %d (pin batch_limit in config.pbtxt to choose)",
                        patience_s, pair[1], pair[0], best)
            break
        fastest = {b: min(times) for b, times in alone.items()}
        for batch, seconds in fastest.items():
            seen[batch] = min(seen.get(batch, seconds), seconds)
        if fastest[pair[1]] > 0.95 * fastest[pair[0]]:
            break
        best = pair[1]
    return best, seen
