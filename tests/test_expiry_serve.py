"""Expiry and carry-over through a kill -9 of `allot serve`, then a rebuild from the ledger.

The real process tree (supervisor and two workers, each with its expiry sweep and ledger writer)
on the shared Redis under this test's prefix and its own database. The service is killed while
it expires a round's reservations and carries its leftovers into a later round; after the
restart the same carry request is replayed, and the books must balance to the unit, in Redis
and in the ledger (`allot reconcile` exits 0). Then Redis loses both rounds and `allot rebuild`
must bring every figure back.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.keys import Keys
from allocator.redistyping import awaited
from tests.helpers import ADMIN, citizen_id, phone, round_body
from tests.processes import ALLOT, Server

pytestmark = pytest.mark.slow

UNITS = 3000
CITIZENS = 1500


@pytest.fixture
def fast_sweep(settings: Settings, tmp_path: Path, redis: Redis) -> Iterator[Server]:
    """`allot serve` whose workers sweep every 0.2 s (config file; everything else default)."""
    config = tmp_path / "allot.toml"
    config.write_text("[service]\nexpiry_sweep_ms = 200\n")
    s = Server(settings, tmp_path / "serve.log")
    s.env["ALLOT_CONFIG"] = str(config)
    yield s
    s.stop()


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None, **kw: Any
) -> tuple[int, Any]:
    try:
        async with session.request(method, url, json=body, **kw) as r:
            return r.status, await r.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return 0, repr(exc)  # the connection died with the service: no answer was given


async def stats(session: aiohttp.ClientSession, url: str, round_id: str) -> dict[str, Any]:
    status, body = await call(
        session, "GET", f"{url}/api/v1/admin/rounds/{round_id}/stats", headers=ADMIN
    )
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def balanced(s: dict[str, Any]) -> None:
    parts = ("remaining", "reserved", "collected", "expired", "carried_out")
    for site in [s, *s["sites"]]:
        assert site["loaded"] == sum(site[p] for p in parts), site


def figures(s: dict[str, Any]) -> dict[str, Any]:
    """The stats without the ledger's progress and the lost mark (which differ in time)."""
    return {k: v for k, v in s.items() if k not in ("ledger", "lost")}


async def allot(server: Server, *args: str) -> tuple[int, Any, str]:
    proc = await asyncio.create_subprocess_exec(
        ALLOT, *args, env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, orjson.loads(out) if out.strip() else None, err.decode()


async def test_kill_9_during_expiry_and_carry_keeps_the_books_and_rebuild_restores_them(
    fast_sweep: Server, settings: Settings, redis: Redis
) -> None:
    """Whatever the kill interrupts (a sweep chunk, step (a) or (b) of the carry), the replay
    and the restarted sweeps leave every unit counted once, and the ledger can rebuild it all."""
    server = fast_sweep
    keys = Keys(settings.service.redis_prefix)
    url = server.url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        server.start(workers=2)
        await server.wait_ready(session)
        sites = {"sites": [{"site_id": "s1", "name": "One", "address": "Road 1", "district": "d"}]}
        assert (await call(session, "PUT", f"{url}/api/v1/admin/sites", sites, headers=ADMIN))[
            0
        ] == 200
        for round_id in ("r1", "r2"):
            status, body = await call(
                session,
                "PUT",
                f"{url}/api/v1/admin/rounds/{round_id}",
                round_body(),
                headers=ADMIN,
            )
            assert status == 201, body
        batch = {"batch_id": "b1", "items": [{"site_id": "s1", "quantity": UNITS}]}
        status, body = await call(
            session, "POST", f"{url}/api/v1/admin/rounds/r1/batches", batch, headers=ADMIN
        )
        assert status == 201, body

        async def reserve(n: int) -> tuple[int, Any]:
            body = {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": "s1"}
            headers = {"X-Forwarded-For": f"2001:db8::{n:x}"}
            return await call(
                session, "POST", f"{url}/api/v1/rounds/r1/reservations", body, headers=headers
            )

        for start in range(0, CITIZENS, 100):
            answers = await asyncio.gather(*(reserve(n) for n in range(start, start + 100)))
            assert {s for s, _ in answers} == {201}, answers[:3]

        # the operator ends r1's pickup window; the sweeps start within 0.2 s
        past = round_body(opens_in=-7200, closes_in=-120, pickup_in=-7200, pickup_for=7140)
        status, body = await call(
            session, "PUT", f"{url}/api/v1/admin/rounds/r1", past, headers=ADMIN
        )
        assert status == 200, body
        tally = keys.round("r1").tally
        async with asyncio.timeout(20):
            while b"expired:s1" not in await awaited(redis.hgetall(tally)):
                await asyncio.sleep(0.005)
        carry = {"batch_id": "leftovers", "carry_from": "r1"}
        carry_url = f"{url}/api/v1/admin/rounds/r2/batches"
        in_flight = asyncio.create_task(call(session, "POST", carry_url, carry, headers=ADMIN))
        await asyncio.sleep(0.002)
        server.kill_all()
        first = await in_flight
        assert first[0] in (0, 201), first

        server.start(workers=2)
        await server.wait_ready(session)
        status, body = await call(session, "POST", carry_url, carry, headers=ADMIN)
        assert status in (200, 201), body
        assert body == {
            "batch_id": "leftovers",
            "units_added": UNITS,
            "sites": 1,
            "carried_from": "r1",
        }
        if first[0] == 201:
            assert status == 200  # answered before the kill: the replay is the first answer
        before = {r: await stats(session, url, r) for r in ("r1", "r2")}
        for s in before.values():
            balanced(s)
        assert (before["r1"]["carried_out"], before["r1"]["reserved"]) == (UNITS, 0)
        assert (before["r1"]["expired"], before["r1"]["remaining"]) == (0, 0)
        assert before["r1"]["reservations"] == CITIZENS  # expired ones are still their shares
        assert (before["r2"]["loaded"], before["r2"]["remaining"]) == (UNITS, UNITS)

        code, report, err = await allot(server, "reconcile", "--wait", "30")
        assert code == 0, (report, err)
        [r1] = [r for r in report["rounds"] if r["round_id"] == "r1"]
        assert r1["sites"][0]["ledger"]["carried_out"] == UNITS
        assert r1["carries"] == [
            {
                "to_round": "r2",
                "batch_id": "leftovers",
                "units": UNITS,
                "loaded_into_later_round": True,
            }
        ]

        # Redis loses both rounds; the ledger brings them back
        server.stop()
        doomed = [k async for k in redis.scan_iter(match=f"{keys.prefix}:{{r:*", count=1000)]
        assert doomed
        await redis.delete(*doomed)
        code, summary, err = await allot(server, "rebuild", "--wait", "5")
        assert code == 0, (summary, err)
        server.start(workers=2)
        await server.wait_ready(session)
        after = {r: await stats(session, url, r) for r in ("r1", "r2")}
        assert {r: figures(s) for r, s in after.items()} == {
            r: figures(s) for r, s in before.items()
        }
        code, report, err = await allot(server, "reconcile", "--wait", "30")
        assert code == 0, (report, err)
        # the replay after the rebuild still answers the first answer and adds nothing
        status, body = await call(session, "POST", carry_url, carry, headers=ADMIN)
        assert (status, body["units_added"]) == (200, UNITS)
        assert (await stats(session, url, "r2"))["loaded"] == UNITS
