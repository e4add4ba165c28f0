"""The end of a reservation's life: expiry recorded after pickup_end, and carry-over of leftovers.

Real Redis and PostgreSQL. A round is moved past its pickup window by an operator's PUT (the
window may be set in the past), so no test waits for a clock; the scripts decide by Redis TIME.
Every answer of the app is checked against the served OpenAPI document.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import LedgerSettings, Settings
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.ledger import LedgerWriter
from allocator.rebuild import rebuild_round
from allocator.reconcile import reconcile
from allocator.redistyping import awaited
from service.app import create_app
from service.appkeys import ALLOCATOR, PG_POOL
from tests.helpers import ADMIN, citizen_id, claim_once, phone, reserve, round_body, seed

Client = TestClient[Any, Any]


@pytest.fixture
async def app(settings: Settings, redis: Redis, checked_client: Any) -> Client:
    """The real app with a fast expiry sweep (every 0.1 s instead of 10 s)."""
    fast = replace(settings, service=replace(settings.service, expiry_sweep_ms=100))
    client: Client = await checked_client(create_app(fast))
    return client


async def end_pickup(client: Client, round_id: str = "r1", per_person: int = 1) -> None:
    """The operator moves the round's windows into the past: pickup ended a minute ago."""
    body = round_body(
        opens_in=-7200, closes_in=-120, pickup_in=-7200, pickup_for=7140, per_person=per_person
    )
    r = await client.put(f"/api/v1/admin/rounds/{round_id}", json=body, headers=ADMIN)
    assert r.status == 200, await r.text()


async def stats(client: Client, round_id: str = "r1") -> dict[str, Any]:
    r = await client.get(f"/api/v1/admin/rounds/{round_id}/stats", headers=ADMIN)
    assert r.status == 200, await r.text()
    body: dict[str, Any] = await r.json()
    return body


async def figures(client: Client, round_id: str = "r1") -> dict[str, Any]:
    """The stats without the ledger's progress (its writer runs meanwhile): the units."""
    return {k: v for k, v in (await stats(client, round_id)).items() if k != "ledger"}


def balanced(s: dict[str, Any]) -> None:
    """At every site, and in total: loaded = remaining + reserved + collected + expired +
    carried_out."""
    parts = ("remaining", "reserved", "collected", "expired", "carried_out")
    for site in [s, *s["sites"]]:
        assert site["loaded"] == sum(site[p] for p in parts), site


async def records(redis: Redis, keys: Keys, round_id: str = "r1") -> dict[str, str]:
    raw = await awaited(redis.hgetall(keys.round(round_id).reservations))
    return {k.decode(): orjson.loads(v)["status"] for k, v in raw.items()}


async def ledger_rows(database_url: str, query: str, *args: Any, want: Any) -> Any:
    """Poll the ledger until ``want(rows)`` holds (the writer runs in the app)."""
    con = await asyncpg.connect(database_url)
    try:
        async with asyncio.timeout(15):
            while True:
                rows = await con.fetch(query, *args)
                if want(rows):
                    return rows
                await asyncio.sleep(0.05)
    finally:
        await con.close()


async def until(check: Any, within: float = 15) -> Any:
    async with asyncio.timeout(within):
        while True:
            got = await check()
            if got:
                return got
            await asyncio.sleep(0.05)


async def carry(client: Client, round_id: str, batch_id: str, carry_from: str) -> Any:
    return await client.post(
        f"/api/v1/admin/rounds/{round_id}/batches",
        json={"batch_id": batch_id, "carry_from": carry_from},
        headers=ADMIN,
    )


# -- expiry -----------------------------------------------------------------------------------


async def test_an_uncollected_reservation_is_recorded_expired_after_pickup_end(
    app: Client, redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Units nobody collected must stop counting as reserved, in Redis and in the ledger."""
    await seed(app, stock={"s1": 6, "s2": 4}, per_person=2)
    kept = await (await reserve(app, 1, "s1")).json()
    taken = await (await reserve(app, 2, "s1")).json()
    dropped = await (await reserve(app, 3, "s2")).json()
    other = await (await reserve(app, 4, "s2")).json()
    r = await app.post(
        "/api/v1/admin/pickups",
        json={"site_id": "s1", "pickup_code": taken["pickup_code"]},
        headers=ADMIN,
    )
    assert r.status == 200
    assert (await app.delete(f"/api/v1/reservations/{dropped['reservation_id']}")).status == 200
    assert (await stats(app))["expired"] == 0

    await end_pickup(app, per_person=2)

    async def swept() -> bool:
        s = await stats(app)
        return bool(s["expired"] == 4)

    await until(swept)
    assert await records(redis, keys) == {
        kept["reservation_id"]: "expired",
        taken["reservation_id"]: "collected",
        dropped["reservation_id"]: "cancelled",
        other["reservation_id"]: "expired",
    }
    s = await stats(app)
    balanced(s)
    assert (s["loaded"], s["reserved"], s["collected"], s["expired"], s["remaining"]) == (
        10,
        0,
        2,
        4,
        4,
    )
    assert s["sites"] == [
        {
            "site_id": "s1",
            "loaded": 6,
            "reserved": 0,
            "collected": 2,
            "expired": 2,
            "carried_out": 0,
            "remaining": 2,
        },
        {
            "site_id": "s2",
            "loaded": 4,
            "reserved": 0,
            "collected": 0,
            "expired": 2,
            "carried_out": 0,
            "remaining": 2,
        },
    ]
    assert s["reservations"] == 3  # an expired reservation is still its citizen's share

    rows = await ledger_rows(
        settings.database_url,
        "SELECT reservation_id, status FROM reservations WHERE round_id = 'r1'",
        want=lambda rows: sum(r["status"] == "expired" for r in rows) == 2,
    )
    assert dict(rows)[kept["reservation_id"]] == "expired"

    # the citizen sees it; the counter and the cancel button refuse it, from the stored status
    got = await (await app.get(f"/api/v1/reservations/{kept['reservation_id']}")).json()
    assert got["status"] == "expired"
    r = await app.post(
        "/api/v1/admin/pickups",
        json={"site_id": "s1", "pickup_code": kept["pickup_code"]},
        headers=ADMIN,
    )
    assert r.status == 409
    problem = await r.json()
    assert (problem["code"], problem["reason"]) == ("not-collectable", "expired")
    r = await app.delete(f"/api/v1/reservations/{kept['reservation_id']}")
    assert r.status == 409
    assert (await r.json())["code"] == "not-collectable"
    assert (await stats(app))["expired"] == 4  # the refusals changed nothing

    con = await asyncpg.connect(settings.database_url)
    try:
        report = await reconcile(redis, con, keys, ["r1"], wait=10)
    finally:
        await con.close()
    assert report["ok"], report


async def test_expiry_waits_for_the_end_of_the_pickup_window(
    redis: Redis, keys: Keys, app: Client
) -> None:
    """A sweep before pickup_end changes nothing: a reservation can still be collected."""
    await seed(app, stock={"s1": 3})
    made = await (await reserve(app, 1)).json()
    allocator: Allocator = app.app[ALLOCATOR]
    assert (await allocator.expiry.sweep_round("r1")).status == "not-yet"
    assert await allocator.expiry.sweep() == []  # by the worker's clock, not yet either
    assert await records(redis, keys) == {made["reservation_id"]: "confirmed"}
    assert (await stats(app))["reserved"] == 1
    r = await app.post(
        "/api/v1/admin/pickups",
        json={"site_id": "s1", "pickup_code": made["pickup_code"]},
        headers=ADMIN,
    )
    assert r.status == 200
    assert (await r.json())["status"] == "collected"


@pytest.mark.parametrize("locked", [True, False])
async def test_two_sweepers_racing_expire_each_reservation_exactly_once(
    redis: Redis, keys: Keys, settings: Settings, locked: bool
) -> None:
    """Several workers (or nodes) sweep at once: every reservation moves once, its units once,
    and one ledger entry each; with the lock, one runner works the round at a time."""
    a = Allocator(redis, None, keys, Hasher(b"p"), gate=settings.gate)
    b = Allocator(redis, None, keys, Hasher(b"p"), gate=settings.gate)
    for worker in (a, b):
        worker.expiry.chunk = 1  # one HSCAN step per call: the runners' calls interleave
    await seed_allocator(a, units=60)
    made = [await claim_once(a, "r1", "s1", citizen_id(n), phone(n)) for n in range(50)]
    assert all(created for _, created in made)
    rk = keys.round("r1")
    seq_before = int((await awaited(redis.hgetall(rk.tally)))[b"seq"])
    entries_before = await redis.xlen(rk.ledger)
    await end_pickup_allocator(a)

    results = await asyncio.gather(
        *(w.expiry.sweep_round("r1", locked=locked) for w in (a, b, a, b))
    )
    assert sum(r.expired for r in results) == 50
    if locked:
        assert sorted(r.status for r in results).count("busy") >= 1
    tally = await awaited(redis.hgetall(rk.tally))
    assert (int(tally[b"reserved:s1"]), int(tally[b"expired:s1"])) == (0, 50)
    assert int(tally[b"seq"]) == seq_before + 50
    assert await redis.xlen(rk.ledger) == entries_before + 50
    assert set((await records(redis, keys)).values()) == {"expired"}
    # a later pass finds nothing more to do; a finished locked sweep marks the round done
    later = await a.expiry.sweep_round("r1")
    assert (later.status, later.expired) == ("done" if locked else "swept", 0)
    assert (await b.expiry.sweep_round("r1")).status == "done"
    assert int((await awaited(redis.hgetall(rk.tally)))[b"seq"]) == seq_before + 50


async def seed_allocator(allocator: Allocator, round_id: str = "r1", units: int = 10) -> None:
    from allocator.model import Site
    from service.validation import parse_round

    await allocator.mirror_sites([Site("s1", "One", "Road 1", "d1")])
    await allocator.mirror_round(parse_round(round_id, round_body()))
    await allocator.load_batch(round_id, f"seed-{round_id}", [("s1", units)])


async def end_pickup_allocator(allocator: Allocator, round_id: str = "r1") -> None:
    from service.validation import parse_round

    body = round_body(opens_in=-7200, closes_in=-120, pickup_in=-7200, pickup_for=7140)
    await allocator.mirror_round(parse_round(round_id, body))


# -- carry-over -------------------------------------------------------------------------------


async def two_rounds(client: Client) -> dict[int, dict[str, Any]]:
    """r1 with reservations (one collected, one cancelled, two left uncollected), whose pickup
    window has then ended; r2, a later round at the same sites."""
    await seed(client, stock={"s1": 6, "s2": 4}, per_person=2)
    made = {n: await (await reserve(client, n, "s1" if n < 3 else "s2")).json() for n in range(5)}
    r = await client.post(
        "/api/v1/admin/pickups",
        json={"site_id": "s1", "pickup_code": made[0]["pickup_code"]},
        headers=ADMIN,
    )
    assert r.status == 200
    assert (await client.delete(f"/api/v1/reservations/{made[1]['reservation_id']}")).status == 200
    await seed(client, "r2", stock={"s1": 0, "s2": 0}, per_person=1)
    return made


async def test_a_carry_before_pickup_end_is_refused_and_changes_nothing(app: Client) -> None:
    """Leftovers may only move once nobody can still collect them."""
    await two_rounds(app)
    before = (await figures(app, "r1"), await figures(app, "r2"))
    r = await carry(app, "r2", "carry-1", "r1")
    assert r.status == 409
    problem = await r.json()
    assert problem["code"] == "carry-not-ready"
    assert "pickup window" in problem["detail"]
    assert (await figures(app, "r1"), await figures(app, "r2")) == before


async def test_a_carry_from_an_unknown_or_the_same_round_is_refused(app: Client) -> None:
    """404 for a round nobody has; 422 for a carry into itself or with items too."""
    await two_rounds(app)
    before = (await figures(app, "r1"), await figures(app, "r2"))
    r = await carry(app, "r2", "carry-1", "nope")
    assert r.status == 404
    assert (await r.json())["code"] == "not-found"
    r = await carry(app, "r1", "carry-1", "r1")
    assert r.status == 422
    assert [e["field"] for e in (await r.json())["errors"]] == ["carry_from"]
    r = await app.post(
        "/api/v1/admin/rounds/r2/batches",
        json={"batch_id": "c", "carry_from": "r1", "items": [{"site_id": "s1", "quantity": 1}]},
        headers=ADMIN,
    )
    assert r.status == 422
    assert [e["field"] for e in (await r.json())["errors"]] == ["items"]
    r = await carry(app, "r2", "carry-1", "Bad Id")
    assert r.status == 422
    assert (await figures(app, "r1"), await figures(app, "r2")) == before


async def test_a_carry_moves_the_unclaimed_units_once_and_a_replay_answers_the_same(
    app: Client, redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Remaining and expired units go to the same sites of the later round, exactly once;
    the still-confirmed reservations are expired first, so nobody's units are taken."""
    made = await two_rounds(app)
    await end_pickup(app, per_person=2)
    allocator: Allocator = app.app[ALLOCATOR]
    allocator.expiry.chunk = 1  # whatever the sweep has done so far, the carry finishes it

    r = await carry(app, "r2", "carry-1", "r1")
    assert r.status == 201, await r.text()
    first = await r.json()
    # s1: 6 loaded, 2 collected, 2 cancelled (back in stock): 2 remaining + 2 expired;
    # s2: 4 loaded, 4 expired (two reservations of 2), nothing remaining
    assert first == {"batch_id": "carry-1", "units_added": 8, "sites": 2, "carried_from": "r1"}
    s1 = await stats(app, "r1")
    balanced(s1)
    assert (s1["remaining"], s1["reserved"], s1["collected"], s1["expired"]) == (0, 0, 2, 0)
    assert s1["carried_out"] == 8
    assert [(s["site_id"], s["carried_out"]) for s in s1["sites"]] == [("s1", 4), ("s2", 4)]
    s2 = await stats(app, "r2")
    balanced(s2)
    assert [(s["site_id"], s["loaded"], s["remaining"]) for s in s2["sites"]] == [
        ("s1", 4, 4),
        ("s2", 4, 4),
    ]
    statuses = await records(redis, keys)
    assert statuses[made[2]["reservation_id"]] == "expired"
    assert statuses[made[0]["reservation_id"]] == "collected"

    again = await carry(app, "r2", "carry-1", "r1")
    assert again.status == 200
    assert await again.json() == first
    assert await figures(app, "r1") == {k: v for k, v in s1.items() if k != "ledger"}
    assert (await stats(app, "r2"))["loaded"] == 8

    second = await carry(app, "r2", "carry-2", "r1")
    assert second.status == 201
    assert await second.json() == {
        "batch_id": "carry-2",
        "units_added": 0,
        "sites": 0,
        "carried_from": "r1",
    }
    assert (await stats(app, "r2"))["loaded"] == 8

    rows = await ledger_rows(
        settings.database_url,
        "SELECT to_round, batch_id, units, parts FROM carries WHERE from_round = 'r1'"
        " ORDER BY batch_id",
        want=lambda rows: len(rows) == 2,
    )
    assert [(r["to_round"], r["batch_id"], r["units"]) for r in rows] == [
        ("r2", "carry-1", 8),
        ("r2", "carry-2", 0),
    ]
    assert orjson.loads(rows[0]["parts"]) == [["s1", 2, 2], ["s2", 0, 4]]
    con = await asyncpg.connect(settings.database_url)
    try:
        report = await reconcile(redis, con, keys, ["r1", "r2"], wait=10)
    finally:
        await con.close()
    assert report["ok"], report


async def test_a_carry_under_a_batch_id_taken_by_other_contents_conflicts_and_moves_nothing(
    app: Client,
) -> None:
    """A batch_id already loaded into the later round must not swallow carried units."""
    await two_rounds(app)
    await end_pickup(app, per_person=2)
    r = await app.post(
        "/api/v1/admin/rounds/r2/batches",
        json={"batch_id": "taken", "items": [{"site_id": "s1", "quantity": 3}]},
        headers=ADMIN,
    )
    assert r.status == 201
    before = await stats(app, "r1")
    r = await carry(app, "r2", "taken", "r1")
    assert r.status == 409
    assert (await r.json())["code"] == "batch-conflict"
    after = await stats(app, "r1")
    assert (after["carried_out"], after["remaining"]) == (0, before["remaining"])


async def test_a_crash_between_the_two_steps_is_flagged_and_healed_by_the_replay(
    app: Client, redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Step (a) done, step (b) never: reconcile names the carry; the same request loads it."""
    await two_rounds(app)
    await end_pickup(app, per_person=2)
    allocator: Allocator = app.app[ALLOCATOR]
    await allocator.expiry.sweep_round("r1", locked=False)
    status, _ = await allocator.carryover._take("r1", "r2", "carry-1")  # step (a) only
    assert status == "carried"
    assert (await stats(app, "r1"))["carried_out"] == 8
    assert (await stats(app, "r2"))["loaded"] == 0

    con = await asyncpg.connect(settings.database_url)
    try:
        report = await reconcile(redis, con, keys, ["r1"], wait=10)
        assert not report["ok"]
        [rnd] = report["rounds"]
        assert rnd["carries"] == [
            {
                "to_round": "r2",
                "batch_id": "carry-1",
                "units": 8,
                "loaded_into_later_round": (
                    "never loaded them (interrupted between the two steps?)"
                ),
            }
        ]
        assert any("carry-over 'carry-1'" in p for p in rnd["problems"]), rnd["problems"]

        r = await carry(app, "r2", "carry-1", "r1")
        assert r.status == 201, await r.text()
        assert await r.json() == {
            "batch_id": "carry-1",
            "units_added": 8,
            "sites": 2,
            "carried_from": "r1",
        }
        assert (await stats(app, "r2"))["loaded"] == 8
        assert (await stats(app, "r1"))["carried_out"] == 8
        report = await reconcile(redis, con, keys, ["r1", "r2"], wait=10)
        assert report["ok"], report
    finally:
        await con.close()


async def test_rebuild_restores_expired_and_carried_out_from_the_ledger(
    app: Client, redis: Redis, keys: Keys, settings: Settings
) -> None:
    """After Redis loses both rounds, the ledger brings back every figure, record and carry."""
    made = await two_rounds(app)
    await end_pickup(app, per_person=2)
    assert (await carry(app, "r2", "carry-1", "r1")).status == 201
    before = {r: await stats(app, r) for r in ("r1", "r2")}
    statuses = {r: await records(redis, keys, r) for r in ("r1", "r2")}
    rk = keys.round("r1")
    carries_before = await awaited(redis.hgetall(rk.carries))
    con = await asyncpg.connect(settings.database_url)
    try:
        writer = LedgerWriter(redis, app.app[PG_POOL], keys, LedgerSettings(), consumer="t")
        async with asyncio.timeout(10):
            await writer.drain()
        for round_id in ("r1", "r2"):
            doomed = [k async for k in redis.scan_iter(match=f"{keys.prefix}:{{r:{round_id}}}*")]
            await redis.delete(*doomed)
        for round_id in ("r1", "r2"):
            await rebuild_round(redis, con, keys, round_id)
        app.app[ALLOCATOR].catalogue.forget_round("r1")
        app.app[ALLOCATOR].catalogue.forget_round("r2")
        for round_id in ("r1", "r2"):
            after = await stats(app, round_id)
            assert {k: v for k, v in after.items() if k != "ledger"} == {
                k: v for k, v in before[round_id].items() if k != "ledger"
            }
            assert await records(redis, keys, round_id) == statuses[round_id]
        restored = await awaited(redis.hgetall(rk.carries))
        assert {k: carry_view(v) for k, v in restored.items()} == {
            k: carry_view(v) for k, v in carries_before.items()
        }
        # a replay after the rebuild still answers the first answer and moves nothing
        again = await carry(app, "r2", "carry-1", "r1")
        assert again.status == 200
        assert (await again.json())["units_added"] == 8
        assert (await stats(app, "r2"))["loaded"] == 8
        # the expired reservation stays expired and its holder holds: no second share
        r = await app.delete(f"/api/v1/reservations/{made[2]['reservation_id']}")
        assert r.status == 409
        report = await reconcile(redis, con, keys, ["r1", "r2"], wait=10)
        assert report["ok"], report
    finally:
        await con.close()


def carry_view(raw: bytes) -> dict[str, Any]:
    record: dict[str, Any] = orjson.loads(raw)
    return {**record, "items": record["items"] or [], "parts": record["parts"] or []}
