"""The citizen reservation flow over HTTP, against real Redis and PostgreSQL."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.helpers import citizen_id, reserve, seed


async def test_reserve_answers_201_with_location_and_pickup_code(
    client: TestClient[Any, Any],
) -> None:
    """The happy path: a citizen leaves with a code and a link to come back to."""
    await seed(client, stock={"s1": 10}, per_person=2)
    r = await reserve(client, 1)
    assert r.status == 201
    body = await r.json()
    assert r.headers["Location"] == f"/api/v1/reservations/{body['reservation_id']}"
    assert body["quantity"] == 2
    assert body["status"] == "confirmed"
    assert body["site_id"] == "s1"
    assert len(body["pickup_code"]) == 8
    assert body["citizen_id_masked"] == citizen_id(1)[:6] + "********" + citizen_id(1)[-4:]
    got = await client.get(r.headers["Location"])
    assert got.status == 200
    assert await got.json() == body
