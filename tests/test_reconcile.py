"""`allot reconcile` proves the books balance; `allot rebuild` restores Redis from the ledger."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.keys import Keys
from allocator.rebuild import RebuildRefused, rebuild_round
from allocator.reconcile import reconcile
from service.appkeys import LEDGER
from tests.helpers import ADMIN, REDIS_URL, reserve, seed

ALLOT = str(Path(sys.executable).with_name("allot"))


async def activity(client: TestClient[Any, Any]) -> dict[str, Any]:
    """Reservations at two sites, a cancel and a pickup; returns the stats afterwards."""
    await seed(client, stock={"s1": 10, "s2": 6}, per_person=2)
    made = [await reserve(client, n, "s1" if n % 2 else "s2") for n in range(6)]
    assert [m.status for m in made] == [201] * 6
    cancelled = await client.delete(made[0].headers["Location"])
    assert cancelled.status == 200
    picked = (await made[1].json())["pickup_code"]
    r = await client.post(
        "/api/v1/admin/pickups", json={"site_id": "s1", "pickup_code": picked}, headers=ADMIN
    )
    assert r.status == 200
    return await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()  # type: ignore[no-any-return]


async def drained(redis: Redis, keys: Keys) -> None:
    async with asyncio.timeout(10):
        while await redis.xlen(keys.round("r1").ledger):
            await asyncio.sleep(0.05)


async def test_reconcile_is_clean_after_real_activity(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Claims, a cancel and a pickup leave Redis and the ledger in exact agreement."""
    await activity(client)
    con = await asyncpg.connect(settings.database_url)
    try:
        report = await reconcile(redis, con, keys, ["r1"], wait=10)
    finally:
        await con.close()
    assert report["ok"], report
    [rnd] = report["rounds"]
    assert rnd["reservations"] == {"redis": 6, "ledger": 6}
    by_site = {s["site_id"]: s for s in rnd["sites"]}
    assert by_site["s1"]["collected"] == 2
    assert by_site["s1"]["ledger"] == {
        "loaded": 10,
        "live": 2 * 2,
        "collected": 2,
        "expired": 0,
        "carried_out": 0,
    }


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (lambda rk: ("hincrby", rk.stock, "s1", 1), "loaded 10 != remaining"),
        (lambda rk: ("hincrby", rk.tally, "reserved:s2", -2), "live: Redis"),
        (lambda rk: ("hincrby", rk.loaded, "s2", 5), "loaded: Redis 11, ledger 6"),
    ],
)
async def test_reconcile_reports_a_planted_mismatch_and_the_cli_exits_1(
    client: TestClient[Any, Any],
    redis: Redis,
    keys: Keys,
    settings: Settings,
    plant: Any,
    expected: str,
) -> None:
    """One unit out of place anywhere must be found, named, and fail the command."""
    await activity(client)
    await drained(redis, keys)
    command, *args = plant(keys.round("r1"))
    await getattr(redis, command)(*args)

    env = {
        **os.environ,
        "ALLOT_REDIS_URL": REDIS_URL,
        "ALLOT_REDIS_PREFIX": settings.service.redis_prefix,
        "ALLOT_DATABASE_URL": settings.database_url,
    }
    proc = await asyncio.create_subprocess_exec(
        ALLOT, "reconcile", "--round", "r1", "--wait", "5",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 1, err.decode()
    report = orjson.loads(out)
    assert report["ok"] is False
    problems = [p for s in report["rounds"][0]["sites"] for p in s["problems"]]
    assert any(expected in p for p in problems), problems


async def test_reconcile_cli_exits_0_when_clean(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """The command's exit status is what an operator's script relies on."""
    await activity(client)
    env = {
        **os.environ,
        "ALLOT_REDIS_URL": REDIS_URL,
        "ALLOT_REDIS_PREFIX": settings.service.redis_prefix,
        "ALLOT_DATABASE_URL": settings.database_url,
    }
    proc = await asyncio.create_subprocess_exec(
        ALLOT, "reconcile", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, out.decode() + err.decode()
    assert orjson.loads(out)["ok"] is True


async def test_rebuild_restores_a_round_after_redis_lost_its_data(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """After Redis loses everything, rebuild restores stock, holders and codes from the ledger."""
    before = await activity(client)
    await drained(redis, keys)
    first = await reserve(client, 3, "s1")  # an existing holder, to look up after the rebuild
    assert first.status == 200
    await drained(redis, keys)
    lost = [k async for k in redis.scan_iter(match=f"{keys.prefix}:*")]
    await redis.delete(*lost)  # Redis lost its data

    con = await asyncpg.connect(settings.database_url)
    try:
        summary = await rebuild_round(redis, con, keys, "r1")
        assert summary["reservations"] == 6
        assert summary["live"] == 5
        after = await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()
        for field in ("loaded", "reserved", "collected", "remaining", "reservations"):
            assert after[field] == before[field], field
        again = await reserve(client, 3, "s1")  # same citizen, same request: same reservation
        assert again.status == 200
        assert (await again.json())["reservation_id"] == (await first.json())["reservation_id"]
        other_site = await reserve(client, 3, "s2")
        assert (await other_site.json())["code"] == "already-reserved"
        report = await reconcile(redis, con, keys, ["r1"], wait=5)
        assert report["ok"], report
    finally:
        await con.close()


async def test_rebuild_refuses_to_discard_entries_not_yet_in_the_ledger(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Rebuilding over a backlog would lose reservations; it must refuse without --force."""
    await activity(client)
    await drained(redis, keys)
    client.app[LEDGER].stop()  # the writer is down, so the next entry stays unwritten
    async with asyncio.timeout(5):  # it ends once the read it is blocked in returns
        while any(t.get_name() == "ledger-writer" and not t.done() for t in asyncio.all_tasks()):
            await asyncio.sleep(0.01)
    rk = keys.round("r1")
    await redis.xadd(rk.ledger, {"kind": "reservation", "record": b"{}"})
    con = await asyncpg.connect(settings.database_url)
    try:
        with pytest.raises(RebuildRefused, match="not yet in"):
            await rebuild_round(redis, con, keys, "r1")
    finally:
        await con.close()
