"""Faults injected mid-flight on private servers: the service stays honest and loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator import db
from allocator.config import Settings
from loadtest.servers import PrivatePostgres, PrivateRedis
from service.app import create_app
from tests.helpers import ADMIN, reserve, seed
from tests.processes import Writer

pytestmark = pytest.mark.slow


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis", appendonly=True)
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


@pytest.fixture
async def private_pg(tmp_path: Path) -> AsyncIterator[PrivatePostgres]:
    server = PrivatePostgres(tmp_path / "pg")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


async def timed(coro: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - started


async def assert_unavailable(response: Any, elapsed: float) -> None:
    assert response.status == 503
    assert response.content_type == "application/problem+json"
    assert (await response.json())["code"] == "unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert elapsed < 1.0, f"answered after {elapsed:.2f}s; the contract says within 1 s"


@pytest.fixture
async def on_private_redis(
    aiohttp_client: Any, settings: Settings, private_redis: PrivateRedis
) -> TestClient[Any, Any]:
    """The app on the private Redis, with the default Redis timeout, and a round seeded."""
    settings = replace(
        settings,
        redis_url=private_redis.url,
        service=replace(settings.service, redis_timeout_ms=800),
    )
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    await seed(client, stock={"s1": 10})
    return client


async def test_redis_stopped_answers_503_at_once_and_recovers_without_restart(
    on_private_redis: TestClient[Any, Any], private_redis: PrivateRedis
) -> None:
    """Redis down: 503 unavailable within 1 s with Retry-After; back up: serving again."""
    client = on_private_redis
    assert (await reserve(client, 1)).status == 201

    await asyncio.to_thread(private_redis.stop)
    response, elapsed = await timed(reserve(client, 2))
    await assert_unavailable(response, elapsed)
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["code"] == "unavailable"

    await asyncio.to_thread(private_redis.start)  # same port, same AOF data, empty script cache
    async with asyncio.timeout(2):  # the breaker lets a call through 0.5 s after the last failure
        while (await client.get("/readyz")).status != 200:
            await asyncio.sleep(0.1)
    again = await reserve(client, 2)
    assert again.status == 201, await again.text()
    retry = await reserve(client, 1)  # the first reservation survived the restart
    assert retry.status == 200
    assert (await client.get("/readyz")).status == 200


async def test_redis_hung_answers_503_within_one_second(
    on_private_redis: TestClient[Any, Any], private_redis: PrivateRedis
) -> None:
    """A Redis that accepts but never answers (SIGSTOP) must not hang a request."""
    client = on_private_redis
    await asyncio.to_thread(private_redis.pause)
    try:
        answers = await asyncio.gather(*(timed(reserve(client, n)) for n in range(1, 6)))
        for response, elapsed in answers:
            await assert_unavailable(response, elapsed)
    finally:
        await asyncio.to_thread(private_redis.resume)
    async with asyncio.timeout(3):
        while (await client.get("/readyz")).status != 200:
            await asyncio.sleep(0.1)
    ok = await reserve(client, 7)
    assert ok.status == 201, await ok.text()


async def test_postgres_outage_mid_load_loses_nothing_and_the_ledger_catches_up(
    aiohttp_client: Any,
    settings: Settings,
    redis: Redis,
    private_pg: PrivatePostgres,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Reservations go on while PostgreSQL is down; within 30 s of its return all are recorded
    by the ledger writer's own process (`allot ledger`), which backs off meanwhile."""
    database_url = private_pg.url_for("allot")
    await db.migrate(database_url)
    settings = replace(settings, database_url=database_url)
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings, run_ledger=False))
    writer = Writer(settings, tmp_path / "ledger.log")
    writer.start()
    request.addfinalizer(writer.stop)
    await writer.wait_started()
    await seed(client, stock={"s1": 200})
    created: set[str] = set()

    async def load(numbers: range) -> None:
        answers = await asyncio.gather(*(reserve(client, n) for n in numbers))
        for a in answers:
            assert a.status == 201, await a.text()
            created.add((await a.json())["reservation_id"])

    await load(range(0, 20))
    outage = asyncio.create_task(asyncio.to_thread(private_pg.stop))
    await load(range(20, 60))  # during the shutdown
    await outage
    await load(range(60, 100))  # while it is down
    stats = await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()
    assert stats["reserved"] == 100
    assert stats["ledger"]["recorded"] is None  # the ledger cannot be read
    assert stats["ledger"]["lag"] > 0  # and the backlog shows
    assert (await client.get("/readyz")).status == 503

    await asyncio.to_thread(private_pg.start)
    back = time.perf_counter()
    con = await asyncpg.connect(database_url)
    try:
        async with asyncio.timeout(30):
            while True:
                found = {
                    r["reservation_id"]
                    for r in await con.fetch("SELECT reservation_id FROM reservations")
                }
                if found >= created:
                    break
                await asyncio.sleep(0.1)
        catch_up = time.perf_counter() - back
        assert found == created
    finally:
        await con.close()
    print(f"ledger caught up {catch_up:.2f}s after PostgreSQL came back")
    stats = await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()
    assert stats["ledger"] == {"recorded": 100, "lag": 0}
