"""One source for the API's shapes and limits: the declarations agree with what the code does,
and the check that holds every contract test's answers to the served document really checks."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

import allocator
from allocator import errors, rules
from allocator.errors import InvalidRequest, RateLimited, SoldOut, Unavailable
from allocator.model import Alternative
from allocator.soldout import SoldOutBoard
from service.openapi import openapi_document, openapi_json
from service.problems import (
    PROBLEM_CODES,
    PROBLEMS,
    problem_body,
    problem_headers,
    problem_response,
)
from service.schemas import SCHEMAS
from service.validation import parse_batch_json, parse_pickup, parse_round, parse_sites
from tests.helpers import round_body
from tests.openapi_check import ContractCheck

# API.md's error table, written out by hand from it: (status, code).
CONTRACT_ERROR_TABLE = {
    (400, "malformed-json"),
    (401, "unauthorized"),
    (404, "not-found"),
    (409, "round-not-open"),
    (409, "sold-out"),
    (409, "already-reserved"),
    (409, "batch-conflict"),
    (409, "not-collectable"),
    (413, "payload-too-large"),
    (415, "unsupported-media-type"),
    (422, "invalid-request"),
    (429, "rate-limited"),
    (429, "overloaded"),
    (503, "unavailable"),
    (409, "wrong-mode"),
    (409, "already-entered"),
    (409, "not-eligible"),
    (409, "in-cooldown"),
    (409, "draw-not-ready"),
    (409, "draw-conflict"),
    (409, "carry-not-ready"),
    (403, "forbidden"),
}


# -- the problem table ------------------------------------------------------------------------


def test_problem_table_is_the_contracts_error_table() -> None:
    """The table the document is built from must hold every code of the contract, with the
    contract's status, and nothing else but the marked extensions."""
    table = {(p.status, p.code) for p in PROBLEM_CODES if not p.beyond_contract}
    assert table == CONTRACT_ERROR_TABLE
    assert len(PROBLEMS) == len(PROBLEM_CODES)  # each code once


def _refusal_classes() -> Iterator[type[errors.Problem]]:
    """Every refusal with a code: the domain's (allocator/errors.py) and the HTTP layer's."""
    todo = [errors.Problem]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "code" in vars(cls) and cls is not errors.Problem:
            yield cls


def test_refusals_answer_as_the_problem_table_says() -> None:
    """The HTTP mapping (service/problems.py) gives each refusal its row's status, title and
    Retry-After; every code raised anywhere is a served row, and every served row is raised."""
    import service.problems  # noqa: F401 - its refusal classes must be among the subclasses

    seen = set()
    for cls in _refusal_classes():
        row = PROBLEMS[cls.code]
        problem = InvalidRequest.one("f", "m") if cls is InvalidRequest else cls("detail")
        response = problem_response(problem)
        body = orjson.loads(response.body)  # type: ignore[arg-type]
        assert (response.status, body["title"], body["code"]) == (row.status, row.title, row.code)
        assert body["type"] == f"urn:allot:problem:{row.code}", cls
        assert ("Retry-After" in response.headers) == row.retry_after, cls
        assert response.content_type == "application/problem+json"
        assert row.served, f"{cls.code} is raised but marked not served"
        seen.add(cls.code)
    assert seen == {p.code for p in PROBLEM_CODES if p.served}


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert problem_headers(RateLimited("x", retry_after=0.2))["Retry-After"] == "1"
    assert problem_headers(RateLimited("x", retry_after=2.01))["Retry-After"] == "3"
    assert problem_headers(Unavailable("x", retry_after=10))["Retry-After"] == "10"
    assert "Retry-After" not in problem_headers(SoldOut("x", alternatives=[]))


def test_one_sold_out_mark_is_serialised_once() -> None:
    """A herd answered from one mark of the sold-out board shares one body (the memo lives in
    service/, keyed by the mark); another mark gets its own."""
    board = SoldOutBoard()
    offer = [Alternative("s2", "Two", "d1", 9)]
    board.mark(
        "r1", "s1", frozenset(), SoldOut("Site 's1' has 0 unit(s) left.", alternatives=offer)
    )
    first, second = board.check("r1", "s1", "a"), board.check("r1", "s1", "b")
    assert first is not None
    assert second is not None
    assert first is not second
    body = problem_body(first)
    assert problem_body(second) is body
    assert orjson.loads(body)["alternatives"] == [
        {"site_id": "s2", "name": "Two", "district": "d1", "remaining": 9}
    ]
    board.mark("r1", "s1", frozenset(), SoldOut("Site 's1' has 1 unit(s) left.", alternatives=[]))
    third = board.check("r1", "s1", "c")
    assert third is not None
    assert orjson.loads(problem_body(third))["detail"] == "Site 's1' has 1 unit(s) left."


HTTP_IN_THE_DOMAIN = re.compile(
    r"\bstatus\s*=\s*\d{3}|\.status\s*=\s*\d|\bheaders\b|Retry-After|\btitle\s*=\s*\"|aiohttp"
)
HTTP_STATUS = re.compile(r"\b(?:400|401|403|404|405|408|409|413|415|422|429|500|503)\b")


def http_in(name: str, text: str) -> list[str]:
    """Lines of an allocator/ module that speak HTTP; in errors.py, any HTTP status number."""
    return [
        f"{name}:{n}: {line.strip()}"
        for n, line in enumerate(text.splitlines(), 1)
        if HTTP_IN_THE_DOMAIN.search(line) or (name == "errors.py" and HTTP_STATUS.search(line))
    ]


def test_the_domain_knows_no_http() -> None:
    """No module of allocator/ sets an HTTP status, a title or a header, or imports aiohttp:
    that is service/problems.py's job (and service/shapes.py's for bodies)."""
    root = Path(allocator.__file__).parent
    found = [
        line
        for path in sorted(root.glob("*.py"))
        for line in http_in(path.name, path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_the_http_scan_finds_a_status_in_the_domain() -> None:
    """The scan above can fail: the errors module as it was (statuses, headers) is caught."""
    old = [
        'class SoldOut(Problem):\n    code, title = "sold-out", "Sold out at this site"',
        "class SoldOut(Problem):\n    status = 409",
        '        self.headers["Retry-After"] = str(self.retry_after)',
        "        problem.status = 503",
        "from aiohttp import web",
    ]
    assert all(http_in("errors.py", text) for text in old)
    assert http_in("errors.py", "    code = 'sold-out'  # 409") != []
    assert http_in("claims.py", "    code = 'sold-out'") == []


# -- the limits the document states are the ones the service applies -------------------------


def _refused(parse: Any, *args: Any) -> set[str]:
    try:
        parse(*args)
    except InvalidRequest as exc:
        return {e["field"] for e in exc.extra["errors"]}
    return set()


def _spec(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = openapi_document()["components"]["schemas"][name]
    return schema


def test_round_limits_in_the_document_are_the_ones_applied() -> None:
    """An operator's tool built from the document must not send what the service refuses, nor
    be stopped short of what it takes."""
    spec = _spec("RoundSpec")["properties"]
    most = spec["per_person"]["maximum"]
    assert most == rules.MAX_PER_PERSON
    assert not _refused(parse_round, "r1", round_body(per_person=most))
    assert _refused(parse_round, "r1", round_body(per_person=most + 1)) == {"per_person"}
    longest = spec["title"]["maxLength"]
    assert not _refused(parse_round, "r1", round_body(title="t" * longest))
    assert _refused(parse_round, "r1", round_body(title="t" * (longest + 1))) == {"title"}
    assert _refused(parse_round, "r1", {**round_body(), "mode": "raffle"}) == {"mode"}
    assert spec["mode"]["enum"] == ["fcfs", "lottery"]
    lottery = {**round_body(), "mode": "lottery"}
    assert _refused(parse_round, "r1", lottery) == {"public_randomness_source"}
    longest = spec["public_randomness_source"]["maxLength"]
    for size, refused in ((longest, set()), (longest + 1, {"public_randomness_source"})):
        body = {**lottery, "public_randomness_source": "x" * size}
        assert _refused(parse_round, "r1", body) == refused


def test_site_and_batch_limits_in_the_document_are_the_ones_applied() -> None:
    """The same for sites (text lengths, how many at once) and batch quantities."""
    longest = _spec("Site")["properties"]["name"]["maxLength"]
    site = {"site_id": "s1", "name": "n" * longest, "address": "a", "district": "d"}
    assert len(parse_sites({"sites": [site]})) == 1
    too_long = {**site, "name": "n" * (longest + 1)}
    assert _refused(parse_sites, {"sites": [too_long]}) == {"sites[0].name"}
    many = _spec("SitesUpsert")["properties"]["sites"]["maxItems"]
    crowd = [{**site, "site_id": f"s{i}"} for i in range(many + 1)]
    assert _refused(parse_sites, {"sites": crowd}) == {"sites"}
    most = _spec("BatchItem")["properties"]["quantity"]["maximum"]
    batch = {"batch_id": "b1", "items": [{"site_id": "s1", "quantity": most}]}
    assert parse_batch_json(batch, {"s1"}).items == [("s1", most)]
    batch["items"] = [{"site_id": "s1", "quantity": most + 1}]
    assert _refused(parse_batch_json, batch, {"s1"}) == {"items[0].quantity"}


def test_identifier_patterns_in_the_document_are_the_ones_applied() -> None:
    """Ids and pickup codes: the document's patterns, Python's checks and the pickup alphabet
    are one declaration."""
    assert _spec("Id")["pattern"] == f"^{rules.ID_REGEX}$"
    assert _spec("PickupCode")["pattern"] == f"^[{rules.PICKUP_ALPHABET}]{{8}}$"
    longest = "a" * rules.ID_MAX_LENGTH
    assert not _refused(parse_pickup, {"site_id": longest, "pickup_code": "23456789"})
    assert _refused(parse_pickup, {"site_id": longest + "a", "pickup_code": "23456789"}) == {
        "site_id"
    }
    for letter in "01IO":  # look-alikes left out of the alphabet
        assert letter not in rules.PICKUP_ALPHABET
        code = "2345678" + letter
        assert _refused(parse_pickup, {"site_id": "s1", "pickup_code": code}) == {"pickup_code"}


def test_load_test_reads_its_field_lists_from_the_declarations() -> None:
    """The load test checks answers with the same member lists the document requires."""
    from loadtest import crowd

    assert tuple(SCHEMAS["Reservation"]["required"]) == crowd.RESERVATION_FIELDS
    assert tuple(SCHEMAS["Round"]["required"]) == crowd.ROUND_FIELDS
    assert tuple(SCHEMAS["SiteStock"]["required"]) == crowd.SITE_FIELDS


# -- the contract check really checks ---------------------------------------------------------

GOOD_RESERVATION = {
    "reservation_id": "Qm9vdHN0cmFwcGluZ0lEeA.r1",
    "round_id": "r1",
    "site_id": "s1",
    "quantity": 1,
    "status": "confirmed",
    "pickup_code": "7KQ2MZ9P",
    "pickup_start": "2026-03-01T09:00:00+08:00",
    "pickup_end": "2026-03-02T09:00:00+08:00",
    "created_at": "2026-03-01T01:00:00.000+00:00",
    "citizen_id_masked": "110105********002X",
}


def _problem(status: int, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": f"urn:allot:problem:{code}",
        "title": "t",
        "status": status,
        "detail": "d",
        "code": code,
        **extra,
    }


# method, path -> (status, body, media type, headers): a stand-in service answering each
# request with a fixed answer, and what the check must say about it (None: nothing wrong).
ANSWERS: dict[tuple[str, str], tuple[int, Any, str, dict[str, str], str | None]] = {
    ("GET", "/healthz"): (200, {"status": "ok"}, "application/json", {}, None),
    ("GET", "/api/v1/reservations/good.r1"): (
        200,
        GOOD_RESERVATION,
        "application/json",
        {},
        None,
    ),
    ("GET", "/api/v1/reservations/extra.r1"): (
        200,
        {**GOOD_RESERVATION, "citizen_id": "11010519491231002X"},
        "application/json",
        {},
        "'citizen_id' was unexpected",
    ),
    ("GET", "/api/v1/rounds/r1"): (
        200,
        {"round_id": "r1"},
        "application/json",
        {},
        "is a required property",
    ),
    ("GET", "/api/v1/reservations/code.r1"): (
        200,
        {**GOOD_RESERVATION, "pickup_code": "0000OOOO"},
        "application/json",
        {},
        "does not match",
    ),
    ("GET", "/api/v1/reservations/time.r1"): (
        200,
        {**GOOD_RESERVATION, "created_at": "2026-03-01T01:00:00"},
        "application/json",
        {},
        "is not a 'date-time'",
    ),
    ("POST", "/api/v1/rounds/r1/reservations"): (
        409,
        _problem(409, "sold-out"),  # without its alternatives
        "application/problem+json",
        {},
        "'alternatives' is a required property",
    ),
    ("GET", "/api/v1/admin/rounds/r1/stats"): (
        404,
        _problem(404, "sold-out", alternatives=[]),  # a code this answer cannot carry
        "application/problem+json",
        {},
        "'sold-out' is not one of ['not-found']",
    ),
    ("DELETE", "/api/v1/reservations/status.r1"): (
        409,
        _problem(410, "not-collectable"),  # a status that is not the code's
        "application/problem+json",
        {},
        "409 was expected",
    ),
    ("GET", "/api/v1/rounds"): (418, {}, "application/json", {}, "status 418 is not documented"),
    ("GET", "/api/v1/rounds/r1/sites"): (
        200,
        "<html></html>",
        "text/html",
        {},
        "media type 'text/html' is not documented",
    ),
    ("GET", "/readyz"): (
        503,
        _problem(503, "unavailable"),  # without Retry-After
        "application/problem+json",
        {},
        "header Retry-After is missing",
    ),
    ("GET", "/api/v1/reservations/retry.r1"): (
        429,
        _problem(429, "rate-limited"),
        "application/problem+json",
        {"Retry-After": "0.5"},
        "is not a whole number",
    ),
    ("GET", "/api/v1/nowhere"): (
        404,
        _problem(404, "not-found", hint="x"),  # off the document: still a Problem
        "application/problem+json",
        {},
        "'hint' was unexpected",
    ),
    ("GET", "/api/v1/elsewhere"): (
        404,
        _problem(503, "unavailable"),  # a well-formed problem, but not this answer's
        "application/problem+json",
        {},
        "the problem's status 503 is not the answer's",
    ),
    ("PATCH", "/api/v1/admin/sites"): (
        405,
        _problem(405, "method-not-allowed"),  # without Allow
        "application/problem+json",
        {},
        "header Allow is missing",
    ),
}


def _stand_in(document: bytes) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        if request.path == "/api/v1/openapi.json":
            return web.Response(body=document, content_type="application/json")
        status, body, media, headers, _ = ANSWERS[(request.method, request.path)]
        raw = body.encode() if isinstance(body, str) else orjson.dumps(body)
        return web.Response(body=raw, status=status, content_type=media, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def test_contract_check_catches_answers_the_document_does_not_allow(
    aiohttp_client: Any,
) -> None:
    """The contract tests pass only if their answers match the served document; that proves
    something only if a wrong answer is caught, each kind of wrong for its own reason."""
    check = ContractCheck()
    client = await aiohttp_client(_stand_in(openapi_json()), middlewares=(check.middleware,))
    await check.load(client)
    found: dict[tuple[str, str], str | None] = {}
    for (method, path), (status, *_, expected) in ANSWERS.items():
        before = len(check.failures)
        r = await client.request(method, path)
        assert r.status == status
        await r.read()  # the test can still read what the check read
        if len(check.failures) > before:  # what is wrong, without the body's excerpt
            found[(method, path)] = check.failures[before].splitlines()[0]
        else:
            found[(method, path)] = None
        if expected is None:
            assert found[(method, path)] is None, found[(method, path)]
        else:
            assert found[(method, path)] is not None, (method, path)
            assert expected in str(found[(method, path)]), found[(method, path)]
    assert check.seen == len(ANSWERS)
    with pytest.raises(AssertionError, match="do not match the served OpenAPI document"):
        check.assert_clean()


async def test_contract_check_reads_the_served_document_not_the_module(
    aiohttp_client: Any,
) -> None:
    """The check holds answers to what the service serves: a served document that lacks an
    operation makes every answer of that operation a failure."""
    document = orjson.loads(openapi_json())
    del document["paths"]["/api/v1/rounds/{round_id}"]["get"]["responses"]["200"]
    check = ContractCheck()
    client = await aiohttp_client(
        _stand_in(orjson.dumps(document)), middlewares=(check.middleware,)
    )
    await check.load(client)
    await client.get("/api/v1/rounds/r1")
    assert check.failures
    assert "status 200 is not documented" in check.failures[0]
