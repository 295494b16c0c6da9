"""``Throttled``: the one way to log a kind of event that can come in floods (a client's
garbage, a full file table, a target refusing every message): a line per interval, with a
count of those held back, not a line per event."""

from __future__ import annotations

import logging
import time
from typing import Any

LOG_INTERVAL_S = 10.0


class Throttled:
    """One kind of log line at most once per ``interval_s``, with a count of those held back:
    a flood (a client's garbage, a full file table) costs a line per interval, not per event."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S):
        self.logger, self.interval_s = logger, interval_s
        self._next, self._held = 0.0, 0

    def log(self, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message, args = message + " (and %d more in the last %.0f s)", (*args, self._held, self.interval_s)
        self._next, self._held = now + self.interval_s, 0
        self.logger.log(level, message, *args)
