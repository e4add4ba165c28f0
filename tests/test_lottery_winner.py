"""A lottery winner's reservation is an ordinary Reservation (issue 10, "The draw"): its QR is
its pickup code, it shows the round's pickup window, the reservation page serves it, and once
collected at the desk it is not collectable again nor cancellable."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from service import pages
from service.app import create_app
from tests.helpers import ADMIN
from tests.test_lottery import enter, problem, seed_lottery, wait_for_status

Client = TestClient[Any, Any]


@pytest.fixture
async def client(settings: Settings, redis: Redis, checked_client: Any) -> Client:
    return cast(Client, await checked_client(create_app(settings)))


async def test_a_winners_reservation_has_its_qr_window_page_and_is_collected_once(
    client: Client,
) -> None:
    rnd = await seed_lottery(client, stock={"s1": 2}, closes_in=2)
    entries = [await (await enter(client, n)).json() for n in range(2)]
    await wait_for_status(client, "frozen")
    r = await client.post(
        "/api/v1/admin/rounds/l1/draw", json={"public_randomness": "3 1 4"}, headers=ADMIN
    )
    assert r.status == 200, await r.text()
    won = [await (await client.get(f"/api/v1/entries/{e['entry_id']}")).json() for e in entries]
    assert [w["status"] for w in won] == ["won", "won"]  # 2 units, 2 entrants at s1

    first, second = (w["reservation_id"] for w in won)
    res = await (await client.get(f"/api/v1/reservations/{first}")).json()
    assert (res["status"], res["site_id"], res["quantity"]) == ("confirmed", "s1", 1)
    assert (res["pickup_start"], res["pickup_end"]) == (rnd["pickup_start"], rnd["pickup_end"])
    qr = await client.get(f"/api/v1/reservations/{first}/qr.svg")
    assert qr.status == 200
    assert await qr.read() == pages.qr_svg(res["pickup_code"])
    page = await client.get(f"/r/{first}")
    assert page.status == 200

    r = await client.post(
        "/api/v1/admin/pickups", json={"site_id": "s1", "pickup_code": res["pickup_code"]},
        headers=ADMIN,
    )  # fmt: skip
    assert r.status == 200, await r.text()
    assert (await r.json())["status"] == "collected"
    r = await client.post(
        "/api/v1/admin/pickups", json={"site_id": "s1", "pickup_code": res["pickup_code"]},
        headers=ADMIN,
    )  # fmt: skip
    await problem(r, 409, "not-collectable")
    await problem(await client.delete(f"/api/v1/reservations/{first}"), 409, "not-collectable")
    # the other winner may still cancel: its unit goes back for a later pass
    r = await client.delete(f"/api/v1/reservations/{second}")
    assert (r.status, (await r.json())["status"]) == (200, "cancelled")
    stats = await (await client.get("/api/v1/admin/rounds/l1/stats", headers=ADMIN)).json()
    assert (stats["collected"], stats["reserved"], stats["remaining"]) == (1, 0, 1)
