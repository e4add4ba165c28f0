"""Our own overload is not Redis being down: the two get different, honest answers."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from allocator.errors import Overloaded, Unavailable
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.looplag import LoopLag
from allocator.redistyping import awaited
from tests.helpers import FakeClock


async def test_loop_lag_notices_a_blocked_loop_and_forgets_it() -> None:
    """A loop that could not keep time for a while is saturated, for a while."""
    # LoopLag measures how late the real event loop runs its ticks: this test runs on the
    # loop's own clock by design, and each sleep lets the ticker run (or, blocking, not run).
    lag = LoopLag(tick=0.01, threshold=0.05, memory=0.3)
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.05)
    assert not lag.saturated()
    time.sleep(0.2)  # noqa: ASYNC251 - on purpose: the worker is busy, nothing else runs
    await asyncio.sleep(0.03)
    assert lag.saturated()
    await asyncio.sleep(0.4)  # past its 0.3 s memory
    assert not lag.saturated()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def slow() -> None:
    """A Redis call that does not answer within the allocator's timeout (it is cancelled)."""
    await asyncio.sleep(1)


async def test_a_timeout_while_saturated_is_overload_and_keeps_the_breaker_closed(
    redis: Redis, keys: Keys
) -> None:
    """A reply left unread by a saturated worker: 429 overloaded, and Redis stays usable."""
    allocator = Allocator(redis, None, keys, Hasher(b"p"), timeout=0.05)
    allocator.loop_lag._late_at = asyncio.get_running_loop().time()  # saturated just now
    with pytest.raises(Overloaded):
        await allocator.store.redis_call(slow())
    assert await allocator.store.redis_call(awaited(redis.ping()))  # no breaker opened


async def test_a_timeout_on_a_healthy_loop_is_unavailable_and_opens_the_breaker(
    redis: Redis, keys: Keys
) -> None:
    """Redis not answering: 503 at once for the next calls, then Redis is tried again."""
    clock = FakeClock()
    allocator = Allocator(
        redis, None, keys, Hasher(b"p"), timeout=0.05, breaker=0.2, monotonic=clock
    )
    with pytest.raises(Unavailable):
        await allocator.store.redis_call(slow())
    with pytest.raises(Unavailable):
        await allocator.store.redis_call(awaited(redis.ping()))  # breaker answers without trying
    clock.advance(0.15)
    with pytest.raises(Unavailable):
        await allocator.store.redis_call(awaited(redis.ping()))  # still open within its 0.2 s
    clock.advance(0.1)
    assert await allocator.store.redis_call(awaited(redis.ping()))
