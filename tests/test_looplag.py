"""Our own overload is not Redis being down: the two get different, honest answers."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from allocator.core import Allocator
from allocator.errors import Overloaded, Unavailable
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.looplag import LoopLag


async def test_loop_lag_notices_a_blocked_loop_and_forgets_it() -> None:
    """A loop that could not keep time for a while is saturated, for a while."""
    lag = LoopLag(tick=0.01, threshold=0.05, memory=0.3)
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.05)
    assert not lag.saturated()
    time.sleep(0.2)  # noqa: ASYNC251 - on purpose: the worker is busy, nothing else runs
    await asyncio.sleep(0.03)
    assert lag.saturated()
    await asyncio.sleep(0.4)
    assert not lag.saturated()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def slow() -> None:
    await asyncio.sleep(1)


async def test_a_timeout_while_saturated_is_overload_and_keeps_the_breaker_closed(
    redis: Redis, keys: Keys
) -> None:
    """A reply left unread by a saturated worker: 429 overloaded, and Redis stays usable."""
    allocator = Allocator(redis, None, keys, Hasher(b"p"), timeout=0.05)
    allocator.loop_lag._late_at = asyncio.get_running_loop().time()  # saturated just now
    with pytest.raises(Overloaded):
        await allocator._redis(slow())
    assert await allocator._redis(redis.ping())  # no breaker opened


async def test_a_timeout_on_a_healthy_loop_is_unavailable_and_opens_the_breaker(
    redis: Redis, keys: Keys
) -> None:
    """Redis not answering: 503 at once for the next calls, then Redis is tried again."""
    allocator = Allocator(redis, None, keys, Hasher(b"p"), timeout=0.05, breaker=0.2)
    with pytest.raises(Unavailable):
        await allocator._redis(slow())
    with pytest.raises(Unavailable):
        await allocator._redis(redis.ping())  # the breaker answers without trying
    await asyncio.sleep(0.25)
    assert await allocator._redis(redis.ping())
