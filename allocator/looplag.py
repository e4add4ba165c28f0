"""Is this worker's event loop keeping time? Tells our own overload from a slow Redis.

A Redis call that times out while the loop itself was too busy to run callbacks on time most
likely did not wait on Redis at all: its reply sat unread while the worker was saturated. That
is overload (answer overloaded and shed load), not Redis being unreachable (unavailable, open the
breaker).
"""

from __future__ import annotations

import asyncio


class LoopLag:
    def __init__(self, tick: float = 0.05, threshold: float = 0.2, memory: float = 1.0) -> None:
        self._tick = tick
        self._threshold = threshold  # a tick this late means the loop was saturated
        self._memory = memory  # and we remember that for this long
        self._late_at = float("-inf")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self._tick
            await asyncio.sleep(self._tick)
            if loop.time() - due > self._threshold:
                self._late_at = loop.time()

    def saturated(self) -> bool:
        return asyncio.get_running_loop().time() - self._late_at < self._memory
