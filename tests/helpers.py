"""Helpers for tests that are neither fixtures nor scenario steps."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock that moves only when the test says so.

    Pass it as ``monotonic=`` to ``create_app`` or ``Allocator`` (or as ``clock=`` to a TtlCache
    or the SoldOutBoard): caches, sold-out marks and the Redis breaker then expire on
    ``advance()``, at once, instead of after a real sleep.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.now += seconds
