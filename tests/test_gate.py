"""The token-bucket gate: per round, per client address and per citizen, shared through Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from dataclasses import replace
from typing import Any
from unittest.mock import Mock

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from redis.asyncio import Redis

from allocator.config import GateSettings, Settings
from allocator.errors import RateLimited
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.model import Round, Site
from allocator.redistyping import awaited
from service.app import create_app
from service.client import client_address
from tests.helpers import ADMIN, citizen_id, phone, seed

TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


def gated(settings: Settings, **gate: Any) -> Settings:
    wide = {
        "global_rate": 1e6,
        "global_burst": 10**6,
        "client_rate": 1e6,
        "client_burst": 10**6,
        "citizen_rate": 1e6,
        "citizen_burst": 10**6,
    }
    return replace(settings, gate=replace(settings.gate, **{**wide, **gate}))


async def post(
    client: TestClient[Any, Any], n: int, xff: str | None = None, site: str = "s1"
) -> Any:
    headers = {"X-Forwarded-For": xff} if xff else {}
    body = {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": site}
    return await client.post("/api/v1/rounds/r1/reservations", json=body, headers=headers)


async def remaining(client: TestClient[Any, Any]) -> int:
    r = await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)
    return int((await r.json())["remaining"])


async def assert_rate_limited(response: Any) -> int:
    assert response.status == 429
    assert response.content_type == "application/problem+json"
    assert (await response.json())["code"] == "rate-limited"
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


async def test_client_bucket_allows_its_burst_then_refuses_then_refills(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """One address gets `client_burst` at once, then waits `1/client_rate` per further claim."""
    client = await aiohttp_client(create_app(gated(settings, client_rate=4, client_burst=3)))
    await seed(client, stock={"s1": 100})
    answers = [await post(client, n) for n in range(3)]
    assert [a.status for a in answers] == [201, 201, 201]
    refused = await post(client, 3)
    assert await assert_rate_limited(refused) == 1  # 1/4 s, rounded up to whole seconds
    assert await remaining(client) == 97  # the refused claim took nothing
    # One token back at 4 per second, by Redis's clock: the bucket lives in Redis and takes its
    # time from Redis TIME (never from the client), so no fake clock can move it.
    await asyncio.sleep(0.3)
    assert (await post(client, 3)).status == 201
    await assert_rate_limited(await post(client, 4))


async def test_citizen_bucket_holds_back_one_id_whatever_the_address(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """A citizen retrying from many addresses is still one citizen."""
    client = await aiohttp_client(create_app(gated(settings, citizen_rate=1, citizen_burst=3)))
    await seed(client, stock={"s1": 100})
    answers = [await post(client, 1, xff=f"2001:db8::{i}") for i in range(5)]
    assert [a.status for a in answers[:3]] == [201, 200, 200]
    for a in answers[3:]:
        await assert_rate_limited(a)
    assert (await post(client, 2, xff="2001:db8::99")).status == 201  # others are not affected


async def test_round_bucket_caps_admissions_across_all_clients(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """The whole round admits at most `global_burst` at once, from any number of addresses."""
    client = await aiohttp_client(create_app(gated(settings, global_rate=1, global_burst=5)))
    await seed(client, stock={"s1": 100})
    answers = await asyncio.gather(*(post(client, n, xff=f"2001:db8::{n}") for n in range(12)))
    assert sorted(a.status for a in answers) == [201] * 5 + [429] * 7
    for a in answers:
        if a.status == 429:
            assert await assert_rate_limited(a) >= 1
    assert await remaining(client) == 95


async def test_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """Only a trusted proxy may name the client; anyone else's header is ignored."""
    untrusted = gated(settings, client_rate=1, client_burst=2, trusted_proxies=())
    client = await aiohttp_client(create_app(untrusted))
    await seed(client, stock={"s1": 100})
    answers = [await post(client, n, xff=f"2001:db8::{n}") for n in range(4)]
    assert [a.status for a in answers[:2]] == [201, 201]
    for a in answers[2:]:
        await assert_rate_limited(a)


async def test_forwarded_for_from_a_trusted_proxy_separates_clients(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """Behind the proxy, each real client has its own bucket."""
    client = await aiohttp_client(create_app(gated(settings, client_rate=1, client_burst=2)))
    await seed(client, stock={"s1": 100})
    answers = [await post(client, n, xff=f"2001:db8::{n}") for n in range(6)]
    assert [a.status for a in answers] == [201] * 6


def request(remote: str, *xff: str) -> Any:
    r = Mock()
    r.remote = remote
    r.headers = CIMultiDict(("X-Forwarded-For", v) for v in xff)
    return r


@pytest.mark.parametrize(
    ("remote", "xff", "expected"),
    [
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),  # untrusted peer: header ignored
        ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("127.0.0.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # right-most untrusted hop
        ("127.0.0.1", ["198.51.100.1, 10.1.2.3"], "198.51.100.1"),  # through two proxies
        ("127.0.0.1", ["198.51.100.1", "10.1.2.3"], "198.51.100.1"),  # as repeated headers
        ("127.0.0.1", ["not-an-ip"], "127.0.0.1"),
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["10.9.9.9"], "127.0.0.1"),  # only proxies: the peer
    ],
)
def test_client_address_is_the_rightmost_untrusted_hop(
    remote: str, xff: list[str], expected: str
) -> None:
    """A client can prepend anything to X-Forwarded-For; only what proxies appended counts."""
    assert client_address(request(remote, *xff), TRUSTED) == expected


async def test_a_mixed_batch_answers_each_item_on_its_own(
    aiohttp_client: Any, settings: Settings, redis: Redis
) -> None:
    """New, duplicate, sold out and gated items in one script call: one true answer each."""
    app = create_app(gated(settings, citizen_rate=0.001, citizen_burst=1))
    client = await aiohttp_client(app)
    await seed(client, stock={"s1": 1, "s2": 0}, per_person=1)
    from service.appkeys import ALLOCATOR

    allocator = app[ALLOCATOR]

    def item(n: int, site: str = "s1") -> Any:
        return allocator.claim_request("r1", site, citizen_id(n), phone(n), f"2001:db8::{n}")

    outcomes = await allocator.claim_many("r1", [item(1), item(2), item(1), item(3, "s2"), item(4)])
    assert outcomes[0].created  # new
    assert outcomes[1].refusal is not None
    assert outcomes[1].refusal.code == "sold-out"  # the one unit went to item 1
    assert isinstance(outcomes[2].refusal, RateLimited)  # citizen 1's single token is spent
    assert outcomes[3].refusal is not None
    assert outcomes[3].refusal.code == "sold-out"
    assert outcomes[4].refusal is not None
    assert outcomes[4].refusal.code == "sold-out"
    again = await allocator.claim_many("r1", [item(5), item(2)])
    assert again[0].refusal is not None
    assert again[0].refusal.code == "sold-out"
    assert isinstance(again[1].refusal, RateLimited)  # citizen 2 spent its token above


def test_default_gate_settings_are_the_contract_s() -> None:
    """The [gate] defaults are part of the public contract."""
    g = GateSettings()
    assert (g.global_rate, g.global_burst, g.client_rate, g.client_burst) == (20000, 40000, 10, 20)
    assert (g.citizen_rate, g.citizen_burst) == (1, 3)
    assert g.trusted_proxies == ("127.0.0.1/32", "::1/128")


async def test_a_bucket_outlives_its_generation_and_an_old_generation_is_emptied(
    redis: Redis, keys: Keys
) -> None:
    """claim.lua keeps a round's buckets in two generations of W ms (here 3 s: the citizen
    bucket fills in 2 s): a bucket spent just before a generation ends still holds back in
    the next one, and the hash of a generation is emptied before it is used again."""
    gate = GateSettings(
        global_rate=1000, global_burst=1000, client_rate=1000, client_burst=1000,
        citizen_rate=0.5, citizen_burst=1,
    )  # fmt: skip
    allocator = Allocator(redis, None, keys, Hasher(b"p"), gate=gate)
    await seed_round(allocator)
    width = 3000
    rk = keys.round("r1")

    async def claim(n: int) -> Any:
        request = allocator.claim_request("r1", "s1", citizen_id(n), phone(n), "2001:db8::1")
        [outcome] = await allocator.claim_many("r1", [request])
        return outcome

    async def redis_ms() -> int:
        seconds, micros = await redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def sleep_into_next_generation(margin_ms: int) -> int:
        now = await redis_ms()
        await asyncio.sleep((width - now % width + margin_ms) / 1000)
        return (await redis_ms()) // width

    # spend citizen 1's one token late in a generation, then look again early in the next
    now = await redis_ms()
    await asyncio.sleep(((width - now % width - 300) % width) / 1000)
    spent_in = (await redis_ms()) // width
    assert (await claim(1)).created
    assert await sleep_into_next_generation(100) == spent_in + 1
    again = await claim(1)
    assert isinstance(again.refusal, RateLimited)  # found in the previous generation
    assert again.refusal.code == "rate-limited"
    citizen_field = f"z:{allocator.hasher.citizen(citizen_id(1))}".encode()
    assert citizen_field in await awaited(redis.hkeys(rk.gate_generations[spent_in % 2]))

    # two generations later its hash is someone else's: the old fields are gone
    assert await sleep_into_next_generation(100) == spent_in + 2
    assert (await claim(2)).created
    fields = await awaited(redis.hkeys(rk.gate_generations[spent_in % 2]))
    assert citizen_field not in fields
    assert f"z:{allocator.hasher.citizen(citizen_id(2))}".encode() in fields
    # citizen 1's bucket, forgotten, is full: the claim passes the gate to its reservation
    back = await claim(1)
    assert back.refusal is None
    assert back.reservation is not None
    assert not back.created
    assert 0 < await redis.pttl(rk.gate_generations[spent_in % 2]) <= 2 * width


async def seed_round(allocator: Allocator) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    await allocator.mirror_sites([Site("s1", "One", "Road 1", "d1")])
    await allocator.mirror_round(
        Round(
            round_id="r1",
            title="r1",
            opens_at=now - dt.timedelta(hours=1),
            closes_at=now + dt.timedelta(hours=1),
            per_person=1,
            pickup_start=now,
            pickup_end=now + dt.timedelta(hours=2),
        )
    )
    await allocator.load_batch("r1", "b1", [("s1", 10)])
