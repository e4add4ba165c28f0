"""The admission queue and the sold-out fast path, against real Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.admission import AdmissionQueue
from allocator.config import QueueSettings, Settings
from allocator.facade import Allocator
from service.app import create_app
from service.appkeys import ADMISSION, ALLOCATOR, METRICS
from service.ops import create_ops_app
from tests.helpers import ADMIN, FakeClock, reserve, seed


def count_claim_calls(allocator: Allocator) -> list[int]:
    """Wraps claim_many to record the size of every batch that reached Redis."""
    sizes: list[int] = []
    original = allocator.claim_many

    async def claim_many(round_id: str, items: Any) -> Any:
        sizes.append(len(items))
        return await original(round_id, items)

    allocator.claim_many = claim_many
    return sizes


async def test_concurrent_claims_are_decided_in_batches_keeping_every_invariant(
    client: TestClient[Any, Any],
) -> None:
    """Under a crowd one script call carries many claims, and exactly the stock is granted."""
    sizes = count_claim_calls(client.app[ALLOCATOR])
    await seed(client, stock={"s1": 30})
    answers = await asyncio.gather(*(reserve(client, n) for n in range(400)))
    assert Counter(a.status for a in answers) == {201: 30, 409: 370}
    assert sum(sizes) < 400  # the sold-out herd was answered from memory, not from Redis
    assert max(sizes) > 1  # and claims shared script calls
    stats = await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()
    assert (stats["remaining"], stats["reserved"], stats["reservations"]) == (0, 30, 30)


async def test_a_full_queue_answers_429_overloaded_with_retry_after(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """A burst into a small queue gets only honest answers, each within max_wait plus a margin."""
    small = replace(settings, queue=QueueSettings(max_depth=20, max_wait_ms=300))
    app = create_app(small)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    await seed(client, stock={"s1": 10_000})
    allocator = app[ALLOCATOR]
    original = allocator.claim_many

    async def slow_claim_many(round_id: str, items: Any) -> Any:
        await asyncio.sleep(0.05)  # Redis made slow on purpose, so the line builds up
        return await original(round_id, items)

    allocator.claim_many = slow_claim_many

    async def timed(n: int) -> tuple[Any, float]:
        started = time.perf_counter()
        response = await reserve(client, n)
        return response, time.perf_counter() - started

    answers = await asyncio.gather(*(timed(n) for n in range(2000)))
    statuses = Counter(a.status for a, _ in answers)
    odd = [await a.text() for a, _ in answers if a.status not in (201, 429)][:2]
    assert set(statuses) <= {201, 429}, (statuses, odd)
    assert statuses[201] > 0
    assert statuses[429] > 0
    for response, _ in answers:
        if response.status == 429:
            assert (await response.json())["code"] == "overloaded"
            assert int(response.headers["Retry-After"]) >= 1
    slowest = max(elapsed for _, elapsed in answers)
    # max_wait 0.3 s, plus one slow batch in flight, plus the test client's own queueing
    assert slowest < 5.0, slowest
    stats = await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()
    assert stats["reservations"] == statuses[201]  # no claim ran without its 201


async def test_a_claim_already_in_redis_when_its_wait_ends_gets_its_true_answer(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """A claim that ran must never be reported as refused: that would strand its units."""
    short = replace(settings, queue=QueueSettings(max_depth=100, max_wait_ms=50))
    app = create_app(short)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    await seed(client, stock={"s1": 10})
    allocator = app[ALLOCATOR]
    original = allocator.claim_many

    async def slower_than_the_wait(round_id: str, items: Any) -> Any:
        result = await original(round_id, items)  # decided in Redis...
        await asyncio.sleep(0.2)  # ...but the answer comes back after max_wait
        return result

    allocator.claim_many = slower_than_the_wait
    response = await reserve(client, 1)
    assert response.status == 201


async def test_queue_depth_is_reported_and_returns_to_zero(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """allot_queue_depth lets an operator see the line; it must not drift."""
    app = create_app(settings)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    await seed(client, stock={"s1": 50})
    await asyncio.gather(*(reserve(client, n) for n in range(200)))
    queue: AdmissionQueue = app[ADMISSION]
    assert queue.depth == 0
    ops: TestClient[Any, Any] = await aiohttp_client(create_ops_app(settings, app[METRICS].render))
    metrics = await (await ops.get("/metrics")).text()
    assert "allot_queue_depth 0.0" in metrics


async def test_sold_out_site_is_answered_from_memory_with_alternatives(
    client: TestClient[Any, Any],
) -> None:
    """Once empty, a site's herd costs Redis nothing, and still hears where stock is left."""
    await seed(client, stock={"s1": 1, "s2": 5}, districts={"s1": "d1", "s2": "d1"})
    assert (await reserve(client, 1)).status == 201
    first = await reserve(client, 2)  # decided in Redis: marks s1 sold out in this worker
    assert (await first.json())["code"] == "sold-out"
    sizes = count_claim_calls(client.app[ALLOCATOR])
    herd = await asyncio.gather(*(reserve(client, n) for n in range(10, 60)))
    assert sizes == []  # not one of them reached Redis
    for r in herd:
        body = await r.json()
        assert r.status == 409
        assert body["code"] == "sold-out"
        assert body["alternatives"] == [
            {"site_id": "s2", "name": "Site s2", "district": "d1", "remaining": 5}
        ]


async def test_a_holder_retrying_at_a_sold_out_site_still_gets_their_reservation(
    client: TestClient[Any, Any],
) -> None:
    """A retry after a timeout is safe even when the site has since sold out."""
    await seed(client, stock={"s1": 1})
    mine = await reserve(client, 1)
    assert mine.status == 201
    assert (await (await reserve(client, 2)).json())["code"] == "sold-out"  # site marked
    retry = await reserve(client, 1)
    assert retry.status == 200
    assert (await retry.json())["reservation_id"] == (await mine.json())["reservation_id"]


async def test_a_cancel_in_another_worker_reopens_a_sold_out_site_at_once(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """Workers share no memory; the stock event tells this one the units are back."""
    # `one`'s clock stands still, so its sold-out mark cannot simply expire: only the event
    # from `other` can clear it.
    one: TestClient[Any, Any] = await aiohttp_client(create_app(settings, monotonic=FakeClock()))
    other: TestClient[Any, Any] = await aiohttp_client(create_app(settings, run_ledger=False))
    await seed(one, stock={"s1": 1})
    held = await reserve(one, 1)
    assert held.status == 201
    assert (await (await reserve(one, 2)).json())["code"] == "sold-out"  # marked in `one`
    cancelled = await other.delete(held.headers["Location"])  # cancelled through `other`
    assert cancelled.status == 200
    async with asyncio.timeout(1):
        while one.app[ALLOCATOR].sold_out.check("r1", "s1", "nobody") is not None:
            await asyncio.sleep(0.01)
    assert (await reserve(one, 2)).status == 201


async def test_lone_request_is_dispatched_without_waiting_for_a_batch(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """No timer gathers batches: a single claim goes to Redis as soon as it is queued."""
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    await seed(client, stock={"s1": 5})
    sizes = count_claim_calls(client.app[ALLOCATOR])
    assert (await reserve(client, 1)).status == 201
    assert sizes == [1]


async def test_a_batch_out_on_one_round_does_not_hold_back_the_claims_on_another(
    client: TestClient[Any, Any],
) -> None:
    """One lane per round: while a batch of r1 is out (its Redis node hung, say), a claim on
    r2 goes to Redis and is answered; r1's own next claim waits for r1's batch only."""
    await seed(client, stock={"s1": 10})
    await seed(client, round_id="r2", stock={"s1": 10})
    allocator = client.app[ALLOCATOR]
    original = allocator.claim_many
    entered, release = asyncio.Event(), asyncio.Event()
    calls: list[tuple[str, int]] = []

    async def claim_many(round_id: str, items: Any) -> Any:
        calls.append((round_id, len(items)))
        if round_id == "r1" and len(calls) == 1:
            entered.set()
            await release.wait()  # the first batch of r1 stays out until the test says so
        return await original(round_id, items)

    allocator.claim_many = claim_many
    held = asyncio.ensure_future(reserve(client, 1, round_id="r1"))
    await entered.wait()
    behind = asyncio.ensure_future(reserve(client, 2, round_id="r1"))
    async with asyncio.timeout(5):  # with one batch at a time per worker: held until release
        other = await reserve(client, 3, round_id="r2")
    assert other.status == 201
    assert not held.done()
    assert not behind.done()  # r1's next batch waits for r1's batch out
    assert calls == [("r1", 1), ("r2", 1)]
    release.set()
    assert (await held).status == 201
    assert (await behind).status == 201
    assert calls == [("r1", 1), ("r2", 1), ("r1", 1)]


async def test_claims_queued_behind_a_batch_that_failed_are_answered_from_the_breaker(
    client: TestClient[Any, Any],
) -> None:
    """A batch whose Redis call failed opened the breaker: the claims that waited behind it
    go out as one batch, answered 503 at once from the breaker, without first reloading the
    ledger's floors (which a Redis failure makes suspect)."""
    await seed(client, stock={"s1": 10})
    allocator = client.app[ALLOCATOR]
    original = allocator.claim_many
    entered, release = asyncio.Event(), asyncio.Event()
    calls: list[int] = []
    floors: list[str] = []
    floor = allocator.watch.floor

    async def claim_many(round_id: str, items: Any) -> Any:
        calls.append(len(items))
        if len(calls) == 1:
            entered.set()
            await release.wait()

            async def fails() -> None:
                raise ConnectionError("the node went away")

            await allocator.store.redis_call(fails())  # raises Unavailable, opens the breaker
        return await original(round_id, items)

    async def counted_floor(round_id: str) -> int:
        floors.append(round_id)
        return int(await floor(round_id))

    allocator.claim_many = claim_many
    allocator.watch.floor = counted_floor  # the claims' watch is this one
    first = asyncio.ensure_future(reserve(client, 1))
    await entered.wait()
    behind = [asyncio.ensure_future(reserve(client, n)) for n in range(2, 7)]
    await asyncio.sleep(0.05)  # all five in line behind the batch out
    release.set()
    answers = [await first, *[await b for b in behind]]
    assert [a.status for a in answers] == [503] * 6
    for a in answers:
        assert (await a.json())["code"] == "unavailable"
        assert int(a.headers["Retry-After"]) >= 1
    assert calls == [1, 5]  # the five as one batch, not sent again one by one
    assert floors == []  # nor did that batch wait for the ledger's floors
