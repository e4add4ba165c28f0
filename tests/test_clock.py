"""Time is injected: caches, the sold-out board, the breaker and the feeds run on a clock the
tests can move, so no test sleeps to wait one out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from allocator.cache import TtlCache
from allocator.errors import SoldOut
from allocator.soldout import TTL, SoldOutBoard
from service.appkeys import ALLOCATOR, SITE_FEEDS
from tests.helpers import FakeClock


async def test_a_cached_value_lives_its_ttl_by_the_clock_and_no_longer() -> None:
    """A snapshot may be up to ttl old, never older: the crowd sees stock that lags by 1 s."""
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(1.0, clock)
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        return loads

    assert await cache.get("k", load) == 1
    clock.advance(0.99)
    assert await cache.get("k", load) == 1  # still fresh: Redis is not asked again
    clock.advance(0.02)
    assert await cache.get("k", load) == 2  # expired: loaded again


class SlowLoads:
    """A snapshot's load: counts its calls and answers the count; every call after the first
    waits for ``release`` (Redis slow, or hung)."""

    def __init__(self) -> None:
        self.count = 0
        self.release = asyncio.Event()

    async def __call__(self) -> int:
        self.count += 1
        if self.count > 1:
            await self.release.wait()
        return self.count


async def test_last_serves_an_expired_value_at_once_while_refresh_loads_it_anew() -> None:
    """Checks made before a claim is queued read the last snapshot and never wait for Redis:
    one background load per expiry, whatever the number of callers."""
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(1.0, clock)
    load = SlowLoads()
    release = load.release

    assert cache.last("k") is None
    assert await cache.get("k", load) == 1
    cache.refresh("k", load)  # fresh: nothing to do
    assert load.count == 1
    clock.advance(1.5)
    for _ in range(3):
        cache.refresh("k", load)
        assert cache.last("k") == 1  # the old value, at once
    await asyncio.sleep(0)
    assert load.count == 2  # one load under way, not three
    release.set()
    assert await cache.get("k", load) == 2  # joins the load under way
    assert cache.last("k") == 2
    assert load.count == 2


async def test_get_or_last_waits_for_a_fresh_value_but_not_on_a_node_that_just_failed() -> None:
    """The sites, round tags and round list live on one cluster node. Healthy, an expired
    snapshot is loaded afresh before it is served (a new round is listed within ttl); once a
    load failed, for ttl the last value is served at once and a fresh one is tried in the
    background (a hung node's timeout is never waited out by every request); back to
    awaiting once a load succeeds."""
    from allocator.errors import Unavailable

    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(1.0, clock)
    failing = False
    hang = asyncio.Event()
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        if failing:
            await hang.wait()  # a hung node: its timeout fires when the test says so
            raise Unavailable("timed out")
        return loads

    assert await cache.get_or_last("k", load, Unavailable) == 1
    clock.advance(1.5)
    assert await cache.get_or_last("k", load, Unavailable) == 2  # awaited: fresh
    clock.advance(1.5)
    failing = True
    waited = asyncio.ensure_future(cache.get_or_last("k", load, Unavailable))
    await asyncio.sleep(0)
    assert not waited.done()  # no failure seen yet: this one waits for the load
    hang.set()
    assert await waited == 2  # the load failed: the last value
    hang.clear()
    for _ in range(3):  # within ttl of the failure: at once, one background try
        assert await asyncio.wait_for(cache.get_or_last("k", load, Unavailable), 0.1) == 2
    assert loads == 4
    hang.set()
    await asyncio.sleep(0)
    failing = False
    clock.advance(0.5)  # the background try failed a moment ago: still served at once
    assert await asyncio.wait_for(cache.get_or_last("k", load, Unavailable), 0.1) == 2
    await asyncio.sleep(0)
    assert cache.last("k") == 5  # that background try succeeded
    clock.advance(1.5)
    assert await cache.get_or_last("k", load, Unavailable) == 6  # healthy: awaited again


async def test_get_or_last_with_grace_serves_a_just_expired_value_while_it_reloads() -> None:
    """A claim batch's snapshots (round tags, sites): within ``grace`` of expiry the last value
    is served at once while a fresh one loads in the background (one load, however many ask),
    so a hung node's timeout is never in front of the claim's own; past that, awaited."""
    from allocator.errors import Unavailable

    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(1.0, clock)
    load = SlowLoads()
    release = load.release

    assert await cache.get_or_last("k", load, Unavailable, grace=1.0) == 1
    clock.advance(1.5)  # expired half a second ago
    for _ in range(3):
        assert (
            await asyncio.wait_for(cache.get_or_last("k", load, Unavailable, grace=1.0), 0.1) == 1
        )
    await asyncio.sleep(0)
    assert load.count == 2  # one load under way
    waited = asyncio.ensure_future(cache.get_or_last("k", load, Unavailable))
    await asyncio.sleep(0)
    assert not waited.done()  # without grace: waits for that load
    release.set()
    assert await waited == 2
    clock.advance(2.5)  # expired 1.5 s ago: past the grace, awaited
    release.clear()
    waited = asyncio.ensure_future(cache.get_or_last("k", load, Unavailable, grace=1.0))
    await asyncio.sleep(0)
    assert not waited.done()
    release.set()
    assert await waited == 3


def test_a_sold_out_mark_answers_from_memory_for_its_ttl_by_the_clock() -> None:
    """The herd on an empty site is answered from memory for at most TTL, then Redis decides."""
    clock = FakeClock()
    board = SoldOutBoard(clock=clock)
    board.mark("r1", "s1", frozenset({"holder"}), SoldOut("Gone.", alternatives=[]))
    assert isinstance(board.check("r1", "s1", "someone"), SoldOut)
    assert board.check("r1", "s1", "holder") is None  # a holder always reaches Redis
    clock.advance(TTL - 0.01)
    assert board.marked("r1", "s1")
    clock.advance(0.02)
    assert not board.marked("r1", "s1")
    assert board.check("r1", "s1", "someone") is None


def test_fake_clock_never_goes_back() -> None:
    """A monotonic clock that went back would make every cache entry live forever."""
    clock = FakeClock(5.0)
    clock.advance(0)
    with pytest.raises(ValueError, match="never goes back"):
        clock.advance(-1)
    assert clock() == 5.0


async def test_the_app_gives_its_clock_to_every_cache_the_board_and_the_breaker(
    clocked_client: TestClient[Any, Any], clock: FakeClock
) -> None:
    """One clock for the whole worker: a cache left on the real one would need a real sleep."""
    app = clocked_client.app
    allocator = app[ALLOCATOR]
    catalogue = allocator.catalogue
    caches = [
        catalogue.rounds_cache,
        catalogue.round_ids_cache,
        catalogue.sites_cache,
        catalogue.stock_cache,
    ]
    assert [c._clock for c in caches] == [clock] * 4
    assert allocator.sold_out._clock is clock
    assert allocator.store.monotonic is clock  # the breaker
    assert app[SITE_FEEDS]._clock is clock
