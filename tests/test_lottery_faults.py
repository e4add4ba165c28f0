"""Lottery entries keep the no-loss promise of reservations: a PostgreSQL outage during
registration, a kill -9 of `allot serve`, and Redis losing the round (rebuild)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator import db
from allocator.config import Settings
from allocator.keys import Keys
from allocator.rebuild import rebuild_round
from loadtest.servers import PrivatePostgres
from service.app import create_app
from tests.helpers import ADMIN, citizen_id, phone
from tests.processes import Server
from tests.test_lottery import closed_lottery, enter, lottery_body, seed_lottery, wait_for_status

pytestmark = pytest.mark.slow


@pytest.fixture
async def private_pg(tmp_path: Path) -> AsyncIterator[PrivatePostgres]:
    server = PrivatePostgres(tmp_path / "pg")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


async def listed_receipts(client: Any, url: str = "") -> set[str]:
    r = await client.get(f"{url}/api/v1/rounds/l1/draw/entries.csv")
    assert r.status == 200
    return {line.split(",")[0] for line in (await r.text()).splitlines()[1:]}


async def test_a_postgres_outage_during_registration_delays_the_freeze_and_loses_no_entry(
    aiohttp_client: Any, settings: Settings, redis: Redis, private_pg: PrivatePostgres
) -> None:
    """Entries go on in Redis while PostgreSQL is down; the freeze waits for the ledger to
    catch up, and then lists every entry answered 201/200, with its last choice."""
    database_url = private_pg.url_for("allot")
    await db.migrate(database_url)
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(replace(settings, database_url=database_url))
    )
    await seed_lottery(client, stock={"s1": 5, "s2": 5}, closes_in=8)
    answered: dict[int, dict[str, Any]] = {}

    async def load(numbers: range, site: str = "s1") -> None:
        answers = await asyncio.gather(*(enter(client, n, site) for n in numbers))
        for n, a in zip(numbers, answers, strict=True):
            assert a.status in (200, 201), await a.text()
            answered[n] = await a.json()

    await load(range(0, 20))
    outage = asyncio.create_task(asyncio.to_thread(private_pg.stop))
    await load(range(20, 40))
    await outage
    await load(range(40, 60))
    await load(range(0, 10), "s2")  # changed choices while the ledger is down
    await asyncio.sleep(8.5)  # the window has closed; the freeze cannot run without the ledger
    assert (await client.get("/api/v1/rounds/l1/draw")).status == 503
    await asyncio.to_thread(private_pg.start)
    await wait_for_status(client, "frozen")
    assert await listed_receipts(client) == {e["receipt"] for e in answered.values()}
    stock_csv = await (await client.get("/api/v1/rounds/l1/draw/entries.csv")).text()
    at = {line.split(",")[0]: line.split(",")[1] for line in stock_csv.splitlines()[1:]}
    assert sorted(at[answered[n]["receipt"]] for n in range(10)) == ["s2"] * 10


async def test_kill_9_of_the_service_during_registration_loses_no_answered_entry(
    settings: Settings, tmp_path: Path, redis: Redis
) -> None:
    """Every entry answered 201 before a kill -9 of the whole service is in the frozen list."""
    server = Server(settings, tmp_path / "serve.log")
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            server.start()
            await server.wait_ready(session)
            url = server.url
            sites = {"sites": [{"site_id": "s1", "name": "One", "address": "R 1", "district": "d"}]}
            async with session.put(f"{url}/api/v1/admin/sites", json=sites, headers=ADMIN) as r:
                assert r.status == 200
            body = lottery_body(closes_in=25)
            async with session.put(f"{url}/api/v1/admin/rounds/l1", json=body, headers=ADMIN) as r:
                assert r.status == 201
            answered: list[tuple[int, Any]] = []

            async def one(n: int) -> tuple[int, Any]:
                ask = {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": "s1"}
                headers = {"X-Forwarded-For": f"2001:db8::{n:x}"}
                try:
                    async with session.post(
                        f"{url}/api/v1/rounds/l1/entries", json=ask, headers=headers
                    ) as r:
                        return r.status, await r.json()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    return 0, repr(exc)

            async def crowd() -> None:
                for start in range(0, 2000, 100):
                    answered.extend(
                        await asyncio.gather(*(one(n) for n in range(start, start + 100)))
                    )

            load = asyncio.create_task(crowd())
            while len(answered) < 400:
                await asyncio.sleep(0.01)
            server.kill_all()
            await load
            statuses = {s for s, _ in answered}
            assert statuses <= {0, 201}, statuses
            granted = {b["receipt"] for s, b in answered if s == 201}
            assert len(granted) >= 400
            server.start()
            await server.wait_ready(session)
            async with asyncio.timeout(90):
                while True:
                    async with session.get(f"{url}/api/v1/rounds/l1/draw") as r:
                        if (await r.json())["status"] == "frozen":
                            break
                    await asyncio.sleep(0.5)
            listed = await listed_receipts(session, url)
            assert granted <= listed
    finally:
        server.stop()


async def test_rebuild_restores_entries_winners_and_the_draw_status(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, pg: asyncpg.Connection
) -> None:
    """After Redis lost the round, `allot rebuild` brings back every entry, each winner's
    reservation and the draw's status from the ledger."""
    entries = await closed_lottery(client, 6, {"s1": 2})
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "r"}, headers=ADMIN
    )
    assert r.status == 200
    before = [await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json() for e in entries]
    rk = keys.round("l1")
    async with asyncio.timeout(10):
        while await redis.xlen(rk.ledger):
            await asyncio.sleep(0.05)
    await redis.delete(*rk.all_static())
    await rebuild_round(redis, pg, keys, "l1", wait=5)
    await asyncio.sleep(1.1)  # snapshots of the round are at most 1 s old
    after = [await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json() for e in entries]
    assert after == before
    for e in after:
        if e["reservation_id"]:
            got = await client.get(f"/api/v1/reservations/{e['reservation_id']}")
            assert got.status == 200
    again = await enter(client, 0)
    assert again.status == 409  # closed: the rebuilt round is still closed
