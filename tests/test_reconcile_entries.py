"""`allot reconcile` compares a lottery round's entries in Redis with the ledger's; `allot
rebuild` brings them back after Redis lost the round (allocator/reconcile_entries.py)."""

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
from allocator.rebuild import rebuild_round
from allocator.reconcile import reconcile
from tests.helpers import ADMIN, REDIS_URL, phone
from tests.test_lottery import enter, problem, seed_lottery, wait_for_status

ALLOT = str(Path(sys.executable).with_name("allot"))


async def registered(client: TestClient[Any, Any]) -> dict[int, dict[str, Any]]:
    """Six entries at s1 and s2; citizen 1 changes to s2 (200), citizen 2 withdraws; the
    entries as the citizens last saw them, by citizen number."""
    await seed_lottery(client, stock={"s1": 3, "s2": 2})
    seen: dict[int, dict[str, Any]] = {}
    for n in range(6):
        r = await enter(client, n, "s1" if n % 2 == 0 else "s2", accept=n == 3)
        assert r.status == 201, await r.text()
        seen[n] = await r.json()
    r = await enter(client, 1, "s1", accept=True)  # the last choice counts
    assert r.status == 200, await r.text()
    seen[1] = await r.json()
    r = await client.delete(f"/api/v1/entries/{seen[2]['entry_id']}")
    assert r.status == 200, await r.text()
    seen[2] = await r.json()
    return seen


async def drained(redis: Redis, keys: Keys, round_id: str = "l1") -> None:
    async with asyncio.timeout(10):
        while await redis.xlen(keys.round(round_id).ledger):
            await asyncio.sleep(0.05)


async def report_of(settings: Settings, redis: Redis, keys: Keys) -> dict[str, Any]:
    con = await asyncpg.connect(settings.database_url)
    try:
        report = await reconcile(redis, con, keys, ["l1"], wait=10)
    finally:
        await con.close()
    [rnd] = report["rounds"]
    assert rnd["ok"] == report["ok"]
    return rnd  # type: ignore[no-any-return]


async def test_reconcile_counts_a_lottery_rounds_entries_and_finds_them_all_in_the_ledger(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Entries, a changed choice and a withdrawal leave Redis and the ledger in agreement, and
    the report says so by status and site."""
    await registered(client)
    rnd = await report_of(settings, redis, keys)
    assert rnd["ok"], rnd
    entries = rnd["entries"]
    assert entries["entries"] == {"redis": 6, "ledger": 6, "in_stream": 0}
    assert entries["by_status"]["ledger"] == {"registered": 5, "withdrawn": 1}
    assert entries["by_status"]["redis"] == entries["by_status"]["ledger"]
    # s1: citizens 0, 4 and 1 (moved from s2); s2: 3, 5 (2 withdrew from s1)
    assert {s["site_id"]: s["live"]["ledger"] for s in entries["sites"]} == {"s1": 3, "s2": 2}
    assert all(s["live"]["redis"] == s["counter"] == s["live"]["ledger"] for s in entries["sites"])


async def test_reconcile_of_an_fcfs_round_has_no_entry_report(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    from tests.helpers import seed

    await seed(client, stock={"s1": 1})
    con = await asyncpg.connect(settings.database_url)
    try:
        report = await reconcile(redis, con, keys, ["r1"], wait=5)
    finally:
        await con.close()
    assert report["ok"], report
    assert report["rounds"][0]["entries"] is None


def _record_edit(field: str, value: Any) -> Any:
    async def plant(redis: Redis, keys: Keys, entry_id: str, database_url: str) -> None:
        rk = keys.round("l1")
        record = orjson.loads(await redis.hget(rk.entries, entry_id))  # type: ignore[misc]
        record[field] = value
        await redis.hset(rk.entries, entry_id, orjson.dumps(record))  # type: ignore[misc, arg-type]

    return plant


async def _drop_entry(redis: Redis, keys: Keys, entry_id: str, database_url: str) -> None:
    await redis.hdel(keys.round("l1").entries, entry_id)  # type: ignore[misc]


async def _bump_counter(redis: Redis, keys: Keys, entry_id: str, database_url: str) -> None:
    await redis.hincrby(keys.round("l1").tally, "entries:s2", 1)  # type: ignore[misc]


async def _forget_entrant(redis: Redis, keys: Keys, entry_id: str, database_url: str) -> None:
    await redis.hset(keys.round("l1").entrants, "someone-else", entry_id)  # type: ignore[misc]


async def _extra_entry(redis: Redis, keys: Keys, entry_id: str, database_url: str) -> None:
    """A record Redis holds that the ledger never saw (with its counter, so only that differs)."""
    rk = keys.round("l1")
    record = orjson.loads(await redis.hget(rk.entries, entry_id))  # type: ignore[misc]
    record["id"] = record["id"].replace(record["id"][:4], "zzzz", 1)
    record["cit"] = "a-citizen-of-its-own"
    await redis.hset(rk.entries, record["id"], orjson.dumps(record))  # type: ignore[misc, arg-type]
    await redis.hset(rk.entrants, record["cit"], record["id"])  # type: ignore[misc]
    await redis.hincrby(rk.tally, f"entries:{record['site']}", 1)  # type: ignore[misc]


async def _ledger_withdrawn(redis: Redis, keys: Keys, entry_id: str, database_url: str) -> None:
    """The ledger says withdrawn where Redis says registered."""
    con = await asyncpg.connect(database_url)
    try:
        await con.execute("UPDATE entries SET status = 'withdrawn' WHERE entry_id = $1", entry_id)
    finally:
        await con.close()


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (_record_edit("site", "s2"), "1 entry that Redis and the ledger record differently"),
        (_record_edit("acc", 0), "1 entry that Redis and the ledger record differently"),
        (_record_edit("status", "withdrawn"), "entries by status: Redis"),
        (_record_edit("cit", "another-hash"), "record differently"),
        (_drop_entry, "1 entry in the ledger but not in Redis"),
        (_bump_counter, "Redis counts 3 live entries at s2"),
        (_forget_entrant, "entrants hash"),
        (_extra_entry, "1 entry in Redis but not in the ledger"),
        (_ledger_withdrawn, "live entries at s1: Redis 3, ledger 2"),
    ],
    ids=[
        "site",
        "accept_district",
        "status",
        "citizen",
        "lost",
        "counter",
        "entrants",
        "unrecorded",
        "ledger-status",
    ],
)
async def test_reconcile_names_an_entry_out_of_place_and_the_cli_exits_1(
    client: TestClient[Any, Any],
    redis: Redis,
    keys: Keys,
    settings: Settings,
    plant: Any,
    expected: str,
) -> None:
    """One entry changed behind the ledger's back is found, named without its full id, and
    fails `allot reconcile`."""
    seen = await registered(client)
    await drained(redis, keys)
    entry_id = seen[1]["entry_id"]  # at s1, accepting the district
    await plant(redis, keys, entry_id, settings.database_url)

    env = {
        **os.environ,
        "ALLOT_REDIS_URL": REDIS_URL,
        "ALLOT_REDIS_PREFIX": settings.service.redis_prefix,
        "ALLOT_DATABASE_URL": settings.database_url,
    }
    proc = await asyncio.create_subprocess_exec(
        ALLOT, "reconcile", "--round", "l1", "--wait", "5",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 1, out.decode() + err.decode()
    assert entry_id not in out.decode()  # the citizen's key stays out of the report
    assert seen[1]["reservation_id"] is None
    report = orjson.loads(out)
    assert report["ok"] is False
    [rnd] = report["rounds"]
    assert any(expected in p for p in rnd["entries"]["problems"]), rnd["entries"]["problems"]
    assert any(p.startswith("entries: ") for p in rnd["problems"]), rnd["problems"]


async def wipe_round(redis: Redis, keys: Keys, round_id: str = "l1") -> int:
    """Redis loses every key of the round (its hash tag, under this test's own prefix)."""
    lost = [k async for k in redis.scan_iter(match=f"{keys.prefix}:{{r:{round_id}}}:*")]
    assert lost
    await redis.delete(*lost)
    return len(lost)


async def answered(client: TestClient[Any, Any], entry_id: str) -> dict[str, Any]:
    """The entry as served, once the workers serve the round again (a rebuild clears the lost
    mark; a worker that saw the round lost catches up within a second)."""
    async with asyncio.timeout(10):
        while True:
            r = await client.get(f"/api/v1/entries/{entry_id}")
            if r.status != 503:
                assert r.status == 200, await r.text()
                return await r.json()  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)


async def test_rebuild_restores_a_lottery_rounds_entries_after_redis_lost_them(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Wipe the round from Redis: rebuild brings every entry back as the citizens saw it,
    reconcile is clean, and entering again is as idempotent as before."""
    seen = await registered(client)
    await drained(redis, keys)
    await wipe_round(redis, keys)
    con = await asyncpg.connect(settings.database_url)
    try:
        summary = await rebuild_round(redis, con, keys, "l1")
    finally:
        await con.close()
    assert summary["entries"] == 6
    for n, before in seen.items():
        assert await answered(client, before["entry_id"]) == before, n
    rnd = await report_of(settings, redis, keys)
    assert rnd["ok"], rnd
    assert rnd["entries"]["by_status"]["redis"] == {"registered": 5, "withdrawn": 1}

    again = await enter(client, 1, "s1", accept=True)  # the same citizen, phone and choice
    assert again.status == 200, await again.text()
    assert await again.json() == seen[1]
    moved = await enter(client, 0, "s2")  # the last choice still counts
    assert moved.status == 200
    assert ((await moved.json())["entry_id"], (await moved.json())["site_id"]) == (
        seen[0]["entry_id"],
        "s2",
    )
    await problem(await enter(client, 3, "s2", ph=phone(900)), 409, "already-entered")
    back = await enter(client, 2, "s1")  # withdrew before the loss: a new entry
    assert back.status == 201
    assert (await back.json())["entry_id"] != seen[2]["entry_id"]
    fresh = await enter(client, 6, "s2")
    assert fresh.status == 201
    await drained(redis, keys)
    rnd = await report_of(settings, redis, keys)
    assert rnd["ok"], rnd
    assert rnd["entries"]["by_status"]["ledger"] == {"registered": 7, "withdrawn": 1}


async def test_rebuild_after_the_draw_restores_winners_and_the_not_drawn(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """A drawn round lost from Redis comes back with its winners' entries and reservations and
    its not-drawn entries as they were; reconcile agrees (Redis `registered` = ledger
    `not-drawn`)."""
    await seed_lottery(client, stock={"s1": 2}, closes_in=2)
    made = [await enter(client, n) for n in range(5)]
    assert {m.status for m in made} == {201}
    ids = [(await m.json())["entry_id"] for m in made]
    await wait_for_status(client, "frozen")
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "42"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    before = [await answered(client, e) for e in ids]
    assert sorted(e["status"] for e in before) == ["not-drawn"] * 3 + ["won"] * 2
    await drained(redis, keys)
    rnd = await report_of(settings, redis, keys)
    assert rnd["ok"], rnd
    assert rnd["entries"]["by_status"]["ledger"] == {"not-drawn": 3, "won": 2}

    await wipe_round(redis, keys)
    con = await asyncpg.connect(settings.database_url)
    try:
        await rebuild_round(redis, con, keys, "l1")
    finally:
        await con.close()
    assert [await answered(client, e) for e in ids] == before
    for e in before:
        if e["status"] == "won":
            res = await client.get(f"/api/v1/reservations/{e['reservation_id']}")
            assert res.status == 200
            assert (await res.json())["status"] == "confirmed"
    rnd = await report_of(settings, redis, keys)
    assert rnd["ok"], rnd
    assert rnd["entries"]["by_status"]["redis"] == {"not-drawn": 3, "won": 2}
    r = await client.get("/api/v1/rounds/l1/draw")
    assert (await r.json())["status"] == "drawn"
