"""Where the draw key comes from (issue 10, "Receipts you can prove"; allocator/drawkeys.py):
``ALLOT_DRAW_KEY`` when set, nothing kept in PostgreSQL; otherwise generated once, kept in
PostgreSQL, the same for every worker, and said so in the log the one time it is made."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.receipts import DrawKey, verify_entry
from service.app import create_app
from tests.test_lottery import enter, seed_lottery

Client = TestClient[Any, Any]


async def draw_key_rows(database_url: str) -> list[str]:
    con = await asyncpg.connect(database_url)
    try:
        return [r["private_key"] for r in await con.fetch("SELECT private_key FROM draw_key")]
    finally:
        await con.close()


async def test_allot_draw_key_signs_every_entry_and_nothing_is_kept_in_postgres(
    aiohttp_client: Any, settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    key = DrawKey.generate()
    client: Client = await aiohttp_client(
        create_app(replace(settings, draw_key=key.private_text()))
    )
    answer = await (await client.get("/api/v1/draw-key")).json()
    assert answer == {"public_key": key.public_key()}
    await seed_lottery(client)
    entry = await (await enter(client, 1)).json()
    assert verify_entry(key.public_key(), entry["signature"], "l1", entry["receipt"], "s1", False)
    assert await draw_key_rows(settings.database_url) == []
    assert "generated the lottery draw key" not in caplog.text


async def test_without_allot_draw_key_one_key_is_made_kept_and_shared_by_every_worker(
    aiohttp_client: Any, settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers on one database: the first to need it makes the key (a WARNING says so,
    once), the other reads the same one; entries made through either verify under it."""
    assert settings.draw_key is None
    caplog.set_level(logging.WARNING, logger="allot.drawkey")
    a: Client = await aiohttp_client(create_app(settings))
    b: Client = await aiohttp_client(create_app(settings))
    first = await (await a.get("/api/v1/draw-key")).json()
    second = await (await b.get("/api/v1/draw-key")).json()
    assert first == second
    [stored] = await draw_key_rows(settings.database_url)
    assert DrawKey.from_text(stored).public_key() == first["public_key"]
    made = [r for r in caplog.records if "generated the lottery draw key" in r.getMessage()]
    assert len(made) == 1
    assert made[0].levelno == logging.WARNING
    assert stored not in caplog.text  # the public key is logged, never the private one
    await seed_lottery(a)
    for client, n in ((a, 1), (b, 2)):
        entry = await (await enter(client, n)).json()
        assert verify_entry(
            first["public_key"], entry["signature"], "l1", entry["receipt"], "s1", False
        )
