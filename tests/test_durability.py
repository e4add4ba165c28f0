"""Durable by default, and loss seen: what a power loss does to answered reservations.

The slow tests run the real service on a private redis-server started like loadtest/servers.py
does. A power loss is simulated faithfully for ``appendfsync everysec``: the append-only files
are copied aside (what the disk held at the last fsync), more reservations are made and written
to the ledger, Redis is killed with SIGKILL, the old files are put back, and Redis restarts from
them. Redis then lacks reservations that PostgreSQL has; the service must notice and refuse the
round instead of handing its stock out again. The faster tests check the scripts' side of the
same guard against the shared Redis, under their own key prefix.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator import db
from allocator.config import LedgerSettings, Settings
from allocator.errors import RoundLost
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.ledger import LedgerWriter
from allocator.model import Round, Site
from allocator.rebuild import RebuildRefused, rebuild_round
from allocator.reconcile import reconcile
from allocator.redistyping import awaited
from loadtest.servers import PrivateRedis
from service.app import create_app
from service.problems import problem_headers, status_of
from service.shapes import stats_body
from tests.helpers import ADMIN, citizen_id, claim_once, phone, reserve, seed

ALLOT = str(Path(sys.executable).with_name("allot"))


# -- helpers ----------------------------------------------------------------------------------


async def on(checked_client: Any, settings: Settings, server: PrivateRedis) -> TestClient[Any, Any]:
    """The real app (ledger writer and integrity watch included) on the private Redis; every
    answer, the refusals of a lost round included, must match the served OpenAPI document."""
    settings = replace(
        settings,
        redis_url=server.url,
        service=replace(settings.service, redis_timeout_ms=800),
    )
    client: TestClient[Any, Any] = await checked_client(create_app(settings))
    return client


async def in_ledger(database_url: str, expected: dict[str, str], round_id: str = "r1") -> None:
    """Wait until the ledger holds exactly these reservation statuses (at least these ids)."""
    con = await asyncpg.connect(database_url)
    try:
        async with asyncio.timeout(15):
            while True:
                rows = await con.fetch(
                    "SELECT reservation_id, status FROM reservations WHERE round_id = $1",
                    round_id,
                )
                found = {r["reservation_id"]: r["status"] for r in rows}
                if all(found.get(rid) == status for rid, status in expected.items()):
                    return
                await asyncio.sleep(0.05)
    finally:
        await con.close()


async def drained(url: str, keys: Keys, round_id: str = "r1") -> None:
    client = Redis.from_url(url)
    try:
        async with asyncio.timeout(15):
            while await client.xlen(keys.round(round_id).ledger):
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def allot(settings: Settings, redis_url: str, *args: str) -> tuple[int, bytes, bytes]:
    """Run the installed ``allot`` command against this test's stores."""
    env = {
        **os.environ,
        "ALLOT_REDIS_URL": redis_url,
        "ALLOT_REDIS_PREFIX": settings.service.redis_prefix,
        "ALLOT_DATABASE_URL": settings.database_url,
    }
    proc = await asyncio.create_subprocess_exec(
        ALLOT, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def unavailable(response: Any) -> dict[str, Any]:
    """A 503 ``unavailable`` problem with Retry-After, as the contract allows; its body."""
    assert response.status == 503, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json()
    assert body["code"] == "unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    return body


async def eventually_ready(client: TestClient[Any, Any]) -> None:
    async with asyncio.timeout(10):
        while (await client.get("/readyz")).status != 200:
            await asyncio.sleep(0.1)


def balanced(stats: dict[str, Any]) -> bool:
    return all(
        s["loaded"] == s["remaining"] + s["reserved"] + stats["collected"] for s in stats["sites"]
    )


@pytest.fixture
async def everysec(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis", appendonly=True, appendfsync="everysec")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


@pytest.fixture
async def always(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis", appendonly=True)  # appendfsync always
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


@pytest.fixture
async def volatile(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")  # no persistence: a restart starts empty
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


# -- a power loss, for real -------------------------------------------------------------------


@pytest.mark.slow
async def test_power_loss_with_everysec_is_seen_refused_and_healed_by_rebuild(
    checked_client: Any,
    settings: Settings,
    keys: Keys,
    everysec: PrivateRedis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis restarts from its last fsync without reservations the ledger already has: those
    citizens must not reserve again (503 for the round), readiness and reconcile say so, and
    after `allot rebuild` they get their own reservation back and the stock balances."""
    client = await on(checked_client, settings, everysec)
    await seed(client, stock={"s1": 10})
    early = [await (await reserve(client, n)).json() for n in range(3)]
    await in_ledger(settings.database_url, {r["reservation_id"]: "confirmed" for r in early})
    await drained(everysec.url, keys)

    fsynced = tmp_path / "aof-at-last-fsync"  # what the disk held when the power went
    await asyncio.to_thread(shutil.copytree, everysec.aof_dir, fsynced)

    late = []
    for n in range(3, 6):
        r = await reserve(client, n)
        assert r.status == 201, await r.text()
        late.append(await r.json())
    cancelled = await client.delete(f"/api/v1/reservations/{early[0]['reservation_id']}")
    assert cancelled.status == 200
    await in_ledger(
        settings.database_url,
        {
            **{r["reservation_id"]: "confirmed" for r in late},
            early[0]["reservation_id"]: "cancelled",
        },
    )

    await asyncio.to_thread(everysec.kill)  # the power goes
    await asyncio.to_thread(shutil.rmtree, everysec.aof_dir)
    await asyncio.to_thread(shutil.copytree, fsynced, everysec.aof_dir)
    await asyncio.to_thread(everysec.start)  # and comes back: Redis as of its last fsync

    # the citizens whose reservations Redis lost cannot take a second share, nor can anyone
    # take their units: the round is refused, not served from the older state
    for n in (3, 4, 5, 7):
        async with asyncio.timeout(5):
            while True:
                r = await reserve(client, n)
                body = await r.json()
                if r.status != 503 or "restored" in body["detail"]:
                    break  # past the breaker's "not answering" of the restart itself
                await asyncio.sleep(0.1)
        await unavailable(r)
    await unavailable(await client.get(f"/api/v1/reservations/{late[0]['reservation_id']}"))
    await unavailable(await client.get("/api/v1/rounds/r1"))
    await unavailable(await client.delete(f"/api/v1/reservations/{early[1]['reservation_id']}"))

    ready = await unavailable(await client.get("/readyz"))
    assert ready["lost_rounds"] == ["r1"]
    assert "round r1" in ready["detail"]
    stats = await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()
    assert stats["lost"]["round_id"] == "r1"
    assert stats["lost"]["redis_seq"] < stats["lost"]["ledger_seq"]
    assert any(
        rec.levelno == logging.ERROR and "round r1" in rec.getMessage() for rec in caplog.records
    ), "the loss must be logged at ERROR"

    code, out, err = await allot(
        settings, everysec.url, "reconcile", "--round", "r1", "--wait", "5"
    )
    assert code == 1, err.decode()
    [report] = orjson.loads(out)["rounds"]
    missing = report["differences"]["in_ledger_not_redis"]
    assert missing["count"] == 3
    assert {m["reservation"] for m in missing["listed"]} == {
        r["reservation_id"][:8] + "…" for r in late
    }
    [changed] = report["differences"]["status_differs"]["listed"]
    assert changed["reservation"] == early[0]["reservation_id"][:8] + "…"
    assert (changed["status"], changed["status_in_redis"]) == ("cancelled", "confirmed")
    assert report["lost"] is not None

    code, out, err = await allot(settings, everysec.url, "rebuild", "--round", "r1")
    assert code == 0, err.decode()
    await eventually_ready(client)

    for r in late:  # each gets the reservation the ledger kept, unchanged
        n = 3 + late.index(r)
        again = await reserve(client, n)
        assert again.status == 200, await again.text()
        assert (await again.json())["reservation_id"] == r["reservation_id"]
    gone = await client.get(f"/api/v1/reservations/{early[0]['reservation_id']}")
    assert (await gone.json())["status"] == "cancelled"  # the lost cancel is back too
    stats = await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()
    assert stats["lost"] is None
    assert stats["reservations"] == 5
    assert stats["remaining"] == 10 - 5
    assert balanced(stats)
    fresh = await reserve(client, 8)
    assert fresh.status == 201, await fresh.text()
    await drained(everysec.url, keys)
    code, out, err = await allot(
        settings, everysec.url, "reconcile", "--round", "r1", "--wait", "5"
    )
    assert code == 0, out.decode() + err.decode()


@pytest.mark.slow
async def test_whole_dataset_lost_answers_503_not_404_and_rebuild_restores_it(
    checked_client: Any, settings: Settings, keys: Keys, volatile: PrivateRedis
) -> None:
    """A Redis restarted empty must not make a round look like it never existed (404 invites
    everyone to start again elsewhere); 503 until rebuilt, then the same reservations."""
    client = await on(checked_client, settings, volatile)
    await seed(client, stock={"s1": 10})
    made = [await (await reserve(client, n)).json() for n in range(3)]
    await in_ledger(settings.database_url, {r["reservation_id"]: "confirmed" for r in made})

    await asyncio.to_thread(volatile.kill)
    await asyncio.to_thread(volatile.start)  # no persistence: empty

    async with asyncio.timeout(5):
        while (await client.get("/api/v1/rounds/r1")).status != 503 or (
            (await client.get("/readyz")).status != 503
        ):
            await asyncio.sleep(0.1)
    await unavailable(await client.get("/api/v1/rounds/r1"))
    await unavailable(await client.get("/api/v1/rounds/r1/sites"))
    await unavailable(await reserve(client, 0))
    await unavailable(await reserve(client, 9))
    await unavailable(await client.get(f"/api/v1/reservations/{made[1]['reservation_id']}"))
    ready = await unavailable(await client.get("/readyz"))
    assert ready["lost_rounds"] == ["r1"]
    assert "round r1" in ready["detail"]

    code, out, err = await allot(settings, volatile.url, "rebuild")  # every round that needs it
    assert code == 0, err.decode()
    [summary] = orjson.loads(out)["rebuilt"]
    assert summary["round_id"] == "r1"
    assert summary["reservations"] == 3
    await eventually_ready(client)
    again = await reserve(client, 1)
    assert again.status == 200, await again.text()
    assert (await again.json())["reservation_id"] == made[1]["reservation_id"]


@pytest.mark.slow
async def test_appendfsync_always_and_kill_9_lose_no_answered_reservation(
    checked_client: Any, settings: Settings, keys: Keys, always: PrivateRedis
) -> None:
    """Redis killed mid-crowd: every reservation answered 201 is still in Redis after the
    restart and reaches the ledger, and the round is not taken for lost."""
    client = await on(checked_client, settings, always)
    await seed(client, stock={"s1": 500})
    answered: dict[int, str] = {}

    async def one(n: int) -> None:
        r = await reserve(client, n)
        if r.status == 201:
            answered[n] = (await r.json())["reservation_id"]
        else:
            assert r.status == 503, await r.text()  # during the crash: unavailable, honestly

    crowd = [asyncio.create_task(one(n)) for n in range(300)]
    async with asyncio.timeout(20):
        while len(answered) < 60:
            await asyncio.sleep(0.005)
    await asyncio.to_thread(always.kill)
    await asyncio.gather(*crowd)
    await asyncio.to_thread(always.start)
    await eventually_ready(client)

    assert len(answered) >= 60
    check = Redis.from_url(always.url)
    try:
        rk = keys.round("r1")
        records = await awaited(check.hmget(rk.reservations, list(answered.values())))
        assert all(r is not None for r in records), "an answered 201 is missing from Redis"
    finally:
        await check.aclose()
    await in_ledger(settings.database_url, dict.fromkeys(answered.values(), "confirmed"))
    for n, rid in list(answered.items())[:20]:
        again = await reserve(client, n)
        assert again.status == 200, await again.text()
        assert (await again.json())["reservation_id"] == rid
    stats = await (await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)).json()
    assert stats["lost"] is None
    assert balanced(stats)


# -- the scripts' side of the guard, on the shared Redis --------------------------------------


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(database_url)
    yield p
    await p.close()


@pytest.fixture
async def allocator(redis: Redis, pool: asyncpg.Pool, keys: Keys) -> Allocator:
    a = Allocator(redis, pool, keys, Hasher(b"pepper"), timeout=2)
    await a.upsert_sites([Site("s1", "One", "Road 1", "d1")])
    now = dt.datetime.now(dt.UTC)
    await a.upsert_round(
        Round(
            "r1",
            "Masks",
            now - dt.timedelta(minutes=1),
            now + dt.timedelta(hours=1),
            1,
            now - dt.timedelta(minutes=1),
            now + dt.timedelta(hours=2),
        )
    )
    await a.load_batch("r1", "b1", [("s1", 10)])
    return a


async def write_ledger(redis: Redis, pool: asyncpg.Pool, keys: Keys, a: Allocator) -> None:
    """Drain the round's stream into the ledger, as a worker's writer does (floors included)."""
    w = LedgerWriter(
        redis, pool, keys, LedgerSettings(), consumer="t", block_ms=10, floors=a.floors
    )
    async with asyncio.timeout(10):
        await w.drain()


async def state_of(redis: Redis, keys: Keys) -> dict[str, Any]:
    rk = keys.round("r1")
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(rk.stock)
        pipe.hgetall(rk.tally)
        pipe.hgetall(rk.holders)
        pipe.hgetall(rk.reservations)
        pipe.xlen(rk.ledger)
        stock, tally, holders, records, backlog = await pipe.execute()
    return {"stock": stock, "tally": tally, "holders": holders, "records": records, "n": backlog}


async def test_every_change_carries_a_sequence_and_the_ledger_keeps_its_high_water_mark(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    """The guard stands on this: Redis's seq counts every change, each ledger entry carries
    its seq, and rounds.ledger_seq is the highest committed one, never lowered."""
    rk = keys.round("r1")
    res, _ = await claim_once(allocator, "r1", "s1", citizen_id(1), phone(1))
    await allocator.cancel(res.reservation_id)
    entries = await redis.xrange(rk.ledger)
    assert [int(f[b"seq"]) for _, f in entries] == [1, 2, 3]  # batch, claim, cancel
    assert int(await redis.hget(rk.tally, "seq")) == 3  # type: ignore[misc]
    await write_ledger(redis, pool, keys, allocator)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT ledger_seq FROM rounds WHERE round_id = 'r1'") == 3
    assert allocator.floors.get("r1") == 3  # the worker learns its own commits at once
    for _, fields in entries[:2]:  # an old entry delivered again must not lower the mark
        await redis.xadd(rk.ledger, fields)
    await write_ledger(redis, pool, keys, allocator)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT ledger_seq FROM rounds WHERE round_id = 'r1'") == 3


async def test_a_redis_behind_the_ledger_refuses_every_change_and_stays_refused(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    """Once Redis's seq is below the ledger's, claims, cancels, pickups and batches change
    nothing (no unit, no token, no record), and the mark holds for a worker that knows
    nothing of the ledger."""
    rk = keys.round("r1")
    made, _ = await claim_once(allocator, "r1", "s1", citizen_id(1), phone(1))
    await write_ledger(redis, pool, keys, allocator)
    # ignore: redis-py's stub types hset's value as str, though it sends an int as its digits
    await awaited(redis.hset(rk.tally, "seq", 1))  # type: ignore[arg-type]  # as if Redis came back without the claim's write
    before = await state_of(redis, keys)
    gate_keys = rk.gate_global.removesuffix("global") + "*"
    gates = sorted([k async for k in redis.scan_iter(match=gate_keys)])
    gate_state = [await awaited(redis.hgetall(k)) for k in gates]

    with pytest.raises(RoundLost) as refused:
        await claim_once(allocator, "r1", "s1", citizen_id(2), phone(2))
    assert status_of(refused.value) == 503
    assert problem_headers(refused.value)["Retry-After"]
    for attempt in (
        allocator.cancel(made.reservation_id),
        allocator.pickup("s1", made.pickup_code, None, "r1"),
        allocator.load_batch("r1", "b2", [("s1", 5)]),
        allocator.reservation(made.reservation_id),
        allocator.round("r1"),
    ):
        with pytest.raises(RoundLost):
            await attempt
    after = await state_of(redis, keys)
    mark = after["tally"].pop(b"lost")
    assert after == before
    assert orjson.loads(mark)["ledger"] == 2
    assert orjson.loads(mark)["redis"] == 1
    assert sorted([k async for k in redis.scan_iter(match=gate_keys)]) == gates
    assert [await awaited(redis.hgetall(k)) for k in gates] == gate_state

    blind = Allocator(redis, None, keys, Hasher(b"pepper"), timeout=2)  # no ledger: floor -1
    with pytest.raises(RoundLost):
        await claim_once(blind, "r1", "s1", citizen_id(3), phone(3))
    assert [r.round_id for r in allocator.lost_rounds()] == ["r1"]
    stats = stats_body(await allocator.stats("r1"))
    assert stats["lost"]["redis_seq"] == 1
    assert stats["lost"]["ledger_seq"] == 2


async def test_rebuild_of_a_lost_round_needs_no_force_and_clears_the_mark(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys, pg: asyncpg.Connection
) -> None:
    """The round Redis is behind on is exactly what rebuild is for; a whole round that still
    holds reservations is not rebuilt without --force."""
    rk = keys.round("r1")
    made, _ = await claim_once(allocator, "r1", "s1", citizen_id(1), phone(1))
    await write_ledger(redis, pool, keys, allocator)
    with pytest.raises(RebuildRefused, match="has lost nothing"):
        await rebuild_round(redis, pg, keys, "r1")

    await awaited(redis.hdel(rk.reservations, made.reservation_id))  # Redis lost the claim's write
    await awaited(redis.hdel(rk.holders, made.citizen_hash))
    await awaited(redis.hset(rk.tally, "seq", 1))  # type: ignore[arg-type]  # stub: str; int is sent as digits
    summary = await rebuild_round(redis, pg, keys, "r1")
    assert summary["was_lost"]["ledger_seq"] == 2
    assert summary["seq"] == 2
    assert not await awaited(redis.hexists(rk.tally, "lost"))
    assert int(await redis.hget(rk.tally, "seq")) == 2  # type: ignore[misc]
    again, created = await claim_once(allocator, "r1", "s1", citizen_id(1), phone(1))
    assert (again.reservation_id, created) == (made.reservation_id, False)
    _, created = await claim_once(allocator, "r1", "s1", citizen_id(2), phone(2))
    assert created
    assert allocator.lost_rounds() == []


async def test_reconcile_names_reservations_missing_on_either_side_beyond_the_stream(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys, pg: asyncpg.Connection
) -> None:
    """A reservation only in the ledger (Redis lost it) and one only in Redis (the ledger lost
    it) are both named; one whose entry still waits in the stream is lag, not a difference."""
    rk = keys.round("r1")
    kept, _ = await claim_once(allocator, "r1", "s1", citizen_id(1), phone(1))
    lost_in_redis, _ = await claim_once(allocator, "r1", "s1", citizen_id(2), phone(2))
    only_in_redis, _ = await claim_once(allocator, "r1", "s1", citizen_id(3), phone(3))
    await write_ledger(redis, pool, keys, allocator)
    await pg.execute(
        "DELETE FROM reservations WHERE reservation_id = $1", only_in_redis.reservation_id
    )
    await awaited(redis.hdel(rk.reservations, lost_in_redis.reservation_id))
    waiting, _ = await claim_once(allocator, "r1", "s1", citizen_id(4), phone(4))  # still in stream

    report = await reconcile(redis, pg, keys, ["r1"], wait=0)
    assert report["ok"] is False
    [rnd] = report["rounds"]
    d = rnd["differences"]
    assert [m["reservation"] for m in d["in_ledger_not_redis"]["listed"]] == [
        lost_in_redis.reservation_id[:8] + "…"
    ]
    assert [m["reservation"] for m in d["in_redis_not_ledger"]["listed"]] == [
        only_in_redis.reservation_id[:8] + "…"
    ]
    assert d["in_stream"] == 1
    named = {m["reservation"] for k in ("in_ledger_not_redis", "in_redis_not_ledger")
             for m in d[k]["listed"]}  # fmt: skip
    assert waiting.reservation_id[:8] + "…" not in named
    assert kept.reservation_id[:8] + "…" not in named
    assert any("in the ledger but not in Redis" in p for p in rnd["problems"])
    assert any("in Redis but not in the ledger" in p for p in rnd["problems"])
    flat = orjson.dumps(report).decode()
    for r in (kept, lost_in_redis, only_in_redis, waiting):
        assert r.reservation_id not in flat  # the citizen's key stays out of the report


@pytest.mark.slow
async def test_a_worker_warns_when_its_redis_could_lose_answered_reservations(
    always: PrivateRedis, tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator who points allot at a Redis with everysec or no AOF is told so at start;
    a durable one raises no alarm."""
    caplog.set_level(logging.WARNING, logger="allot.allocator")
    warnings = []
    everysec_server = PrivateRedis(tmp_path / "everysec", appendonly=True, appendfsync="everysec")
    await asyncio.to_thread(everysec_server.start)
    try:
        for server in (always, everysec_server):
            client = Redis.from_url(server.url)
            try:
                caplog.clear()
                await Allocator(client, None, keys, Hasher(b"p")).watch.check_persistence()
                warnings.append([r.getMessage() for r in caplog.records])
            finally:
                await client.aclose()
    finally:
        await asyncio.to_thread(everysec_server.close)
    assert warnings[0] == []
    [warning] = warnings[1]
    assert "appendfsync everysec" in warning
    assert "appendfsync always" in warning
