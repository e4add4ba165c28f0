"""Log lines a client can trigger at will, at most one per kind and interval, with a count."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

INTERVAL = 10.0  # seconds between two lines of one kind


class RateLimitedLog:
    """``log(key, level, msg, *args)`` emits at most once per ``interval`` per key.

    The first line of a kind goes out at once; later ones within the interval are only
    counted, and the next line that goes out says how many were suppressed. Thread-safe: the
    operations listener logs from its own thread.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}  # key -> (next line allowed at, held)

    def admit(self, key: str) -> int | None:
        """None: stay quiet; else a line may go out, and this many were suppressed before it."""
        now = self._clock()
        with self._lock:
            due, held = self._state.get(key, (float("-inf"), 0))
            if now < due:
                self._state[key] = (due, held + 1)
                return None
            self._state[key] = (now + self.interval, 0)
            if len(self._state) > 1024:  # keys are a closed set in practice; never grow unbounded
                self._state = {k: v for k, v in self._state.items() if v[0] > now}
            return held

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        held = self.admit(key)
        if held is None:
            return
        if held:
            msg += f" ({held} more like it suppressed since the last one)"
        self.logger.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(key, logging.WARNING, msg, *args)
