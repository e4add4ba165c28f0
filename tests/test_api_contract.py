"""The public contract (/work/shared/API.md) over HTTP, against real Redis and PostgreSQL.

Every refusal is checked for its status, its problem+json media type and stable ``code``, and,
where a refusal could have had an effect, that nothing changed. The token-bucket gate and the
admission queue (429) are covered elsewhere once they exist.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.redistyping import awaited
from service.app import create_app
from tests.helpers import (
    ADMIN,
    ADMIN_TOKEN,
    FakeClock,
    citizen_id,
    phone,
    reserve,
    round_body,
    seed,
)

Client = TestClient[Any, Any]
Cases = dict[str, tuple[str, str, dict[str, Any]]]  # id -> method, path, request kwargs

PROBLEM = "application/problem+json"
PICKUP_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
RESERVATION_KEYS = {
    "reservation_id",
    "round_id",
    "site_id",
    "quantity",
    "status",
    "pickup_code",
    "pickup_start",
    "pickup_end",
    "created_at",
    "citizen_id_masked",
}
ROUND_KEYS = {
    "round_id",
    "title",
    "opens_at",
    "closes_at",
    "per_person",
    "pickup_start",
    "pickup_end",
    "mode",
    "status",
    "remaining",
    "programme",
    "cooldown_days",
    "eligibility",
    "draw",
}
SITE_KEYS = {"site_id", "name", "address", "district", "remaining"}
RESERVATIONS = "/api/v1/rounds/r1/reservations"
CSV = {**ADMIN, "Content-Type": "text/csv"}


# -- the client: every answer checked against the served OpenAPI document -----------------


@pytest.fixture
async def client(settings: Settings, redis: Redis, checked_client: Any) -> Client:
    """The real application on a real socket, as tests/conftest.py's ``client``; every answer
    it receives must also match GET /api/v1/openapi.json (tests/openapi_check.py)."""
    return cast(Client, await checked_client(create_app(settings)))


# -- helpers ------------------------------------------------------------------------------


async def problem(r: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """Assert an RFC 9457 problem with this status and code; return its body."""
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == PROBLEM, (r.content_type, text)
    body: dict[str, Any] = await r.json(content_type=None)
    assert body["code"] == code, body
    assert body["status"] == status
    assert isinstance(body["type"], str)
    assert body["type"]
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    return body


async def invalid(r: ClientResponse) -> set[str]:
    """Assert a 422 invalid-request and return the set of fields it names."""
    body = await problem(r, 422, "invalid-request")
    errors = body["errors"]
    assert errors, body
    for e in errors:
        assert set(e) == {"field", "message"}, e
        assert isinstance(e["message"], str)
        assert e["message"]
    return {e["field"] for e in errors}


async def stats(client: Client, round_id: str = "r1") -> dict[str, Any]:
    r = await client.get(f"/api/v1/admin/rounds/{round_id}/stats", headers=ADMIN)
    assert r.status == 200, await r.text()
    assert r.content_type == "application/json"
    body: dict[str, Any] = await r.json()
    return body


def stock_view(s: dict[str, Any]) -> dict[str, Any]:
    """The parts of the stats a refused request must not change (the ledger may move)."""
    return {k: v for k, v in s.items() if k != "ledger"}


async def created(r: ClientResponse) -> dict[str, Any]:
    assert r.status == 201, await r.text()
    body: dict[str, Any] = await r.json()
    assert set(body) == RESERVATION_KEYS
    return body


async def pickup(client: Client, site_id: str, code: str, **extra: Any) -> ClientResponse:
    return await client.post(
        "/api/v1/admin/pickups",
        json={"site_id": site_id, "pickup_code": code, **extra},
        headers=ADMIN,
    )


async def put_sites(client: Client, sites: dict[str, str]) -> None:
    """Sites (site_id -> district) through the operator API."""
    body = {
        "sites": [
            {"site_id": s, "name": f"Site {s}", "address": f"{s} road 1", "district": d}
            for s, d in sites.items()
        ]
    }
    r = await client.put("/api/v1/admin/sites", json=body, headers=ADMIN)
    assert r.status == 200, await r.text()


async def post_batch(
    client: Client, batch_id: str, items: dict[str, Any], round_id: str = "r1"
) -> ClientResponse:
    return await client.post(
        f"/api/v1/admin/rounds/{round_id}/batches",
        json={
            "batch_id": batch_id,
            "items": [{"site_id": s, "quantity": q} for s, q in items.items()],
        },
        headers=ADMIN,
    )


def id_with_x() -> str:
    """A valid citizen ID whose check character is X."""
    n = next(n for n in range(100, 1000) if citizen_id(n).endswith("X"))
    return citizen_id(n)


def masked(number: str) -> str:
    return number[:6] + "*" * 8 + number[-4:]


async def refusals(
    client: Client,
    cases: dict[str, tuple[str, str, dict[str, Any]]],
    *,
    status: int,
    code: str,
    round_id: str = "r1",
) -> None:
    """Send every case (id -> method, path, request kwargs); each must be refused with this
    status and code and change nothing. All failing cases are reported together."""
    before = stock_view(await stats(client, round_id))
    wrong: dict[str, Any] = {}
    for name, (method, path, kwargs) in cases.items():
        r = await client.request(method, path, **kwargs)
        text = await r.text()
        got: Any = (r.status, r.content_type)
        if r.content_type == PROBLEM:
            got = (r.status, r.content_type, (await r.json(content_type=None)).get("code"))
        if got != (status, PROBLEM, code):
            wrong[name] = (got, text[:200])
        if stock_view(await stats(client, round_id)) != before:
            wrong[name] = "changed the round's stock"
    assert not wrong, wrong


async def fields_named(
    client: Client, cases: dict[str, tuple[str, str, dict[str, Any]]], round_id: str = "r1"
) -> dict[str, Any]:
    """Send every case; return id -> set of fields named by its 422 (or what came instead).
    Each case must leave the round's stock unchanged."""
    before = stock_view(await stats(client, round_id))
    out: dict[str, Any] = {}
    for name, (method, path, kwargs) in cases.items():
        r = await client.request(method, path, **kwargs)
        if r.status == 422 and r.content_type == PROBLEM:
            out[name] = await invalid(r)
            errors = (await r.json(content_type=None))["errors"]
            if len(errors) != len(out[name]):
                out[name] = ("a field named twice", errors)
        else:
            out[name] = (r.status, (await r.text())[:200])
        assert stock_view(await stats(client, round_id)) == before, name
    return out


# -- 400 / 413 / 415: bodies refused before anything happens --------------------------------


async def test_body_that_is_not_a_json_object_is_400_malformed_json(client: Client) -> None:
    """Clients with a broken serializer must get a clear 400, not a 5xx or a half-made claim."""
    await seed(client)
    raws = {
        "garbage": b"{not json",
        "empty": b"",
        "truncated": b'{"citizen_id": ',
        "not-utf8": b"\xff\xfe{}",
        "empty-array": b"[]",
        "array": b'[{"citizen_id": "x"}]',
        "string": b'"text"',
        "number": b"42",
        "null": b"null",
    }
    json_type = {"Content-Type": "application/json"}
    cases: Cases = {
        k: ("POST", RESERVATIONS, {"data": v, "headers": json_type}) for k, v in raws.items()
    }
    cases["sites-array"] = (
        "PUT",
        "/api/v1/admin/sites",
        {"data": b"[]", "headers": {**ADMIN, **json_type}},
    )
    cases["batch-garbage"] = (
        "POST",
        "/api/v1/admin/rounds/r1/batches",
        {"data": b"{", "headers": {**ADMIN, **json_type}},
    )
    await refusals(client, cases, status=400, code="malformed-json")


async def test_json_body_over_16_kib_is_413(client: Client) -> None:
    """An oversized body is refused by size, before it is parsed or acted on."""
    await seed(client)
    body = (
        b'{"citizen_id": "%s", "phone": "%s", "site_id": "s1"'
        % (citizen_id(1).encode(), phone(1).encode())
        + b" " * (16 * 1024)
        + b"}"
    )
    r = await client.post(RESERVATIONS, data=body, headers={"Content-Type": "application/json"})
    await problem(r, 413, "payload-too-large")
    assert (await stats(client))["reserved"] == 0
    # just under the limit is fine
    ok = body[: 16 * 1024 - 1] + b"}"
    await created(
        await client.post(RESERVATIONS, data=ok, headers={"Content-Type": "application/json"})
    )


async def test_chunked_json_body_over_16_kib_is_413(client: Client) -> None:
    """Without Content-Length the limit must hold while reading, not after buffering it all."""
    await seed(client)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"citizen_id": "%s", "phone": "%s", "site_id": "s1"' % (
            citizen_id(1).encode(),
            phone(1).encode(),
        )
        for _ in range(10):
            yield b" " * 4096
        yield b"}"

    r = await client.post(RESERVATIONS, data=chunks(), headers={"Content-Type": "application/json"})
    assert "Content-Length" not in r.request_info.headers
    await problem(r, 413, "payload-too-large")
    assert (await stats(client))["reserved"] == 0


async def test_csv_batch_over_1_mib_is_413_and_loads_nothing(client: Client) -> None:
    """CSV batches may be large, but not unbounded: over 1 MiB is refused and nothing is loaded."""
    await seed(client)
    before = await stats(client)
    line = b"s1,1\n"
    body = b"site_id,quantity\n" + line * (1024 * 1024 // len(line) + 10)
    r = await client.post(
        "/api/v1/admin/rounds/r1/batches",
        params={"batch_id": "big"},
        data=io.BytesIO(body),
        headers=CSV,
    )
    await problem(r, 413, "payload-too-large")
    assert stock_view(await stats(client)) == stock_view(before)


async def test_body_that_is_not_json_media_type_is_415(client: Client) -> None:
    """Only JSON (and CSV for batches) is understood; anything else is named as the problem."""
    await seed(client)
    payload = json.dumps({"citizen_id": citizen_id(1), "phone": phone(1), "site_id": "s1"})
    endpoints = [
        ("POST", RESERVATIONS),
        ("PUT", "/api/v1/admin/sites"),
        ("PUT", "/api/v1/admin/rounds/r1"),
        ("POST", "/api/v1/admin/rounds/r1/batches"),
        ("POST", "/api/v1/admin/pickups"),
    ]
    types = ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream"]
    cases = {
        f"{method} {path} as {ct}": (
            method,
            path,
            {"data": payload, "headers": {**ADMIN, "Content-Type": ct}},
        )
        for method, path in endpoints
        for ct in types
    }
    # CSV is only for batches
    cases["csv reservation"] = (
        "POST",
        RESERVATIONS,
        {"data": "citizen_id,phone,site_id\n", "headers": {"Content-Type": "text/csv"}},
    )
    await refusals(client, cases, status=415, code="unsupported-media-type")


# -- 401: operator endpoints ----------------------------------------------------------------


def operator_calls() -> list[tuple[str, str, Any]]:
    return [
        (
            "PUT",
            "/api/v1/admin/sites",
            {"sites": [{"site_id": "evil", "name": "E", "address": "A", "district": "d9"}]},
        ),
        ("PUT", "/api/v1/admin/rounds/r2", round_body()),
        (
            "POST",
            "/api/v1/admin/rounds/r1/batches",
            {"batch_id": "b9", "items": [{"site_id": "s1", "quantity": 5}]},
        ),
        ("GET", "/api/v1/admin/rounds/r1/stats", None),
        ("POST", "/api/v1/admin/pickups", {"site_id": "s1", "pickup_code": "22222222"}),
    ]


BAD_AUTH = {
    "none": {},
    "wrong": {"Authorization": "Bearer wrong-token"},
    "longer": {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    "prefix": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    "basic": {"Authorization": f"Basic {ADMIN_TOKEN}"},
    "no-scheme": {"Authorization": ADMIN_TOKEN},
    "empty-bearer": {"Authorization": "Bearer "},
    "bare-bearer": {"Authorization": "Bearer"},
    "query": {},  # the token in the query string is not a bearer header
}


async def test_operator_endpoints_without_the_right_token_are_401_and_change_nothing(
    client: Client,
) -> None:
    """Anyone on the internet can reach these URLs; only the operator token may act through them."""
    await seed(client)
    r1 = await created(await reserve(client, 1))
    cases = {
        f"{method} {path} {name}": (
            method,
            path,
            {
                "json": body,
                "headers": headers,
                "params": {"token": ADMIN_TOKEN} if name == "query" else {},
            },
        )
        for method, path, body in operator_calls()
        for name, headers in BAD_AUTH.items()
    }
    await refusals(client, cases, status=401, code="unauthorized")
    await problem(await client.get("/api/v1/rounds/r2"), 404, "not-found")
    got = await (await client.get(f"/api/v1/reservations/{r1['reservation_id']}")).json()
    assert got["status"] == "confirmed"
    r = await post_batch(client, "check", {"evil": 1})  # the site 'evil' was not stored
    assert await invalid(r) == {"items[0].site_id"}
    assert (await post_batch(client, "b9", {"s1": 1})).status == 201  # b9 was not used up


async def test_operator_endpoints_refuse_everyone_when_no_token_is_configured(
    checked_client: Any, settings: Settings, redis: Redis
) -> None:
    """An unset ALLOT_ADMIN_TOKEN must lock operators out, never let everyone in."""
    client = await checked_client(create_app(dataclasses.replace(settings, admin_token=None)))
    headers_to_try = [*BAD_AUTH.values(), ADMIN, {"Authorization": "Bearer None"}]
    wrong = []
    for method, path, body in operator_calls():
        for headers in headers_to_try:
            r = await client.request(method, path, json=body, headers=headers)
            if r.status != 401 or r.content_type != PROBLEM:
                wrong.append((method, path, headers, r.status))
            else:
                assert (await r.json(content_type=None))["code"] == "unauthorized"
    assert not wrong
    await problem(await client.get("/api/v1/rounds/r2"), 404, "not-found")
    assert (await (await client.get("/api/v1/rounds")).json()) == {"rounds": []}


# -- 404 / 405 ------------------------------------------------------------------------------


async def test_unknown_round_is_404(client: Client) -> None:
    """A mistyped round must say 'not found', not look like an empty or closed round."""
    await seed(client)
    claim = {"citizen_id": citizen_id(1), "phone": phone(1), "site_id": "s1"}
    batch = {"batch_id": "b1", "items": [{"site_id": "s1", "quantity": 1}]}
    cases: Cases = {
        "round": ("GET", "/api/v1/rounds/nosuch", {}),
        "upper-case round": ("GET", "/api/v1/rounds/R1", {}),
        "sites": ("GET", "/api/v1/rounds/nosuch/sites", {}),
        "reserve": ("POST", "/api/v1/rounds/nosuch/reservations", {"json": claim}),
        "stats": ("GET", "/api/v1/admin/rounds/nosuch/stats", {"headers": ADMIN}),
        "batch": (
            "POST",
            "/api/v1/admin/rounds/nosuch/batches",
            {"json": batch, "headers": ADMIN},
        ),
    }
    await refusals(client, cases, status=404, code="not-found")
    await created(await reserve(client, 1))  # the refused claim did not count against citizen 1


async def test_reserving_at_unknown_site_of_known_round_is_404_and_changes_nothing(
    client: Client,
) -> None:
    """A wrong site_id is the client's mistake, not 'sold out' with alternatives."""
    await seed(client)
    before = await stats(client)
    await problem(await reserve(client, 1, site="nosuch"), 404, "not-found")
    assert stock_view(await stats(client)) == stock_view(before)
    # the citizen is not marked as holding anything: a good site still works
    await created(await reserve(client, 1))


async def test_unknown_or_malformed_reservation_id_is_404(client: Client) -> None:
    """A guessed or garbled reservation link must reveal nothing and change nothing."""
    await seed(client)
    real = await created(await reserve(client, 1))
    token = real["reservation_id"].partition(".")[0]
    ids = {
        "unknown": secrets.token_urlsafe(16) + ".r1",
        "unknown-round": token + ".nosuch",
        "other-round": token + ".r2",
        "short": "abc",
        "no-round": token,
        "upper-round": token + ".R1",
        "empty-round": token + ".",
        "few-bits": token[:16] + ".r1",
        "extra-char": token + "A.r1",
        "long": "x" * 500 + ".r1",
        "encoded-slash": token + "%2F.r1",
    }
    cases: Cases = {
        f"{method} {name}": (method, f"/api/v1/reservations/{rid}", {})
        for name, rid in ids.items()
        for method in ("GET", "DELETE")
    }
    await refusals(client, cases, status=404, code="not-found")
    got = await (await client.get(f"/api/v1/reservations/{real['reservation_id']}")).json()
    assert got == real


async def test_unknown_route_is_404_problem_json(client: Client) -> None:
    """Even the router's own 404 speaks problem+json, so clients need one error parser."""
    await seed(client)
    cases: Cases = {
        path: (method, path, {})
        for method, path in [
            ("GET", "/nope"),
            ("GET", "/api/v1/nope"),
            ("POST", "/api/v2/rounds/r1/reservations"),
            ("GET", "/api/v1/rounds/r1/sites/s1"),
            ("GET", "/api/v1/admin"),
        ]
    }
    await refusals(client, cases, status=404, code="not-found")


async def test_wrong_method_is_405_problem_json_with_allow(client: Client) -> None:
    """A wrong verb is named as such (with Allow), in the same problem+json shape as all errors."""
    await seed(client)
    wrong = {}
    for method, path in [
        ("DELETE", "/api/v1/rounds"),
        ("POST", "/api/v1/rounds/r1"),
        ("PUT", "/api/v1/rounds/r1/reservations"),
        ("POST", "/api/v1/reservations/abc.r1"),
        ("GET", "/api/v1/admin/pickups"),
        ("PATCH", "/api/v1/admin/sites"),
        ("POST", "/healthz"),
    ]:
        r = await client.request(method, path, headers=ADMIN)
        if r.status != 405 or r.content_type != PROBLEM or not r.headers.get("Allow"):
            wrong[f"{method} {path}"] = (r.status, r.content_type, dict(r.headers))
        else:
            assert (await r.json(content_type=None))["code"] == "method-not-allowed"
    assert not wrong, wrong


# -- 422: every bad field at once -----------------------------------------------------------

_GOOD = {"citizen_id": citizen_id(1), "phone": phone(1), "site_id": "s1"}


def _bad_check_digit(number: str) -> str:
    last = "0123456789X"
    return number[:17] + last[(last.index(number[17]) + 1) % len(last)]


async def test_invalid_reservation_names_each_bad_field_at_once(client: Client) -> None:
    """A form can show every mistake in one go only if the API names all of them, once each."""
    await seed(client)
    all3 = {"citizen_id", "phone", "site_id"}
    cid = "citizen_id"
    bodies: dict[str, tuple[dict[str, Any], set[str]]] = {
        "check-digit+phone+upper-site": (
            {
                "citizen_id": _bad_check_digit(citizen_id(1)),
                "phone": "12900000001",
                "site_id": "S1",
            },
            all3,
        ),
        "month-13": ({**_GOOD, cid: citizen_id(1, born="19801301")}, {cid}),
        "month-00": ({**_GOOD, cid: citizen_id(1, born="19800001")}, {cid}),
        "feb-30": ({**_GOOD, cid: citizen_id(1, born="19810230")}, {cid}),
        "feb-29-non-leap": ({**_GOOD, cid: citizen_id(1, born="19810229")}, {cid}),
        "day-0": ({**_GOOD, cid: citizen_id(1, born="19800100")}, {cid}),
        "future-dob": ({**_GOOD, cid: citizen_id(1, born="20991231")}, {cid}),
        "17-chars": ({**_GOOD, cid: citizen_id(1)[:17]}, {cid}),
        "19-chars": ({**_GOOD, cid: citizen_id(1) + "1"}, {cid}),
        "letter": ({**_GOOD, cid: "11010119800101A011"}, {cid}),
        "x-not-last": ({**_GOOD, cid: "1101011980010100X1"}, {cid}),
        "empty-id": ({**_GOOD, cid: ""}, {cid}),
        "phone-12": ({**_GOOD, "phone": "12900000001"}, {"phone"}),
        "phone-10-digits": ({**_GOOD, "phone": "1390000000"}, {"phone"}),
        "phone-12-digits": ({**_GOOD, "phone": "139000000011"}, {"phone"}),
        "phone-plus86": ({**_GOOD, "phone": "+8613900000001"}, {"phone"}),
        "phone-not-1": ({**_GOOD, "phone": "23900000001"}, {"phone"}),
        "phone-letter": ({**_GOOD, "phone": "1390000000a"}, {"phone"}),
        "phone-arabic-indic": ({**_GOOD, "phone": "١٣٩٠٠٠٠٠٠١١"}, {"phone"}),
        "phone-fullwidth-too-short": ({**_GOOD, "phone": "１３９０００００１１"}, {"phone"}),
        "site-upper": ({**_GOOD, "site_id": "S1"}, {"site_id"}),
        "site-empty": ({**_GOOD, "site_id": ""}, {"site_id"}),
        "site-65": ({**_GOOD, "site_id": "s" * 65}, {"site_id"}),
        "site-space": ({**_GOOD, "site_id": "s 1"}, {"site_id"}),
        "all-missing": ({}, all3),
        "two-missing": ({"site_id": "s1"}, {cid, "phone"}),
        "nulls": ({cid: None, "phone": None, "site_id": None}, all3),
        "numbers": (
            {cid: int(citizen_id(2)[:17] + "0"), "phone": int(phone(1)), "site_id": 1},
            all3,
        ),
        "list-object-bool": (
            {cid: [citizen_id(1)], "phone": {"n": phone(1)}, "site_id": True},
            all3,
        ),
    }
    cases = {k: ("POST", RESERVATIONS, {"json": body}) for k, (body, _) in bodies.items()}
    assert await fields_named(client, cases) == {k: f for k, (_, f) in bodies.items()}
    await created(await reserve(client, 1))  # none of it counted against citizen 1


async def test_lower_case_x_in_citizen_id_is_accepted_and_normalised(client: Client) -> None:
    """IDs ending in X are typed with a lower-case x half the time; it is the same person."""
    await seed(client)
    number = id_with_x()
    lower = number[:17] + "x"
    r = await client.post(
        RESERVATIONS, json={"citizen_id": lower, "phone": phone(1), "site_id": "s1"}
    )
    first = await created(r)
    assert first["citizen_id_masked"] == masked(number)
    assert first["citizen_id_masked"].endswith("X")
    # the upper-case form is the same citizen: a retry, not a second reservation
    r = await client.post(
        RESERVATIONS, json={"citizen_id": number, "phone": phone(1), "site_id": "s1"}
    )
    assert r.status == 200
    assert await r.json() == first
    assert (await stats(client))["reservations"] == 1


FULLWIDTH = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")
MATH_BOLD = str.maketrans(
    {**{str(d): chr(0x1D7CE + d) for d in range(10)}, "X": "\U0001d417"}  # math bold 0-9 and X
)
OTHER_SCRIPTS = {  # decimal digits that NFKC leaves as they are
    "arabic-indic": str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"),
    "devanagari": str.maketrans("0123456789", "०१२३४५६७८९"),
    "bengali": str.maketrans("0123456789", "০১২৩৪৫৬৭৮৯"),
}


async def _ledger_settled(client: Client, recorded: int) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while (await stats(client))["ledger"] != {"recorded": recorded, "lag": 0}:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


async def test_one_citizen_typing_other_digit_forms_holds_one_reservation(
    client: Client, redis: Redis, redis_prefix: str
) -> None:
    """Fullwidth and math-bold digits are the same person (one share); Arabic-Indic, Devanagari
    and Bengali digits are refused 422 and change nothing, so no digit set is a second identity."""
    await seed(client, stock={"s1": 10, "s2": 10})
    number, ph = id_with_x(), phone(1)

    def ask(cid: str, phone_: str, site: str = "s1") -> Any:
        return client.post(RESERVATIONS, json={"citizen_id": cid, "phone": phone_, "site_id": site})

    first = await created(await ask(number, ph))
    assert first["citizen_id_masked"] == masked(number)
    mixed_id = "".join(c.translate(FULLWIDTH if i % 2 else MATH_BOLD) for i, c in enumerate(number))
    mixed_ph = "".join(c.translate(MATH_BOLD if i % 2 else FULLWIDTH) for i, c in enumerate(ph))
    same_site = {
        "fullwidth": (number.translate(FULLWIDTH), ph.translate(FULLWIDTH)),
        "math-bold": (number.translate(MATH_BOLD), ph.translate(MATH_BOLD)),
        "mixed-with-lower-x-and-ideographic-space": (
            "\u3000" + mixed_id[:17] + "x",
            mixed_ph + "\u3000",
        ),
    }
    for name, (cid, p) in same_site.items():
        r = await ask(cid, p)
        assert r.status == 200, (name, await r.text())
        assert await r.json() == first, name
    for cid, p in [*same_site.values(), (number, ph)]:
        await problem(await ask(cid, p, site="s2"), 409, "already-reserved")
    after = await stats(client)
    assert (after["reservations"], after["reserved"]) == (1, 1)

    await _ledger_settled(client, recorded=1)
    before = sorted(await _redis_texts(redis, redis_prefix))
    cases: dict[str, tuple[str, str, dict[str, Any]]] = {}
    expected: dict[str, set[str]] = {}
    for script, table in OTHER_SCRIPTS.items():
        for site in ("s1", "s2"):
            body = {"citizen_id": number.translate(table), "phone": ph, "site_id": site}
            cases[f"{script}-id-{site}"] = ("POST", RESERVATIONS, {"json": body})
            expected[f"{script}-id-{site}"] = {"citizen_id"}
            body = {"citizen_id": number, "phone": ph.translate(table), "site_id": site}
            cases[f"{script}-phone-{site}"] = ("POST", RESERVATIONS, {"json": body})
            expected[f"{script}-phone-{site}"] = {"phone"}
            # one foreign digit among fullwidth ones is refused too
            one = number.translate(FULLWIDTH)[:16] + number[16].translate(table) + number[17]
            body = {"citizen_id": one, "phone": ph, "site_id": site}
            cases[f"{script}-one-digit-{site}"] = ("POST", RESERVATIONS, {"json": body})
            expected[f"{script}-one-digit-{site}"] = {"citizen_id"}
    assert await fields_named(client, cases) == expected
    assert sorted(await _redis_texts(redis, redis_prefix)) == before
    assert stock_view(await stats(client)) == stock_view(after)


async def test_leap_day_birth_date_is_accepted(client: Client) -> None:
    """29 February exists in leap years; refusing such citizens would lock them out."""
    await seed(client)
    await created(
        await client.post(
            RESERVATIONS,
            json={"citizen_id": citizen_id(1, born="20000229"), "phone": phone(1), "site_id": "s1"},
        )
    )


async def test_unknown_body_fields_are_ignored_never_honoured(client: Client) -> None:
    """Quantity and status are the server's to set; a crafted body must not get 99 units."""
    await seed(client, stock={"s1": 200}, per_person=2)
    r = await client.post(
        RESERVATIONS,
        json={
            "citizen_id": citizen_id(1),
            "phone": phone(1),
            "site_id": "s1",
            "quantity": 99,
            "status": "collected",
            "pickup_code": "22222222",
            "reservation_id": "x" * 22 + ".r1",
            "round_id": "r2",
        },
    )
    body = await created(r)
    assert body["quantity"] == 2
    assert body["status"] == "confirmed"
    assert body["round_id"] == "r1"
    assert body["reservation_id"] != "x" * 22 + ".r1"
    s = await stats(client)
    assert (s["reserved"], s["collected"], s["remaining"]) == (2, 0, 198)


# -- 409: window, stock, one per citizen ----------------------------------------------------


@pytest.mark.parametrize(
    "window",
    [
        {"opens_in": 3600, "closes_in": 7200, "pickup_in": 3600},
        {"opens_in": -7200, "closes_in": -3600},
    ],
    ids=["before-opens_at", "after-closes_at"],
)
async def test_reserving_outside_the_window_is_409_round_not_open(
    client: Client, window: dict[str, Any]
) -> None:
    """Nobody may get ahead of the opening time, or in after closing, even by calling the API."""
    await seed(client, **window)
    before = await stats(client)
    await problem(await reserve(client, 1), 409, "round-not-open")
    assert stock_view(await stats(client)) == stock_view(before)
    assert before["remaining"] == 10


async def test_sold_out_is_409_with_alternatives_same_district_first(client: Client) -> None:
    """A citizen turned away should be told where stock is left, nearest (same district) first."""
    districts = {
        "a": "d1",
        "b": "d1",
        "c": "d1",
        "h": "d1",
        "d": "d2",
        "e": "d2",
        "f": "d3",
        "g": "d3",
        "z": "d1",
    }
    await put_sites(client, districts)
    stock = {"a": 2, "b": 3, "c": 1, "h": 5, "d": 9, "e": 8, "f": 7, "g": 6}  # z: none loaded
    await seed(client, stock=stock, districts=districts, per_person=2)
    await created(await reserve(client, 1, site="a"))
    before = await stats(client)
    body = await problem(await reserve(client, 2, site="a"), 409, "sold-out")
    alternatives = body["alternatives"]
    assert 1 <= len(alternatives) <= 5
    for alt in alternatives:
        assert set(alt) == {"site_id", "name", "district", "remaining"}
        assert alt["remaining"] == stock[alt["site_id"]]
        assert alt["remaining"] >= 2
        assert alt["name"] == f"Site {alt['site_id']}"
        assert alt["district"] == districts[alt["site_id"]]
    ids = [a["site_id"] for a in alternatives]
    assert len(ids) == 5
    assert len(set(ids)) == 5
    assert set(ids[:2]) == {"b", "h"}  # same district (d1), with enough stock
    assert set(ids[2:]) <= {"d", "e", "f", "g"}
    assert not {"a", "c", "z"} & set(ids)  # sold out, too little for a share, none loaded
    assert stock_view(await stats(client)) == stock_view(before)


async def test_sold_out_without_any_stock_left_has_empty_alternatives(client: Client) -> None:
    """When nothing is left anywhere, the answer says so instead of pointing at empty sites."""
    await seed(client, stock={"s1": 1, "s2": 1})
    await created(await reserve(client, 1, site="s1"))
    await created(await reserve(client, 2, site="s2"))
    body = await problem(await reserve(client, 3, site="s1"), 409, "sold-out")
    assert body["alternatives"] == []


async def test_already_reserved_at_another_site_is_409(client: Client) -> None:
    """One live reservation per citizen per round, whatever the site: no hoarding across sites."""
    await seed(client, stock={"s1": 5, "s2": 5})
    first = await created(await reserve(client, 1, site="s1"))
    before = await stats(client)
    await problem(await reserve(client, 1, site="s2"), 409, "already-reserved")
    assert stock_view(await stats(client)) == stock_view(before)
    got = await (await client.get(f"/api/v1/reservations/{first['reservation_id']}")).json()
    assert got == first


async def test_already_reserved_with_another_phone_at_same_site_is_409(client: Client) -> None:
    """Someone else with the citizen's ID but their own phone must not get the citizen's code."""
    await seed(client)
    first = await created(await reserve(client, 1))
    before = await stats(client)
    r = await client.post(
        RESERVATIONS, json={"citizen_id": citizen_id(1), "phone": phone(2), "site_id": "s1"}
    )
    body = await problem(r, 409, "already-reserved")
    assert first["pickup_code"] not in await r.text()
    assert "reservation_id" not in body
    assert stock_view(await stats(client)) == stock_view(before)


async def test_retry_with_same_citizen_phone_and_site_returns_the_same_reservation_200(
    client: Client,
) -> None:
    """A retry after a timeout must be safe: same reservation, no second claim, no new code."""
    await seed(client, per_person=2)
    first = await created(await reserve(client, 1))
    before = await stats(client)
    for _ in range(3):
        r = await reserve(client, 1)
        assert r.status == 200
        assert r.content_type == "application/json"
        again = await r.json()
        assert again == first
    assert stock_view(await stats(client)) == stock_view(before)
    assert before["reserved"] == 2


# -- DELETE: cancelling -----------------------------------------------------------------------


async def test_cancel_returns_units_at_once_and_is_idempotent(client: Client) -> None:
    """A cancelled share must be reservable by the next citizen straight away, and only once."""
    await seed(client, stock={"s1": 4}, per_person=2)
    first = await created(await reserve(client, 1))
    url = f"/api/v1/reservations/{first['reservation_id']}"
    assert (await stats(client))["remaining"] == 2
    r = await client.delete(url)
    assert r.status == 200, await r.text()
    cancelled = await r.json()
    assert cancelled == {**first, "status": "cancelled"}
    s = await stats(client)
    assert (s["remaining"], s["reserved"], s["reservations"]) == (4, 0, 0)
    for _ in range(2):
        r = await client.delete(url)
        assert r.status == 200
        assert await r.json() == cancelled
    assert stock_view(await stats(client)) == stock_view(s)  # units returned once, not per call
    assert await (await client.get(url)).json() == cancelled


async def test_cancel_of_collected_reservation_is_409_not_collectable(client: Client) -> None:
    """Units already handed over cannot be given back to stock by cancelling afterwards."""
    await seed(client)
    first = await created(await reserve(client, 1))
    r = await pickup(client, "s1", first["pickup_code"])
    assert r.status == 200, await r.text()
    before = await stats(client)
    await problem(
        await client.delete(f"/api/v1/reservations/{first['reservation_id']}"),
        409,
        "not-collectable",
    )
    assert stock_view(await stats(client)) == stock_view(before)
    got = await (await client.get(f"/api/v1/reservations/{first['reservation_id']}")).json()
    assert got["status"] == "collected"


@pytest.mark.parametrize("site", ["s1", "s2"])
async def test_citizen_may_reserve_again_after_cancelling(client: Client, site: str) -> None:
    """Cancelling frees the citizen's one reservation per round, at the same or another site."""
    await seed(client, stock={"s1": 1, "s2": 1})
    first = await created(await reserve(client, 1, site="s1"))
    assert (await client.delete(f"/api/v1/reservations/{first['reservation_id']}")).status == 200
    second = await created(await reserve(client, 1, site=site))
    assert second["reservation_id"] != first["reservation_id"]
    assert second["status"] == "confirmed"
    s = await stats(client)
    assert (s["reservations"], s["reserved"], s["remaining"]) == (1, 1, 1)
    old = await (await client.get(f"/api/v1/reservations/{first['reservation_id']}")).json()
    assert old["status"] == "cancelled"


# -- operators: sites and rounds --------------------------------------------------------------


async def test_put_sites_answers_upserted_count_and_updates_in_place(client: Client) -> None:
    """Operators re-send their whole site list; it is an upsert, counted, never a duplicate."""
    sites = [
        {"site_id": f"s{i}", "name": f"Site {i}", "address": f"{i} road", "district": "d1"}
        for i in range(3)
    ]
    r = await client.put("/api/v1/admin/sites", json={"sites": sites}, headers=ADMIN)
    assert r.status == 200
    assert r.content_type == "application/json"
    assert await r.json() == {"upserted": 3}
    sites[0]["name"] = "Renamed"
    r = await client.put("/api/v1/admin/sites", json={"sites": sites[:1]}, headers=ADMIN)
    assert await r.json() == {"upserted": 1}
    r = await client.put("/api/v1/admin/rounds/r1", json=round_body(), headers=ADMIN)
    r = await post_batch(client, "b1", {"s0": 1, "s1": 1, "s2": 1})
    assert r.status == 201
    listed = (await (await client.get("/api/v1/rounds/r1/sites")).json())["sites"]
    assert sorted(s["site_id"] for s in listed) == ["s0", "s1", "s2"]
    assert next(s for s in listed if s["site_id"] == "s0")["name"] == "Renamed"


async def test_put_sites_with_bad_rows_is_422_naming_them_and_stores_nothing(
    client: Client,
) -> None:
    """An operator fixes a spreadsheet faster when told exactly which rows are wrong."""
    bad_rows = [
        {"site_id": "ok", "name": "N", "address": "A", "district": "d"},
        {"site_id": "Bad", "name": "N", "address": "A", "district": "d"},
        {"site_id": "ok2", "name": "", "address": "A", "district": "d"},
        {"site_id": "ok3", "name": "N", "district": "d"},
        {"site_id": "ok", "name": "N", "address": "A", "district": "d"},
        "not-an-object",
        {"site_id": "ok4", "name": "N", "address": "A", "district": 7},
    ]
    await seed(client, stock={"s1": 1})
    cases = {
        "bad-rows": {"sites": bad_rows},
        "empty": {"sites": []},
        "not-a-list": {"sites": "s1"},
        "missing": {},
    }
    got = await fields_named(
        client,
        {
            k: ("PUT", "/api/v1/admin/sites", {"json": v, "headers": ADMIN})
            for k, v in cases.items()
        },
    )
    assert got == {
        "bad-rows": {
            "sites[1].site_id",
            "sites[2].name",
            "sites[3].address",
            "sites[4].site_id",
            "sites[5]",
            "sites[6].district",
        },
        "empty": {"sites"},
        "not-a-list": {"sites"},
        "missing": {"sites"},
    }
    r = await post_batch(client, "b1", {"ok": 1})
    assert await invalid(r) == {"items[0].site_id"}  # 'ok' was not stored


async def test_put_round_creates_201_then_updates_200(client: Client) -> None:
    """Operators can tell a new round from an edit, and always get the Round back."""
    r = await client.put("/api/v1/admin/rounds/r1", json=round_body(title="Masks"), headers=ADMIN)
    assert r.status == 201
    assert r.content_type == "application/json"
    body = await r.json()
    assert set(body) == ROUND_KEYS
    assert (body["round_id"], body["title"], body["status"], body["mode"]) == (
        "r1",
        "Masks",
        "open",
        "fcfs",
    )
    assert body["remaining"] == 0
    r = await client.put(
        "/api/v1/admin/rounds/r1", json=round_body(title="Masks 2", per_person=3), headers=ADMIN
    )
    assert r.status == 200
    body = await r.json()
    assert (body["title"], body["per_person"]) == ("Masks 2", 3)
    got = await (await client.get("/api/v1/rounds/r1")).json()
    assert (got["title"], got["per_person"]) == ("Masks 2", 3)


async def test_round_status_follows_its_window(client: Client) -> None:
    """Pages show 'opens at …' or 'closed' from status, so it must match the clock."""
    windows: dict[str, dict[str, Any]] = {
        "upcoming": {"opens_in": 3600, "closes_in": 7200, "pickup_in": 3600},
        "open": {},
        "closed": {"opens_in": -7200, "closes_in": -3600},
    }
    for status, window in windows.items():
        r = await client.put(
            f"/api/v1/admin/rounds/{status}", json=round_body(**window), headers=ADMIN
        )
        assert r.status == 201
        assert (await r.json())["status"] == status
        assert (await (await client.get(f"/api/v1/rounds/{status}")).json())["status"] == status
    listed = (await (await client.get("/api/v1/rounds")).json())["rounds"]
    assert {x["round_id"]: x["status"] for x in listed} == {s: s for s in windows}


def _round_with(**changes: Any) -> dict[str, Any]:
    body = round_body()
    for k, v in changes.items():
        if v is None:
            body.pop(k)
        else:
            body[k] = v
    return body


async def test_put_round_with_bad_fields_is_422_naming_them_and_stores_nothing(
    client: Client,
) -> None:
    """A round with impossible times would open or close at the wrong moment for everyone."""
    await seed(client)  # r1 exists; the refused rounds are r2
    bodies: dict[str, tuple[dict[str, Any], set[str]]] = {
        "no-offset": (_round_with(opens_at="2030-01-01T09:00:00"), {"opens_at"}),
        "date-only": (_round_with(pickup_start="2030-01-01"), {"pickup_start"}),
        "not-a-time": (_round_with(closes_at="tomorrow"), {"closes_at"}),
        "epoch-number": (_round_with(closes_at=1_900_000_000), {"closes_at"}),
        "closes-before-opens": (
            _round_with(
                opens_at="2030-01-02T09:00:00+08:00",
                closes_at="2030-01-01T09:00:00+08:00",
                pickup_start="2030-01-01T09:00:00+08:00",
                pickup_end="2030-01-03T09:00:00+08:00",
            ),
            {"closes_at"},
        ),
        "closes-equals-opens": (
            _round_with(
                opens_at="2030-01-01T09:00:00+08:00",
                closes_at="2030-01-01T01:00:00Z",
                pickup_start="2030-01-01T09:00:00+08:00",
                pickup_end="2030-01-03T09:00:00+08:00",
            ),
            {"closes_at"},
        ),
        "pickup-ends-before-close": (
            _round_with(
                opens_at="2030-01-01T09:00:00+08:00",
                closes_at="2030-01-02T09:00:00+08:00",
                pickup_start="2030-01-01T09:00:00+08:00",
                pickup_end="2030-01-01T18:00:00+08:00",
            ),
            {"pickup_end"},
        ),
        "per-person-0": (_round_with(per_person=0), {"per_person"}),
        "per-person-negative": (_round_with(per_person=-1), {"per_person"}),
        "per-person-string": (_round_with(per_person="2"), {"per_person"}),
        "per-person-float": (_round_with(per_person=1.5), {"per_person"}),
        "per-person-bool": (_round_with(per_person=True), {"per_person"}),
        "empty-title": (_round_with(title="  "), {"title"}),
        "unknown-mode": (_round_with(mode="raffle"), {"mode"}),
        "lottery-without-source": (_round_with(mode="lottery"), {"public_randomness_source"}),
        "three-at-once": (
            _round_with(title=None, per_person=0, opens_at="2030-01-01T09:00:00"),
            {"title", "per_person", "opens_at"},
        ),
        "empty": (
            {},
            {"title", "opens_at", "closes_at", "per_person", "pickup_start", "pickup_end"},
        ),
    }
    cases = {
        k: ("PUT", "/api/v1/admin/rounds/r2", {"json": body, "headers": ADMIN})
        for k, (body, _) in bodies.items()
    }
    assert await fields_named(client, cases) == {k: f for k, (_, f) in bodies.items()}
    await problem(await client.get("/api/v1/rounds/r2"), 404, "not-found")
    listed = (await (await client.get("/api/v1/rounds")).json())["rounds"]
    assert [x["round_id"] for x in listed] == ["r1"]


async def test_put_round_with_bad_fields_leaves_an_existing_round_unchanged(
    clocked_client: Client, clock: FakeClock
) -> None:
    """A refused edit must not half-apply to a live round."""
    client = clocked_client
    await seed(client, per_person=2)
    before = await (await client.get("/api/v1/rounds/r1")).json()
    r = await client.put(
        "/api/v1/admin/rounds/r1", json=_round_with(per_person=0, title="X"), headers=ADMIN
    )
    assert await invalid(r) == {"per_person"}
    clock.advance(1.05)  # past any per-worker cache of the round
    assert await (await client.get("/api/v1/rounds/r1")).json() == before


# -- operators: batches -----------------------------------------------------------------------


async def _batch_round(client: Client) -> None:
    """Sites s1, s2, s3 (district d1) and an open round r1 with no stock."""
    await seed(client, stock={"s1": 0, "s2": 0, "s3": 0})


async def test_batch_json_is_201_and_its_replay_is_200_with_stock_unchanged(client: Client) -> None:
    """Operators retry uploads on a flaky link; a batch must count once however often it is sent."""
    await _batch_round(client)
    r = await post_batch(client, "b1", {"s1": 5, "s2": 7})
    assert r.status == 201, await r.text()
    assert r.content_type == "application/json"
    first = await r.json()
    assert first == {"batch_id": "b1", "units_added": 12, "sites": 2}
    after_first = await stats(client)
    assert (after_first["loaded"], after_first["remaining"]) == (12, 12)
    for items in ({"s1": 5, "s2": 7}, {"s2": 7, "s1": 5}):
        r = await post_batch(client, "b1", items)
        assert r.status == 200, await r.text()
        assert await r.json() == first
    assert stock_view(await stats(client)) == stock_view(after_first)
    r = await post_batch(client, "b2", {"s3": 1})
    assert r.status == 201
    assert (await stats(client))["loaded"] == 13


async def test_batch_id_replayed_with_other_contents_is_409_batch_conflict(client: Client) -> None:
    """A reused batch_id with other numbers is an operator mistake to surface, not to apply."""
    await _batch_round(client)
    assert (await post_batch(client, "b1", {"s1": 5, "s2": 7})).status == 201
    variants = {
        "other-quantity": {"s1": 5, "s2": 8},
        "fewer-rows": {"s1": 5},
        "more-rows": {"s1": 5, "s2": 7, "s3": 1},
        "swapped": {"s1": 7, "s2": 5},
        "other-site": {"s1": 5, "s3": 7},
    }
    cases = {
        k: (
            "POST",
            "/api/v1/admin/rounds/r1/batches",
            {
                "json": {
                    "batch_id": "b1",
                    "items": [{"site_id": s, "quantity": q} for s, q in items.items()],
                },
                "headers": ADMIN,
            },
        )
        for k, items in variants.items()
    }
    await refusals(client, cases, status=409, code="batch-conflict")
    assert (await stats(client))["loaded"] == 12


def _batch_case(items: list[tuple[Any, Any]], batch_id: str = "b1") -> tuple[str, str, Any]:
    body = {"batch_id": batch_id, "items": [{"site_id": s, "quantity": q} for s, q in items]}
    return ("POST", "/api/v1/admin/rounds/r1/batches", {"json": body, "headers": ADMIN})


async def test_batch_with_a_bad_row_is_422_naming_it_and_loads_nothing(client: Client) -> None:
    """All or nothing: a half-loaded batch could never be told apart from a whole one."""
    await _batch_round(client)
    assert (await post_batch(client, "b0", {"s3": 1})).status == 201
    rows: dict[str, tuple[list[tuple[Any, Any]], set[str]]] = {
        "unknown-site": ([("s1", 5), ("s2", 5), ("nosuch", 5)], {"items[2].site_id"}),
        "quantity-0": ([("s1", 5), ("s2", 0)], {"items[1].quantity"}),
        "quantity-negative": ([("s1", 5), ("s2", -3)], {"items[1].quantity"}),
        "quantity-float": ([("s1", 5), ("s2", 2.5)], {"items[1].quantity"}),
        "quantity-string": ([("s1", 5), ("s2", "5")], {"items[1].quantity"}),
        "quantity-bool": ([("s1", 5), ("s2", True)], {"items[1].quantity"}),
        "quantity-missing": ([("s1", 5), ("s2", None)], {"items[1].quantity"}),
        "duplicate-site": ([("s1", 5), ("s2", 1), ("s1", 2)], {"items[2].site_id"}),
        "upper-site": ([("s1", 5), ("S2", 1)], {"items[1].site_id"}),
        "missing-site": ([("s1", 5), (None, 1)], {"items[1].site_id"}),
        "no-rows": ([], {"items"}),
        "two-bad-quantities": (
            [("s1", 0), ("s2", 1), ("s3", -1)],
            {"items[0].quantity", "items[2].quantity"},
        ),
    }
    cases = {k: _batch_case(items) for k, (items, _) in rows.items()}
    assert await fields_named(client, cases) == {k: f for k, (_, f) in rows.items()}
    # and the batch_id was not used up: the corrected batch loads
    assert (await post_batch(client, "b1", {"s1": 5})).status == 201


async def test_batch_with_several_bad_rows_names_all_of_them_at_once(client: Client) -> None:
    """'One per bad field': an unknown site must be named together with a bad quantity."""
    await _batch_round(client)
    got = await fields_named(client, {"x": _batch_case([("s1", 0), ("s2", 1), ("nosuch", 1)])})
    assert got == {"x": {"items[0].quantity", "items[2].site_id"}}


async def test_batch_with_bad_envelope_is_422(client: Client) -> None:
    """A batch without a usable id or item list is refused, named, and loads nothing."""
    await _batch_round(client)
    one = [{"site_id": "s1", "quantity": 1}]
    bodies: dict[str, tuple[dict[str, Any], set[str]]] = {
        "no-batch-id": ({"items": one}, {"batch_id"}),
        "upper-batch-id": ({"batch_id": "B1", "items": one}, {"batch_id"}),
        "long-batch-id": ({"batch_id": "b" * 65, "items": one}, {"batch_id"}),
        "number-batch-id": ({"batch_id": 1, "items": one}, {"batch_id"}),
        "no-items": ({"batch_id": "b1"}, {"items"}),
        "items-object": ({"batch_id": "b1", "items": {"s1": 1}}, {"items"}),
    }
    cases = {
        k: ("POST", "/api/v1/admin/rounds/r1/batches", {"json": b, "headers": ADMIN})
        for k, (b, _) in bodies.items()
    }
    assert await fields_named(client, cases) == {k: f for k, (_, f) in bodies.items()}


async def test_batch_item_that_is_not_an_object_is_named_alone(client: Client) -> None:
    """A list with one malformed item is not an empty list; only the item is the bad field."""
    await _batch_round(client)
    cases = {
        "x": (
            "POST",
            "/api/v1/admin/rounds/r1/batches",
            {"json": {"batch_id": "b1", "items": ["s1"]}, "headers": ADMIN},
        )
    }
    assert await fields_named(client, cases) == {"x": {"items[0]"}}


async def test_batch_csv_is_201_and_its_replay_is_200(client: Client) -> None:
    """Operators export stock from spreadsheets; CSV must load exactly like JSON, once."""
    await _batch_round(client)
    csv = "site_id,quantity\r\ns1,5\r\ns2,7\r\n\r\n"
    url = "/api/v1/admin/rounds/r1/batches"
    r = await client.post(url, params={"batch_id": "c1"}, data=csv, headers=CSV)
    assert r.status == 201, await r.text()
    first = await r.json()
    assert first == {"batch_id": "c1", "units_added": 12, "sites": 2}
    after = await stats(client)
    assert after["loaded"] == 12
    r = await client.post(
        url,
        params={"batch_id": "c1"},
        data="site_id,quantity\ns2,7\ns1,5\n",
        headers={**ADMIN, "Content-Type": "text/csv; charset=utf-8"},
    )
    assert r.status == 200, await r.text()
    assert await r.json() == first
    assert stock_view(await stats(client)) == stock_view(after)


async def test_batch_csv_equal_to_a_json_batch_replays_as_200(client: Client) -> None:
    """The same batch sent once as JSON and once as CSV is one batch, whatever the row order."""
    await _batch_round(client)
    r = await post_batch(client, "b1", {"s1": 5, "s2": 7})
    first = await r.json()
    before = await stats(client)
    r = await client.post(
        "/api/v1/admin/rounds/r1/batches",
        params={"batch_id": "b1"},
        data="site_id,quantity\ns2,7\ns1,5\n",
        headers=CSV,
    )
    assert r.status == 200, await r.text()
    assert await r.json() == first
    assert stock_view(await stats(client)) == stock_view(before)
    r = await client.post(
        "/api/v1/admin/rounds/r1/batches",
        params={"batch_id": "b1"},
        data="site_id,quantity\ns2,7\ns1,6\n",
        headers=CSV,
    )
    await problem(r, 409, "batch-conflict")
    assert stock_view(await stats(client)) == stock_view(before)


def _csv_case(csv: str) -> tuple[str, str, Any]:
    return (
        "POST",
        "/api/v1/admin/rounds/r1/batches",
        {"params": {"batch_id": "c1"}, "data": csv.encode(), "headers": CSV},
    )


def _lines_only(got: dict[str, Any]) -> dict[str, Any]:
    """Reduce each case's named fields to the 'line N' they start with."""
    return {k: {f.split(".")[0] for f in v} if isinstance(v, set) else v for k, v in got.items()}


async def test_batch_csv_with_a_bad_line_is_422_naming_the_line_and_loads_nothing(
    client: Client,
) -> None:
    """In a CSV the operator looks for a line number, so the error must name the line."""
    await _batch_round(client)
    csvs = {
        "quantity-0": ("site_id,quantity\ns1,5\ns2,0\n", {"line 3"}),
        "quantity-negative": ("site_id,quantity\ns1,5\ns2,-1\n", {"line 3"}),
        "quantity-text": ("site_id,quantity\ns1,5\ns2,abc\n", {"line 3"}),
        "quantity-decimal": ("site_id,quantity\ns1,5\ns2,1.5\n", {"line 3"}),
        "quantity-empty": ("site_id,quantity\ns1,5\ns2,\n", {"line 3"}),
        "one-value": ("site_id,quantity\ns1,5\ns2\n", {"line 3"}),
        "three-values": ("site_id,quantity\ns1,5\ns2,1,9\n", {"line 3"}),
        "duplicate": ("site_id,quantity\ns1,5\ns1,2\n", {"line 3"}),
        "upper-site-after-blank": ("site_id,quantity\ns1,5\n\nS2,2\n", {"line 4"}),
        "two-bad-lines": ("site_id,quantity\ns1,0\ns2,5\ns3,x\n", {"line 2", "line 4"}),
        "bad-header": ("site,qty\ns1,5\n", {"line 1"}),
        "empty": ("", {"line 1"}),
        "header-only": ("site_id,quantity\n", {"items"}),
    }
    got = await fields_named(client, {k: _csv_case(c) for k, (c, _) in csvs.items()})
    assert _lines_only(got) == {k: lines for k, (_, lines) in csvs.items()}
    assert (await stats(client))["loaded"] == 0


async def test_batch_csv_with_an_unknown_site_names_its_line(client: Client) -> None:
    """The operator fixing a CSV looks for 'line 3', not for the JSON-only 'items[1]'."""
    await _batch_round(client)
    got = await fields_named(client, {"x": _csv_case("site_id,quantity\ns1,5\nnosuch,2\n")})
    assert _lines_only(got) == {"x": {"line 3"}}
    assert (await stats(client))["loaded"] == 0


async def test_batch_csv_with_a_non_ascii_digit_quantity_is_422_not_503(client: Client) -> None:
    """Any malformed CSV cell is the operator's mistake to fix (422), never a server failure."""
    await _batch_round(client)
    cases = {
        "superscript-two": _csv_case("site_id,quantity\ns1,5\ns2,\u00b2\n"),
        "circled-one": _csv_case("site_id,quantity\ns1,5\ns2,\u2460\n"),
    }
    got = await fields_named(client, cases)
    assert _lines_only(got) == {"superscript-two": {"line 3"}, "circled-one": {"line 3"}}
    assert (await stats(client))["loaded"] == 0


async def test_batch_csv_without_batch_id_is_422(client: Client) -> None:
    """Without ?batch_id= a CSV upload could not be made safe to retry, so it is refused."""
    await _batch_round(client)
    r = await client.post(
        "/api/v1/admin/rounds/r1/batches", data="site_id,quantity\ns1,5\n", headers=CSV
    )
    assert await invalid(r) == {"batch_id"}
    assert (await stats(client))["loaded"] == 0


async def test_batch_into_unknown_round_is_404(client: Client) -> None:
    """Stock loaded into a mistyped round would sit where nobody can reserve it."""
    await _batch_round(client)
    cases: Cases = {
        "json": (
            "POST",
            "/api/v1/admin/rounds/nosuch/batches",
            {
                "json": {"batch_id": "b1", "items": [{"site_id": "s1", "quantity": 5}]},
                "headers": ADMIN,
            },
        ),
        "csv": (
            "POST",
            "/api/v1/admin/rounds/nosuch/batches",
            {"params": {"batch_id": "b1"}, "data": b"site_id,quantity\ns1,5\n", "headers": CSV},
        ),
    }
    await refusals(client, cases, status=404, code="not-found")
    await problem(await client.get("/api/v1/rounds/nosuch"), 404, "not-found")
    assert (await post_batch(client, "b1", {"s1": 5})).status == 201  # batch_id not consumed


# -- stats and the ledger -------------------------------------------------------------------


async def test_stats_account_for_every_unit_and_the_ledger_catches_up(
    client: Client, pg: asyncpg.Connection
) -> None:
    """Operators reconcile stock from these figures; every unit must be in exactly one bucket."""
    await seed(client, stock={"s1": 5, "s2": 5}, per_person=2)
    r1 = await created(await reserve(client, 1, site="s1"))
    r2 = await created(await reserve(client, 2, site="s1"))
    await created(await reserve(client, 3, site="s2"))
    assert (await client.delete(f"/api/v1/reservations/{r2['reservation_id']}")).status == 200
    assert (await pickup(client, "s1", r1["pickup_code"])).status == 200
    s = await stats(client)
    assert s["round_id"] == "r1"
    assert (s["loaded"], s["reserved"], s["collected"], s["remaining"]) == (10, 2, 2, 6)
    assert s["reservations"] == 2  # r1 collected + r3 confirmed; r2 cancelled
    assert s["loaded"] == s["remaining"] + s["reserved"] + s["collected"]
    assert s["sites"] == [
        {
            "site_id": "s1",
            "loaded": 5,
            "reserved": 0,
            "collected": 2,
            "expired": 0,
            "carried_out": 0,
            "remaining": 3,
        },
        {
            "site_id": "s2",
            "loaded": 5,
            "reserved": 2,
            "collected": 0,
            "expired": 0,
            "carried_out": 0,
            "remaining": 3,
        },
    ]
    assert (s["expired"], s["carried_out"]) == (0, 0)
    assert set(s["ledger"]) == {"recorded", "lag"}
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        ledger = (await stats(client))["ledger"]
        if ledger == {"recorded": 3, "lag": 0}:
            break
        assert asyncio.get_running_loop().time() < deadline, ledger
        await asyncio.sleep(0.1)
    rows = dict(
        cast(
            list[tuple[str, str]], await pg.fetch("SELECT reservation_id, status FROM reservations")
        )
    )
    assert rows[r1["reservation_id"]] == "collected"
    assert rows[r2["reservation_id"]] == "cancelled"
    assert sorted(rows.values()) == ["cancelled", "collected", "confirmed"]


# -- pickups --------------------------------------------------------------------------------


async def test_pickup_collects_once_then_is_409_not_collectable(client: Client) -> None:
    """Units are handed over once per code; a second presentation must be refused."""
    await seed(client, per_person=2)
    first = await created(await reserve(client, 1))
    r = await pickup(client, "s1", first["pickup_code"], citizen_id=citizen_id(1))
    assert r.status == 200, await r.text()
    assert r.content_type == "application/json"
    assert await r.json() == {**first, "status": "collected"}
    after = await stats(client)
    assert (after["reserved"], after["collected"]) == (0, 2)
    await problem(await pickup(client, "s1", first["pickup_code"]), 409, "not-collectable")
    assert stock_view(await stats(client)) == stock_view(after)
    got = await (await client.get(f"/api/v1/reservations/{first['reservation_id']}")).json()
    assert got["status"] == "collected"


async def test_pickup_of_a_code_not_issued_at_that_site_is_404(client: Client) -> None:
    """A code is only good at the site it was issued for; elsewhere it does not exist."""
    await seed(client, stock={"s1": 5, "s2": 5})
    first = await created(await reserve(client, 1, site="s1"))
    code = first["pickup_code"]
    unused = next(c for c in ("22222222", "33333333") if c != code)

    def case(site: str, c: str, **extra: Any) -> tuple[str, str, Any]:
        body = {"site_id": site, "pickup_code": c, **extra}
        return ("POST", "/api/v1/admin/pickups", {"json": body, "headers": ADMIN})

    cases = {
        "wrong-site": case("s2", code),
        "unknown-code": case("s1", unused),
        "unknown-site": case("nosuch", code),
        "wrong-site-with-holder-id": case("s2", code, citizen_id=citizen_id(1)),
    }
    await refusals(client, cases, status=404, code="not-found")
    got = await (await client.get(f"/api/v1/reservations/{first['reservation_id']}")).json()
    assert got["status"] == "confirmed"


async def test_pickup_with_another_citizens_id_is_409_and_stays_confirmed(client: Client) -> None:
    """A stolen code is no good without the holder's ID, and the holder can still collect."""
    await seed(client)
    first = await created(await reserve(client, 1))
    before = await stats(client)
    body = await problem(
        await pickup(client, "s1", first["pickup_code"], citizen_id=citizen_id(2)),
        409,
        "not-collectable",
    )
    assert "not match" in body["detail"].lower(), body["detail"]
    assert stock_view(await stats(client)) == stock_view(before)
    got = await (await client.get(f"/api/v1/reservations/{first['reservation_id']}")).json()
    assert got["status"] == "confirmed"
    r = await pickup(client, "s1", first["pickup_code"], citizen_id=citizen_id(1))
    assert r.status == 200


async def test_pickup_code_is_accepted_in_lower_case(client: Client) -> None:
    """Codes are read out and typed by hand at a counter; case must not matter."""
    await seed(client)
    first = await created(await reserve(client, 1))
    r = await pickup(client, "s1", first["pickup_code"].lower())
    assert r.status == 200, await r.text()
    assert (await r.json())["status"] == "collected"


async def test_pickup_of_a_cancelled_reservation_is_409_not_collectable(client: Client) -> None:
    """Units given back by cancelling may already be someone else's; the old code is dead."""
    await seed(client)
    first = await created(await reserve(client, 1))
    assert (await client.delete(f"/api/v1/reservations/{first['reservation_id']}")).status == 200
    before = await stats(client)
    await problem(await pickup(client, "s1", first["pickup_code"]), 409, "not-collectable")
    assert stock_view(await stats(client)) == stock_view(before)
    assert before["collected"] == 0


async def test_pickup_with_bad_fields_is_422(client: Client) -> None:
    """A mistyped code is named as such at the counter rather than looking like 'not issued'."""
    await seed(client)
    bodies: dict[str, tuple[dict[str, Any], set[str]]] = {
        "no-code": ({"site_id": "s1"}, {"pickup_code"}),
        "no-site": ({"pickup_code": "22222222"}, {"site_id"}),
        "short-code": ({"site_id": "s1", "pickup_code": "2222222"}, {"pickup_code"}),
        "outside-alphabet": ({"site_id": "s1", "pickup_code": "0OOIL111"}, {"pickup_code"}),
        "number-code": ({"site_id": "s1", "pickup_code": 22222222}, {"pickup_code"}),
        "bad-citizen-id": (
            {"site_id": "s1", "pickup_code": "22222222", "citizen_id": "123"},
            {"citizen_id"},
        ),
        "empty": ({}, {"site_id", "pickup_code"}),
    }
    cases = {
        k: ("POST", "/api/v1/admin/pickups", {"json": b, "headers": ADMIN})
        for k, (b, _) in bodies.items()
    }
    assert await fields_named(client, cases) == {k: f for k, (_, f) in bodies.items()}


# -- reading rounds and sites; operations ---------------------------------------------------


async def test_rounds_list_and_detail_have_the_contract_shape(client: Client) -> None:
    """Citizen pages are built from these fields; a missing or renamed one breaks every page."""
    await seed(client, stock={"s1": 10, "s2": 5}, per_person=2, title="Masks")
    await seed(
        client, round_id="r0", stock={"s1": 3}, opens_in=3600, closes_in=7200, pickup_in=3600
    )
    r = await client.get("/api/v1/rounds")
    assert r.status == 200
    assert r.content_type == "application/json"
    listed = (await r.json())["rounds"]
    assert {x["round_id"] for x in listed} == {"r0", "r1"}
    for rnd in listed:
        assert set(rnd) == ROUND_KEYS
        assert isinstance(rnd["remaining"], int)
    r1 = next(x for x in listed if x["round_id"] == "r1")
    assert (r1["title"], r1["per_person"], r1["mode"], r1["status"], r1["remaining"]) == (
        "Masks",
        2,
        "fcfs",
        "open",
        15,
    )
    r0 = next(x for x in listed if x["round_id"] == "r0")
    assert (r0["status"], r0["remaining"]) == ("upcoming", 3)
    got = await (await client.get("/api/v1/rounds/r1")).json()
    assert got == r1
    for key in ("opens_at", "closes_at", "pickup_start", "pickup_end"):
        assert re.search(r"(Z|[+-]\d\d:\d\d)$", got[key]), got[key]


async def test_sites_list_has_the_contract_shape(client: Client) -> None:
    """Citizens choose a pickup point from this list, with name, address, district and stock."""
    await seed(client, stock={"s1": 10, "s2": 4}, districts={"s1": "d1", "s2": "d2"})
    r = await client.get("/api/v1/rounds/r1/sites")
    assert r.status == 200
    assert r.content_type == "application/json"
    body = await r.json()
    assert set(body) == {"sites"}
    assert sorted(body["sites"], key=lambda s: s["site_id"]) == [
        {
            "site_id": "s1",
            "name": "Site s1",
            "address": "s1 road 1",
            "district": "d1",
            "remaining": 10,
        },
        {
            "site_id": "s2",
            "name": "Site s2",
            "address": "s2 road 1",
            "district": "d2",
            "remaining": 4,
        },
    ]


async def test_health_and_readiness_answer_200(client: Client) -> None:
    """Load balancers and orchestrators route and restart by these two answers."""
    assert (await client.get("/healthz")).status == 200
    r = await client.get("/readyz")
    assert r.status == 200, await r.text()


async def test_metrics_expose_the_contract_series(client: Client, ops: Client) -> None:
    """Dashboards and alerts are keyed on these names; renaming one silently blinds them."""
    await seed(client)
    await created(await reserve(client, 1))
    await problem(await reserve(client, 1, site="nosuch"), 409, "already-reserved")
    r = await ops.get("/metrics")
    assert r.status == 200
    assert r.content_type == "text/plain"
    text = await r.text()
    assert 'allot_reservations_total{outcome="created"} 1.0' in text
    assert 'allot_reservations_total{outcome="already-reserved"} 1.0' in text
    assert "allot_request_duration_seconds_bucket{" in text
    assert re.search(r"^allot_queue_depth \d", text, re.M)
    assert re.search(r"^allot_ledger_lag \d", text, re.M)


async def test_metrics_are_404_on_the_citizens_port(client: Client) -> None:
    """/metrics is for the operations listener only: on the public port it would let anyone
    stall a worker's loop with scrapes, and it tells outsiders how the service is doing."""
    await problem(await client.get("/metrics"), 404, "not-found")


async def test_operations_listener_answers_health_and_readiness(ops: Client) -> None:
    """Orchestrators may probe the operations port instead of the public one."""
    assert (await ops.get("/healthz")).status == 200
    r = await ops.get("/readyz")
    assert r.status == 200, await r.text()
    await problem(await ops.get("/api/v1/rounds"), 404, "not-found")  # nothing else is here


async def test_openapi_document_is_served_as_openapi_3_1(client: Client) -> None:
    """Client generators fetch the document from the running service, not from the repository."""
    r = await client.get("/api/v1/openapi.json")
    assert r.status == 200
    assert r.content_type == "application/json"
    body = await r.json()
    assert body["openapi"] == "3.1.0"
    assert "/api/v1/rounds/{round_id}/reservations" in body["paths"]


# -- identifiers ----------------------------------------------------------------------------


async def test_reservation_ids_are_unguessable_and_pickup_codes_use_the_alphabet(
    client: Client,
) -> None:
    """The reservation_id is the citizen's only key: a guessable one lets anyone cancel it."""
    await seed(client, stock={"s1": 50})
    bodies = [await created(await reserve(client, n)) for n in range(50)]
    ids = [b["reservation_id"] for b in bodies]
    assert len(set(ids)) == 50
    for rid in ids:
        token, dot, round_id = rid.partition(".")
        assert dot
        assert round_id == "r1"
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", token), rid  # >= 22 * 6 = 132 random bits
    codes = [b["pickup_code"] for b in bodies]
    assert len(set(codes)) == 50  # unique within the site and round
    for code in codes:
        assert len(code) == 8
        assert set(code) <= set(PICKUP_ALPHABET), code
    # the random part is not a counter: consecutive ids share no long common prefix
    prefixes = {rid[:6] for rid in ids}
    assert len(prefixes) > 45


# -- privacy --------------------------------------------------------------------------------


async def _privacy_flow(client: Client) -> list[str]:
    """Reservations, a retry, refusals, a cancel and a pickup; returns every clear value used."""
    await seed(client, stock={"s1": 10, "s2": 10})
    x_id = id_with_x()
    people = [(citizen_id(n), phone(n)) for n in range(1, 5)] + [(x_id, phone(9))]
    made = []
    for cid, ph in people:
        r = await client.post(RESERVATIONS, json={"citizen_id": cid, "phone": ph, "site_id": "s1"})
        made.append(await created(r))
    cid, ph = people[0]
    assert (
        await client.post(RESERVATIONS, json={"citizen_id": cid, "phone": ph, "site_id": "s1"})
    ).status == 200
    r = await client.post(RESERVATIONS, json={"citizen_id": cid, "phone": ph, "site_id": "s2"})
    await problem(r, 409, "already-reserved")
    r = await client.post(
        RESERVATIONS, json={"citizen_id": _bad_check_digit(cid), "phone": ph, "site_id": "s1"}
    )
    await invalid(r)
    assert (await client.delete(f"/api/v1/reservations/{made[1]['reservation_id']}")).status == 200
    r = await pickup(client, "s1", made[2]["pickup_code"], citizen_id=people[2][0])
    assert r.status == 200
    r = await pickup(client, "s1", made[3]["pickup_code"], citizen_id=people[0][0])
    await problem(r, 409, "not-collectable")
    clear = [v for pair in people for v in pair]
    clear += [x_id.lower(), _bad_check_digit(cid)]
    return clear


async def _redis_texts(redis: Redis, prefix: str) -> list[bytes]:
    """Every key name, hash field and value, set member, string and stream entry under prefix."""
    out: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        out.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            for field, value in (await awaited(redis.hgetall(key))).items():
                out += [field, value]
        elif kind == "string":
            out.append(await redis.get(key))
        elif kind == "set":
            out += list(await awaited(redis.smembers(key)))
        elif kind == "zset":
            out += [m for m, _ in await awaited(redis.zrange(key, 0, -1, withscores=True))]
        elif kind == "list":
            out += list(await awaited(redis.lrange(key, 0, -1)))
        elif kind == "stream":
            for entry_id, fields in await redis.xrange(key):
                out.append(entry_id)
                for field, value in fields.items():
                    out += [field, value]
        else:
            raise AssertionError(f"unexpected redis type {kind} for {key!r}")
    return out


async def test_redis_holds_no_clear_citizen_id_or_phone(
    client: Client, redis: Redis, redis_prefix: str
) -> None:
    """A leaked Redis dump must not hand out citizens' ID numbers and phones."""
    clear = await _privacy_flow(client)
    texts = await _redis_texts(redis, redis_prefix)
    assert len(texts) > 20  # the scan did see the round's state
    for text in texts:
        for value in clear:
            assert value.encode() not in text, (value, text[:200])


async def test_postgres_ledger_holds_no_clear_citizen_id_or_phone(
    client: Client, pg: asyncpg.Connection
) -> None:
    """The durable ledger keeps only keyed hashes and the masked ID, never the clear values."""
    clear = await _privacy_flow(client)
    deadline = asyncio.get_running_loop().time() + 5
    while (await stats(client))["ledger"] != {"recorded": 5, "lag": 0}:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    rows = await pg.fetch("SELECT * FROM reservations")
    assert len(rows) == 5
    masks = {r["citizen_id_masked"] for r in rows}
    assert masked(citizen_id(1)) in masks
    for row in rows:
        for column, value in row.items():
            for secret in clear:
                assert secret not in str(value), (column, value)
    # nor anywhere else in the database
    for table in ("sites", "rounds", "batches"):
        dump = str(await pg.fetch(f"SELECT * FROM {table}"))  # noqa: S608 - fixed names
        for secret in clear:
            assert secret not in dump, table


async def test_logs_hold_no_clear_citizen_id_or_phone(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Logs are shipped and kept widely; clear IDs and phones in them would be a data leak."""
    caplog.set_level(logging.DEBUG)
    clear = await _privacy_flow(client)
    deadline = asyncio.get_running_loop().time() + 5
    while (await stats(client))["ledger"] != {"recorded": 5, "lag": 0}:  # the writer has logged
        assert asyncio.get_running_loop().time() < deadline  # whatever it logs for these
        await asyncio.sleep(0.1)
    assert caplog.records  # capture works (at least the access log speaks)
    for record in caplog.records:
        text = record.getMessage() + str(record.args) + str(record.exc_text or "")
        for secret in clear:
            assert secret not in text, (record.name, text[:300])
    for secret in clear:
        assert secret not in caplog.text


async def test_not_collectable_names_its_reason_for_programs(client: TestClient[Any, Any]) -> None:
    """The pickup desk shows a different answer per case; it must not parse prose to do it."""
    await seed(client, stock={"s1": 10})
    made = await reserve(client, 1)
    code = (await made.json())["pickup_code"]
    desk = "/api/v1/admin/pickups"
    wrong = await client.post(
        desk,
        json={"site_id": "s1", "pickup_code": code, "citizen_id": citizen_id(2)},
        headers=ADMIN,
    )
    assert (await wrong.json())["reason"] == "citizen"
    assert (
        await client.post(desk, json={"site_id": "s1", "pickup_code": code}, headers=ADMIN)
    ).status == 200
    again = await client.post(desk, json={"site_id": "s1", "pickup_code": code}, headers=ADMIN)
    assert (await again.json())["reason"] == "collected"
    cancel = await client.delete(made.headers["Location"])
    assert (await cancel.json())["reason"] == "collected"
    other = await reserve(client, 3)
    await client.delete(other.headers["Location"])
    code3 = (await other.json())["pickup_code"]
    gone = await client.post(desk, json={"site_id": "s1", "pickup_code": code3}, headers=ADMIN)
    assert (await gone.json())["reason"] == "cancelled"
