"""``Backoff``: the one exponential back-off of the house, for whatever retries after a failure
(a camera reconnecting, a sink's delivery, the client's calls): pauses of ``first_s``,
doubling, never above ``max_s``; ``attempts`` tries in all, or without end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """first_s: the first pause; max_s: the longest; attempts: tries in all (so ``attempts``
    - 1 pauses), None for a retry without end."""

    first_s: float = 0.2
    max_s: float = 5.0
    attempts: int | None = 8

    def __post_init__(self):
        if not 0 < self.first_s <= self.max_s:  # NaN fails too
            raise ValueError(f"a back-off needs 0 < first_s <= max_s, not {self.first_s}, {self.max_s}")
        if self.attempts is not None and self.attempts < 0:
            raise ValueError(f"attempts must be >= 0 or None, not {self.attempts}")

    def delays(self) -> Iterator[float]:
        """The pauses after consecutive failures (a fresh iterator starts again from first_s)."""
        delay, left = self.first_s, None if self.attempts is None else self.attempts - 1
        while left is None or left > 0:
            yield delay
            delay = min(delay * 2, self.max_s)
            if left is not None:
                left -= 1
