"""A small time-bounded cache with single-flight loading.

Under a flash crowd thousands of requests ask for the same round or the same stock snapshot in
the same millisecond; only one of them goes to Redis, the others wait for its answer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._values: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}
        self._failed: dict[K, float] = {}  # get_or_last: when a load last failed

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        hit = self._values.get(key)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key, load))
            # The caller that started the load may be cancelled (its client went away); the
            # others still get the result, and a failure is never left unretrieved.
            pending.add_done_callback(_retrieve)
            self._loading[key] = pending
        return await asyncio.shield(pending)

    async def _load(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        try:
            value = await load()
            self._values[key] = (self._clock() + self._ttl, value)
            return value
        finally:
            del self._loading[key]

    async def get_or_last(
        self,
        key: K,
        load: Callable[[], Awaitable[V]],
        failure: type[BaseException],
        *,
        grace: float = 0.0,
    ) -> V:
        """As ``get``; when the load fails with ``failure``, the last value loaded (however
        old), if there is one. For snapshots of things that change rarely and are kept on one
        Redis Cluster node (the sites, the round-tags map, the round list): that node's
        failover, or its hanging, must not stop or slow the rounds on every other node.

        So after a load failed, for ``ttl`` the last value is served at once, while a fresh
        one is tried in the background (whose failure starts another ``ttl``): awaiting the
        load after each expiry, every request of every shard waited out the Redis timeout
        once a second while the node was hung (tests/test_cluster.py, the hung shard). With
        no failure, an expired value is loaded afresh before it is served, as by ``get``;
        within ``grace`` of its expiry it is served at once while a fresh one loads in the
        background (a claim batch: no snapshot's timeout in front of the claim's own)."""
        noted = self._noting_failure(key, load, failure)
        hit = self._values.get(key)
        now = self._clock()
        if (
            hit is not None
            and hit[0] <= now
            and (now - hit[0] < grace or now - self._failed.get(key, -math.inf) < self._ttl)
        ):
            self.refresh(key, noted)
            return hit[1]
        try:
            return await self.get(key, noted)
        except failure:
            last = self.last(key)
            if last is None:
                raise
            return last

    def _noting_failure(
        self, key: K, load: Callable[[], Awaitable[V]], failure: type[BaseException]
    ) -> Callable[[], Awaitable[V]]:
        async def noted() -> V:
            try:
                value = await load()
            except failure:
                self._failed[key] = self._clock()
                raise
            self._failed.pop(key, None)
            return value

        return noted

    def last(self, key: K) -> V | None:
        """The last value loaded for ``key``, however old; None if there is none."""
        hit = self._values.get(key)
        return hit[1] if hit is not None else None

    def refresh(self, key: K, load: Callable[[], Awaitable[V]]) -> None:
        """Start loading ``key`` in the background if its value has expired and no load is
        under way (the next ``get`` or ``last`` sees the result); never waits."""
        hit = self._values.get(key)
        if (hit is not None and hit[0] > self._clock()) or key in self._loading:
            return
        pending = asyncio.ensure_future(self._load(key, load))
        pending.add_done_callback(_retrieve)
        self._loading[key] = pending

    def invalidate(self, key: K | None = None) -> None:
        if key is None:
            self._values.clear()
        else:
            self._values.pop(key, None)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
