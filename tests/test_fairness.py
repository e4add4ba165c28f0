"""Channels on every reservation, the fairness report on a seeded crowd, and the desk's gate.

The crowd below is small enough to count by hand; the expected report is written out in full.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, cast

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from stdnum.cn import ric

from allocator.config import Settings
from allocator.keys import Keys
from allocator.rebuild import rebuild_round
from allocator.redistyping import awaited
from service.app import create_app
from service.appkeys import ALLOCATOR, METRICS
from tests.helpers import ADMIN, citizen_id, phone, seed
from tests.test_api_contract import _redis_texts
from tests.test_lottery import seed_lottery, wait_for_status

Client = TestClient[Any, Any]
RESERVE = "/api/v1/rounds/r1/reservations"
DESK_RESERVE = "/api/v1/desk/rounds/r1/reservations"


def cid(region: str, born: str, seq: int) -> str:
    body = f"{region}{born}{seq:03d}"
    return body + ric.calc_check_digit(body + "0")


# name: (ID, phone); regions differ so that the kept prefix can be checked
PEOPLE = {
    "A": (cid("440106", "19500301", 1), "13900000001"),  # 76 at opening: 65+
    "B": (cid("440106", "20120301", 2), "13900000002"),  # 14: 0-17
    "C": (cid("310104", "19900301", 3), "13900000003"),  # 36: 18-39
    "D": (cid("310104", "19750301", 4), "13900000004"),  # 51: 40-64
    "E": (cid("110101", "19450301", 5), "13900000005"),  # 81: 65+
    "F": (cid("110101", "19950301", 6), "13900000006"),  # 31: 18-39
    "G": (cid("440106", "19680301", 7), "13900000007"),  # 58: 40-64
    "H": (cid("310104", "20010301", 8), "13900000008"),  # 25: 18-39
}


@pytest.fixture
async def client(settings: Settings, redis: Redis, checked_client: Any) -> Client:
    c = cast(Client, await checked_client(create_app(settings)))
    await seed(c, stock={"s1": 2, "s2": 5, "s3": 1}, districts={"s1": "East", "s2": "East"})
    r = await c.put(
        "/api/v1/admin/sites",
        json={"sites": [{"site_id": "s3", "name": "Site s3", "address": "x", "district": "West"}]},
        headers=ADMIN,
    )
    assert r.status == 200
    return c


async def ask(client: Client, who: str, site: str, channel: str | None = None) -> int:
    """One reservation request; ``channel`` "desk" goes through the desk route."""
    citizen, mobile = PEOPLE[who]
    body = {"citizen_id": citizen, "phone": mobile, "site_id": site}
    if channel == "desk":
        r = await client.post(DESK_RESERVE, json=body, headers=ADMIN)
    else:
        headers = {"X-Allot-Channel": channel} if channel else {}
        r = await client.post(RESERVE, json=body, headers=headers)
    return r.status


async def crowd(client: Client) -> None:
    """The seeded crowd: s1 and s2 in East (2 and 5 units), s3 in West (1 unit)."""
    assert await ask(client, "A", "s1", "web") == 201
    assert await ask(client, "B", "s1", "web") == 201
    assert await ask(client, "C", "s1", "web") == 409  # sold out at s1
    assert await ask(client, "C", "s2") == 201  # then elsewhere, through the API
    assert await ask(client, "D", "s3", "desk") == 201
    assert await ask(client, "E", "s3", "mini-program") == 409
    assert await ask(client, "E", "s3", "mini-program") == 409  # again: from memory
    r = await client.post(
        RESERVE, json={"citizen_id": PEOPLE["F"][0], "phone": PEOPLE["F"][1], "site_id": "s2"}
    )
    assert r.status == 201
    cancel = await client.delete(f"/api/v1/reservations/{(await r.json())['reservation_id']}")
    assert cancel.status == 200  # F asked, and holds nothing
    assert await ask(client, "G", "s2", "bogus") == 201  # an unknown channel is `api`
    assert await ask(client, "H", "s3", "mini-program") == 409  # answered from memory


async def ledger_has(pg: asyncpg.Connection, rows: int, cancelled: int) -> None:
    for _ in range(200):
        total = await pg.fetchval("SELECT count(*) FROM reservations")
        gone = await pg.fetchval("SELECT count(*) FROM reservations WHERE status = 'cancelled'")
        if (total, gone) == (rows, cancelled):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger has {total} rows, {gone} cancelled")


EXPECTED = [
    # district of the site asked for: East asked A B C F G, granted A B C G; West D E H / D
    ("district", "East", 5, 4, 0.625, 0.8),
    ("district", "West", 3, 1, 0.375, 0.2),
    ("age_band", "0-17", 1, 1, 0.125, 0.2),  # B
    ("age_band", "18-39", 3, 1, 0.375, 0.2),  # C F H / C
    ("age_band", "40-64", 2, 2, 0.25, 0.4),  # D G
    ("age_band", "65+", 2, 1, 0.25, 0.2),  # A E / A
    # C asked on the web (sold out) and through the API: one asker in each
    ("channel", "desk", 1, 1, 0.1111, 0.2),  # D
    ("channel", "web", 3, 2, 0.3333, 0.4),  # A B C / A B
    ("channel", "mini-program", 2, 0, 0.2222, 0.0),  # E H
    ("channel", "api", 3, 2, 0.3333, 0.4),  # C F G / C G
]


async def test_the_fairness_report_matches_the_hand_count_of_a_seeded_crowd(
    client: Client, pg: asyncpg.Connection
) -> None:
    """Asked and granted per district, age band and channel, counted by hand above."""
    await crowd(client)
    await ledger_has(pg, rows=6, cancelled=1)
    r = await client.get("/api/v1/admin/rounds/r1/fairness", headers=ADMIN)
    assert r.status == 200, await r.text()
    report = await r.json()
    assert report["round_id"] == "r1"
    got = [
        (
            g["dimension"],
            g["group"],
            g["asked"],
            g["granted"],
            g["share_of_asked"],
            g["share_of_granted"],
        )
        for g in report["groups"]
    ]
    assert got == EXPECTED


async def test_every_reservation_records_its_channel_band_and_region_never_the_id(
    client: Client, pg: asyncpg.Connection, redis: Redis, redis_prefix: str
) -> None:
    """The report's inputs, in Redis and in the ledger, hold bands and prefixes, not IDs."""
    await crowd(client)
    await ledger_has(pg, rows=6, cancelled=1)
    rows = await pg.fetch(
        "SELECT citizen_id_masked, channel, age_band, region FROM reservations ORDER BY created_at"
    )
    assert [(r["channel"], r["age_band"], r["region"]) for r in rows] == [
        ("web", "65+", "440106"),  # A
        ("web", "0-17", "440106"),  # B
        ("api", "18-39", "310104"),  # C
        ("desk", "40-64", "310104"),  # D
        ("api", "18-39", "110101"),  # F
        ("api", "40-64", "440106"),  # G
    ]
    texts = await _redis_texts(redis, redis_prefix)
    assert any(b"fair:asked" in t for t in texts)  # the askers' sets were scanned
    for citizen, mobile in PEOPLE.values():
        for text in texts:
            assert citizen.encode() not in text
            assert mobile.encode() not in text
            assert citizen[6:14].encode() not in text  # not even the birth date
        for row in rows:
            assert citizen not in repr(dict(row))
            assert citizen[6:14] not in repr(dict(row))


async def test_rebuild_restores_channels_and_the_askers_the_ledger_knows(
    client: Client, pg: asyncpg.Connection, redis: Redis, keys: Keys
) -> None:
    """After Redis lost the round, the report is what the ledger can vouch for."""
    await crowd(client)
    await ledger_has(pg, rows=6, cancelled=1)
    await client.app[ALLOCATOR].asks.flush()  # nothing of the crowd's still on its way
    rk = keys.round("r1")
    before = {
        orjson.loads(v)["id"]: orjson.loads(v)
        for v in (await awaited(redis.hgetall(rk.reservations))).values()
    }
    doomed = [k async for k in redis.scan_iter(match=f"{keys.prefix}:{{r:r1}}:*")]
    await redis.delete(*doomed)
    await rebuild_round(redis, pg, keys, "r1")
    after = {
        orjson.loads(v)["id"]: orjson.loads(v)
        for v in (await awaited(redis.hgetall(rk.reservations))).values()
    }
    assert {i: (r["ch"], r["age"], r["reg"]) for i, r in after.items()} == {
        i: (r["ch"], r["age"], r["reg"]) for i, r in before.items()
    }
    # reservers are askers again; E and H, only ever refused sold-out, are not in the ledger
    assert await redis.scard(rk.fair_asked("district", "East")) == 5  # type: ignore[misc]
    assert await redis.scard(rk.fair_asked("district", "West")) == 1  # type: ignore[misc]
    assert await redis.scard(rk.fair_asked("channel", "mini-program")) == 0  # type: ignore[misc]


async def test_asks_and_grants_are_counted_per_channel_for_prometheus(client: Client) -> None:
    """On-call sees at a glance whether the desk or the web is where shares go."""
    await crowd(client)
    registry = client.app[METRICS].registry

    def value(name: str, channel: str) -> float:
        return registry.get_sample_value(name, {"channel": channel}) or 0.0

    # asks: every request answered with a new reservation or sold-out
    assert [value("allot_asks_total", c) for c in ("web", "api", "desk", "mini-program")] == [
        3.0,
        3.0,
        1.0,
        3.0,
    ]
    assert [value("allot_grants_total", c) for c in ("web", "api", "desk", "mini-program")] == [
        2.0,
        3.0,
        1.0,
        0.0,
    ]


async def test_the_report_needs_the_operator_and_a_known_round(client: Client) -> None:
    """A desk must not see the city's figures; an unknown round is 404."""
    r = await client.post(
        "/api/v1/admin/desk-tokens", json={"site_id": "s1", "label": "x"}, headers=ADMIN
    )
    desk = {"Authorization": f"Bearer {(await r.json())['token']}"}
    assert (await client.get("/api/v1/admin/rounds/r1/fairness", headers=desk)).status == 403
    assert (await client.get("/api/v1/admin/rounds/r1/fairness")).status == 401
    r = await client.get("/api/v1/admin/rounds/nope/fairness", headers=ADMIN)
    assert r.status == 404
    r = await client.get("/api/v1/admin/rounds/r1/fairness", headers=ADMIN)
    assert (await r.json())["groups"] == []  # nobody asked yet


# -- the desk and the token buckets -------------------------------------------------------------


@pytest.fixture
def tight_gate(settings: Settings) -> Settings:
    """Two requests per address, one per citizen, and (nearly) no refill during the test."""
    return replace(
        settings,
        gate=replace(
            settings.gate,
            client_rate=0.001,
            client_burst=2,
            citizen_rate=0.001,
            citizen_burst=1,
        ),
    )


async def test_the_desk_skips_the_per_address_bucket_but_not_the_per_citizen_one(
    tight_gate: Settings, redis: Redis, aiohttp_client: Any
) -> None:
    """A pharmacy serves a queue from one address; one citizen still cannot hammer it."""
    c: Client = await aiohttp_client(create_app(tight_gate))
    await seed(c, stock={"s1": 20})
    r = await c.post(
        "/api/v1/admin/desk-tokens", json={"site_id": "s1", "label": "x"}, headers=ADMIN
    )
    desk = {"Authorization": f"Bearer {(await r.json())['token']}"}

    def body(n: int) -> dict[str, str]:
        return {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": "s1"}

    # the citizens' route: the address's two tokens, then 429 naming the address
    assert [(await c.post(RESERVE, json=body(n))).status for n in (1, 2, 3)] == [201, 201, 429]
    # the desk, from the same address: every walk-in served
    for n in (4, 5, 6, 7):
        r = await c.post(DESK_RESERVE, json=body(n), headers=desk)
        assert r.status == 201, await r.text()
    # but the same citizen again at once: the citizen's bucket refuses
    r = await c.post(DESK_RESERVE, json=body(4), headers=desk)
    assert r.status == 429
    assert (await r.json())["code"] == "rate-limited"
    assert "ID number" in (await r.json())["detail"]


async def test_the_desk_enters_past_the_per_address_bucket_but_not_the_per_citizen_one(
    tight_gate: Settings, redis: Redis, aiohttp_client: Any
) -> None:
    """The same gate rule for lottery entries made at the counter."""
    c: Client = await aiohttp_client(create_app(tight_gate))
    await seed_lottery(c, stock={"s1": 20})
    r = await c.post(
        "/api/v1/admin/desk-tokens", json={"site_id": "s1", "label": "x"}, headers=ADMIN
    )
    desk = {"Authorization": f"Bearer {(await r.json())['token']}"}

    def body(n: int) -> dict[str, str]:
        return {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": "s1"}

    assert [(await c.post(ENTER, json=body(n))).status for n in (1, 2, 3)] == [201, 201, 429]
    for n in (4, 5, 6, 7):
        r = await c.post(DESK_ENTER, json=body(n), headers=desk)
        assert r.status == 201, await r.text()
    r = await c.post(DESK_ENTER, json=body(4), headers=desk)
    assert r.status == 429
    assert "ID number" in (await r.json())["detail"]


# -- lottery rounds -----------------------------------------------------------------------------

ENTER = "/api/v1/rounds/l1/entries"
DESK_ENTER = "/api/v1/desk/rounds/l1/entries"
LOTTERY_SITES = {"s1": "East", "s2": "East", "s3": "West"}


async def put_lottery_sites(client: Client) -> None:
    sites = [
        {"site_id": s, "name": f"Site {s}", "address": "x", "district": d}
        for s, d in LOTTERY_SITES.items()
    ]
    r = await client.put("/api/v1/admin/sites", json={"sites": sites}, headers=ADMIN)
    assert r.status == 200


async def lottery_ask(
    client: Client, who: str, site: str, channel: str | None, desk: dict[str, str] | None = None
) -> Any:
    """One entry; ``desk`` (a desk's or the operator's header) goes through the desk route."""
    citizen, mobile = PEOPLE[who]
    body = {"citizen_id": citizen, "phone": mobile, "site_id": site}
    if desk is not None:
        return await client.post(DESK_ENTER, json=body, headers=desk)
    headers = {"X-Allot-Channel": channel} if channel else {}
    return await client.post(ENTER, json=body, headers=headers)


async def lottery_crowd(client: Client) -> dict[str, dict[str, Any]]:
    """s1 and s2 in East (3 and 1 units), s3 in West (none): who enters where and how; the
    entries as answered, by person."""
    r = await client.post(
        "/api/v1/admin/desk-tokens", json={"site_id": "s1", "label": "x"}, headers=ADMIN
    )
    desk = {"Authorization": f"Bearer {(await r.json())['token']}"}
    # independent people at once (the round may close soon); C and F in two steps each
    first = await asyncio.gather(
        lottery_ask(client, "A", "s1", "web"),
        lottery_ask(client, "B", "s1", None, desk),
        lottery_ask(client, "C", "s3", "web"),
        lottery_ask(client, "D", "s2", None, ADMIN),
        lottery_ask(client, "E", "s3", "mini-program"),
        lottery_ask(client, "F", "s3", "web"),
        lottery_ask(client, "G", "s3", "bogus"),  # an unknown channel is `api`
        lottery_ask(client, "H", "s3", None, ADMIN),
    )
    assert [a.status for a in first] == [201] * 8, [await a.text() for a in first]
    entries = {who: await a.json() for who, a in zip("ABCDEFGH", first, strict=True)}
    # C moves to s1 through the API: the last site counts, the channel stays the first one
    again = await lottery_ask(client, "C", "s1", None)
    assert again.status == 200
    entries["C"] = await again.json()
    r = await client.delete(f"/api/v1/entries/{entries['F']['entry_id']}")
    assert r.status == 200  # F withdrew: not an asker
    return entries


async def ledger_entries_settled(pg: asyncpg.Connection) -> None:
    """Every entry of the crowd in the ledger, with C's move and F's withdrawal."""
    for _ in range(200):
        rows = await pg.fetch("SELECT site_id, status FROM entries WHERE round_id = 'l1'")
        got = sorted((r["site_id"], r["status"]) for r in rows)
        if got.count(("s3", "withdrawn")) == 1 and got.count(("s1", "registered")) == 3:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger has {got}")


def table(report: dict[str, Any]) -> list[tuple[str, str, int, int, float, float]]:
    return [
        (
            g["dimension"],
            g["group"],
            g["asked"],
            g["granted"],
            g["share_of_asked"],
            g["share_of_granted"],
        )
        for g in report["groups"]
    ]


# Live entries: A B C (s1), D (s2), E G H (s3); F withdrew. The draw: s1's 3 units go to the
# three at s1, s2's one to D, West has none; then A cancels the reservation won.
ASKED_LOTTERY = [
    ("district", "East", 4, "A B C D"),
    ("district", "West", 3, "E G H"),
    ("age_band", "0-17", 1, "B"),
    ("age_band", "18-39", 2, "C H"),
    ("age_band", "40-64", 2, "D G"),
    ("age_band", "65+", 2, "A E"),
    ("channel", "desk", 3, "B D H"),
    ("channel", "web", 2, "A C"),
    ("channel", "mini-program", 1, "E"),
    ("channel", "api", 1, "G"),
]
BEFORE_THE_DRAW = [
    ("district", "East", 4, 0, 0.5714, 0.0),
    ("district", "West", 3, 0, 0.4286, 0.0),
    ("age_band", "0-17", 1, 0, 0.1429, 0.0),
    ("age_band", "18-39", 2, 0, 0.2857, 0.0),
    ("age_band", "40-64", 2, 0, 0.2857, 0.0),
    ("age_band", "65+", 2, 0, 0.2857, 0.0),
    ("channel", "desk", 3, 0, 0.4286, 0.0),
    ("channel", "web", 2, 0, 0.2857, 0.0),
    ("channel", "mini-program", 1, 0, 0.1429, 0.0),
    ("channel", "api", 1, 0, 0.1429, 0.0),
]
AFTER_THE_DRAW = [
    # granted B C D (A cancelled): 3
    ("district", "East", 4, 3, 0.5714, 1.0),
    ("district", "West", 3, 0, 0.4286, 0.0),
    ("age_band", "0-17", 1, 1, 0.1429, 0.3333),  # B
    ("age_band", "18-39", 2, 1, 0.2857, 0.3333),  # C
    ("age_band", "40-64", 2, 1, 0.2857, 0.3333),  # D
    ("age_band", "65+", 2, 0, 0.2857, 0.0),  # A cancelled, E not drawn
    ("channel", "desk", 3, 2, 0.4286, 0.6667),  # B D
    ("channel", "web", 2, 1, 0.2857, 0.3333),  # C
    ("channel", "mini-program", 1, 0, 0.1429, 0.0),
    ("channel", "api", 1, 0, 0.1429, 0.0),
    ("weight", "1", 7, 3, 1.0, 1.0),  # every entry weighs 1 without loss weighting
]


async def test_a_lottery_report_counts_entrants_and_winners_and_weight_from_the_freeze(
    client: Client, pg: asyncpg.Connection
) -> None:
    """Asked = live entrants, granted = winners whose reservation stands; the weight dimension
    once the freeze has fixed the weights. Counted by hand above."""
    await put_lottery_sites(client)
    await seed_lottery(client, stock={"s1": 3, "s2": 1, "s3": 0}, districts=LOTTERY_SITES)
    await lottery_crowd(client)
    await ledger_entries_settled(pg)
    r = await client.get("/api/v1/admin/rounds/l1/fairness", headers=ADMIN)
    assert r.status == 200, await r.text()
    assert table(await r.json()) == BEFORE_THE_DRAW  # registering: no weight yet
    assert [(d, g, n) for d, g, n, _ in ASKED_LOTTERY] == [x[:3] for x in BEFORE_THE_DRAW]


async def test_a_drawn_lottery_report_matches_the_hand_count(
    client: Client, pg: asyncpg.Connection
) -> None:
    """The same crowd, closed, frozen and drawn; one winner cancels."""
    await put_lottery_sites(client)
    await seed_lottery(
        client, stock={"s1": 3, "s2": 1, "s3": 0}, districts=LOTTERY_SITES, closes_in=3
    )
    entries = await lottery_crowd(client)
    await wait_for_status(client, "frozen")
    frozen = table(
        await (await client.get("/api/v1/admin/rounds/l1/fairness", headers=ADMIN)).json()
    )
    assert frozen == [*BEFORE_THE_DRAW, ("weight", "1", 7, 0, 1.0, 0.0)]
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "42"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    won = {}
    for who, e in entries.items():
        got = await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json()
        won[who] = got["status"]
        if who == "A":
            cancel = await client.delete(f"/api/v1/reservations/{got['reservation_id']}")
            assert cancel.status == 200
    assert won == {
        "A": "won", "B": "won", "C": "won", "D": "won",
        "E": "not-drawn", "F": "withdrawn", "G": "not-drawn", "H": "not-drawn",
    }  # fmt: skip
    for _ in range(200):  # the ledger has A's cancellation a moment later
        cancelled = await pg.fetchval(
            "SELECT count(*) FROM reservations WHERE status = 'cancelled'"
        )
        if cancelled == 1:
            break
        await asyncio.sleep(0.05)
    r = await client.get("/api/v1/admin/rounds/l1/fairness", headers=ADMIN)
    assert table(await r.json()) == AFTER_THE_DRAW


async def test_entries_keep_channel_and_band_never_the_id_and_rebuild_restores_them(
    client: Client, pg: asyncpg.Connection, redis: Redis, keys: Keys, redis_prefix: str
) -> None:
    """The lottery report's inputs, in Redis and the ledger, survive a lost Redis."""
    await put_lottery_sites(client)
    await seed_lottery(client, stock={"s1": 3, "s2": 1, "s3": 0}, districts=LOTTERY_SITES)
    await lottery_crowd(client)
    await ledger_entries_settled(pg)
    rows = await pg.fetch("SELECT * FROM entries WHERE round_id = 'l1' ORDER BY citizen_id_masked")
    by_mask = {r["citizen_id_masked"]: (r["channel"], r["age_band"]) for r in rows}
    masks = {who: c[:6] + "********" + c[-4:] for who, (c, _) in PEOPLE.items()}
    assert {who: by_mask[m] for who, m in masks.items()} == {
        "A": ("web", "65+"), "B": ("desk", "0-17"), "C": ("web", "18-39"),
        "D": ("desk", "40-64"), "E": ("mini-program", "65+"), "F": ("web", "18-39"),
        "G": ("api", "40-64"), "H": ("desk", "18-39"),
    }  # fmt: skip
    texts = await _redis_texts(redis, redis_prefix)
    for citizen, mobile in PEOPLE.values():
        for text in [*texts, *(repr(dict(r)).encode() for r in rows)]:
            assert citizen.encode() not in text
            assert mobile.encode() not in text
            assert citizen[6:14].encode() not in text  # not even the birth date
    rk = keys.round("l1")

    async def records() -> dict[str, tuple[str, str]]:
        found = (await awaited(redis.hgetall(rk.entries))).values()
        return {(e := orjson.loads(v))["id"]: (e["ch"], e["age"]) for v in found}

    before = await records()
    assert len(before) == 8
    await redis.delete(*[k async for k in redis.scan_iter(match=f"{keys.prefix}:{{r:l1}}:*")])
    await rebuild_round(redis, pg, keys, "l1")
    assert await records() == before
