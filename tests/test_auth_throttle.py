"""Failed operator tokens are throttled per client address, across workers, and logged safely.

The app's real limit (10 failures per address per minute) applies here; addresses are told
apart by X-Forwarded-For, which the app honours from 127.0.0.1 (a trusted proxy by default).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from service.app import create_app
from tests.helpers import ADMIN, ADMIN_TOKEN, seed

Client = TestClient[Any, Any]
STATS = "/api/v1/admin/rounds/r1/stats"
LIMIT = 10


@pytest.fixture
def real_limit(settings: Settings) -> Settings:
    return replace(settings, service=replace(settings.service, auth_failures_per_minute=LIMIT))


@pytest.fixture
async def app_client(real_limit: Settings, redis: Redis, aiohttp_client: Any) -> Client:
    client: Client = await aiohttp_client(create_app(real_limit))
    await seed(client)
    return client


def guess(n: int, address: str) -> dict[str, str]:
    return {"Authorization": f"Bearer guess-{n:04d}", "X-Forwarded-For": address}


async def test_token_guessing_is_refused_429_with_retry_after_after_ten_failures(
    app_client: Client,
) -> None:
    """1,850 guesses a second were possible; now ten a minute per address, then 429."""
    attacker = "203.0.113.9"
    for n in range(LIMIT):
        assert (await app_client.get(STATS, headers=guess(n, attacker))).status == 401
    r = await app_client.get(STATS, headers=guess(LIMIT, attacker))
    assert r.status == 429
    assert r.content_type == "application/problem+json"
    assert (await r.json())["code"] == "rate-limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # blocked means blocked: even the right token from there, or a guess would learn it is right
    right_from_attacker = {**ADMIN, "X-Forwarded-For": attacker}
    assert (await app_client.get(STATS, headers=right_from_attacker)).status == 429


async def test_the_right_token_still_works_from_another_address(app_client: Client) -> None:
    """Throttling a guesser must not lock the real operators out."""
    for n in range(LIMIT + 3):
        await app_client.get(STATS, headers=guess(n, "203.0.113.9"))
    r = await app_client.get(STATS, headers={**ADMIN, "X-Forwarded-For": "198.51.100.7"})
    assert r.status == 200, await r.text()


async def test_requests_without_any_token_are_refused_but_not_counted(app_client: Client) -> None:
    """A console polling before the operator typed the token is not guessing."""
    me = "198.51.100.8"
    for _ in range(3 * LIMIT):
        r = await app_client.get(STATS, headers={"X-Forwarded-For": me})
        assert r.status == 401
    assert (await app_client.get(STATS, headers={**ADMIN, "X-Forwarded-For": me})).status == 200


async def test_failures_are_counted_across_workers(
    real_limit: Settings, redis: Redis, aiohttp_client: Any
) -> None:
    """With N workers the bound stays ten a minute, not ten per worker (the count is in Redis)."""
    one: Client = await aiohttp_client(create_app(real_limit))
    other: Client = await aiohttp_client(create_app(real_limit, run_ledger=False))
    await seed(one)
    attacker = "203.0.113.10"
    for n in range(LIMIT):
        worker = one if n % 2 else other
        assert (await worker.get(STATS, headers=guess(n, attacker))).status == 401
    assert (await one.get(STATS, headers=guess(99, attacker))).status == 429
    assert (await other.get(STATS, headers=guess(98, attacker))).status == 429


async def test_failures_are_logged_with_a_hashed_address_and_never_the_token(
    app_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """On-call must see guessing going on; the log must not hold tokens or addresses."""
    caplog.set_level(logging.INFO)
    attacker = "203.0.113.11"
    for n in range(LIMIT + 5):
        await app_client.get(STATS, headers=guess(n, attacker))
    await app_client.get(STATS, headers={**ADMIN, "X-Forwarded-For": attacker})
    lines = [r.getMessage() for r in caplog.records if r.name == "allot.auth"]
    assert any("authentication failed" in line for line in lines), lines
    assert any("blocked" in line for line in lines), lines
    assert len(lines) <= 3, lines  # one line per kind and 10 s, not one per guess
    for secret in ("guess-", ADMIN_TOKEN, attacker):
        assert secret not in caplog.text


async def test_an_operator_token_with_bytes_that_are_not_utf8_is_401(client: Client) -> None:
    """Such a header is the client's mistake (a wrong token), not a server error to retry."""
    assert client.server.port is not None
    for token in (b"\xff\xfe", b"\xed\xa0\x80", ADMIN_TOKEN.encode() + b"\xff"):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(
            b"GET /api/v1/admin/rounds/r1/stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token + b"\r\n\r\n"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 "), answer[:300]
        assert b"Content-Type: application/problem+json" in head
        assert orjson.loads(body)["code"] == "unauthorized"
