"""Desk tokens: least privilege for the staff of one site, revoked everywhere within a second.

Every answer of the ``client`` here is checked against the served OpenAPI document.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import replace
from typing import Any, cast

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from service.app import create_app
from tests.helpers import ADMIN, ADMIN_TOKEN, FakeClock, citizen_id, phone, reserve, seed
from tests.test_lottery import ledger_entries, seed_lottery, wait_for_entries

Client = TestClient[Any, Any]
TOKEN = re.compile(r"allot-desk-[A-Za-z0-9_-]{43}")


@pytest.fixture
async def client(settings: Settings, redis: Redis, checked_client: Any) -> Client:
    c = cast(Client, await checked_client(create_app(settings)))
    await seed(c, stock={"s1": 10, "s2": 10})
    return c


async def new_desk(client: Client, site: str = "s1", label: str = "Counter 1") -> dict[str, Any]:
    r = await client.post(
        "/api/v1/admin/desk-tokens", json={"site_id": site, "label": label}, headers=ADMIN
    )
    assert r.status == 201, await r.text()
    body: dict[str, Any] = await r.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def walk_in(n: int, site: str = "s1") -> dict[str, str]:
    return {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": site}


async def desk_reserve(client: Client, token: str, n: int, site: str = "s1") -> Any:
    return await client.post(
        "/api/v1/desk/rounds/r1/reservations", json=walk_in(n, site), headers=bearer(token)
    )


async def stats(client: Client) -> dict[str, Any]:
    r = await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)
    assert r.status == 200
    body: dict[str, Any] = await r.json()
    return body


# -- creating and listing ---------------------------------------------------------------------


async def test_a_desk_token_is_shown_once_and_stored_only_as_its_hash(
    client: Client, pg: asyncpg.Connection, redis: Redis, redis_prefix: str
) -> None:
    """A leaked database or Redis must not hand out the keys of every pharmacy counter."""
    desk = await new_desk(client, "s1", "Pharmacy 7, counter 2")
    assert TOKEN.fullmatch(desk["token"])
    assert desk["site_id"] == "s1"
    assert desk["label"] == "Pharmacy 7, counter 2"
    row = await pg.fetchrow("SELECT * FROM desk_tokens WHERE token_id = $1", desk["token_id"])
    assert row is not None
    assert row["token_hash"] == hashlib.sha256(desk["token"].encode()).hexdigest()
    assert desk["token"] not in repr(dict(row))
    secret = desk["token"].removeprefix("allot-desk-")
    async for key in redis.scan_iter(match=f"{redis_prefix}:*"):
        assert secret.encode() not in key
    listed = await client.get("/api/v1/admin/desk-tokens", headers=ADMIN)
    assert listed.status == 200
    assert secret not in await listed.text()
    [only] = (await listed.json())["desk_tokens"]
    assert only["token_id"] == desk["token_id"]
    assert only["revoked_at"] is None
    again = await new_desk(client, "s1", "Counter 1")
    assert again["token"] != desk["token"]
    assert again["token_id"] != desk["token_id"]


async def test_a_token_for_an_unknown_site_is_422_naming_site_id(
    client: Client, pg: asyncpg.Connection
) -> None:
    """A desk token for a site that does not exist could never be used: a bad field."""
    r = await client.post(
        "/api/v1/admin/desk-tokens", json={"site_id": "nowhere", "label": "x"}, headers=ADMIN
    )
    assert r.status == 422
    assert [e["field"] for e in (await r.json())["errors"]] == ["site_id"]
    assert await pg.fetchval("SELECT count(*) FROM desk_tokens") == 0


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"site_id": "s1"}, ["label"]),
        ({"site_id": "s1", "label": "   "}, ["label"]),
        ({"site_id": "s1", "label": "x" * 201}, ["label"]),
        ({"site_id": "s1", "label": "counter\n2"}, ["label"]),
        ({"site_id": "s1", "label": 7}, ["label"]),
        ({"site_id": "S 1", "label": "ok"}, ["site_id"]),
        ({}, ["site_id", "label"]),
    ],
)
async def test_a_bad_desk_token_request_is_422_and_creates_nothing(
    client: Client, pg: asyncpg.Connection, body: dict[str, Any], fields: list[str]
) -> None:
    """Each bad field named; nothing stored."""
    r = await client.post("/api/v1/admin/desk-tokens", json=body, headers=ADMIN)
    assert r.status == 422
    assert [e["field"] for e in (await r.json())["errors"]] == fields
    assert await pg.fetchval("SELECT count(*) FROM desk_tokens") == 0


async def test_only_the_operator_creates_lists_and_revokes_desk_tokens(client: Client) -> None:
    """A desk must not mint itself more tokens, nor revoke a colleague's."""
    desk = await new_desk(client)
    other = await new_desk(client, "s2")
    as_desk = bearer(desk["token"])
    r = await client.post(
        "/api/v1/admin/desk-tokens", json={"site_id": "s1", "label": "x"}, headers=as_desk
    )
    assert r.status == 403
    assert (await r.json())["code"] == "forbidden"
    r = await client.delete(f"/api/v1/admin/desk-tokens/{other['token_id']}", headers=as_desk)
    assert r.status == 403
    assert (await desk_reserve(client, other["token"], 1, "s2")).status == 201  # still valid
    assert (await client.post("/api/v1/admin/desk-tokens", json={})).status == 401


# -- what a desk may do -------------------------------------------------------------------------


async def test_a_desk_collects_at_its_own_site_only(client: Client) -> None:
    """A counter hands over only what was reserved at its own site."""
    here = await (await reserve(client, 1, "s1")).json()
    there = await (await reserve(client, 2, "s2")).json()
    desk = await new_desk(client, "s1")
    r = await client.post(
        "/api/v1/admin/pickups",
        json={"site_id": "s2", "pickup_code": there["pickup_code"]},
        headers=bearer(desk["token"]),
    )
    assert r.status == 403
    assert (await r.json())["code"] == "forbidden"
    r = await client.get(f"/api/v1/reservations/{there['reservation_id']}")
    assert (await r.json())["status"] == "confirmed"  # nothing changed
    r = await client.post(
        "/api/v1/admin/pickups",
        json={"site_id": "s1", "pickup_code": here["pickup_code"]},
        headers=bearer(desk["token"]),
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["status"] == "collected"


async def test_a_desk_reserves_for_a_walk_in_at_its_own_site_only(client: Client) -> None:
    """The assisted form answers like the citizen's own; another site is refused untouched."""
    desk = await new_desk(client, "s1")
    r = await desk_reserve(client, desk["token"], 5)
    assert r.status == 201, await r.text()
    made = await r.json()
    assert r.headers["Location"] == f"/api/v1/reservations/{made['reservation_id']}"
    assert made["site_id"] == "s1"
    assert made["citizen_id_masked"] == citizen_id(5)[:6] + "********" + citizen_id(5)[-4:]
    again = await desk_reserve(client, desk["token"], 5)
    assert again.status == 200  # a retry at the counter is safe
    assert (await again.json())["reservation_id"] == made["reservation_id"]
    before = await stats(client)
    r = await desk_reserve(client, desk["token"], 6, "s2")
    assert r.status == 403
    assert (await r.json())["code"] == "forbidden"
    after = await stats(client)
    assert after["reserved"] == before["reserved"] == 1
    assert after["reservations"] == before["reservations"] == 1


async def test_the_desk_route_keeps_the_citizen_answers(client: Client) -> None:
    """Same body, same refusals: a citizen holding one elsewhere is told so at the counter."""
    await reserve(client, 9, "s2")
    desk = await new_desk(client, "s1")
    r = await desk_reserve(client, desk["token"], 9)
    assert r.status == 409
    assert (await r.json())["code"] == "already-reserved"
    r = await client.post(
        "/api/v1/desk/rounds/r1/reservations",
        json={"citizen_id": "123", "site_id": "s1"},
        headers=bearer(desk["token"]),
    )
    assert r.status == 422
    assert {e["field"] for e in (await r.json())["errors"]} == {"citizen_id", "phone"}
    r = await client.post(
        "/api/v1/desk/rounds/nope/reservations", json=walk_in(10), headers=bearer(desk["token"])
    )
    assert r.status == 404


async def test_the_operator_token_may_use_the_desk_routes_at_any_site(client: Client) -> None:
    """The operator may do everything a desk may, everywhere."""
    for n, site in ((1, "s1"), (2, "s2")):
        r = await client.post(
            "/api/v1/desk/rounds/r1/reservations", json=walk_in(n, site), headers=ADMIN
        )
        assert r.status == 201, await r.text()
    me = await client.get("/api/v1/desk/me", headers=ADMIN)
    assert (await me.json())["role"] == "operator"


# -- entering walk-ins in a lottery ------------------------------------------------------------


async def desk_enter(client: Client, headers: dict[str, str], n: int, site: str = "s1") -> Any:
    return await client.post(
        "/api/v1/desk/rounds/l1/entries", json=walk_in(n, site), headers=headers
    )


async def test_a_desk_enters_a_walk_in_in_a_lottery_at_its_own_site_only(
    client: Client, database_url: str
) -> None:
    """The assisted form registers for the lottery like the citizen's own page, as `desk`;
    another site is refused and nothing is entered."""
    await seed_lottery(client, stock={"s1": 3, "s2": 3})
    desk = await new_desk(client, "s1")
    r = await desk_enter(client, bearer(desk["token"]), 5)
    assert r.status == 201, await r.text()
    made = await r.json()
    assert r.headers["Location"] == f"/api/v1/entries/{made['entry_id']}"
    assert (made["site_id"], made["status"]) == ("s1", "registered")
    assert made["citizen_id_masked"] == citizen_id(5)[:6] + "********" + citizen_id(5)[-4:]
    again = await desk_enter(client, bearer(desk["token"]), 5)
    assert again.status == 200  # a retry at the counter is safe
    assert (await again.json())["entry_id"] == made["entry_id"]
    r = await desk_enter(client, bearer(desk["token"]), 6, "s2")
    assert r.status == 403
    assert (await r.json())["code"] == "forbidden"
    # a citizen's own entry, from the web page, for comparison
    r = await client.post(
        "/api/v1/rounds/l1/entries", json=walk_in(7), headers={"X-Allot-Channel": "web"}
    )
    assert r.status == 201
    await wait_for_entries(database_url, 2)
    await asyncio.sleep(0.3)  # a refused entry, had it been made, would be in the ledger now
    rows = await ledger_entries(database_url)
    assert sorted((row["channel"], row["site_id"]) for row in rows) == [
        ("desk", "s1"),
        ("web", "s1"),
    ]
    assert all(row["age_band"] is not None for row in rows)
    draw = await (await client.get("/api/v1/rounds/l1/draw")).json()
    assert draw["status"] == "registering"


async def test_the_desk_entry_route_keeps_the_citizen_answers_and_lets_the_operator_in(
    client: Client,
) -> None:
    """Same body, same refusals; the operator may enter anyone at any site."""
    await seed_lottery(client, stock={"s1": 3, "s2": 3})
    desk = await new_desk(client, "s1")
    r = await client.post(
        "/api/v1/rounds/l1/entries", json={**walk_in(9), "phone": phone(10)}
    )  # the citizen entered from home with another phone
    assert r.status == 201
    r = await desk_enter(client, bearer(desk["token"]), 9)
    assert (r.status, (await r.json())["code"]) == (409, "already-entered")
    r = await client.post(
        "/api/v1/desk/rounds/l1/entries",
        json={"citizen_id": "123", "site_id": "s1"},
        headers=bearer(desk["token"]),
    )
    assert r.status == 422
    assert {e["field"] for e in (await r.json())["errors"]} == {"citizen_id", "phone"}
    r = await client.post(  # the desk's fcfs round: reserve there instead
        "/api/v1/desk/rounds/r1/entries", json=walk_in(11), headers=bearer(desk["token"])
    )
    assert (r.status, (await r.json())["code"]) == (409, "wrong-mode")
    r = await client.post(
        "/api/v1/desk/rounds/nope/entries", json=walk_in(11), headers=bearer(desk["token"])
    )
    assert r.status == 404
    assert (await client.post("/api/v1/desk/rounds/l1/entries", json=walk_in(12))).status == 401
    for n, site in ((13, "s1"), (14, "s2")):
        r = await desk_enter(client, ADMIN, n, site)
        assert r.status == 201, await r.text()


async def test_the_console_learns_which_site_a_desk_token_is_for(client: Client) -> None:
    """Desk mode shows only the token's site: the console must know it without asking."""
    desk = await new_desk(client, "s2", "Community desk")
    r = await client.get("/api/v1/desk/me", headers=bearer(desk["token"]))
    assert r.status == 200
    assert await r.json() == {
        "role": "desk",
        "token_id": desk["token_id"],
        "site_id": "s2",
        "label": "Community desk",
    }
    assert (await client.get("/api/v1/desk/me")).status == 401


def _sample(path: str) -> str:
    return path.replace("{round_id}", "r1").replace("{token_id}", "desk-0123456789abcdef")


async def test_every_operator_endpoint_refuses_a_desk_token_with_403(client: Client) -> None:
    """Walk the router: a route added later is refused to desks unless it is let in on purpose."""
    desk = await new_desk(client, "s1")
    allowed = {("POST", "/api/v1/admin/pickups")}
    walked = []
    for resource in client.app.router.resources():
        path = resource.canonical
        if not path.startswith("/api/v1/admin/"):
            continue
        for route in resource:
            if route.method == "HEAD" or (route.method, path) in allowed:
                continue
            walked.append((route.method, path))
            r = await client.request(
                route.method, _sample(path), json={}, headers=bearer(desk["token"])
            )
            assert r.status == 403, (route.method, path, r.status, await r.text())
            assert (await r.json())["code"] == "forbidden"
    assert ("PUT", "/api/v1/admin/sites") in walked
    assert ("POST", "/api/v1/admin/rounds/{round_id}/batches") in walked
    assert ("DELETE", "/api/v1/admin/desk-tokens/{token_id}") in walked
    assert len(walked) >= 8
    assert (await stats(client))["loaded"] == 20  # nothing changed


# -- revoked, malformed, guessed ----------------------------------------------------------------


async def test_revoking_answers_the_token_then_the_same_and_unknown_is_404(
    client: Client,
) -> None:
    """Revoking twice (a double click, a retry) is safe; a typo is told apart."""
    desk = await new_desk(client)
    path = f"/api/v1/admin/desk-tokens/{desk['token_id']}"
    first = await client.delete(path, headers=ADMIN)
    assert first.status == 200
    body = await first.json()
    assert body["token_id"] == desk["token_id"]
    assert body["site_id"] == "s1"
    assert body["revoked_at"] is not None
    assert "token" not in body
    second = await client.delete(path, headers=ADMIN)
    assert second.status == 200
    assert await second.json() == body
    r = await client.delete("/api/v1/admin/desk-tokens/desk-0000000000000000", headers=ADMIN)
    assert r.status == 404
    r = await client.delete("/api/v1/admin/desk-tokens/No%20Such", headers=ADMIN)
    assert r.status == 404


async def test_a_revoked_or_malformed_desk_token_is_401_and_changes_nothing(
    client: Client,
) -> None:
    """Staff who left cannot reserve or collect; garbage is simply not a token."""
    code = (await (await reserve(client, 1, "s1")).json())["pickup_code"]
    desk = await new_desk(client)
    assert (await desk_reserve(client, desk["token"], 2)).status == 201
    r = await client.delete(f"/api/v1/admin/desk-tokens/{desk['token_id']}", headers=ADMIN)
    assert r.status == 200
    wrong = [
        desk["token"],  # revoked
        "allot-desk-short",
        "allot-desk-" + "A" * 43,
        desk["token"] + "x",
        desk["token"].upper(),
    ]
    for token in wrong:
        r = await desk_reserve(client, token, 3)
        assert r.status == 401, token
        assert (await r.json())["code"] == "unauthorized"
        r = await client.post(
            "/api/v1/admin/pickups",
            json={"site_id": "s1", "pickup_code": code},
            headers=bearer(token),
        )
        assert r.status == 401
    assert (await stats(client))["reserved"] == 2
    assert (await stats(client))["collected"] == 0


async def test_revocation_reaches_another_worker_at_once_through_redis(
    settings: Settings, redis: Redis, aiohttp_client: Any
) -> None:
    """Two workers (or nodes): the one that did not revoke refuses at once, its clock still."""
    clock_a, clock_b = FakeClock(), FakeClock()
    a: Client = await aiohttp_client(create_app(settings, monotonic=clock_a))
    b: Client = await aiohttp_client(create_app(settings, run_ledger=False, monotonic=clock_b))
    await seed(a, stock={"s1": 10})
    desk = await new_desk(a)
    assert (await desk_reserve(b, desk["token"], 1)).status == 201  # b has it cached now
    assert (await a.delete(f"/api/v1/admin/desk-tokens/{desk['token_id']}", headers=ADMIN)).ok
    assert (await desk_reserve(a, desk["token"], 2)).status == 401
    # b hears the announcement; its clock never moves, so only the announcement can do it
    for _ in range(200):
        status = (await desk_reserve(b, desk["token"], 2)).status
        if status == 401:
            break
        assert status == 201 or status == 200
        await asyncio.sleep(0.05)
    assert status == 401


async def test_a_worker_that_missed_the_announcement_refuses_within_a_second(
    settings: Settings, redis: Redis, aiohttp_client: Any, pg: asyncpg.Connection
) -> None:
    """Even with the announcement lost, no worker acts on a revoked token a second later."""
    clock = FakeClock()
    b: Client = await aiohttp_client(create_app(settings, monotonic=clock))
    await seed(b, stock={"s1": 10})
    desk = await new_desk(b)
    assert (await desk_reserve(b, desk["token"], 1)).status == 201
    # revoked behind the workers' backs: in PostgreSQL only, nothing published
    await pg.execute(
        "UPDATE desk_tokens SET revoked_at = now() WHERE token_id = $1", desk["token_id"]
    )
    clock.advance(0.9)
    assert (await desk_reserve(b, desk["token"], 1)).status == 200  # its cache, under 1 s old
    clock.advance(0.1)
    r = await desk_reserve(b, desk["token"], 2)
    assert r.status == 401


@pytest.fixture
def real_limit(settings: Settings) -> Settings:
    return replace(settings, service=replace(settings.service, auth_failures_per_minute=10))


async def test_guessed_desk_tokens_are_throttled_per_address_and_never_logged(
    real_limit: Settings, redis: Redis, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Desk tokens are guessed like operator ones: ten a minute per address, then 429."""
    client: Client = await aiohttp_client(create_app(real_limit))
    await seed(client)
    desk = await new_desk(client)
    caplog.set_level(logging.INFO)
    attacker = "203.0.113.20"
    guesses = [f"allot-desk-{n:043d}" for n in range(11)]
    for guess in guesses[:10]:
        r = await client.post(
            "/api/v1/desk/rounds/r1/reservations",
            json=walk_in(1),
            headers={**bearer(guess), "X-Forwarded-For": attacker},
        )
        assert r.status == 401
    r = await client.post(
        "/api/v1/desk/rounds/r1/reservations",
        json=walk_in(1),
        headers={**bearer(guesses[10]), "X-Forwarded-For": attacker},
    )
    assert r.status == 429
    assert (await r.json())["code"] == "rate-limited"
    # blocked means blocked, even with a right desk token from there ...
    r = await client.post(
        "/api/v1/desk/rounds/r1/reservations",
        json=walk_in(1),
        headers={**bearer(desk["token"]), "X-Forwarded-For": attacker},
    )
    assert r.status == 429
    # ... but not another address, nor the operator (counted in its own scope)
    r = await client.post(
        "/api/v1/desk/rounds/r1/reservations",
        json=walk_in(1),
        headers={**bearer(desk["token"]), "X-Forwarded-For": "198.51.100.20"},
    )
    assert r.status == 201
    r = await client.get(
        "/api/v1/admin/rounds/r1/stats", headers={**ADMIN, "X-Forwarded-For": attacker}
    )
    assert r.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "allot.auth"]
    assert any("desk authentication failed" in line for line in lines), lines
    assert any("desk authentication: client" in line and "blocked" in line for line in lines)
    for secret in (*guesses, desk["token"], ADMIN_TOKEN, attacker):
        assert secret not in caplog.text
