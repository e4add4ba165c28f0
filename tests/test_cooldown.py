"""Programmes and cooldown (API.md "Entitlement"): the round fields, the bar across the rounds of
a programme (atomic under concurrency, one slot), its end, cancel, rebuild and reconcile.

Every answer here is also checked against the served OpenAPI document (``checked_client``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from typing import Any, cast

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.keys import Keys
from allocator.rebuild import needs_rebuild, rebuild_round
from allocator.reconcile import reconcile
from allocator.redistyping import awaited
from service.app import create_app
from tests.helpers import (
    ADMIN,
    FakeClock,
    citizen_id,
    phone,
    redis_state,
    reserve,
    round_body,
    seed,
)

Client = TestClient[Any, Any]
DAY = dt.timedelta(days=1)


@pytest.fixture
async def client(settings: Settings, redis: Redis, checked_client: Any) -> Client:
    return cast(Client, await checked_client(create_app(settings)))


async def problem(r: Any, status: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = await r.json(content_type=None)
    assert r.status == status, body
    assert r.content_type == "application/problem+json"
    assert body["code"] == code, body
    return body


async def put_round(client: Client, round_id: str, **members: Any) -> Any:
    return await client.put(
        f"/api/v1/admin/rounds/{round_id}", json=round_body(**members), headers=ADMIN
    )


async def snapshot(redis: Redis, prefix: str) -> dict[bytes, object]:
    """Every key under the test's prefix (tests/helpers.py): equal means nothing changed."""
    return await redis_state(redis, prefix)


async def drained(redis: Redis, keys: Keys, *round_keys: Any) -> None:
    """Until the ledger writer has taken every entry of these rounds' streams."""
    async with asyncio.timeout(10):
        while any([await redis.xlen(rk.ledger) for rk in round_keys]):
            await asyncio.sleep(0.05)


async def hget(redis: Redis, key: str, field: str) -> bytes | None:
    """HGET as this client returns it (bytes; redis-py types it as str)."""
    return cast(bytes | None, await awaited(redis.hget(key, field)))


def rfc3339(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# -- the round fields ----------------------------------------------------------------------


async def test_round_fields_are_stored_shown_and_keep_keys_under_the_programme_tag(
    client: Client, redis: Redis, keys: Keys, settings: Settings
) -> None:
    """The Round shows programme, cooldown and eligibility; its keys share the programme's slot."""
    eligibility = {"birth_year_last_digit": [3, 1], "min_age": 18, "regions": ["11", "4401"]}
    r = await put_round(
        client,
        "a",
        programme="masks",
        cooldown_days=7,
        eligibility=eligibility,
        loss_weighting=True,
    )
    assert r.status == 201, await r.text()
    body = await r.json()
    assert body["programme"] == "masks"
    assert body["cooldown_days"] == 7
    assert body["eligibility"] == {
        "birth_year_last_digit": [1, 3],
        "min_age": 18,
        "regions": ["11", "4401"],
    }
    assert body["draw"] is None
    assert await (await client.get("/api/v1/rounds/a")).json() == body
    plain = await put_round(client, "plain")
    plain_body = await plain.json()
    assert (plain_body["programme"], plain_body["cooldown_days"], plain_body["eligibility"]) == (
        None,
        0,
        None,
    )

    assert await hget(redis, keys.round_tags, "a") == b"p:masks"
    assert await redis.exists(keys.round("a", "p:masks").round)
    assert not await redis.exists(keys.round("a").round)
    assert keys.round("a", "p:masks").round == f"{keys.prefix}:{{p:masks}}:r:a:round"
    assert keys.round("a", "p:masks").entitled == f"{keys.prefix}:{{p:masks}}:entitled"
    assert await redis.exists(keys.round("plain").round)

    con = await asyncpg.connect(settings.database_url)
    try:
        row = await con.fetchrow(
            "SELECT programme, cooldown_days, key_tag FROM rounds WHERE round_id = 'a'"
        )
    finally:
        await con.close()
    assert row is not None
    assert dict(row) == {"programme": "masks", "cooldown_days": 7, "key_tag": "p:masks"}


BAD_FIELDS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "unknown eligibility member": ({"eligibility": {"colour": "red"}}, ["eligibility.colour"]),
    "digit outside 0-9": (
        {"eligibility": {"birth_year_last_digit": [1, 10]}},
        ["eligibility.birth_year_last_digit[1]"],
    ),
    "empty age range": ({"eligibility": {"min_age": 30, "max_age": 20}}, ["eligibility"]),
    "region not 2, 4 or 6 digits": (
        {"eligibility": {"regions": ["441"]}},
        ["eligibility.regions[0]"],
    ),
    "eligibility not an object": ({"eligibility": [1]}, ["eligibility"]),
    "negative cooldown": ({"cooldown_days": -1}, ["cooldown_days"]),
    "cooldown over a year": ({"cooldown_days": 366}, ["cooldown_days"]),
    "cooldown not whole": ({"cooldown_days": 1.5}, ["cooldown_days"]),
    "programme with capitals": ({"programme": "Masks"}, ["programme"]),
    "programme empty": ({"programme": ""}, ["programme"]),
    "loss_weighting not a boolean": ({"loss_weighting": "yes"}, ["loss_weighting"]),
    "several at once": (
        {"programme": "a b", "cooldown_days": -3, "eligibility": {"max_age": 151}},
        ["programme", "cooldown_days", "eligibility.max_age"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
async def test_bad_entitlement_fields_are_422_naming_each_and_change_nothing(
    case: str, client: Client, redis: Redis, keys: Keys
) -> None:
    members, fields = BAD_FIELDS[case]
    r = await put_round(client, "a", **members)
    body = await problem(r, 422, "invalid-request")
    assert sorted(e["field"] for e in body["errors"]) == sorted(fields)
    await problem(await client.get("/api/v1/rounds/a"), 404, "not-found")
    assert await snapshot(redis, keys.prefix) == {}


async def test_fixed_fields_of_an_opened_round_are_422_and_nothing_changes(
    client: Client, redis: Redis, keys: Keys
) -> None:
    """Changing who may take part, or the programme, after opening would rewrite the rules
    mid-way for citizens who already played by them."""
    rules = {"regions": ["11", "44"], "max_age": 90}
    await seed(client, "a", stock={"s1": 5}, programme="masks", eligibility=rules)
    await drained(redis, keys, keys.round("a", "p:masks"))
    before = await snapshot(redis, keys.prefix)
    shown = await (await client.get("/api/v1/rounds/a")).json()

    for members, fields in (
        ({"programme": "gloves", "eligibility": rules}, ["programme"]),
        ({"programme": None, "eligibility": rules}, ["programme"]),
        ({"programme": "masks", "eligibility": {"regions": ["11"]}}, ["eligibility"]),
        ({"programme": "masks", "eligibility": None}, ["eligibility"]),
        (
            {"programme": "masks", "eligibility": rules, "loss_weighting": True},
            ["loss_weighting"],
        ),
        ({"programme": "other", "eligibility": {}}, ["programme", "eligibility"]),
    ):
        body = await problem(await put_round(client, "a", **members), 422, "invalid-request")
        assert sorted(e["field"] for e in body["errors"]) == sorted(fields), members
        assert await snapshot(redis, keys.prefix) == before
        assert await (await client.get("/api/v1/rounds/a")).json() == shown

    # the same rules listed in another order are not a change; title and cooldown may change
    same = {"max_age": 90, "regions": ["44", "11"]}
    r = await put_round(
        client, "a", programme="masks", eligibility=same, cooldown_days=3, title="Masks II"
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["cooldown_days"] == 3


async def test_the_programme_of_an_empty_upcoming_round_moves_and_its_keys_follow(
    client: Client, redis: Redis, keys: Keys
) -> None:
    """Before opening and before any batch, the round's definition moves to the new tag;
    after a batch its keys stay where they are (422 naming programme, nothing changed)."""
    r = await put_round(client, "a", opens_in=3600, closes_in=7200, pickup_in=3600)
    assert r.status == 201
    assert await redis.exists(keys.round("a").round)
    r = await put_round(
        client, "a", opens_in=3600, closes_in=7200, pickup_in=3600, programme="masks"
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["programme"] == "masks"
    assert not await redis.exists(keys.round("a").round)
    assert await redis.exists(keys.round("a", "p:masks").round)
    assert await hget(redis, keys.round_tags, "a") == b"p:masks"

    sites = {"sites": [{"site_id": "s1", "name": "S", "address": "A", "district": "d"}]}
    assert (await client.put("/api/v1/admin/sites", json=sites, headers=ADMIN)).status == 200
    batch = {"batch_id": "b1", "items": [{"site_id": "s1", "quantity": 4}]}
    r = await client.post("/api/v1/admin/rounds/a/batches", json=batch, headers=ADMIN)
    assert r.status == 201, await r.text()
    assert await hget(redis, keys.round("a", "p:masks").stock, "s1") == b"4"
    stats = await (await client.get("/api/v1/admin/rounds/a/stats", headers=ADMIN)).json()
    assert stats["loaded"] == 4

    await drained(redis, keys, keys.round("a", "p:masks"))
    before = await snapshot(redis, keys.prefix)
    for programme in ("gloves", None):
        r = await put_round(
            client, "a", opens_in=3600, closes_in=7200, pickup_in=3600, programme=programme
        )
        body = await problem(r, 422, "invalid-request")
        assert [e["field"] for e in body["errors"]] == ["programme"]
        assert "batch" in body["errors"][0]["message"]
        assert await snapshot(redis, keys.prefix) == before
    assert (await (await client.get("/api/v1/rounds/a")).json())["programme"] == "masks"


async def test_a_programme_round_made_on_another_worker_is_found_within_a_tenth_of_a_second(
    client: Client, settings: Settings, aiohttp_client: Any
) -> None:
    """A worker whose snapshot of the round -> tag mapping predates a round looks it up afresh
    (at most every 0.1 s on its own clock), not only when the 1 s snapshot expires."""
    clock = FakeClock()
    other: Client = await aiohttp_client(create_app(settings, monotonic=clock))
    await problem(await other.get("/api/v1/rounds/nothing"), 404, "not-found")  # snapshot taken
    await seed(client, "a", stock={"s1": 5}, programme="masks", cooldown_days=7)
    clock.advance(0.1)  # still far inside the snapshot's 1 s, past the 0.1 s between look-ups
    made = await reserve(other, 1, round_id="a")
    assert made.status == 201, await made.text()
    assert (await reserve(client, 1, round_id="a")).status == 200  # the same one, worker A


# -- the cooldown ----------------------------------------------------------------------------


async def test_a_reservation_bars_the_other_rounds_of_its_programme_until_its_cooldown_ends(
    client: Client, redis: Redis, keys: Keys
) -> None:
    """409 in-cooldown with until = created_at + that round's cooldown_days, before any unit."""
    await seed(client, "a", stock={"s1": 5}, programme="masks", cooldown_days=7)
    await seed(client, "b", stock={"s1": 5}, programme="masks", cooldown_days=2)
    made = await reserve(client, 1, round_id="a")
    assert made.status == 201
    created = rfc3339((await made.json())["created_at"])

    barred = await reserve(client, 1, round_id="b")
    body = await problem(barred, 409, "in-cooldown")
    until = rfc3339(body["until"])
    assert until == created + 7 * DAY  # round a's cooldown, to the millisecond
    assert until.utcoffset() == dt.timedelta(hours=8)  # in the offset the operator used
    assert "masks" in body["detail"]
    stats = await (await client.get("/api/v1/admin/rounds/b/stats", headers=ADMIN)).json()
    assert (stats["remaining"], stats["reservations"]) == (5, 0)

    # the round the bar comes from still answers its own retry with the same reservation
    again = await reserve(client, 1, round_id="a")
    assert again.status == 200
    # the bar is the citizen's, not the phone's or the site's: same ID, other phone, barred
    other_phone = await client.post(
        "/api/v1/rounds/b/reservations",
        json={"citizen_id": citizen_id(1), "phone": phone(99), "site_id": "s1"},
    )
    await problem(other_phone, 409, "in-cooldown")
    # other citizens are not barred
    assert (await reserve(client, 2, round_id="b")).status == 201
    # and a reservation in b bars a for b's cooldown
    barred_back = await problem(await reserve(client, 2, round_id="a"), 409, "in-cooldown")
    made_b = await (await reserve(client, 2, round_id="b")).json()
    assert rfc3339(barred_back["until"]) == rfc3339(made_b["created_at"]) + 2 * DAY


async def test_rounds_of_other_programmes_or_of_none_do_not_bar_each_other(
    client: Client,
) -> None:
    await seed(client, "a", stock={"s1": 5}, programme="masks", cooldown_days=7)
    await seed(client, "g", stock={"s1": 5}, programme="gloves", cooldown_days=7)
    await seed(client, "free", stock={"s1": 5})
    await seed(client, "free2", stock={"s1": 5}, cooldown_days=7)  # a cooldown, no programme
    for round_id in ("a", "g", "free", "free2"):
        r = await reserve(client, 1, round_id=round_id)
        assert r.status == 201, (round_id, await r.text())


async def test_cancelling_lifts_the_cooldown(client: Client, redis: Redis, keys: Keys) -> None:
    """A cancelled reservation bars nobody; the next reservation sets its own bar."""
    await seed(client, "a", stock={"s1": 5}, programme="masks", cooldown_days=7)
    await seed(client, "b", stock={"s1": 5}, programme="masks", cooldown_days=7)
    made = await reserve(client, 1, round_id="a")
    await problem(await reserve(client, 1, round_id="b"), 409, "in-cooldown")
    assert (await client.delete(made.headers["Location"])).status == 200
    assert await awaited(redis.hlen(keys.round("a", "p:masks").entitled)) == 0
    moved = await reserve(client, 1, round_id="b")
    assert moved.status == 201, await moved.text()
    # the cancelled round is barred now by the reservation in b
    await problem(await reserve(client, 1, round_id="a"), 409, "in-cooldown")
    # cancelling the cancelled one again lifts nothing of b's bar
    assert (await client.delete(made.headers["Location"])).status == 200
    await problem(await reserve(client, 1, round_id="a"), 409, "in-cooldown")


async def test_a_collected_reservation_still_bars(client: Client) -> None:
    """Unless cancelled: a share handed over is the share the cooldown is about."""
    await seed(client, "a", stock={"s1": 5}, programme="masks", cooldown_days=7)
    await seed(client, "b", stock={"s1": 5}, programme="masks", cooldown_days=7)
    made = await (await reserve(client, 1, round_id="a")).json()
    r = await client.post(
        "/api/v1/admin/pickups",
        json={"site_id": "s1", "pickup_code": made["pickup_code"], "round_id": "a"},
        headers=ADMIN,
    )
    assert r.status == 200, await r.text()
    await problem(await reserve(client, 1, round_id="b"), 409, "in-cooldown")


async def test_a_bar_whose_until_has_passed_bars_nobody(
    client: Client, redis: Redis, keys: Keys
) -> None:
    """The script compares until with Redis TIME: written in the past, it lets the citizen in;
    written in the future, it is exactly what the refusal says."""
    await seed(client, "a", stock={"s1": 5}, programme="masks", cooldown_days=0)
    await seed(client, "b", stock={"s1": 5}, programme="masks", cooldown_days=7)
    await seed(client, "c", stock={"s1": 5}, programme="masks", cooldown_days=7)
    # cooldown_days = 0 bars nothing afterwards
    assert (await reserve(client, 1, round_id="a")).status == 201
    assert (await reserve(client, 1, round_id="b")).status == 201
    await problem(await reserve(client, 1, round_id="c"), 409, "in-cooldown")

    entitled = keys.round("b", "p:masks").entitled
    [(citizen, value)] = (await awaited(redis.hgetall(entitled))).items()
    held = value.split(b" ", 1)[1]
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    future = now_ms + 3_600_000
    await awaited(
        redis.hset(entitled, citizen, f"{future} {held.decode()}")
    )  # test-only: another end
    body = await problem(await reserve(client, 1, round_id="c"), 409, "in-cooldown")
    assert rfc3339(body["until"]) == dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
        milliseconds=future
    )
    await awaited(
        redis.hset(entitled, citizen, f"{now_ms - 1000} {held.decode()}")
    )  # ended a second ago
    assert (await reserve(client, 1, round_id="c")).status == 201


async def test_two_open_rounds_of_one_programme_at_once_give_each_citizen_one_share(
    client: Client, settings: Settings, aiohttp_client: Any
) -> None:
    """300 citizens, each asking in both rounds twice, through two workers, all at once:
    exactly one reservation each, and every other answer is the same one (200) or a bar."""
    second: Client = await aiohttp_client(create_app(settings))  # another worker
    await seed(client, "a", stock={"s1": 400}, programme="masks", cooldown_days=7)
    await seed(client, "b", stock={"s1": 400}, programme="masks", cooldown_days=7)
    citizens = range(300)
    asks = [(n, r, w) for n in citizens for r in ("a", "b") for w in (client, second)]
    answers = await asyncio.gather(*(reserve(w, n, round_id=r) for n, r, w in asks))
    bodies = [await a.json(content_type=None) for a in answers]

    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {200, 201, 409}, statuses
    assert statuses[201] == len(citizens)
    created = Counter(n for (n, _, _), a in zip(asks, answers, strict=True) if a.status == 201)
    assert set(created.values()) == {1}
    assert set(created) == set(citizens)
    refused = Counter(b["code"] for a, b in zip(answers, bodies, strict=True) if a.status == 409)
    assert set(refused) <= {"in-cooldown"}

    con = await asyncpg.connect(settings.database_url)
    try:
        async with asyncio.timeout(10):
            while True:
                rows = await con.fetch(
                    "SELECT citizen_hash, round_id FROM reservations WHERE status <> 'cancelled'"
                )
                if len(rows) >= len(citizens):
                    break
                await asyncio.sleep(0.05)
    finally:
        await con.close()
    assert len(rows) == len(citizens)
    assert len({r["citizen_hash"] for r in rows}) == len(citizens)
    total = 0
    for round_id in ("a", "b"):
        s = await (await client.get(f"/api/v1/admin/rounds/{round_id}/stats", headers=ADMIN)).json()
        assert s["loaded"] == s["remaining"] + s["reserved"] + s["collected"]
        total += s["reservations"]
    assert total == len(citizens)


async def test_rebuild_brings_the_cooldowns_back_and_reconcile_checks_them(
    client: Client, redis: Redis, keys: Keys, settings: Settings
) -> None:
    """After Redis lost everything, the ledger restores the bars (and only live ones)."""
    await seed(client, "a", stock={"s1": 5}, programme="masks", cooldown_days=7)
    await seed(client, "b", stock={"s1": 5}, programme="masks", cooldown_days=7)
    made = {n: await reserve(client, n, round_id="a") for n in (1, 2, 3)}
    assert (await client.delete(made[3].headers["Location"])).status == 200
    barred = await problem(await reserve(client, 1, round_id="b"), 409, "in-cooldown")
    rk_a, rk_b = keys.round("a", "p:masks"), keys.round("b", "p:masks")
    await drained(redis, keys, rk_a, rk_b)

    con = await asyncpg.connect(settings.database_url)
    try:
        report = await reconcile(redis, con, keys, ["a", "b"], wait=5)
        assert report["ok"], report
        assert report["rounds"][0]["cooldowns"]["bars_of_round"] == 2

        # reconcile sees a bar that went missing, and one of a cancelled reservation
        bars = await awaited(redis.hgetall(rk_a.entitled))
        [victim, *_] = sorted(bars)
        await awaited(redis.hdel(rk_a.entitled, victim))
        cancelled = (await made[3].json())["reservation_id"]
        await awaited(redis.hset(rk_a.entitled, "f" * 64, f"99999999999999 {cancelled}"))
        report = await reconcile(redis, con, keys, ["a"], wait=5)
        assert not report["ok"]
        cooldowns = report["rounds"][0]["cooldowns"]
        assert (cooldowns["missing"]["count"], cooldowns["stale"]["count"]) == (1, 1)
        assert any("cooldown" in p for p in report["rounds"][0]["problems"])
        await awaited(redis.hset(rk_a.entitled, victim, bars[victim]))
        await awaited(redis.hdel(rk_a.entitled, "f" * 64))

        lost = [k async for k in redis.scan_iter(match=f"{keys.prefix}:*")]
        await redis.delete(*lost)  # Redis lost its data
        assert await needs_rebuild(redis, con, keys, "a")
        summary = await rebuild_round(redis, con, keys, "a")
        assert summary["cooldowns"] == 2  # citizens 1 and 2; 3 cancelled
        await rebuild_round(redis, con, keys, "b")
        assert not await needs_rebuild(redis, con, keys, "a")
        report = await reconcile(redis, con, keys, ["a", "b"], wait=5)
        assert report["ok"], report
    finally:
        await con.close()

    async with asyncio.timeout(5):  # each worker serves a rebuilt round again within a second
        while (await reserve(client, 2, round_id="a")).status != 200:
            await asyncio.sleep(0.1)
    again = await problem(await reserve(client, 1, round_id="b"), 409, "in-cooldown")
    assert again["until"] == barred["until"]
    assert (await reserve(client, 3, round_id="b")).status == 201  # cancelled: no bar came back
