"""Eligibility rules of a round (API.md "Entitlement"), checked from the ID before any Redis work:
409 not-eligible naming the rule, and nothing in Redis touched (no token, no unit)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.errors import NotEligible
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.model import Round
from service.app import create_app
from tests.helpers import identity, phone, redis_state, seed

Client = TestClient[Any, Any]
TEN_YEARS_AGO = f"{dt.date.today().year - 10}0101"


@pytest.fixture
async def client(settings: Settings, redis: Redis, checked_client: Any) -> Client:
    return cast(Client, await checked_client(create_app(settings)))


async def snapshot(redis: Redis, prefix: str) -> dict[bytes, object]:
    """Every key under the test's prefix (tests/helpers.py): equal means nothing changed."""
    return await redis_state(redis, prefix)


async def ask(client: Client, citizen: str, n: int) -> Any:
    body = {"citizen_id": citizen, "phone": phone(n), "site_id": "s1"}
    return await client.post("/api/v1/rounds/r1/reservations", json=body)


# rule -> (eligibility, an ID failing it, IDs passing it)
RULES: dict[str, tuple[dict[str, Any], str, list[str]]] = {
    "regions": (
        {"regions": ["44", "3101"]},
        identity(1, region="110101"),
        [identity(2, region="440106"), identity(3, region="310115")],
    ),
    "birth_year_last_digit": (
        {"birth_year_last_digit": [1, 3]},
        identity(1, born="19800101"),
        [identity(2, born="19810101"), identity(3, born="19930707")],
    ),
    "min_age": (
        {"min_age": 65},
        identity(1, born="19800101"),
        [identity(2, born="19500101")],
    ),
    "max_age": (
        {"max_age": 17},
        identity(1, born="19800101"),
        [identity(2, born=TEN_YEARS_AGO)],
    ),
}


@pytest.mark.parametrize("rule", sorted(RULES))
async def test_each_failed_rule_is_409_not_eligible_naming_it_before_redis_is_touched(
    rule: str, client: Client, redis: Redis, keys: Keys
) -> None:
    eligibility, failing, passing = RULES[rule]
    await seed(client, stock={"s1": 10}, eligibility=eligibility)
    async with asyncio.timeout(10):  # the seed's batch entry leaves the stream first
        while await redis.xlen(keys.round("r1").ledger):
            await asyncio.sleep(0.05)
    before = await snapshot(redis, keys.prefix)

    r = await ask(client, failing, 1)
    body = await r.json(content_type=None)
    assert r.status == 409, body
    assert body["code"] == "not-eligible"
    assert body["rule"] == rule
    # no token bucket, no stock, no record: the refusal came before the claim script
    assert await snapshot(redis, keys.prefix) == before

    for n, citizen in enumerate(passing, start=2):
        r = await ask(client, citizen, n)
        assert r.status == 201, await r.text()


async def test_the_first_failing_rule_in_order_is_the_one_named(client: Client) -> None:
    """Regions before age: telling a non-resident to come back when older would mislead."""
    await seed(client, stock={"s1": 10}, eligibility={"regions": ["44"], "min_age": 65})
    r = await ask(client, identity(1, region="110101", born="19800101"), 1)
    assert (await r.json())["rule"] == "regions"
    r = await ask(client, identity(2, region="440106", born="19800101"), 2)
    assert (await r.json())["rule"] == "min_age"


def opening_at(opens_at: str, **rules: Any) -> Round:
    from allocator.entitlement import Eligibility

    opens = dt.datetime.fromisoformat(opens_at)
    return Round(
        "r1",
        "r1",
        opens,
        opens + dt.timedelta(hours=1),
        1,
        opens,
        opens + dt.timedelta(hours=2),
        eligibility=Eligibility.parse(rules),
    )


async def test_ages_count_on_the_opening_date_in_the_operators_offset(
    redis: Redis, keys: Keys
) -> None:
    """Opening at 00:30 on 1 March in +08:00 is still 28 February in UTC: someone born on
    1 March 2008 is 18 on the round's own date, and that is the age that counts."""
    allocator = Allocator(redis, None, keys, Hasher(b"p"))
    born_1_march = identity(1, born="20080301")
    adults = opening_at("2026-03-01T00:30:00+08:00", min_age=18)
    allocator.check_eligibility(adults, born_1_march)  # 18 that day: no refusal
    minors = opening_at("2026-03-01T00:30:00+08:00", max_age=17)
    with pytest.raises(NotEligible) as refused:
        allocator.check_eligibility(minors, born_1_march)
    assert refused.value.extra == {"rule": "max_age"}
    # the same instant given in UTC is 28 February: 17 then
    allocator.check_eligibility(opening_at("2026-02-28T16:30:00+00:00", max_age=17), born_1_march)
