"""The ledger writer: at-least-once delivery from the stream, exactly one row per reservation.

(The writer as the process `allot serve` and `allot ledger` run: tests/test_writer_process.py.)"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from allocator import db
from allocator.config import LedgerSettings
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.ledger import (
    GROUP,
    UPSERT_ENTRIES,
    UPSERT_ENTRY,
    UPSERT_RESERVATION,
    UPSERT_RESERVATIONS,
    Entry,
    LedgerWriter,
    _columns,
    _fold,
    _fold_entries,
    create_group,
)
from allocator.model import Round, Site
from tests.helpers import citizen_id, claim_once, phone


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(database_url)
    yield p
    await p.close()


@pytest.fixture
async def allocator(redis: Redis, pool: asyncpg.Pool, keys: Keys) -> Allocator:
    a = Allocator(redis, pool, keys, Hasher(b"pepper"), timeout=2)
    await a.upsert_sites([Site("s1", "One", "Road 1", "d1"), Site("s2", "Two", "Road 2", "d1")])
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
    await a.load_batch("r1", "b1", [("s1", 100), ("s2", 100)])
    return a


def writer(
    redis: Redis, pool: asyncpg.Pool, keys: Keys, consumer: str, **settings: Any
) -> LedgerWriter:
    return LedgerWriter(
        redis, pool, keys, replace(LedgerSettings(), **settings), consumer=consumer, block_ms=10
    )


async def rows(pool: asyncpg.Pool) -> dict[str, str]:
    async with pool.acquire() as con:
        found = await con.fetch("SELECT reservation_id, status FROM reservations")
    return {r["reservation_id"]: r["status"] for r in found}


async def reserve_many(allocator: Allocator, count: int, start: int = 0) -> list[str]:
    ids = []
    for n in range(start, start + count):
        res, created = await claim_once(allocator, "r1", "s1", citizen_id(n), phone(n))
        assert created
        ids.append(res.reservation_id)
    return ids


async def test_duplicate_delivery_of_an_entry_writes_one_row(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    """A redelivered entry (at-least-once) must not create a second row or a second batch."""
    [rid] = await reserve_many(allocator, 1)
    rk = keys.round("r1")
    entries = await redis.xrange(rk.ledger)
    for _, fields in entries:  # deliver every entry a second time
        await redis.xadd(rk.ledger, fields)
    w = writer(redis, pool, keys, "c1")
    async with asyncio.timeout(10):
        await w.drain()
    assert await rows(pool) == {rid: "confirmed"}
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT count(*) FROM batches") == 1


async def test_status_only_moves_forward_whatever_the_delivery_order(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    """A late 'confirmed' entry arriving after 'cancelled' must not revive the reservation."""
    [rid] = await reserve_many(allocator, 1)
    await allocator.cancel(rid)
    rk = keys.round("r1")
    entries = await redis.xrange(rk.ledger)
    reservation_entries = [f for _, f in entries if f[b"kind"] == b"reservation"]
    assert [orjson.loads(f[b"record"])["status"] for f in reservation_entries] == [
        "confirmed",
        "cancelled",
    ]
    await redis.delete(rk.ledger)
    await create_group(redis, rk.ledger)
    for fields in reversed(reservation_entries):  # cancelled first, then the stale confirmed
        await redis.xadd(rk.ledger, fields)
    w = writer(redis, pool, keys, "c1")
    async with asyncio.timeout(10):
        await w.drain()
    assert await rows(pool) == {rid: "cancelled"}


async def test_writer_killed_between_read_and_commit_loses_nothing(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    """Entries a writer read but never committed are taken over by another writer."""
    ids = await reserve_many(allocator, 20)
    doomed = writer(redis, pool, keys, "doomed")
    reached_commit = asyncio.Event()

    async def die_in_commit(entries: Any, streams: Any) -> None:
        reached_commit.set()
        await asyncio.sleep(3600)  # holds the entries, then is killed

    doomed._commit = die_in_commit  # type: ignore[method-assign]
    task = asyncio.create_task(doomed.run())
    async with asyncio.timeout(5):
        await reached_commit.wait()
    task.cancel()  # the writer dies holding every entry, none acknowledged
    with pytest.raises(asyncio.CancelledError):
        await task
    info = await redis.xpending(keys.round("r1").ledger, GROUP)
    assert info["pending"] == 21  # 20 reservations and the batch, all delivered to "doomed"
    assert await rows(pool) == {}

    heir = writer(redis, pool, keys, "heir", claim_idle_ms=100)
    await asyncio.sleep(0.2)  # the entries idle past claim_idle_ms by Redis's clock (XAUTOCLAIM)
    task = asyncio.create_task(heir.run())
    try:
        async with asyncio.timeout(10):
            while len(await rows(pool)) < 20:
                await asyncio.sleep(0.05)
    finally:
        heir.stop()
        await task
    assert await rows(pool) == dict.fromkeys(ids, "confirmed")
    assert await redis.xlen(keys.round("r1").ledger) == 0


async def test_restarted_writer_commits_its_own_pending_entries_first(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    """The same worker slot, restarted, finishes what it had read before it died."""
    ids = await reserve_many(allocator, 5)
    await redis.xreadgroup(GROUP, "w0", {keys.round("r1").ledger: ">"}, count=100)
    again = writer(redis, pool, keys, "w0", claim_idle_ms=3_600_000)  # no takeover involved
    async with asyncio.timeout(10):
        await again.drain()
    assert await rows(pool) == dict.fromkeys(ids, "confirmed")


async def test_an_entry_postgres_keeps_refusing_goes_to_the_dead_letter_stream(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys, caplog: Any
) -> None:
    """One bad entry must not stop the ledger: it is set aside, logged, and the rest commit."""
    ids = await reserve_many(allocator, 3)
    rk = keys.round("r1")
    bad = orjson.loads((await redis.xrange(rk.ledger))[-1][1][b"record"])
    bad.update(id="bad-entry", qty=0, code="ZZZZZZZZ")  # violates CHECK (quantity >= 1)
    await redis.xadd(rk.ledger, {"kind": "reservation", "record": orjson.dumps(bad)})
    ids += await reserve_many(allocator, 2, start=10)
    w = writer(redis, pool, keys, "c1", max_attempts=3)
    async with asyncio.timeout(10):
        await w.drain()
    assert await rows(pool) == dict.fromkeys(ids, "confirmed")
    dead = await redis.xrange(rk.dead)
    assert len(dead) == 1
    assert orjson.loads(dead[0][1][b"record"])["id"] == "bad-entry"
    assert b"quantity" in dead[0][1][b"error"]
    assert "dead-letter" in caplog.text or "moved to" in caplog.text


def test_entry_statement_rejects_an_unknown_kind() -> None:
    """An entry of a kind the writer does not know is a data fault, not a crash."""
    with pytest.raises(ValueError, match="unknown ledger entry kind"):
        Entry("r1", b"1-0", {b"kind": b"mystery"}).statement()


# -- one statement per batch --------------------------------------------------------------------


async def test_a_batch_with_redeliveries_and_a_cancel_commits_as_one_bulk_insert(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys, caplog: Any
) -> None:
    """A reservation, its cancel and a second delivery of everything in one batch: one
    ``INSERT … SELECT FROM unnest`` may touch each row once only, so the batch is folded first;
    it commits in one go (no one-by-one fallback) with the outcome of the entries in order."""
    ids = await reserve_many(allocator, 3)
    await allocator.cancel(ids[1])
    rk = keys.round("r1")
    for _, fields in await redis.xrange(rk.ledger):
        await redis.xadd(rk.ledger, fields)
    w = writer(redis, pool, keys, "c1")
    async with asyncio.timeout(10):
        await w.drain()
    assert await rows(pool) == {ids[0]: "confirmed", ids[1]: "cancelled", ids[2]: "confirmed"}
    assert w.committed == 2 * 5  # the batch entry, three reservations and a cancel, twice
    assert "one by one" not in caplog.text
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT ledger_seq FROM rounds WHERE round_id = 'r1'") == 5


STATUSES = ("confirmed", "confirmed", "confirmed", "cancelled", "collected", "expired")


async def test_the_bulk_upsert_ends_as_the_same_upserts_one_after_the_other_would(
    pg: asyncpg.Connection,
) -> None:
    """Differential: for random batches (several entries of one reservation, any order, rows
    already there in any state), the folded bulk statement leaves exactly the rows that the
    single-row statement applied entry by entry leaves, in every column."""
    now = dt.datetime.now(dt.UTC)
    await pg.execute(
        "INSERT INTO rounds (round_id, title, opens_at, closes_at, per_person, pickup_start,"
        " pickup_end, spec) VALUES ('r1', 't', $1, $2, 1, $1, $2, '{}')",
        now,
        now + dt.timedelta(hours=1),
    )
    await pg.execute("CREATE TABLE one_by_one (LIKE reservations INCLUDING ALL)")
    one_by_one = UPSERT_RESERVATION.replace("reservations", "one_by_one")
    columns = "reservation_id, round_id, site_id, quantity, status, pickup_code, citizen_hash,"
    columns += " phone_hash, citizen_id_masked, created_at, updated_at, channel, age_band, region"
    rng = random.Random(13)

    def row(rid: int, status: str) -> tuple[Any, ...]:
        updated = now + dt.timedelta(seconds=rng.randrange(3600))
        return (f"id{rid}", "r1", "s1", 1 + rid % 3, status, f"CODE{rid}", f"c{rid}", f"p{rid}",
                "m", now, updated, ("api", "web", "desk")[rid % 3],  # fixed per reservation
                ("18-39", None)[rid % 2], ("110101", None)[rid % 2])  # fmt: skip

    for _ in range(300):
        await pg.execute("TRUNCATE reservations, one_by_one")
        ids = range(rng.randrange(1, 5))
        for rid in ids:
            if rng.random() < 0.5:
                there = row(rid, rng.choice(STATUSES))
                for table in ("reservations", "one_by_one"):
                    values = ", ".join(f"${i}" for i in range(1, 15))
                    insert = f"INSERT INTO {table} ({columns}) VALUES ({values})"  # noqa: S608
                    await pg.execute(insert, *there)
        batch = [row(rng.choice(ids), rng.choice(STATUSES)) for _ in range(rng.randrange(1, 9))]
        async with pg.transaction():
            await pg.execute(UPSERT_RESERVATIONS, *_columns(_fold(batch)))
        for entry in batch:
            await pg.execute(one_by_one, *entry)
        query = f"SELECT {columns} FROM {{}} ORDER BY reservation_id"  # noqa: S608 - constants
        bulk = [tuple(r) for r in await pg.fetch(query.format("reservations"))]
        assert bulk == [tuple(r) for r in await pg.fetch(query.format("one_by_one"))], batch


ENTRY_STATUSES = ("registered", "withdrawn", "won")


async def test_the_bulk_entry_upsert_ends_as_the_same_upserts_one_after_the_other_would(
    pg: asyncpg.Connection,
) -> None:
    """Differential, as for reservations: random batches of lottery-entry changes (several of
    one entry, higher and lower and equal seq, redeliveries, rows already there) leave exactly
    the rows the single-row statement applied change by change leaves, in every column."""
    now = dt.datetime.now(dt.UTC)
    await pg.execute(
        "INSERT INTO rounds (round_id, title, opens_at, closes_at, per_person, pickup_start,"
        " pickup_end, spec) VALUES ('r1', 't', $1, $2, 1, $1, $2, '{}')",
        now,
        now + dt.timedelta(hours=1),
    )
    await pg.execute("CREATE TABLE one_by_one (LIKE entries INCLUDING ALL)")
    one_by_one = UPSERT_ENTRY.replace("INTO entries", "INTO one_by_one").replace(
        "WHERE entries.seq", "WHERE one_by_one.seq"
    )
    assert one_by_one.count("one_by_one") == 2
    columns = "entry_id, round_id, receipt, site_id, accept_district, status, citizen_hash,"
    columns += " phone_hash, citizen_id_masked, reservation_id, seq, created_at, updated_at,"
    columns += " channel, age_band"
    rng = random.Random(17)

    def row(eid: int) -> tuple[Any, ...]:
        status = rng.choice(ENTRY_STATUSES)
        return (f"e{eid}", "r1", f"{eid:064x}", rng.choice(("s1", "s2", "s3")),
                rng.random() < 0.5, status, f"c{eid}", f"p{eid}", "m",
                f"res{eid}" if status == "won" else None, rng.randrange(0, 6),
                now + dt.timedelta(seconds=rng.randrange(60)),  # differs change by change:
                now + dt.timedelta(seconds=rng.randrange(3600)),  # only the first insert counts
                rng.choice(("api", "web", "desk")), rng.choice(("18-39", None)))  # fmt: skip

    for _ in range(300):
        await pg.execute("TRUNCATE entries, one_by_one")
        ids = range(rng.randrange(1, 5))
        for eid in ids:
            if rng.random() < 0.5:
                there = row(eid)
                for table in ("entries", "one_by_one"):
                    values = ", ".join(f"${i}" for i in range(1, 16))
                    insert = f"INSERT INTO {table} ({columns}) VALUES ({values})"  # noqa: S608
                    await pg.execute(insert, *there)
        batch = [row(rng.choice(ids)) for _ in range(rng.randrange(1, 9))]
        async with pg.transaction():
            await pg.execute(UPSERT_ENTRIES, *_columns(_fold_entries(batch)))
        for change in batch:
            await pg.execute(one_by_one, *change)
        query = f"SELECT {columns} FROM {{}} ORDER BY entry_id"  # noqa: S608 - constants
        bulk = [tuple(r) for r in await pg.fetch(query.format("entries"))]
        assert bulk == [tuple(r) for r in await pg.fetch(query.format("one_by_one"))], batch


async def test_a_trickle_of_entries_is_gathered_into_one_batch_by_the_linger(
    allocator: Allocator, redis: Redis, pool: asyncpg.Pool, keys: Keys
) -> None:
    """After a batch smaller than batch_size the writer waits linger_ms before reading again:
    entries that trickle in meanwhile are committed together, not one commit each."""
    w = writer(redis, pool, keys, "c1", linger_ms=1000)
    task = asyncio.create_task(w.run())
    try:
        async with asyncio.timeout(10):
            while w.committed < 1:  # the seed batch's entry: the linger starts now
                await asyncio.sleep(0.005)
        assert w.last_batch == 1
        for n in range(8):  # one at a time, each one would wake a writer blocked in its read
            await reserve_many(allocator, 1, start=n)
            await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            while w.committed < 9:
                await asyncio.sleep(0.01)
    finally:
        w.stop()
        await task
    assert w.last_batch == 8
    assert len(await rows(pool)) == 8
