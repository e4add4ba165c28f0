"""`allot reconcile` checks the full balance of issue 14 (loaded = remaining + reserved +
collected + expired + carried_out, per site, and each part against the ledger): one unit
planted out of place in `expired` or `carried_out`, after a real expiry and carry-over, is found
and named (API.md, "End of a reservation's life")."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.keys import Keys
from allocator.reconcile import reconcile
from allocator.redistyping import awaited
from tests.test_expiry import Client, app, balanced, carry, end_pickup, stats, two_rounds, until

__all__ = ["app"]  # the fixture (a fast expiry sweep), used by name below


async def report_of(redis: Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    con = await asyncpg.connect(settings.database_url)
    try:
        return await reconcile(redis, con, keys, ["r1", "r2"], wait=10)
    finally:
        await con.close()


@pytest.mark.parametrize("field", ["expired:s2", "carried_out:s1"])
async def test_reconcile_names_a_unit_planted_in_expired_or_carried_out(
    app: Client, redis: Redis, keys: Keys, settings: Settings, field: str
) -> None:
    await two_rounds(app)
    await end_pickup(app, per_person=2)

    async def swept() -> bool:  # every uncollected reservation of r1 recorded expired
        return bool((await stats(app, "r1"))["reserved"] == 0)

    await until(swept)
    if field.startswith("carried_out"):
        r = await carry(app, "r2", "carry-1", "r1")
        assert r.status == 201, await r.text()
    balanced(await stats(app, "r1"))
    clean = await report_of(redis, keys, settings)
    assert clean["ok"], clean
    before = {s["site_id"]: s for s in clean["rounds"][0]["sites"]}
    part, site = field.split(":")
    was = before[site][part]
    assert was > 0  # the part is really in use: 4 units expired at s2, 4 carried out of s1
    await awaited(redis.hincrby(keys.round("r1").tally, field, 1))

    report = await report_of(redis, keys, settings)
    assert report["ok"] is False
    [r1] = [r for r in report["rounds"] if r["round_id"] == "r1"]
    by_site = {s["site_id"]: s for s in r1["sites"]}
    [balance, ledger] = by_site[site]["problems"]
    assert balance.startswith(f"loaded {before[site]['loaded']} != remaining")
    assert f"{part} {was + 1}" in balance
    assert ledger == f"{part}: Redis {was + 1}, ledger {was}"
    other = next(s for s in by_site if s != site)
    assert by_site[other]["ok"], by_site[other]
