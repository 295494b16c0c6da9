"""Keeping the server's resident memory flat: glibc's allocator, tuned once, trimmed when idle.

Measured under 32 streams of overload (benchmarks/soak_bench.py): glibc gives each busy
thread its own arena and keeps freed blocks of every arena mapped, so the resident set grew
by hundreds of MB and swung by 20% between rounds with nothing leaking. Two settings, applied
by the server process itself so they reach every way it is started (``python -m pipeline
serve``, the Docker images, the Kubernetes pods), unlike environment variables:

- at most ``ARENAS`` arenas (``M_ARENA_MAX``);
- once a model's queue has stayed empty for a second, freed memory goes back to the OS
  (``malloc_trim``: ~25 ms when there is much to give back, under 1 ms else), never under
  load, where it would only cost page faults on the next batch.

Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

LOG = logging.getLogger(__name__)
ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number
_lock = threading.Lock()


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _glibc()


def tune() -> bool:
    """Cap the allocator's arenas (call before starting threads); True where it applied."""
    if _LIBC is None:
        return False
    applied = bool(_LIBC.mallopt(_M_ARENA_MAX, ARENAS))
    LOG.info("allocator: glibc, at most %d arenas%s", ARENAS, "" if applied else " (refused)")
    return applied


def trim() -> bool:
    """Give freed memory back to the OS (for idle moments); True where it applied."""
    if _LIBC is None:
        return False
    with _lock:
        _LIBC.malloc_trim(0)
    return True
