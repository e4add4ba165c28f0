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
