"""Rate-limited warnings and errors: a flood of one failure is logged a few times, then summed.

At the open-file limit the server's accept loop fails on every connection attempt, and each
failure logged with its traceback wrote 46,000 lines (19 MB) in 6 s. `RateLimit` lets at
most `burst` records of the same kind (logger, level, message template, exception type)
through per `interval_s`; the first one let through after a quiet spell says how many were
dropped. Records below WARNING (the access log) pass untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Loggers a flood comes through: uvicorn's server and protocol errors, asyncio's accept
# loop and unretrieved exceptions, and the app's own.
FLOOD_LOGGERS = ("uvicorn.error", "asyncio", "matching")


class RateLimit(logging.Filter):
    def __init__(
        self,
        burst: int = 5,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst, self.interval_s, self.clock = int(burst), float(interval_s), clock
        self._kinds: dict[tuple, list] = {}  # kind -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        kind = (record.name, record.levelno, str(record.msg), exc)
        now = self.clock()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.interval_s:
            dropped = state[2] if state else 0
            self._kinds[kind] = [now, 1, 0]
            if len(self._kinds) > 1000:  # many distinct messages: forget the oldest windows
                for old in sorted(self._kinds, key=lambda k: self._kinds[k][0])[:500]:
                    del self._kinds[old]
            if dropped:
                record.msg = f"{record.msg} [{dropped} more like this were not logged]"
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


def limit_log_floods(burst: int = 5, interval_s: float = 60.0) -> RateLimit:
    """Attach one shared `RateLimit` to the flood-prone loggers (after uvicorn configured
    logging); returns it."""
    rate_limit = RateLimit(burst, interval_s)
    for name in FLOOD_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RateLimit)]:
            logger.removeFilter(old)
        logger.addFilter(rate_limit)
    return rate_limit
