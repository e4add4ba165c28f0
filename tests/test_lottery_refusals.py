"""Refusals on the lottery routes that the other lottery tests do not walk: entries with bodies
the front door refuses (400, 413, 415, 422 naming each field), draw requests on rounds that have
no draw or do not exist, draw files that do not exist yet, and the freeze's lock (API.md,
"Errors", "Lottery rounds"). Every refusal changes nothing: the Redis keys under the test's
prefix are compared before and after."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import os
from typing import Any, cast

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator import drawjob
from allocator.config import Settings
from allocator.keys import Keys
from allocator.redistyping import awaited
from service.app import create_app
from service.appkeys import ALLOCATOR
from tests.helpers import ADMIN, citizen_id, phone, redis_state, seed
from tests.test_eligibility_api import RULES
from tests.test_lottery import enter, problem, seed_lottery, wait_for_status

Client = TestClient[Any, Any]
ENTRIES = "/api/v1/rounds/l1/entries"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def client(settings: Settings, redis: Redis, checked_client: Any) -> Client:
    """The real application; every answer must also match the served OpenAPI document."""
    return cast(Client, await checked_client(create_app(settings)))


async def settled(redis: Redis, prefix: str) -> dict[bytes, object]:
    """The keys under ``prefix`` once the ledger writer has taken what was there (two equal
    looks 0.2 s apart), so that a later difference is the request's doing."""
    before = await redis_state(redis, prefix)
    async with asyncio.timeout(10):
        while True:
            await asyncio.sleep(0.2)
            now = await redis_state(redis, prefix)
            if now == before:
                return now
            before = now


def wrong_check_digit(n: int) -> str:
    good = citizen_id(n)
    return good[:-1] + ("0" if good[-1] != "0" else "1")


def good_entry(n: int = 1) -> dict[str, Any]:
    return {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": "s1"}


# -- entries: bodies refused at the door ------------------------------------------------------


async def test_entry_bodies_that_are_not_json_objects_too_big_or_not_json_change_nothing(
    client: Client, redis: Redis, keys: Keys
) -> None:
    """400 malformed-json, 413 payload-too-large, 415 unsupported-media-type on the entries
    route, exactly as on the reservations route; no entry is made by any of them."""
    await seed_lottery(client)
    before = await settled(redis, keys.prefix)
    for raw in (b"{not json", b"", b'{"citizen_id": ', b"\xff\xfe{}", b"[]", b'"x"', b"null"):
        r = await client.post(ENTRIES, data=raw, headers=JSON)
        await problem(r, 400, "malformed-json")
    big = (
        b'{"citizen_id": "%s", "phone": "%s", "site_id": "s1"'
        % (citizen_id(1).encode(), phone(1).encode())
        + b" " * (16 * 1024)
        + b"}"
    )
    await problem(await client.post(ENTRIES, data=big, headers=JSON), 413, "payload-too-large")
    for ct in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        r = await client.post(ENTRIES, data=b'{"citizen_id": "x"}', headers={"Content-Type": ct})
        await problem(r, 415, "unsupported-media-type")
    assert await redis_state(redis, keys.prefix) == before
    # the same citizen is still free to enter: the refusals left no trace
    assert (await enter(client, 1)).status == 201


BAD_ENTRIES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "nothing": ({}, ["citizen_id", "phone", "site_id"]),
    "wrong check digit": ({**good_entry(), "citizen_id": wrong_check_digit(1)}, ["citizen_id"]),
    "phone not a number": ({**good_entry(), "phone": "call me"}, ["phone"]),
    "site_id not an identifier": ({**good_entry(), "site_id": "no such site!"}, ["site_id"]),
    "site_id a number": ({**good_entry(), "site_id": 7}, ["site_id"]),
    "accept_district a string": ({**good_entry(), "accept_district": "yes"}, ["accept_district"]),
    "accept_district a number": ({**good_entry(), "accept_district": 1}, ["accept_district"]),
    "all at once": (
        {"citizen_id": 12, "phone": "", "site_id": "", "accept_district": "0"},
        ["accept_district", "citizen_id", "phone", "site_id"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
async def test_an_entry_with_bad_fields_is_422_naming_each_and_changes_nothing(
    case: str, client: Client, redis: Redis, keys: Keys
) -> None:
    body, fields = BAD_ENTRIES[case]
    await seed_lottery(client)
    before = await settled(redis, keys.prefix)
    answer = await problem(await client.post(ENTRIES, json=body), 422, "invalid-request")
    assert sorted(e["field"] for e in answer["errors"]) == fields
    assert all(e["message"] for e in answer["errors"])
    assert await redis_state(redis, keys.prefix) == before
    assert await awaited(redis.hlen(keys.round("l1").entries)) == 0


async def test_withdrawing_an_unknown_entry_is_404(client: Client) -> None:
    await seed_lottery(client)
    for entry_id in ("nonsense", "AAAAAAAAAAAAAAAAAAAAAA.l1"):
        await problem(await client.delete(f"/api/v1/entries/{entry_id}"), 404, "not-found")


# -- the draw routes on rounds without a draw ------------------------------------------------


async def test_draw_requests_on_an_fcfs_or_unknown_round_are_refused_and_change_nothing(
    client: Client, redis: Redis, keys: Keys
) -> None:
    """An FCFS round has no draw: 409 wrong-mode for the draw, the pass and the files; an
    unknown round 404; a body that is not JSON 400 (after the operator's token is checked)."""
    await seed(client, "f1")
    await seed_lottery(client)
    before = await settled(redis, keys.prefix)
    randomness = {"public_randomness": "7 12 19"}
    r = await client.post("/api/v1/admin/rounds/f1/draw", json=randomness, headers=ADMIN)
    await problem(r, 409, "wrong-mode")
    r = await client.post("/api/v1/admin/rounds/f1/draw/next", headers=ADMIN)
    await problem(r, 409, "wrong-mode")
    for name in ("entries.csv", "stock.csv", "results.csv", "pass-1.csv"):
        await problem(await client.get(f"/api/v1/rounds/f1/draw/{name}"), 409, "wrong-mode")
    r = await client.post("/api/v1/admin/rounds/nope/draw", json=randomness, headers=ADMIN)
    await problem(r, 404, "not-found")
    await problem(await client.post("/api/v1/admin/rounds/nope/draw/next", headers=ADMIN), 404,
                  "not-found")  # fmt: skip
    await problem(await client.get("/api/v1/rounds/nope/draw"), 404, "not-found")
    await problem(await client.get("/api/v1/rounds/nope/draw/entries.csv"), 404, "not-found")
    r = await client.post("/api/v1/admin/rounds/l1/draw", data=b"{", headers={**ADMIN, **JSON})
    await problem(r, 400, "malformed-json")
    r = await client.post("/api/v1/admin/rounds/l1/draw", json={}, headers=ADMIN)
    body = await problem(r, 422, "invalid-request")
    assert [e["field"] for e in body["errors"]] == ["public_randomness"]
    assert await redis_state(redis, keys.prefix) == before
    record = await (await client.get("/api/v1/rounds/l1/draw")).json()
    assert (record["status"], record["public_randomness"]) == ("registering", None)


async def test_draw_files_that_do_not_exist_yet_are_404(client: Client) -> None:
    """Before the freeze no file but the record; after it entries and stock, not results or a
    pass, and malformed public randomness is 422 and draws nothing; a pass number never run
    is 404 even after the draw."""
    await seed_lottery(client, closes_in=2)
    assert (await enter(client, 1)).status == 201
    for name in ("entries.csv", "stock.csv", "results.csv", "pass-1.csv"):
        await problem(await client.get(f"/api/v1/rounds/l1/draw/{name}"), 404, "not-found")
    await wait_for_status(client, "frozen")
    for name in ("entries.csv", "stock.csv"):
        assert (await client.get(f"/api/v1/rounds/l1/draw/{name}")).status == 200
    for name in ("results.csv", "pass-1.csv"):
        await problem(await client.get(f"/api/v1/rounds/l1/draw/{name}"), 404, "not-found")
    frozen = await (await client.get("/api/v1/rounds/l1/draw")).json()
    for bad in ("", "x" * 257, "tab\there", "nul\x00", ["1"], {"v": 1}):
        r = await client.post(
            "/api/v1/admin/rounds/l1/draw", json={"public_randomness": bad}, headers=ADMIN
        )
        body = await problem(r, 422, "invalid-request")
        assert [e["field"] for e in body["errors"]] == ["public_randomness"]
    assert await (await client.get("/api/v1/rounds/l1/draw")).json() == frozen  # not drawn
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "1"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    assert (await client.get("/api/v1/rounds/l1/draw/results.csv")).status == 200
    for name in ("pass-1.csv", "pass-0.csv", "pass-x.csv"):
        await problem(await client.get(f"/api/v1/rounds/l1/draw/{name}"), 404, "not-found")


# -- the freeze: once, by one holder of the round's lock --------------------------------------


async def test_the_freeze_waits_for_the_lock_holder_and_a_second_freeze_changes_nothing(
    client: Client, database_url: str
) -> None:
    """While someone else holds the round's draw lock (another worker or node freezing it),
    no worker freezes the round and a direct freeze answers ``busy``; once the lock is let go
    the round is frozen, and freezing it again answers ``frozen`` and rewrites nothing."""
    await seed_lottery(client, closes_in=2)
    assert {(await enter(client, n)).status for n in range(3)} == {201}
    holder = await asyncpg.connect(database_url)
    try:
        lock = holder.transaction()
        await lock.start()
        assert await holder.fetchval(drawjob.DRAW_LOCK, drawjob.lock_name("l1"))
        await asyncio.sleep(2.0 + 2 * 2.5)  # closed, and two looks of the worker's watcher
        record = await (await client.get("/api/v1/rounds/l1/draw")).json()
        assert (record["status"], record["frozen_at"]) == ("registering", None)
        found = await asyncio.to_thread(drawjob.freeze, database_url, "l1", {})
        assert found == "busy"
        await lock.rollback()
    finally:
        await holder.close()
    frozen = await wait_for_status(client, "frozen")
    assert frozen["entries"] == 3
    con = await asyncpg.connect(database_url)
    try:
        row = await con.fetchrow("SELECT * FROM draws WHERE round_id = 'l1'")
        assert row is not None
        assert await asyncio.to_thread(drawjob.freeze, database_url, "l1", {}) == "frozen"
        again = await con.fetchrow("SELECT * FROM draws WHERE round_id = 'l1'")
    finally:
        await con.close()
    assert again is not None
    assert dict(again) == dict(row)
    assert isinstance(row["frozen_at"], dt.datetime)
    assert await (await client.get("/api/v1/rounds/l1/draw")).json() == frozen


async def test_the_freeze_and_the_draw_run_in_a_process_of_their_own(client: Client) -> None:
    """A draw of a million entries sorts and hashes for seconds: it must not run on the
    citizens' event loop, nor in its process (allocator/lottery.py, a spawned pool)."""
    await seed_lottery(client, closes_in=2)
    assert (await enter(client, 1)).status == 201
    await wait_for_status(client, "frozen")
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "9"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    pool = client.app[ALLOCATOR].lottery._pool
    assert isinstance(pool, concurrent.futures.ProcessPoolExecutor)
    pids = set(pool._processes)
    assert pids
    assert os.getpid() not in pids


# -- who may enter: every eligibility rule on the entries route -------------------------------


@pytest.mark.parametrize("rule", sorted(RULES))
async def test_each_failed_rule_refuses_an_entry_409_not_eligible_before_redis_is_touched(
    rule: str, client: Client, redis: Redis, keys: Keys
) -> None:
    """The same rules as for reservations (tests/test_eligibility_api.py), on a lottery's
    entries: 409 naming the rule, no token, no entry; the IDs that pass are entered."""
    eligibility, failing, passing = RULES[rule]
    await seed_lottery(client, eligibility=eligibility)
    before = await settled(redis, keys.prefix)
    r = await client.post(ENTRIES, json={"citizen_id": failing, "phone": phone(1), "site_id": "s1"})
    body = await problem(r, 409, "not-eligible")
    assert body["rule"] == rule
    assert await redis_state(redis, keys.prefix) == before
    for n, citizen in enumerate(passing, start=2):
        r = await client.post(
            ENTRIES, json={"citizen_id": citizen, "phone": phone(n), "site_id": "s1"}
        )
        assert r.status == 201, await r.text()
