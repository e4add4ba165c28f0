"""Helpers shared by the tests: test identities, the operator token, scenario steps through
the API, a fake clock. Fixtures live in conftest.py."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from aiohttp.test_utils import TestClient
from stdnum.cn import ric

from allocator.facade import Allocator
from allocator.model import Reservation

# The servers the tests use (make test exports these; each test isolates itself by prefix/db).
REDIS_URL = os.environ.get("ALLOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _without_tls_probe(url: str) -> str:
    """The test server's URL with ``sslmode=disable`` unless it names a mode: asyncpg's default
    (``prefer``) first asks the server for TLS, and a connect cancelled during that exchange (a
    timeout on a loaded machine) leaves a future whose 'unexpected connection_lost()' nobody
    retrieves, which the loop's exception check then blames on an unrelated test."""
    if "sslmode=" in url:
        return url
    return url + ("&" if "?" in url else "?") + "sslmode=disable"


PG_URL = _without_tls_probe(
    os.environ.get("ALLOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
)
ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def citizen_id(n: int, born: str = "19800101") -> str:
    """A valid 18-character ID, distinct for each n (region 110101, sequence from n)."""
    body = f"110101{born}{n % 1000:03d}"
    assert len(body) == 17
    # the sequence only has 3 digits: vary the birth day for larger n so IDs stay distinct
    if n >= 1000:
        day = dt.date(1950, 1, 1) + dt.timedelta(days=n // 1000)
        body = f"110101{day:%Y%m%d}{n % 1000:03d}"
    return body + ric.calc_check_digit(body + "0")  # stdnum ignores the last character


def identity(n: int, *, region: str = "110101", born: str = "19800101") -> str:
    """A valid ID with the given issuing region (6 digits) and birth date (YYYYMMDD)."""
    body = f"{region}{born}{n % 1000:03d}"
    assert len(body) == 17
    return body + ric.calc_check_digit(body + "0")


def phone(n: int) -> str:
    return f"139{n:08d}"


class FakeClock:
    """A monotonic clock that moves only when the test says so.

    Pass it as ``monotonic=`` to ``create_app`` or ``Allocator`` (or as ``clock=`` to a TtlCache
    or the SoldOutBoard): caches, sold-out marks and the Redis breaker then expire on
    ``advance()``, at once, instead of after a real sleep.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.now += seconds


async def claim_once(
    allocator: Allocator, round_id: str, site_id: str, citizen_id: str, phone: str
) -> tuple[Reservation, bool]:
    """One claim straight to the allocator, past the admission queue: ``claim_many`` with one
    item (as the queue sends a batch of one). The reservation and whether it is new; a refusal
    is raised."""
    request = allocator.claim_request(round_id, site_id, citizen_id, phone)
    [outcome] = await allocator.claim_many(round_id, [request])
    if outcome.refusal is not None:
        raise outcome.refusal
    assert outcome.reservation is not None
    return outcome.reservation, outcome.created


# -- scenario helpers ----------------------------------------------------------------------


def tz8() -> dt.timezone:
    return dt.timezone(dt.timedelta(hours=8))


def round_body(
    *,
    opens_in: float = -60,
    closes_in: float = 3600,
    per_person: int = 1,
    pickup_in: float = -60,
    pickup_for: float = 7200,
    title: str = "Masks",
    **members: Any,
) -> dict[str, Any]:
    """A round's body, open now by default; ``members`` adds or overrides members as given
    (``programme``, ``cooldown_days``, ``eligibility``, ...)."""
    now = dt.datetime.now(tz8())
    return {
        "title": title,
        "opens_at": (now + dt.timedelta(seconds=opens_in)).isoformat(),
        "closes_at": (now + dt.timedelta(seconds=closes_in)).isoformat(),
        "per_person": per_person,
        "pickup_start": (now + dt.timedelta(seconds=pickup_in)).isoformat(),
        "pickup_end": (now + dt.timedelta(seconds=pickup_in + pickup_for)).isoformat(),
        **members,
    }


async def seed(
    client: TestClient[Any, Any],
    round_id: str = "r1",
    stock: dict[str, int] | None = None,
    districts: dict[str, str] | None = None,
    **round_kwargs: Any,
) -> None:
    """Sites, an open round and one batch, through the operator API."""
    stock = {"s1": 10} if stock is None else stock
    districts = districts or {}
    sites = [
        {
            "site_id": s,
            "name": f"Site {s}",
            "address": f"{s} road 1",
            "district": districts.get(s, "d1"),
        }
        for s in stock
    ]
    r = await client.put("/api/v1/admin/sites", json={"sites": sites}, headers=ADMIN)
    assert r.status == 200, await r.text()
    r = await client.put(
        f"/api/v1/admin/rounds/{round_id}", json=round_body(**round_kwargs), headers=ADMIN
    )
    assert r.status in (200, 201), await r.text()
    items = [{"site_id": s, "quantity": q} for s, q in stock.items() if q > 0]
    if items:
        r = await client.post(
            f"/api/v1/admin/rounds/{round_id}/batches",
            json={"batch_id": f"seed-{round_id}", "items": items},
            headers=ADMIN,
        )
        assert r.status == 201, await r.text()


async def reserve(
    client: TestClient[Any, Any], n: int, site: str = "s1", round_id: str = "r1", **extra: Any
) -> Any:
    body = {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": site, **extra}
    return await client.post(f"/api/v1/rounds/{round_id}/reservations", json=body)


async def redis_state(redis: Any, prefix: str) -> dict[bytes, object]:
    """Every key under ``prefix``: equal states mean nothing changed. A stream counts by its
    entries and its groups' progress (last delivered id, pending), not by DUMP, which also
    holds the consumers' own bookkeeping (which consumer last looked, and when): a ledger
    writer looking at an idle stream changes nothing."""
    state: dict[bytes, object] = {}
    async for key in redis.scan_iter(match=f"{prefix}:*", count=500):
        if await redis.type(key) == b"stream":
            groups = [
                (g["name"], g["last-delivered-id"], g["pending"])
                for g in await redis.xinfo_groups(key)
            ]
            state[key] = (await redis.xrange(key), groups)
        else:
            state[key] = await redis.dump(key)
    return state
