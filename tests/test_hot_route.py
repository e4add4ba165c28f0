"""The reservation route served beneath aiohttp's web layer (service/app.py, HotRoutes): it is
taken there, only in its exact form, and answers as the routed way does; and the worker's
metrics, added up per turn of the event loop (service/metrics.py), equal the direct ones."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry, Histogram

from allocator.errors import Unavailable
from service.app import HotRoutes
from service.appkeys import ADMISSION, ALLOCATOR
from service.metrics import BUCKETS, Metrics
from tests.helpers import ADMIN, citizen_id, phone, reserve, seed
from tests.test_lottery import seed_lottery

# Headers an answer carries whoever built it (the date moves, and so does the length of a
# body that holds a fresh reservation_id or time); the rest must be equal.
VOLATILE = {"Date", "Content-Length"}


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths aiohttp's router resolved, in order."""
    seen: list[str] = []
    resolve = web.UrlDispatcher.resolve

    async def recording(self: web.UrlDispatcher, request: web.Request) -> Any:
        seen.append(request.raw_path)
        return await resolve(self, request)

    monkeypatch.setattr(web.UrlDispatcher, "resolve", recording)
    return seen


def headers_of(r: Any) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k not in VOLATILE}


async def test_reservations_are_served_beneath_the_router(
    client: TestClient[Any, Any], resolved: list[str]
) -> None:
    assert isinstance(client.app._handle, HotRoutes)
    await seed(client, stock={"s1": 5})
    resolved.clear()
    r = await reserve(client, 1)
    assert r.status == 201, await r.text()
    assert resolved == []  # answered without the router
    got = await client.get(r.headers["Location"])
    assert got.status == 200
    assert resolved == [r.headers["Location"]]  # every other route goes the routed way


async def test_any_other_form_of_the_path_is_routed_and_answered_alike(
    client: TestClient[Any, Any], resolved: list[str]
) -> None:
    variant = "/api/v1/rounds/r1/reservations?via=router"  # a query string: not the hot form
    await seed(client, stock={"s1": 2, "s2": 1})
    assert (await reserve(client, 9, site="s2")).status == 201  # s2 is sold out
    resolved.clear()
    body = {"citizen_id": citizen_id(1), "phone": phone(1), "site_id": "s1"}
    hot = await client.post("/api/v1/rounds/r1/reservations", json=body)
    routed = await client.post(variant, json={**body, "citizen_id": citizen_id(2)})
    assert resolved == [variant]
    assert (hot.status, routed.status) == (201, 201)
    assert list(headers_of(hot)) == list(headers_of(routed))  # the same headers, in order
    assert (await hot.json()).keys() == (await routed.json()).keys()
    for path in ("/api/v1/rounds/r1/reservations", variant):  # the same citizen again: 200
        again = await client.post(path, json=body)
        assert again.status == 200
        assert "Location" not in again.headers
    # refusals: the same body and headers both ways
    for bad in (
        {**body, "citizen_id": "110101198001010011", "phone": "12"},  # 422, two fields
        {**body, "citizen_id": citizen_id(3), "site_id": "s2"},  # 409 sold-out
        {**body, "citizen_id": citizen_id(4), "site_id": "nosuch"},  # 404 site
    ):
        one = await client.post("/api/v1/rounds/r1/reservations", json=bad)
        other = await client.post(variant, json=bad)
        assert one.status == other.status >= 400
        assert list(headers_of(one).items()) == list(headers_of(other).items())
        assert await one.json() == await other.json()


async def test_sold_out_from_memory_answers_as_redis_did(client: TestClient[Any, Any]) -> None:
    """The herd's answer from the board is the answer Redis gave (body, headers), and counted."""
    await seed(client, stock={"s1": 1, "s2": 3})
    assert (await reserve(client, 1)).status == 201
    first = await reserve(client, 2)  # Redis decides, and marks the site
    herd = [await reserve(client, n) for n in range(3, 6)]  # answered from memory
    assert first.status == 409
    for r in herd:
        assert r.status == 409
        assert headers_of(r) == headers_of(first)
        assert await r.json() == await first.json()


async def test_expect_continue_goes_the_routed_way(
    client: TestClient[Any, Any], resolved: list[str]
) -> None:
    await seed(client, stock={"s1": 2})
    resolved.clear()
    body = {"citizen_id": citizen_id(1), "phone": phone(1), "site_id": "s1"}
    r = await client.post(
        "/api/v1/rounds/r1/reservations", json=body, headers={"Expect": "100-continue"}
    )
    assert r.status == 201
    assert resolved == ["/api/v1/rounds/r1/reservations"]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("route",)))): s.value
        for m in registry.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


def observed_directly(values: list[float]) -> CollectorRegistry:
    registry = CollectorRegistry()
    h = Histogram(
        "allot_request_duration_seconds",
        "",
        ["route", "status"],
        buckets=BUCKETS,
        registry=registry,
    )
    for v in values:
        h.labels("/r", "201").observe(v)
    return registry


VALUES = [0.0, 0.0005, 0.001, 0.0010001, 0.003, 0.01, 0.2, 0.25, 4.9, 5.0, 7.5, 120.0]


def test_tallied_durations_equal_direct_observations_without_a_loop() -> None:
    m = Metrics()
    for v in VALUES:
        m.observe_request("/r", 201, v)  # no event loop: written at once
    direct = samples(observed_directly(VALUES))
    batched = {k: v for k, v in samples(m.registry).items() if k[0] in {n for n, _ in direct}}
    assert batched == direct


async def test_counts_of_one_turn_are_written_at_its_end() -> None:
    m = Metrics()
    for v in VALUES:
        m.observe_request("/r", 201, v)
    for _ in range(3):
        m.count_reservation("created")
    m.count_ask("web", granted=True)
    m.count_ask("web", granted=False)
    m.set_queue_depth(7)
    m.set_queue_depth(5)  # the last value of the turn is the one written
    assert m.registry.get_sample_value("allot_reservations_total", {"outcome": "created"}) in (
        None,
        0.0,
    )  # not yet: at the end of this turn
    await asyncio.sleep(0)
    assert m.registry.get_sample_value("allot_reservations_total", {"outcome": "created"}) == 3
    assert m.registry.get_sample_value("allot_asks_total", {"channel": "web"}) == 2
    assert m.registry.get_sample_value("allot_grants_total", {"channel": "web"}) == 1
    assert m.registry.get_sample_value("allot_queue_depth") == 5
    direct = samples(observed_directly(VALUES))
    batched = {k: v for k, v in samples(m.registry).items() if k[0] in {n for n, _ in direct}}
    assert batched == direct
    m.observe_request("/r", 201, 0.002)  # a later turn adds to the same series
    await asyncio.sleep(0)
    direct = samples(observed_directly([*VALUES, 0.002]))
    batched = {k: v for k, v in samples(m.registry).items() if k[0] in {n for n, _ in direct}}
    assert batched == direct


async def exchange(client: TestClient[Any, Any], head: str, body: bytes) -> bytes:
    """One raw request on a connection of its own; the answer's head and body."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(head.encode() + body)
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in answer.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            return answer + await reader.readexactly(length)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("version", "connection"),
    [("1.1", None), ("1.1", "close"), ("1.0", None), ("1.0", "keep-alive")],
)
async def test_connection_header_as_the_routed_way(
    client: TestClient[Any, Any], version: str, connection: str | None
) -> None:
    """Keep-alive and Connection as aiohttp decides them, for HTTP/1.0 and 1.1."""
    await seed(client, stock={"s1": 1})
    assert (await reserve(client, 1)).status == 201
    answers = []
    for n, path in enumerate(
        ["/api/v1/rounds/r1/reservations", "/api/v1/rounds/r1/reservations?via=router"]
    ):
        body = (
            f'{{"citizen_id":"{citizen_id(10 + n)}","phone":"{phone(10 + n)}","site_id":"s1"}}'
        ).encode()
        head = (
            f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + (f"Connection: {connection}\r\n" if connection else "")
            + "\r\n"
        )
        raw = await exchange(client, head, body)
        status_line, _, rest = raw.partition(b"\r\n")
        lines = rest.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        names = [line.split(b":", 1)[0] for line in lines]
        kept = [line for line in lines if not line.startswith((b"Date:", b"Content-Length:"))]
        answers.append((status_line, names, kept))
    assert answers[0][0].endswith(b" 409 Conflict")  # sold out: from memory, then from memory
    assert answers[0] == answers[1]


# -- lottery entries on the hot route ---------------------------------------------------------

ENTRIES = "/api/v1/rounds/l1/entries"
ROUTED_ENTRIES = "/api/v1/rounds/l1/entries?via=router"  # a query string: not the hot form


def entry_ask(n: int, **changes: Any) -> dict[str, Any]:
    return {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": "s1", **changes}


async def both_ways(client: TestClient[Any, Any], body: Any) -> tuple[Any, Any]:
    """The same entry asked on the hot route, then the routed way."""
    return await client.post(ENTRIES, json=body), await client.post(ROUTED_ENTRIES, json=body)


async def assert_alike(one: Any, other: Any, status: int) -> None:
    assert (one.status, other.status) == (status, status), (await one.text(), await other.text())
    assert list(headers_of(one).items()) == list(headers_of(other).items())
    assert await one.read() == await other.read()


async def test_entries_are_served_beneath_the_router(
    client: TestClient[Any, Any], resolved: list[str]
) -> None:
    await seed_lottery(client)
    resolved.clear()
    r = await client.post(ENTRIES, json=entry_ask(1))
    assert r.status == 201, await r.text()
    assert resolved == []  # answered without the router
    got = await client.get(r.headers["Location"])
    assert got.status == 200
    assert resolved == [r.headers["Location"]]
    assert await got.json() == await r.json()


async def test_every_entry_answer_on_the_hot_route_is_the_routed_ones(
    client: TestClient[Any, Any], resolved: list[str]
) -> None:
    await seed_lottery(client, stock={"s1": 5, "s2": 5})
    await seed(client, stock={"s1": 5})  # r1: a first-come round, where entries are wrong-mode
    resolved.clear()
    hot = await client.post(ENTRIES, json=entry_ask(1))
    routed = await client.post(ROUTED_ENTRIES, json=entry_ask(2))
    assert resolved == [ROUTED_ENTRIES]
    assert (hot.status, routed.status) == (201, 201)
    assert list(headers_of(hot)) == list(headers_of(routed))  # the same headers, in order
    assert hot.headers["Location"] == f"/api/v1/entries/{(await hot.json())['entry_id']}"
    assert (await hot.json()).keys() == (await routed.json()).keys()

    # 200: the same citizen again with another choice, both ways the same entry and answer
    again = entry_ask(1, site_id="s2", accept_district=True)
    one, other = await both_ways(client, again)
    await assert_alike(one, other, 200)
    assert "Location" not in one.headers
    assert (await one.json())["site_id"] == "s2"
    # 409 already-entered: the citizen under another phone
    one, other = await both_ways(client, entry_ask(1, phone=phone(99)))
    await assert_alike(one, other, 409)
    assert (await one.json())["code"] == "already-entered"
    # 409 wrong-mode: an entry on the first-come round
    one = await client.post("/api/v1/rounds/r1/entries", json=entry_ask(3))
    other = await client.post("/api/v1/rounds/r1/entries?via=router", json=entry_ask(3))
    await assert_alike(one, other, 409)
    assert (await one.json())["code"] == "wrong-mode"
    # 422s: bad fields (each named); 400s: a body that is not an object, or not JSON
    for bad in (
        entry_ask(4, citizen_id="110101198001010011", phone="12"),
        entry_ask(4, accept_district="yes"),
    ):
        one, other = await both_ways(client, bad)
        await assert_alike(one, other, 422)
    one, other = await both_ways(client, [entry_ask(4)])
    await assert_alike(one, other, 400)
    headers = {"Content-Type": "application/json"}
    one = await client.post(ENTRIES, data=b"{not json", headers=headers)
    other = await client.post(ROUTED_ENTRIES, data=b"{not json", headers=headers)
    await assert_alike(one, other, 400)
    # 404: an unknown round (well-formed: the hot form) and an unknown site
    one = await client.post("/api/v1/rounds/nosuch/entries", json=entry_ask(5))
    other = await client.post("/api/v1/rounds/nosuch/entries?via=router", json=entry_ask(5))
    await assert_alike(one, other, 404)
    one, other = await both_ways(client, entry_ask(5, site_id="nosuch"))
    await assert_alike(one, other, 404)

    # 429 overloaded: the line full
    admission = client.app[ADMISSION]
    depth = admission.max_depth
    admission.max_depth = 0
    try:
        one, other = await both_ways(client, entry_ask(6))
    finally:
        admission.max_depth = depth
    await assert_alike(one, other, 429)
    assert (await one.json())["code"] == "overloaded"
    assert "Retry-After" in one.headers

    # 503 unavailable: the draw key (read before Redis) cannot be had
    allocator = client.app[ALLOCATOR]
    draw_key = allocator.draw_key

    async def no_key() -> Any:
        raise Unavailable("The draw key cannot be read right now.")

    allocator.draw_key = no_key
    one, other = await both_ways(client, entry_ask(7))
    await assert_alike(one, other, 503)
    assert "Retry-After" in one.headers
    allocator.draw_key = draw_key

    # nothing the refusals asked was made: only citizens 1 and 2 hold entries
    assert (await client.post(ENTRIES, json=entry_ask(6))).status == 201
    stats = await (await client.get("/api/v1/admin/rounds/l1/stats", headers=ADMIN)).json()
    assert stats["entries"] == 3
