"""Lottery rounds through the service: the commitment, entries through the front door, the
freeze, the draw, passes and winners' reservations (API.md, "Lottery rounds")."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.draw import entry_receipt
from allocator.keys import Keys
from allocator.rebuild import rebuild_round
from allocator.receipts import verify_entry
from allocator.redistyping import awaited
from allocator.scripts import script_source
from service.app import create_app
from tests.helpers import ADMIN, citizen_id, phone, reserve, round_body, seed

SOURCE = "drand quicknet round 9123456"


@pytest.fixture
async def client(settings: Settings, redis: Redis, checked_client: Any) -> TestClient[Any, Any]:
    """The real application; every answer must also match the served OpenAPI document."""
    return cast(TestClient[Any, Any], await checked_client(create_app(settings)))


def lottery_body(**kwargs: Any) -> dict[str, Any]:
    return {**round_body(**kwargs), "mode": "lottery", "public_randomness_source": SOURCE}


async def seed_lottery(
    client: TestClient[Any, Any],
    round_id: str = "l1",
    stock: dict[str, int] | None = None,
    districts: dict[str, str] | None = None,
    **round_kwargs: Any,
) -> dict[str, Any]:
    """Sites, a lottery round open now and one batch; the Round as answered."""
    stock = {"s1": 10} if stock is None else stock
    districts = districts or {}
    sites = [
        {"site_id": s, "name": f"Site {s}", "address": "road 1", "district": districts.get(s, "d1")}
        for s in stock
    ]
    r = await client.put("/api/v1/admin/sites", json={"sites": sites}, headers=ADMIN)
    assert r.status == 200, await r.text()
    r = await client.put(
        f"/api/v1/admin/rounds/{round_id}", json=lottery_body(**round_kwargs), headers=ADMIN
    )
    assert r.status == 201, await r.text()
    answered: dict[str, Any] = await r.json()
    items = [{"site_id": s, "quantity": q} for s, q in stock.items() if q > 0]
    if items:
        r = await client.post(
            f"/api/v1/admin/rounds/{round_id}/batches",
            json={"batch_id": f"seed-{round_id}", "items": items},
            headers=ADMIN,
        )
        assert r.status == 201, await r.text()
    return answered


async def enter(
    client: TestClient[Any, Any],
    n: int,
    site: str = "s1",
    round_id: str = "l1",
    *,
    ph: str | None = None,
    accept: bool | None = None,
) -> Any:
    body: dict[str, Any] = {"citizen_id": citizen_id(n), "phone": ph or phone(n), "site_id": site}
    if accept is not None:
        body["accept_district"] = accept
    return await client.post(f"/api/v1/rounds/{round_id}/entries", json=body)


async def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    body = await response.json()
    assert (response.status, body["code"]) == (status, code), body
    return body  # type: ignore[no-any-return]


async def ledger_entries(database_url: str, round_id: str = "l1") -> list[asyncpg.Record]:
    con = await asyncpg.connect(database_url)
    try:
        return await con.fetch(
            "SELECT * FROM entries WHERE round_id = $1 ORDER BY entry_id", round_id
        )
    finally:
        await con.close()


async def wait_for_entries(
    database_url: str, want: int, round_id: str = "l1", within: float = 10.0
) -> list[asyncpg.Record]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        rows = await ledger_entries(database_url, round_id)
        if len(rows) >= want:
            return rows
        assert loop.time() < deadline, f"ledger has {len(rows)} of {want} entries"
        await asyncio.sleep(0.05)


# -- rounds -------------------------------------------------------------------------------------


async def test_a_lottery_round_publishes_its_commitment_and_keeps_the_secret_in_postgres(
    client: TestClient[Any, Any], pg: asyncpg.Connection, redis: Redis, redis_prefix: str
) -> None:
    """The commitment is public from creation; the secret behind it is only in PostgreSQL."""
    body = await seed_lottery(client)
    draw = body["draw"]
    assert draw["public_randomness_source"] == SOURCE
    assert draw["status"] == "registering"
    assert re.fullmatch(r"[0-9a-f]{64}", draw["commitment"])
    secret = await pg.fetchval("SELECT secret FROM draws WHERE round_id = 'l1'")
    assert hashlib.sha256(secret).hexdigest() == draw["commitment"]
    got = await (await client.get("/api/v1/rounds/l1")).json()
    assert got["draw"] == draw
    assert got["mode"] == "lottery"
    for key in [k async for k in redis.scan_iter(match=f"{redis_prefix}:*")]:
        if await redis.type(key) == b"hash":
            dumped = repr(await awaited(redis.hgetall(key)))
            assert secret.hex() not in dumped
            assert repr(secret)[2:-1] not in dumped
    # an update before opening keeps the same commitment; an fcfs round has no draw
    r = await client.put(
        "/api/v1/admin/rounds/l1", json=lottery_body(opens_in=600, pickup_in=600), headers=ADMIN
    )
    assert r.status == 200
    assert (await r.json())["draw"]["commitment"] == draw["commitment"]
    await seed(client, "f1")
    assert (await (await client.get("/api/v1/rounds/f1")).json())["draw"] is None


async def test_mode_and_source_cannot_change_once_the_round_has_opened(
    client: TestClient[Any, Any],
) -> None:
    """A source changed after the opening could be chosen to suit the operator."""
    await seed_lottery(client)
    other = {**lottery_body(), "public_randomness_source": "the operator's own dice"}
    r = await client.put("/api/v1/admin/rounds/l1", json=other, headers=ADMIN)
    body = await problem(r, 422, "invalid-request")
    assert [e["field"] for e in body["errors"]] == ["public_randomness_source"]
    r = await client.put("/api/v1/admin/rounds/l1", json=round_body(), headers=ADMIN)
    body = await problem(r, 422, "invalid-request")
    assert {e["field"] for e in body["errors"]} == {"mode", "public_randomness_source"}
    got = await (await client.get("/api/v1/rounds/l1")).json()
    assert (got["mode"], got["draw"]["public_randomness_source"]) == ("lottery", SOURCE)
    # before the opening both may change
    upcoming = lottery_body(opens_in=600, pickup_in=600)
    r = await client.put("/api/v1/admin/rounds/l2", json=upcoming, headers=ADMIN)
    assert r.status == 201
    r = await client.put(
        "/api/v1/admin/rounds/l2",
        json={**upcoming, "public_randomness_source": "福彩3D 2020037"},
        headers=ADMIN,
    )
    assert r.status == 200
    assert (await r.json())["draw"]["public_randomness_source"] == "福彩3D 2020037"


async def test_a_reservation_on_a_lottery_round_and_an_entry_on_an_fcfs_round_are_wrong_mode(
    client: TestClient[Any, Any], redis: Redis, keys: Keys
) -> None:
    """The two kinds of round never mix: no stock is taken by a reservation in a lottery."""
    await seed_lottery(client)
    await seed(client, "f1")
    r = await client.post(
        "/api/v1/rounds/l1/reservations",
        json={"citizen_id": citizen_id(1), "phone": phone(1), "site_id": "s1"},
    )
    await problem(r, 409, "wrong-mode")
    await problem(await enter(client, 1, round_id="f1"), 409, "wrong-mode")
    assert int(await awaited(redis.hget(keys.round("l1").stock, "s1")) or 0) == 10
    assert await awaited(redis.hlen(keys.round("f1").entries)) == 0


# -- entries ------------------------------------------------------------------------------------


async def test_an_entry_is_signed_idempotent_and_its_last_choice_counts(
    client: TestClient[Any, Any], database_url: str
) -> None:
    """201, then 200 with the new choice (receipt unchanged, signature re-made), another phone
    409; the ledger ends with the last choice."""
    await seed_lottery(client, stock={"s1": 10, "s2": 10})
    key = (await (await client.get("/api/v1/draw-key")).json())["public_key"]
    r = await enter(client, 1)
    assert r.status == 201
    first = await r.json()
    assert r.headers["Location"] == f"/api/v1/entries/{first['entry_id']}"
    assert first["receipt"] == entry_receipt("l1", first["entry_id"])
    assert (first["status"], first["weight"], first["reservation_id"]) == ("registered", None, None)
    assert first["accept_district"] is False
    assert verify_entry(key, first["signature"], "l1", first["receipt"], "s1", False)
    r = await enter(client, 1, "s2", accept=True)
    assert r.status == 200
    second = await r.json()
    assert (second["entry_id"], second["receipt"]) == (first["entry_id"], first["receipt"])
    assert (second["site_id"], second["accept_district"]) == ("s2", True)
    assert verify_entry(key, second["signature"], "l1", second["receipt"], "s2", True)
    assert not verify_entry(key, first["signature"], "l1", second["receipt"], "s2", True)
    await problem(await enter(client, 1, "s1", ph=phone(999)), 409, "already-entered")
    got = await (await client.get(f"/api/v1/entries/{first['entry_id']}")).json()
    assert got == second
    [row] = await wait_for_entries(database_url, 1)
    for _ in range(100):
        [row] = await ledger_entries(database_url)
        if row["site_id"] == "s2":
            break
        await asyncio.sleep(0.05)
    assert (row["site_id"], row["accept_district"], row["status"]) == ("s2", True, "registered")
    assert row["receipt"] == first["receipt"]


async def test_withdrawing_before_close_then_entering_again_makes_a_new_entry(
    client: TestClient[Any, Any],
) -> None:
    """A withdrawn entry stays withdrawn (its owner can see it); entering again is a new one."""
    await seed_lottery(client)
    first = await (await enter(client, 1)).json()
    r = await client.delete(f"/api/v1/entries/{first['entry_id']}")
    assert r.status == 200
    assert (await r.json())["status"] == "withdrawn"
    r = await client.delete(f"/api/v1/entries/{first['entry_id']}")
    assert (r.status, (await r.json())["status"]) == (200, "withdrawn")
    r = await enter(client, 1)
    assert r.status == 201
    assert (await r.json())["entry_id"] != first["entry_id"]
    await problem(await client.get("/api/v1/entries/nonsense"), 404, "not-found")
    await problem(await client.get("/api/v1/entries/AAAAAAAAAAAAAAAAAAAAAA.l1"), 404, "not-found")


async def test_an_entry_at_an_unknown_site_or_round_is_not_found(
    client: TestClient[Any, Any],
) -> None:
    await seed_lottery(client)
    await problem(await enter(client, 1, "nowhere"), 404, "not-found")
    await problem(await enter(client, 1, round_id="nope"), 404, "not-found")


async def test_entries_outside_the_window_are_refused_and_withdrawal_after_close_too(
    client: TestClient[Any, Any],
) -> None:
    """Registration is the window: before it opens and after it closes, 409 round-not-open."""
    await seed_lottery(client, "l1", closes_in=2, pickup_in=-60)
    entry = await (await enter(client, 1)).json()
    r = await client.put(
        "/api/v1/admin/rounds/l2", json=lottery_body(opens_in=600, pickup_in=600), headers=ADMIN
    )
    assert r.status == 201
    await problem(await enter(client, 2, round_id="l2"), 409, "round-not-open")
    await asyncio.sleep(2.2)
    await problem(await enter(client, 3), 409, "round-not-open")
    late = await client.delete(f"/api/v1/entries/{entry['entry_id']}")
    await problem(late, 409, "round-not-open")
    got = await (await client.get(f"/api/v1/entries/{entry['entry_id']}")).json()
    assert got["status"] == "registered"


async def test_many_entrants_at_once_each_hold_exactly_one_entry_in_the_ledger(
    client: TestClient[Any, Any], database_url: str
) -> None:
    """600 citizens, some twice at once, some with another phone, some changing site: one
    entry each, the ledger has every entry answered 201/200, duplicates agree."""
    await seed_lottery(client, stock={"s1": 10, "s2": 10})
    asks: list[tuple[int, str, str]] = []
    for n in range(600):
        asks.append((n, "s1", phone(n)))
        if n % 5 == 0:
            asks.append((n, "s2", phone(n)))  # the same citizen, another site
        if n % 7 == 0:
            asks.append((n, "s1", phone(n + 5000)))  # another phone
    random.Random(3).shuffle(asks)
    answers = await asyncio.gather(*(enter(client, n, s, ph=p) for n, s, p in asks))
    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {200, 201, 409}, statuses
    bodies = [await a.json() for a in answers]
    created = [b for a, b in zip(answers, bodies, strict=True) if a.status == 201]
    assert len(created) == 600
    by_citizen: dict[int, set[str]] = {}
    for (n, _, _), a, b in zip(asks, answers, bodies, strict=True):
        if a.status in (200, 201):
            by_citizen.setdefault(n, set()).add(b["entry_id"])
        else:
            assert b["code"] == "already-entered"
    assert all(len(ids) == 1 for ids in by_citizen.values())
    rows = await wait_for_entries(database_url, 600)
    assert len(rows) == 600
    assert {r["entry_id"] for r in rows} == {b["entry_id"] for b in created}
    stats = await (await client.get("/api/v1/admin/rounds/l1/stats", headers=ADMIN)).json()
    assert stats["entries"] == 600
    assert sum(s["entries"] for s in stats["sites"]) == 600


def _block(text: str, start: str, end: str) -> str:
    at = text.index(start)
    return text[at : text.index(end, at) + len(end)]


GATE_BLOCKS = (
    ("-- The gate: three token buckets", "  return b\nend\n"),  # the settings, the read
    ("-- the longest wait of the buckets so far", "  return wait, refused_by\nend\n"),
    (
        "local global = bucket('g', 'global')\n",
        "  wait, refused_by = short(citizen_b, wait, refused_by)\n",
    ),
    ("    global.tokens = global.tokens - 1\n", "    citizen_b.dirty = true\n"),  # the spend
    ("local gate_args = {}\n", "return replies\n"),  # the write
)


def test_the_entry_script_spends_the_same_gate_as_the_claim_script() -> None:
    """Registration is a flash crowd too: its buckets must behave exactly like the claims'. The
    entry script keeps them in the claim script's hashes and its gate is the claim script's,
    block for block: the settings and the read, the wait, each item's buckets, the spend and
    the write."""
    claim, entry = script_source("claim"), script_source("enter")
    for start, end in GATE_BLOCKS:
        block = _block(claim, start, end)
        assert block.count("\n") >= 3
        assert block == _block(entry, start, end)


# -- freeze, draw, passes -----------------------------------------------------------------------


async def wait_for_status(
    client: TestClient[Any, Any], want: str, round_id: str = "l1", within: float = 60.0
) -> dict[str, Any]:
    """The draw record once its status is ``want`` (the freeze comes within 60 s of close)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        r = await client.get(f"/api/v1/rounds/{round_id}/draw")
        assert r.status == 200, await r.text()
        record: dict[str, Any] = await r.json()
        if record["status"] == want:
            return record
        assert loop.time() < deadline, f"still {record['status']}, not {want}"
        await asyncio.sleep(0.2)


async def closed_lottery(
    client: TestClient[Any, Any], entrants: int, stock: dict[str, int], **kwargs: Any
) -> list[dict[str, Any]]:
    """A lottery round closing 2 s from now, ``entrants`` entries at s1 (odd ones accept the
    district), then closed and frozen; the entries as answered."""
    await seed_lottery(client, stock=stock, closes_in=2, **kwargs)
    answers = await asyncio.gather(*(enter(client, n, accept=n % 2 == 1) for n in range(entrants)))
    assert {a.status for a in answers} == {201}
    bodies = [await a.json() for a in answers]
    await wait_for_status(client, "frozen")
    return bodies


def verify_url(client: TestClient[Any, Any], round_id: str = "l1") -> int:
    from allocator import verify_draw

    base = str(client.make_url("")).rstrip("/")
    return verify_draw.main(["--url", base, "--round", round_id])


async def test_the_freeze_lists_every_entry_and_the_draw_replays_with_the_verifier(
    client: TestClient[Any, Any], database_url: str
) -> None:
    """Frozen after close with every answered entry; drawn once; verify-draw replays it;
    winners hold ordinary reservations, the others are not drawn."""
    entries = await closed_lottery(client, 12, {"s1": 4, "s2": 2})
    record = await wait_for_status(client, "frozen")
    assert record["entries"] == 12
    assert record["secret"] is not None
    assert hashlib.sha256(bytes.fromhex(record["secret"])).hexdigest() == record["commitment"]
    assert record["public_randomness"] is None
    listed = await (await client.get("/api/v1/rounds/l1/draw/entries.csv")).read()
    assert {e["receipt"] for e in entries} == {
        line.split(b",")[0].decode() for line in listed.splitlines()[1:]
    }
    assert hashlib.sha256(listed).hexdigest() == record["entries_digest"]
    await problem(await client.get("/api/v1/rounds/l1/draw/results.csv"), 404, "not-found")
    got = await (await client.get(f"/api/v1/entries/{entries[0]['entry_id']}")).json()
    assert (got["status"], got["weight"]) == ("registered", 1)
    assert await asyncio.to_thread(verify_url, client) == 0  # "frozen, NOT drawn yet"

    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "7 12 19 23 31 42"},
        headers=ADMIN,
    )  # fmt: skip
    assert r.status == 200, await r.text()
    drawn = await r.json()
    assert drawn["status"] == "drawn"
    assert drawn["public_randomness"] == "7 12 19 23 31 42"
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "7 12 19 23 31 42"},
        headers=ADMIN,
    )  # fmt: skip
    assert (r.status, await r.json()) == (200, drawn)
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "other"}, headers=ADMIN
    )
    await problem(r, 409, "draw-conflict")
    assert await asyncio.to_thread(verify_url, client) == 0

    results = await (await client.get("/api/v1/rounds/l1/draw/results.csv")).read()
    placed = {
        line.split(b",")[1].decode(): line.split(b",")[2].decode()
        for line in results.splitlines()[1:]
    }
    statuses: Counter[str] = Counter()
    for e in entries:
        got = await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json()
        statuses[got["status"]] += 1
        if placed[e["receipt"]]:
            assert got["status"] == "won"
            res = await (await client.get(f"/api/v1/reservations/{got['reservation_id']}")).json()
            assert (res["site_id"], res["status"]) == (placed[e["receipt"]], "confirmed")
            assert res["citizen_id_masked"] == e["citizen_id_masked"]
        else:
            assert (got["status"], got["reservation_id"]) == ("not-drawn", None)
    # 4 units at s1 for 12 entrants at s1, odd ones may also take s2's 2: 6 winners
    assert statuses == {"won": 6, "not-drawn": 6}
    stats = await (await client.get("/api/v1/admin/rounds/l1/stats", headers=ADMIN)).json()
    assert (stats["remaining"], stats["reserved"], stats["reservations"]) == (0, 6, 6)
    await the_ledger_shows_without_rewriting(database_url, {"won": 6, "not-drawn": 6})


async def the_ledger_shows_without_rewriting(database_url: str, want: dict[str, int]) -> None:
    """Neither the freeze nor the draw rewrote the entry rows (no weight 1, no not-drawn is
    stored: migration 0009); entries_shown reads them as the answers show them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    con = await asyncpg.connect(database_url)
    try:
        while True:  # the winners' entries reach the ledger through the stream
            shown = await con.fetch(
                "SELECT status, weight FROM entries_shown WHERE round_id = 'l1'"
            )
            if Counter(r["status"] for r in shown) == want or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert Counter(r["status"] for r in shown) == want
        assert {r["weight"] for r in shown} == {1}
        stored = await ledger_entries(database_url)
        assert {(r["status"], r["weight"]) for r in stored} == {("won", None), ("registered", None)}
    finally:
        await con.close()


async def test_a_lottery_round_of_a_programme_keeps_every_key_under_the_programme_tag(
    client: TestClient[Any, Any], redis: Redis, keys: Keys
) -> None:
    """Entries, freeze, draw and winners' reservations of a programme's lottery round all live
    under {p:<programme>} (one slot with the programme's cooldowns), found through round-tags;
    eligibility is checked on entries too, before any Redis work."""
    entries = await closed_lottery(
        client, 4, {"s1": 2}, programme="masks", eligibility={"regions": ["11"]}
    )
    rk = keys.round("l1", "p:masks")
    assert await awaited(redis.hlen(rk.entries)) == 4
    assert not await redis.exists(keys.round("l1").round)
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "1 2 3"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    won = []
    for e in entries:
        got = await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json()
        if got["status"] == "won":
            won.append(got["reservation_id"])
    assert len(won) == 2
    assert sorted(k.decode() for k in await awaited(redis.hkeys(rk.reservations))) == sorted(won)
    stats = await (await client.get("/api/v1/admin/rounds/l1/stats", headers=ADMIN)).json()
    assert (stats["reserved"], stats["reservations"]) == (2, 2)

    await seed_lottery(client, "l2", programme="masks", eligibility={"regions": ["44"]})
    body = {"citizen_id": citizen_id(1), "phone": phone(1), "site_id": "s1"}
    r = await client.post("/api/v1/rounds/l2/entries", json=body)
    assert (await problem(r, 409, "not-eligible"))["rule"] == "regions"


async def test_a_draw_before_the_freeze_is_not_ready_and_bad_randomness_is_refused(
    client: TestClient[Any, Any],
) -> None:
    await seed_lottery(client)
    draw = "/api/v1/admin/rounds/l1/draw"
    r = await client.post(draw, json={"public_randomness": "42"}, headers=ADMIN)
    await problem(r, 409, "draw-not-ready")
    await problem(await client.post(f"{draw}/next", headers=ADMIN), 409, "draw-not-ready")
    for bad in ("", "x" * 257, "line\nbreak", 42, None):
        r = await client.post(draw, json={"public_randomness": bad}, headers=ADMIN)
        body = await problem(r, 422, "invalid-request")
        assert [e["field"] for e in body["errors"]] == ["public_randomness"]
    await problem(await client.post(draw, json={"public_randomness": "42"}), 401, "unauthorized")
    record = await (await client.get("/api/v1/rounds/l1/draw")).json()
    assert (record["status"], record["secret"], record["sites"]) == ("registering", None, None)
    await seed(client, "f1")
    await problem(await client.get("/api/v1/rounds/f1/draw"), 409, "wrong-mode")


async def test_a_cancelled_win_goes_to_the_next_entry_in_rank_order_and_the_desk_hands_over(
    client: TestClient[Any, Any],
) -> None:
    """Passes: units that come back go to the not-drawn entries in rank order; a winner
    collects at the pickup desk like any reservation."""
    entries = await closed_lottery(client, 6, {"s1": 2})
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "abc"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    results = (await (await client.get("/api/v1/rounds/l1/draw/results.csv")).read()).decode()
    order = [line.split(",")[1] for line in results.splitlines()[1:]]
    by_receipt = {e["receipt"]: e for e in entries}
    first, second, third = (by_receipt[x] for x in order[:3])
    won = [
        await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json() for e in (first, second)
    ]
    assert [w["status"] for w in won] == ["won", "won"]
    # the first winner collects at the desk; the second cancels
    res = await (await client.get(f"/api/v1/reservations/{won[0]['reservation_id']}")).json()
    r = await client.post(
        "/api/v1/admin/pickups",
        json={"site_id": "s1", "pickup_code": res["pickup_code"], "citizen_id": citizen_id(
            next(n for n in range(6) if entries[n]["entry_id"] == first["entry_id"]))},
        headers=ADMIN,
    )  # fmt: skip
    assert (r.status, (await r.json())["status"]) == (200, "collected")
    r = await client.delete(f"/api/v1/reservations/{won[1]['reservation_id']}")
    assert r.status == 200
    # the ledger must have the cancellation before the pass counts it: a pass may come back empty
    for _ in range(100):
        r = await client.post("/api/v1/admin/rounds/l1/draw/next", headers=ADMIN)
        assert r.status == 200, await r.text()
        record = await r.json()
        if record["passes"][-1]["released"]:
            break
        await asyncio.sleep(0.1)
    assert record["passes"][-1]["released"] == [{"site_id": "s1", "units": 1}]
    n = record["passes"][-1]["pass"]
    drawn = (await (await client.get(f"/api/v1/rounds/l1/draw/pass-{n}.csv")).read()).decode()
    assert [line.split(",")[1] for line in drawn.splitlines()[1:]] == [third["receipt"]]
    got = await (await client.get(f"/api/v1/entries/{third['entry_id']}")).json()
    assert got["status"] == "won"
    assert await asyncio.to_thread(verify_url, client) == 0


def allot(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`allot ...` against the test's Redis prefix and database."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ALLOT_")},
        "ALLOT_REDIS_URL": settings.redis_url,
        "ALLOT_REDIS_PREFIX": settings.service.redis_prefix,
        "ALLOT_DATABASE_URL": settings.database_url,
        "ALLOT_ID_PEPPER": "test-pepper",
    }
    command = [str(Path(sys.executable).with_name("allot")), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


async def test_allot_draw_does_what_the_endpoint_does_and_allot_verify_draw_replays_it(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    """The command line draws once; the same value again is the same record, another is a
    conflict; `allot verify-draw --url` against the running service exits 0."""
    await closed_lottery(client, 5, {"s1": 2})
    done = await asyncio.to_thread(allot, settings, "draw", "--round", "l1",
                                   "--public-randomness", "drand 123: 9f0e")  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = orjson.loads(done.stdout)
    assert record["status"] == "drawn"
    assert record == await (await client.get("/api/v1/rounds/l1/draw")).json()
    again = await asyncio.to_thread(allot, settings, "draw", "--round", "l1",
                                    "--public-randomness", "other")  # fmt: skip
    assert again.returncode == 1
    assert "draw-conflict" in again.stderr
    base = str(client.make_url("")).rstrip("/")
    verified = await asyncio.to_thread(allot, settings, "verify-draw", "--url", base,
                                       "--round", "l1")  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_withdrawals_racing_re_entries_leave_at_most_one_live_entry_per_citizen(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, database_url: str
) -> None:
    """50 citizens withdraw and enter again at once, three times over: each ends with at most
    one live entry, Redis's counts agree with the entries, and the ledger with Redis."""
    await seed_lottery(client, stock={"s1": 5, "s2": 5})
    first = [await (await enter(client, n)).json() for n in range(50)]
    ids = {n: e["entry_id"] for n, e in enumerate(first)}
    for rounds in range(3):
        withdraws = [client.delete(f"/api/v1/entries/{ids[n]}") for n in range(50)]
        again = [enter(client, n, "s2" if rounds % 2 else "s1") for n in range(50)]
        mixed = [x for pair in zip(withdraws, again, strict=True) for x in pair]
        answers = await asyncio.gather(*mixed)
        for n in range(50):
            withdrawn, entered = answers[2 * n], answers[2 * n + 1]
            assert withdrawn.status == 200, await withdrawn.text()
            assert entered.status in (200, 201), await entered.text()
            ids[n] = (await entered.json())["entry_id"]
    rk = keys.round("l1")
    records = [orjson.loads(v) for v in (await awaited(redis.hgetall(rk.entries))).values()]
    live = Counter(r["cit"] for r in records if r["status"] == "registered")
    assert max(live.values()) == 1
    entrants = await awaited(redis.hgetall(rk.entrants))
    assert len(entrants) == len(live)
    tally = await awaited(redis.hgetall(rk.tally))
    counted = sum(int(v) for k, v in tally.items() if k.startswith(b"entries:"))
    assert counted == len(live)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await awaited(redis.xlen(rk.ledger)):
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    rows = await ledger_entries(database_url)
    assert {(r["entry_id"], r["status"], r["site_id"]) for r in rows} == {
        (r["id"], r["status"], r["site"]) for r in records
    }


# -- entitlement: cooldown on entries, winners' bars, exclusion and weights at the freeze -------


async def settled_entry(client: TestClient[Any, Any], entry_id: str) -> dict[str, Any]:
    """The entry once this worker shows it frozen (weight or exclusion set): a worker's round
    snapshot lags another worker's freeze by up to its cache's second."""
    async with asyncio.timeout(5):
        while True:
            got: dict[str, Any] = await (await client.get(f"/api/v1/entries/{entry_id}")).json()
            if got["weight"] is not None or got["status"] != "registered":
                return got
            await asyncio.sleep(0.1)


def _until(body: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(body["until"])


async def test_an_entry_in_the_programmes_cooldown_is_refused_with_until_and_makes_nothing(
    client: TestClient[Any, Any], redis: Redis, keys: Keys
) -> None:
    """A live reservation in another round of the programme bars entering, as reserving: 409
    in-cooldown with until = its created_at + that round's cooldown_days, no entry made; an
    existing entry is left as it is; cancelling lifts the bar; other programmes are not barred."""
    await seed(client, "f1", stock={"s1": 5}, programme="masks", cooldown_days=7)
    await seed_lottery(client, "l1", programme="masks", cooldown_days=3)
    await seed_lottery(client, "l9")  # in no programme
    rk = keys.round("l1", "p:masks")
    made = await reserve(client, 1, round_id="f1")
    assert made.status == 201
    created = dt.datetime.fromisoformat((await made.json())["created_at"])
    seq = await awaited(redis.hget(rk.tally, "seq"))

    r = await enter(client, 1)
    body = await problem(r, 409, "in-cooldown")
    assert r.content_type == "application/problem+json"
    assert _until(body) == created + dt.timedelta(days=7)  # f1's cooldown, to the millisecond
    assert _until(body).utcoffset() == dt.timedelta(hours=8)  # the offset the operator used
    assert "masks" in body["detail"]
    assert await awaited(redis.hlen(rk.entries)) == 0
    assert await awaited(redis.hlen(rk.entrants)) == 0
    assert await awaited(redis.hget(rk.tally, "seq")) == seq  # no change logged
    tally = await awaited(redis.hgetall(rk.tally))
    assert not [k for k in tally if k.startswith(b"entries:")]
    # the bar is the citizen's: another phone, another site, same answer
    await problem(await enter(client, 1, ph=phone(77)), 409, "in-cooldown")
    assert (await enter(client, 1, round_id="l9")).status == 201  # no programme: no bar

    # entered first, reserved afterwards (an entry sets no bar): a change is refused, the
    # entry stays as it was (it is excluded at the freeze if still barred then)
    entered = await (await enter(client, 2)).json()
    assert (await reserve(client, 2, round_id="f1")).status == 201
    await problem(await enter(client, 2, accept=True), 409, "in-cooldown")
    got = await (await client.get(f"/api/v1/entries/{entered['entry_id']}")).json()
    assert (got["status"], got["accept_district"], got["weight"]) == ("registered", False, None)

    assert (await enter(client, 3)).status == 201  # not barred
    assert (await client.delete(made.headers["Location"])).status == 200
    again = await enter(client, 1)
    assert again.status == 201, await again.text()


async def test_entries_racing_reservations_of_the_programme_end_in_one_share_each(
    client: TestClient[Any, Any], settings: Settings, aiohttp_client: Any, redis: Redis, keys: Keys
) -> None:
    """80 citizens enter a lottery round while the even ones reserve in an fcfs round of the
    same programme at the same instant, through two workers. An entry made after the
    reservation is refused in-cooldown; one made before is excluded at the freeze; so the
    frozen list is exactly the odd citizens', and no even citizen can win a second share."""
    second: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    await seed(client, "f1", stock={"s1": 200}, programme="masks", cooldown_days=7)
    await seed_lottery(client, "l1", stock={"s1": 10}, closes_in=6, programme="masks")
    citizens = range(80)
    workers = (client, second)
    asks = [enter(workers[n % 2], n) for n in citizens]
    asks += [reserve(workers[(n // 2) % 2], n, round_id="f1") for n in citizens if n % 2 == 0]
    answers = await asyncio.gather(*asks)
    entries, reservations = answers[: len(citizens)], answers[len(citizens) :]
    assert {r.status for r in reservations} == {201}
    made: dict[int, dict[str, Any]] = {}
    for n, r in zip(citizens, entries, strict=True):
        body = await r.json()
        if n % 2:
            assert r.status == 201, body
        else:
            assert (r.status, body.get("code")) in ((201, None), (409, "in-cooldown")), body
        if r.status == 201:
            made[n] = body
    refused = len(citizens) - len(made)

    record = await wait_for_status(client, "frozen")
    listed = await (await client.get("/api/v1/rounds/l1/draw/entries.csv")).read()
    receipts = {line.split(b",")[0].decode() for line in listed.splitlines()[1:]}
    assert receipts == {e["receipt"] for n, e in made.items() if n % 2}
    assert record["entries"] == 40
    # the other worker may have frozen it: this one's round snapshot follows within a second
    await settled_entry(client, made[1]["entry_id"])
    for n, e in made.items():
        got = await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json()
        want = ("registered", 1) if n % 2 else ("excluded", None)
        assert (got["status"], got["weight"]) == want, n
    rows = await ledger_entries(settings.database_url)
    assert Counter(r["status"] for r in rows) == {"registered": 40, "excluded": 40 - refused}

    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "9 9 9"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    assert await asyncio.to_thread(verify_url, client) == 0
    rk = keys.round("l1", "p:masks")
    won = [orjson.loads(v) for v in (await awaited(redis.hvals(rk.reservations)))]
    assert len(won) == 10
    listed_citizens = {r["citizen_hash"] for r in rows if r["status"] == "registered"}
    assert {w["cit"] for w in won} <= listed_citizens  # the odd ones, who hold nothing else


async def test_a_win_bars_the_programme_until_its_cooldown_ends_and_cancelling_it_lifts_it(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """A winner's reservation sets the bar a claim sets (award.lua): reserving or entering
    another round of the programme is 409 in-cooldown until created_at + cooldown_days; a loser
    is not barred; cancelling the win lifts the bar; rebuild brings the bar back."""
    entries = await closed_lottery(client, 6, {"s1": 2}, programme="masks", cooldown_days=5)
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "1 2 3"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    await seed(client, "f1", stock={"s1": 5}, programme="masks", cooldown_days=7)
    await seed_lottery(client, "l2", programme="masks")
    got = {
        n: await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json()
        for n, e in enumerate(entries)
    }
    winners = [n for n, e in got.items() if e["status"] == "won"]
    losers = [n for n, e in got.items() if e["status"] == "not-drawn"]
    assert (len(winners), len(losers)) == (2, 4)
    rk = keys.round("l1", "p:masks")
    assert await awaited(redis.hlen(rk.entitled)) == 2
    for n in winners:
        won = got[n]["reservation_id"]
        res = await (await client.get(f"/api/v1/reservations/{won}")).json()
        until = dt.datetime.fromisoformat(res["created_at"]) + dt.timedelta(days=5)
        body = await problem(await reserve(client, n, round_id="f1"), 409, "in-cooldown")
        assert _until(body) == until
        body = await problem(await enter(client, n, round_id="l2"), 409, "in-cooldown")
        assert _until(body) == until
    assert (await reserve(client, losers[0], round_id="f1")).status == 201
    assert (await enter(client, losers[1], round_id="l2")).status == 201

    # rebuild after Redis lost the programme's bars: the winners' come back from the ledger
    await awaited(redis.delete(rk.entitled))
    async with asyncio.timeout(10):
        while await awaited(redis.xlen(rk.ledger)):
            await asyncio.sleep(0.05)
    con = await asyncpg.connect(settings.database_url)
    try:
        summary = await rebuild_round(redis, con, keys, "l1", force=True)
    finally:
        await con.close()
    assert summary["cooldowns"] == 2
    await problem(await reserve(client, winners[0], round_id="f1"), 409, "in-cooldown")

    cancelled = await client.delete(f"/api/v1/reservations/{got[winners[0]]['reservation_id']}")
    assert cancelled.status == 200
    assert (await reserve(client, winners[0], round_id="f1")).status == 201
    await problem(await enter(client, winners[1], round_id="l2"), 409, "in-cooldown")


async def frozen_weights(client: TestClient[Any, Any], round_id: str) -> dict[str, int]:
    """receipt -> weight, as entries.csv of the round publishes them."""
    listed = await (await client.get(f"/api/v1/rounds/{round_id}/draw/entries.csv")).read()
    rows = [line.decode().split(",") for line in listed.splitlines()[1:]]
    return {row[0]: int(row[-1]) for row in rows}


async def test_programme_lotteries_freeze_in_close_order_with_exclusions_and_loss_weights(
    client: TestClient[Any, Any], redis: Redis, keys: Keys, settings: Settings
) -> None:
    """Three lottery rounds of one programme, the same six citizens in each. A round is not
    frozen (nor drawable) before the earlier-closing ones are drawn; then the winners of the
    earlier ones are excluded (cooldown) and, with loss_weighting, the losers weigh 1 + their
    losing streak; entries.csv carries the weights, verify-draw replays them, the entry shows
    its weight or exclusion and the fairness report's weight dimension counts them."""
    common: dict[str, Any] = {"programme": "masks", "cooldown_days": 7}
    await seed_lottery(client, "l1", stock={"s1": 2}, closes_in=4, **common)
    await seed_lottery(client, "l2", stock={"s1": 2}, closes_in=5, loss_weighting=True, **common)
    await seed_lottery(client, "l3", stock={"s1": 2}, closes_in=5, loss_weighting=True, **common)
    citizens = range(6)
    asks = [enter(client, n, round_id=r) for r in ("l1", "l2", "l3") for n in citizens]
    answers = await asyncio.gather(*asks)
    assert {a.status for a in answers} == {201}
    bodies = [await a.json() for a in answers]
    entry = {(r, n): bodies[i * 6 + n] for i, r in enumerate(("l1", "l2", "l3")) for n in citizens}

    await wait_for_status(client, "frozen", "l1")
    await asyncio.sleep(5)  # two freeze looks of the worker at least: l2 and l3 wait for l1
    for later in ("l2", "l3"):
        assert (await (await client.get(f"/api/v1/rounds/{later}/draw")).json())["status"] == (
            "registering"
        )
    draw = "/api/v1/admin/rounds/{}/draw"
    r = await client.post(draw.format("l2"), json={"public_randomness": "x"}, headers=ADMIN)
    await problem(r, 409, "draw-not-ready")
    assert (await frozen_weights(client, "l1")) == {entry["l1", n]["receipt"]: 1 for n in citizens}

    async def drawn(round_id: str) -> dict[int, str]:
        r = await client.post(draw.format(round_id), json={"public_randomness": "7"}, headers=ADMIN)
        assert r.status == 200, await r.text()
        assert (await r.json())["status"] == "drawn"
        assert await asyncio.to_thread(verify_url, client, round_id) == 0
        return {
            n: (
                await (await client.get(f"/api/v1/entries/{entry[round_id, n]['entry_id']}")).json()
            )["status"]
            for n in citizens
        }

    first = await drawn("l1")
    won1 = {n for n, s in first.items() if s == "won"}
    assert len(won1) == 2
    await wait_for_status(client, "frozen", "l2")
    assert (await (await client.get("/api/v1/rounds/l3/draw")).json())["status"] == "registering"
    # l1's winners are in cooldown at l2's freeze: excluded; l1's losers weigh 2
    assert await frozen_weights(client, "l2") == {
        entry["l2", n]["receipt"]: 2 for n in citizens if n not in won1
    }
    for n in citizens:
        got = await settled_entry(client, entry["l2", n]["entry_id"])
        want = ("excluded", None) if n in won1 else ("registered", 2)
        assert (got["status"], got["weight"]) == want, n
    # Redis lost l2's entries: rebuild brings back the exclusions and weights from the ledger
    await awaited(redis.delete(keys.round("l2", "p:masks").entries))
    con = await asyncpg.connect(settings.database_url)
    try:
        await rebuild_round(redis, con, keys, "l2", force=True)
    finally:
        await con.close()
    async with asyncio.timeout(5):  # the worker serves the rebuilt round within a second
        while (await client.get(f"/api/v1/entries/{entry['l2', 0]['entry_id']}")).status != 200:
            await asyncio.sleep(0.1)
    for n in citizens:
        got = await (await client.get(f"/api/v1/entries/{entry['l2', n]['entry_id']}")).json()
        want = ("excluded", None) if n in won1 else ("registered", 2)
        assert (got["status"], got["weight"]) == want, n

    second = await drawn("l2")
    assert {n for n, s in second.items() if s == "excluded"} == won1
    won2 = {n for n, s in second.items() if s == "won"}
    assert len(won2) == 2
    async with asyncio.timeout(10):  # the report reads the ledger: the wins arrive a moment later
        while True:
            r = await client.get("/api/v1/admin/rounds/l2/fairness", headers=ADMIN)
            groups = (await r.json())["groups"]
            by_weight = {
                g["group"]: (g["asked"], g["granted"]) for g in groups if g["dimension"] == "weight"
            }
            if by_weight == {"2": (4, 2)} or len(by_weight) != 1:
                break
            await asyncio.sleep(0.1)
    assert by_weight == {"2": (4, 2)}

    await wait_for_status(client, "frozen", "l3")
    # winners of l1 and of l2 excluded; who lost both weighs 3
    lost_both = set(citizens) - won1 - won2
    assert await frozen_weights(client, "l3") == {entry["l3", n]["receipt"]: 3 for n in lost_both}
    third = await drawn("l3")
    assert {n for n, s in third.items() if s == "excluded"} == won1 | won2
    assert {n for n, s in third.items() if s == "won"} == lost_both  # 2 units, 2 entries


async def test_a_winner_who_reserved_in_the_programme_after_the_freeze_gets_no_second_share(
    client: TestClient[Any, Any], database_url: str
) -> None:
    """The freeze could not know of a reservation made after it: the award refuses the second
    share (the entry becomes excluded), the unit stays at the site and the next pass releases
    it; the published draw still replays."""
    entries = await closed_lottery(client, 3, {"s1": 3}, programme="masks", cooldown_days=7)
    await seed(client, "f1", stock={"s1": 5}, programme="masks", cooldown_days=7)
    assert (await reserve(client, 0, round_id="f1")).status == 201  # an entry sets no bar
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "5"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    results = (await (await client.get("/api/v1/rounds/l1/draw/results.csv")).read()).decode()
    assert all(line.split(",")[2] for line in results.splitlines()[1:])  # all three placed
    shown = [await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json() for e in entries]
    assert [(e["status"], e["reservation_id"] is None) for e in shown] == [
        ("excluded", True), ("won", False), ("won", False),
    ]  # fmt: skip
    stats = await (await client.get("/api/v1/admin/rounds/l1/stats", headers=ADMIN)).json()
    assert (stats["reserved"], stats["remaining"]) == (2, 1)
    await wait_for_entries(database_url, 3)
    for _ in range(100):  # the ledger has the exclusion a moment later
        r = await client.post("/api/v1/admin/rounds/l1/draw/next", headers=ADMIN)
        assert r.status == 200, await r.text()
        record = await r.json()
        if record["passes"][-1]["released"]:
            break
        await asyncio.sleep(0.1)
    assert record["passes"][-1]["released"] == [{"site_id": "s1", "units": 1}]
    assert await asyncio.to_thread(verify_url, client) == 0
