"""The OpenAPI 3.1 document of allot's HTTP interface, served at ``GET /api/v1/openapi.json``.

Generated, not written out: the shapes come from ``service/schemas.py`` (and through it the
patterns and limits of ``allocator/rules.py``), the problem codes with their statuses from
``service/problems.py``, and each operation from one entry of ``ROUTES`` below: method, path,
summary, request body, success answers and the problem codes it can answer. Statuses, the
``Retry-After`` header and the problem schema of each error answer follow from the codes.
The few things the implementation offers beyond the contract are marked "Extension beyond the
contract" in their descriptions. The document is built once per process.

``tests/test_openapi.py`` validates the document against the OpenAPI 3.1 specification, checks
that every path and method of the contract and every route of the application is in it, and the
contract tests validate every body they receive against it (``tests/openapi_check.py``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.problems import PROBLEMS
from service.schemas import CSV_LIMIT, JSON_LIMIT, SCHEMAS, Schema, ref

CITIZENS = "citizens"
OPERATORS = "operators"
OPERATIONS = "operations"
DESKS = "desks"
ADMIN_PREFIX = "/api/v1/admin/"
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]
RETRY_LATER = "`Retry-After` says when to try again."
DESK_PREFIX = "/api/v1/desk/"
AUTH_THROTTLED = (
    "too many wrong operator (or desk) tokens from this client address within a minute"
    " (`[service] auth_failures_per_minute`, counted apart for each kind); every attempt from"
    " it waits out `Retry-After`."
)
# The answers of an operator-only endpoint to a token that is not the operator's.
OPERATOR_ONLY: dict[str, str | None] = {
    "unauthorized": None,
    "forbidden": "a desk token: this endpoint is the operator's only.",
    "rate-limited": AUTH_THROTTLED,
}

JSON_SIZE = f"{JSON_LIMIT // 1024} KiB"
CSV_SIZE = f"{CSV_LIMIT // (1024 * 1024)} MiB"

# Path parameters by name: #/components/parameters/<value>
PATH_PARAMETERS = {
    "round_id": "RoundId",
    "reservation_id": "ReservationId",
    "token_id": "DeskTokenId",
    "entry_id": "EntryId",
    "n": "PassNumber",
}


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful answer: its body's schema (a component name or an inline schema)."""

    description: str
    schema: str | Schema
    media: str = "application/json"
    headers: tuple[str, ...] = ()  # #/components/headers/<name>


@dataclass(frozen=True, slots=True)
class Route:
    """One operation. ``problems``: each code it can answer, with what it means here (None: the
    words of service/problems.py); the error answers are grouped by the codes' statuses."""

    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    answers: Mapping[int, Answer]
    problems: Mapping[str, str | None] = field(default_factory=dict)
    description: str | None = None
    request: Mapping[str, str] | None = None  # media type -> component schema name
    request_description: str = ""
    query: tuple[str, ...] = ()  # #/components/parameters/<name>


def _body_problems(
    too_large: str = f"the body is larger than {JSON_SIZE}.",
    media: str | None = None,
) -> dict[str, str | None]:
    """The codes of every endpoint that reads a JSON body."""
    return {
        "malformed-json": None,
        "payload-too-large": too_large,
        "unsupported-media-type": media,
        "invalid-request": None,
    }


CITIZEN_ERRORS: dict[str, str | None] = {"rate-limited": None, "unavailable": None}

# The answers of an endpoint a desk may use, to a token that may not act there.
DESK_ALLOWED: dict[str, str | None] = {
    "unauthorized": None,
    "forbidden": "a desk token of another site.",
    "rate-limited": AUTH_THROTTLED,
}

_ENTRIES_CSV = "The frozen entry list, from the freeze on."
_STOCK_CSV = "The stock at the freeze, from the freeze on."


def _draw_file(name: str, operation_id: str, what: str) -> Route:
    """One of the draw's published files (text/csv, byte-exact)."""
    return Route(
        "get",
        f"/api/v1/rounds/{{round_id}}/draw/{name}",
        operation_id,
        CITIZENS,
        f"A published file of the draw: {name}",
        {200: Answer(what, "DrawFile", media="text/csv")},
        {
            "not-found": "unknown round, or the file is not published yet.",
            "wrong-mode": "an `fcfs` round has no draw.",
            "unavailable": None,
        },
    )


# -- the routes -------------------------------------------------------------------------------

ROUTES: tuple[Route, ...] = (
    # citizens
    Route(
        "get",
        "/api/v1/rounds",
        "listRounds",
        CITIZENS,
        "List the rounds",
        {200: Answer("All rounds.", "RoundList")},
        CITIZEN_ERRORS,
    ),
    Route(
        "get",
        "/api/v1/rounds/{round_id}",
        "getRound",
        CITIZENS,
        "Get one round",
        {200: Answer("The round.", "Round")},
        {"not-found": "unknown round.", **CITIZEN_ERRORS},
    ),
    Route(
        "get",
        "/api/v1/rounds/{round_id}/sites",
        "listRoundSites",
        CITIZENS,
        "List a round's sites with their remaining units",
        {200: Answer("The round's sites.", "SiteList")},
        {"not-found": "unknown round.", **CITIZEN_ERRORS},
        description="`remaining` may lag the truth by up to 2 s.",
    ),
    Route(
        "post",
        "/api/v1/rounds/{round_id}/reservations",
        "createReservation",
        CITIZENS,
        "Reserve a share at a site",
        {
            201: Answer("A new reservation.", "Reservation", headers=("Location",)),
            200: Answer(
                "The same citizen with the same phone already holds a live reservation at this "
                "same site in this round: that reservation, unchanged.",
                "Reservation",
            ),
        },
        {
            **_body_problems(),
            "not-found": "unknown round or site.",
            "round-not-open": None,
            "wrong-mode": "the round is a `lottery` round: citizens register entries instead.",
            "sold-out": None,
            "already-reserved": None,
            "not-eligible": None,
            "in-cooldown": None,
            "rate-limited": None,
            "overloaded": None,
            "unavailable": None,
        },
        description=(
            "A citizen holds at most one live reservation per round, whatever the site. "
            "A retry after a timeout is safe: it answers 200 with the same reservation. "
            "The round's `eligibility` is checked from the ID first (`not-eligible`, before "
            "any stock is touched); a live reservation in another round of the same "
            "`programme` bars the citizen until its `created_at` + that round's "
            "`cooldown_days` (`in-cooldown`)."
        ),
        request={"application/json": "ReservationRequest"},
        request_description="Who reserves, and where.",
    ),
    Route(
        "get",
        "/api/v1/reservations/{reservation_id}",
        "getReservation",
        CITIZENS,
        "Get a reservation",
        {200: Answer("The reservation.", "Reservation")},
        {"not-found": "unknown reservation.", **CITIZEN_ERRORS},
    ),
    Route(
        "delete",
        "/api/v1/reservations/{reservation_id}",
        "cancelReservation",
        CITIZENS,
        "Cancel a reservation",
        {200: Answer("The reservation, now `cancelled`.", "Reservation")},
        {
            "not-found": "unknown reservation.",
            "not-collectable": (
                "the reservation is collected (or has expired) and can no longer be cancelled."
            ),
            **CITIZEN_ERRORS,
        },
        description="Its units go back to the site at once. Cancelling again answers the same.",
    ),
    # lottery: entries
    Route(
        "post",
        "/api/v1/rounds/{round_id}/entries",
        "createEntry",
        CITIZENS,
        "Register an entry in a lottery round",
        {
            201: Answer("A new entry.", "Entry", headers=("Location",)),
            200: Answer(
                "The same citizen with the same phone already holds an entry in this round: "
                "that entry, now with this request's `site_id` and `accept_district` (the last "
                "choice before close counts; the receipt is unchanged, the signature covers the "
                "new choice).",
                "Entry",
            ),
        },
        {
            **_body_problems(),
            "not-found": "unknown round or site.",
            "round-not-open": "before `opens_at` or after `closes_at` (registration window).",
            "wrong-mode": "the round is an `fcfs` round: citizens reserve instead.",
            "already-entered": None,
            "not-eligible": "the citizen fails a rule of the round's `eligibility` (checked on the "
            "ID before anything else).",
            "in-cooldown": "a live reservation in another round of the same `programme` bars the "
            "citizen until its `created_at` + that round's `cooldown_days`; no entry is made "
            "(an existing one is left unchanged).",
            "rate-limited": None,
            "overloaded": None,
            "unavailable": None,
        },
        description=(
            "Through the same token buckets, admission queue and batched script call as "
            "reservations. Speed and retries change nothing in a lottery."
        ),
        request={"application/json": "EntryRequest"},
        request_description="Who enters, where, and whether another site of the district will do.",
    ),
    Route(
        "get",
        "/api/v1/entries/{entry_id}",
        "getEntry",
        CITIZENS,
        "Get an entry",
        {200: Answer("The entry.", "Entry")},
        {"not-found": "unknown entry.", **CITIZEN_ERRORS},
    ),
    Route(
        "delete",
        "/api/v1/entries/{entry_id}",
        "withdrawEntry",
        CITIZENS,
        "Withdraw an entry",
        {200: Answer("The entry, now `withdrawn` (withdrawing again answers the same).", "Entry")},
        {
            "not-found": "unknown entry.",
            "round-not-open": "the registration window has closed.",
            **CITIZEN_ERRORS,
        },
    ),
    Route(
        "get",
        "/api/v1/draw-key",
        "getDrawKey",
        CITIZENS,
        "The service's draw key",
        {200: Answer("The Ed25519 public key that signs entries.", "DrawKey")},
        {"unavailable": None},
    ),
    Route(
        "get",
        "/api/v1/rounds/{round_id}/draw",
        "getDraw",
        CITIZENS,
        "A lottery round's draw record",
        {200: Answer("The draw record; members not yet known are `null`.", "DrawRecord")},
        {
            "not-found": "unknown round.",
            "wrong-mode": "an `fcfs` round has no draw.",
            "unavailable": None,
        },
        description=(
            "Public. From the freeze on it carries the secret and the digests of the files; "
            "`allot verify-draw --url BASE --round R` replays the draw from it and the files."
        ),
    ),
    _draw_file("entries.csv", "getDrawEntries", _ENTRIES_CSV),
    _draw_file("stock.csv", "getDrawStock", _STOCK_CSV),
    _draw_file("results.csv", "getDrawResults", "The draw's results, once drawn."),
    _draw_file("pass-{n}.csv", "getDrawPass", "The entries pass `n` drew, in rank order."),
    # operators
    Route(
        "put",
        "/api/v1/admin/sites",
        "upsertSites",
        OPERATORS,
        "Create or update pickup sites",
        {200: Answer("How many sites were written.", "SitesUpserted")},
        {
            **_body_problems(),
            **OPERATOR_ONLY,
            "unavailable": None,
        },
        request={"application/json": "SitesUpsert"},
        request_description="The sites to create or update.",
    ),
    Route(
        "put",
        "/api/v1/admin/rounds/{round_id}",
        "putRound",
        OPERATORS,
        "Create or update a round",
        {
            201: Answer("The round was created.", "Round"),
            200: Answer("The round was updated.", "Round"),
        },
        {
            **_body_problems(),
            **OPERATOR_ONLY,
            "unavailable": None,
        },
        description=(
            "`mode` and `public_randomness_source` cannot change once the round has opened "
            "(422 naming the field). A new `lottery` round draws its secret here and publishes "
            "`draw.commitment`."
        ),
        request={"application/json": "RoundSpec"},
        request_description=(
            "The round's settings. `mode`, `programme`, `eligibility` and `loss_weighting` "
            "cannot change once the round has opened; `programme` cannot change either once "
            "a batch has been loaded (422 naming the field, nothing changed)."
        ),
    ),
    Route(
        "post",
        "/api/v1/admin/rounds/{round_id}/batches",
        "loadBatch",
        OPERATORS,
        "Load a batch of inventory into a round",
        {
            201: Answer("The batch was loaded.", "BatchAnswer"),
            200: Answer(
                "This `batch_id` was already loaded with the same contents: the first answer; "
                "the stock is unchanged.",
                "BatchAnswer",
            ),
        },
        {
            **_body_problems(
                too_large=f"the body is larger than {JSON_SIZE} (JSON) or {CSV_SIZE} (CSV).",
                media="the body is neither JSON nor CSV.",
            ),
            **OPERATOR_ONLY,
            "not-found": "unknown round, or unknown `carry_from` round.",
            "batch-conflict": None,
            "carry-not-ready": None,
            "unavailable": None,
        },
        description=(
            "All or nothing: one bad row is answered 422 naming it, and nothing is loaded. The "
            "same `batch_id` with the same contents again answers 200 with the first answer and "
            "leaves the stock unchanged. With `carry_from` (a carry-over), each site of that "
            "earlier round gives its unclaimed units (remaining + expired) to the same site of "
            "this round, once: the earlier round counts them as `carried_out`, a second carry "
            "adds 0, and the same `batch_id` again answers 200 with the first answer; only "
            "after the earlier round's `pickup_end`."
        ),
        request={"application/json": "Batch", "text/csv": "BatchCsv"},
        request_description=(
            "JSON with `batch_id` and `items` (or `carry_from`), or CSV (`site_id,quantity` "
            "header) with `?batch_id=` in the query."
        ),
        query=("BatchId",),
    ),
    Route(
        "get",
        "/api/v1/admin/rounds/{round_id}/stats",
        "getRoundStats",
        OPERATORS,
        "A round's figures",
        {200: Answer("The round's figures.", "Stats")},
        {
            **OPERATOR_ONLY,
            "not-found": "unknown round.",
            "unavailable": None,
        },
    ),
    Route(
        "get",
        "/api/v1/admin/rounds/{round_id}/fairness",
        "getRoundFairness",
        OPERATORS,
        "Who asked and who got a share, by group",
        {200: Answer("The round's fairness report.", "FairnessReport")},
        {
            **OPERATOR_ONLY,
            "not-found": "unknown round.",
            "unavailable": "Redis or PostgreSQL (the ledger counts `granted`) does not answer.",
        },
        description=(
            "`asked` counts distinct citizens who reserved or were refused sold-out, from "
            "Redis at once; `granted` distinct citizens holding a reservation not cancelled, "
            "from the ledger (a few seconds behind at most)."
        ),
    ),
    Route(
        "post",
        "/api/v1/admin/pickups",
        "recordPickup",
        OPERATORS,
        "Hand over a reservation at the counter",
        {200: Answer("The reservation, now `collected`.", "Reservation")},
        {
            **_body_problems(),
            **DESK_ALLOWED,
            "not-found": "unknown pickup code at that site.",
            "not-collectable": (
                "the reservation is collected, cancelled or expired; or `citizen_id` was given "
                "and does not match, with a detail saying so."
            ),
            "unavailable": None,
        },
        description=(
            "The operator token, or a desk token of that site. Extension beyond the contract: "
            "the body may name the `round_id`; when it does not, the server finds the round "
            "holding that pickup code at that site."
        ),
        request={"application/json": "PickupRequest"},
        request_description="The site and the pickup code.",
    ),
    Route(
        "post",
        "/api/v1/admin/desk-tokens",
        "createDeskToken",
        OPERATORS,
        "Create a desk token for one site",
        {201: Answer("The new token, shown this once.", "DeskTokenCreated")},
        {
            **_body_problems(),
            **OPERATOR_ONLY,
            "invalid-request": (
                "a field is missing or wrong, or `site_id` names no site; `errors` names each."
            ),
            "unavailable": None,
        },
        description=(
            "The token may collect at its site (`POST /api/v1/admin/pickups`) and reserve or "
            "enter on behalf of a citizen there (`POST /api/v1/desk/rounds/{round_id}/"
            "reservations` or `…/entries`), nothing else. Only its SHA-256 is stored: keep the "
            "answer, it is not shown again."
        ),
        request={"application/json": "DeskTokenRequest"},
        request_description="The site, and a label saying who holds the token.",
    ),
    Route(
        "delete",
        "/api/v1/admin/desk-tokens/{token_id}",
        "revokeDeskToken",
        OPERATORS,
        "Revoke a desk token",
        {200: Answer("The token, now revoked (again: the same answer).", "DeskToken")},
        {**OPERATOR_ONLY, "not-found": "unknown `token_id`.", "unavailable": None},
        description=("At once: every worker and node refuses the token within a second (401)."),
    ),
    Route(
        "post",
        "/api/v1/desk/rounds/{round_id}/reservations",
        "createDeskReservation",
        DESKS,
        "Reserve on behalf of a walk-in citizen at the desk's site",
        {
            201: Answer("A new reservation.", "Reservation", headers=("Location",)),
            200: Answer(
                "The same citizen with the same phone already holds a live reservation at this "
                "same site in this round: that reservation, unchanged.",
                "Reservation",
            ),
        },
        {
            **_body_problems(),
            **DESK_ALLOWED,
            "not-found": "unknown round or site.",
            "round-not-open": None,
            "sold-out": None,
            "already-reserved": None,
            "rate-limited": (
                "a token bucket (whole round or citizen) refused the request; or " + AUTH_THROTTLED
            ),
            "overloaded": None,
            "unavailable": None,
        },
        description=(
            "The same body and answers as `POST /api/v1/rounds/{round_id}/reservations`, with "
            "a desk token of the `site_id` asked for (or the operator token)."
        ),
        request={"application/json": "ReservationRequest"},
        request_description="Who reserves, and where (the desk's own site).",
    ),
    Route(
        "post",
        "/api/v1/desk/rounds/{round_id}/entries",
        "createDeskEntry",
        DESKS,
        "Enter a walk-in citizen in a lottery round at the desk's site",
        {
            201: Answer("A new entry.", "Entry", headers=("Location",)),
            200: Answer(
                "The same citizen with the same phone already holds an entry in this round: "
                "that entry, now with this request's `site_id` and `accept_district` (its "
                "channel stays the one it was made through).",
                "Entry",
            ),
        },
        {
            **_body_problems(),
            **DESK_ALLOWED,
            "not-found": "unknown round or site.",
            "round-not-open": "before `opens_at` or after `closes_at` (registration window).",
            "wrong-mode": "the round is an `fcfs` round: reserve for the citizen instead.",
            "already-entered": None,
            "in-cooldown": None,
            "rate-limited": (
                "a token bucket (whole round or citizen) refused the request; or " + AUTH_THROTTLED
            ),
            "overloaded": None,
            "unavailable": None,
        },
        description=(
            "The same body and answers as `POST /api/v1/rounds/{round_id}/entries`, with a desk "
            "token of the `site_id` asked for (or the operator token). Channel `desk`; the "
            "per-address token bucket is not applied, the per-citizen one is."
        ),
        request={"application/json": "EntryRequest"},
        request_description="Who enters, where (the desk's own site), and whether another site "
        "of the district will do.",
    ),
    Route(
        "post",
        "/api/v1/admin/rounds/{round_id}/draw",
        "drawRound",
        OPERATORS,
        "Draw a frozen lottery round",
        {
            200: Answer("The draw record, `drawn` (also for the same value again).", "DrawRecord"),
            202: Answer(
                "The draw record, `drawing`: the winners' reservations are still being made; "
                "ask again (or read `GET /api/v1/rounds/{round_id}/draw`).",
                "DrawRecord",
            ),
        },
        {
            **_body_problems(),
            **OPERATOR_ONLY,
            "not-found": "unknown round.",
            "wrong-mode": "an `fcfs` round has no draw.",
            "draw-not-ready": None,
            "draw-conflict": None,
            "unavailable": None,
        },
        request={"application/json": "DrawRequest"},
        request_description="The public random value.",
    ),
    Route(
        "post",
        "/api/v1/admin/rounds/{round_id}/draw/next",
        "drawNextPass",
        OPERATORS,
        "One more pass of a drawn lottery round",
        {
            200: Answer("The draw record with one more pass.", "DrawRecord"),
            202: Answer(
                "The draw record, `drawing`: the pass's awards are being made.", "DrawRecord"
            ),
        },
        {
            **OPERATOR_ONLY,
            "not-found": "unknown round.",
            "wrong-mode": "an `fcfs` round has no draw.",
            "draw-not-ready": "the round has not been drawn yet.",
            "unavailable": None,
        },
        description=(
            "The units that came back since the last pass (cancelled won reservations, later "
            "batches, as recorded in the ledger) go to the not-drawn entries in rank order."
        ),
    ),
    # operations
    Route(
        "get",
        "/healthz",
        "healthz",
        OPERATIONS,
        "Liveness",
        {200: Answer("The process runs.", "Health")},
    ),
    Route(
        "get",
        "/readyz",
        "readyz",
        OPERATIONS,
        "Readiness",
        {
            200: Answer(
                "Redis and PostgreSQL answer, and Redis holds every round the ledger has, none "
                "of them behind it.",
                "Health",
            )
        },
        {
            "unavailable": "Redis or PostgreSQL does not answer, or Redis has lost data the "
            "ledger has: `lost_rounds` names the rounds, `detail` says what is missing and "
            "which `allot rebuild` heals it."
        },
    ),
    Route(
        "get",
        "/metrics",
        "metrics",
        OPERATIONS,
        "Prometheus metrics",
        {
            200: Answer(
                "Prometheus text exposition format; at least `allot_reservations_total{outcome}`, "
                "`allot_request_duration_seconds` (histogram), `allot_queue_depth` and "
                "`allot_ledger_lag`.",
                {"type": "string"},
                media="text/plain",
            )
        },
        description=(
            "Served only on the operations listener (`[service] ops_port`, env `ALLOT_OPS_PORT`, "
            "default 9180, bound to 127.0.0.1 unless `ops_host` says otherwise), which also "
            "answers `/healthz` and `/readyz`. The public port answers this path with 404."
        ),
        problems={"not-found": "on the citizens' port: `/metrics` is served on `ops_port` only."},
    ),
    Route(
        "get",
        "/api/v1/openapi.json",
        "getOpenapi",
        OPERATIONS,
        "This document",
        {200: Answer("The OpenAPI 3.1 document.", {"type": "object"})},
        description=(
            "The OpenAPI 3.1 document of all endpoints. Extension beyond the contract in that "
            "the contract does not describe itself; it is documented here too."
        ),
    ),
)


# -- building the document --------------------------------------------------------------------


def _content(media: str, schema: str | Schema) -> dict[str, Any]:
    return {media: {"schema": ref(schema) if isinstance(schema, str) else schema}}


def _success(answer: Answer) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": answer.description,
        "content": _content(answer.media, answer.schema),
    }
    if answer.headers:
        out["headers"] = {h: {"$ref": f"#/components/headers/{h}"} for h in answer.headers}
    return out


def problem_answer(codes: Mapping[str, str | None]) -> dict[str, Any]:
    """One error answer (one status) for these codes: what each means, their problem schema,
    and Retry-After when any of them carries it."""
    rows = [PROBLEMS[code] for code in codes]
    if len({p.status for p in rows}) != 1 or not all(p.served for p in rows):
        raise ValueError(f"not one status of served codes: {list(codes)}")
    text = " ".join(f"`{p.code}`: {codes[p.code] or p.when}" for p in rows)
    retry = any(p.retry_after for p in rows)
    out: dict[str, Any] = {
        "description": f"{text} {RETRY_LATER}" if retry else text,
        "content": {
            "application/problem+json": {
                "schema": {
                    "allOf": [
                        ref("Problem"),
                        {"properties": {"code": {"enum": [p.code for p in rows]}}},
                    ]
                }
            }
        },
    }
    if retry:
        out["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return out


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": [route.tag],
        "operationId": route.operation_id,
        "summary": route.summary,
    }
    if route.description:
        operation["description"] = route.description
    if route.path.startswith((ADMIN_PREFIX, DESK_PREFIX)):
        if "unauthorized" not in route.problems:
            raise ValueError(f"{route.path}: an operator or desk endpoint answers 401")
        operation["security"] = ADMIN_SECURITY
    if route.query:
        operation["parameters"] = [
            {"$ref": f"#/components/parameters/{name}"} for name in route.query
        ]
    if route.request:
        operation["requestBody"] = {
            "required": True,
            "description": route.request_description,
            "content": {media: {"schema": ref(name)} for media, name in route.request.items()},
        }
    responses: dict[str, Any] = {str(s): _success(a) for s, a in route.answers.items()}
    by_status: dict[int, dict[str, str | None]] = {}
    for code, words in route.problems.items():
        by_status.setdefault(PROBLEMS[code].status, {})[code] = words
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = problem_answer(codes)
    operation["responses"] = responses
    return operation


def _paths() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        item = paths.setdefault(route.path, {})
        names = re.findall(r"\{(\w+)\}", route.path)
        if names:
            item["parameters"] = [
                {"$ref": f"#/components/parameters/{PATH_PARAMETERS[n]}"} for n in names
            ]
        if route.method in item:
            raise ValueError(f"{route.method} {route.path} is declared twice")
        item[route.method] = _operation(route)
    return paths


def _components() -> dict[str, Any]:
    return {
        "schemas": SCHEMAS,
        "parameters": {
            "RoundId": {
                "name": "round_id",
                "in": "path",
                "required": True,
                "schema": ref("Id"),
            },
            "ReservationId": {
                "name": "reservation_id",
                "in": "path",
                "required": True,
                "schema": ref("ReservationId"),
            },
            "DeskTokenId": {
                "name": "token_id",
                "in": "path",
                "required": True,
                "schema": ref("DeskTokenId"),
            },
            "EntryId": {
                "name": "entry_id",
                "in": "path",
                "required": True,
                "schema": ref("EntryId"),
            },
            "PassNumber": {
                "name": "n",
                "in": "path",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            },
            "BatchId": {
                "name": "batch_id",
                "in": "query",
                "required": False,
                "description": "Required with a `text/csv` body; not used with a JSON body.",
                "schema": ref("Id"),
            },
        },
        "headers": {
            "Retry-After": {
                "description": "Whole seconds (at least 1) to wait before trying again.",
                "schema": {"type": "integer", "minimum": 1},
            },
            "Location": {
                "description": (
                    "`/api/v1/reservations/{reservation_id}` of the new reservation, or "
                    "`/api/v1/entries/{entry_id}` of the new entry."
                ),
                "schema": {"type": "string", "format": "uri-reference"},
            },
        },
        "responses": {
            "MethodNotAllowed": {
                **problem_answer({"method-not-allowed": None}),
                "headers": {
                    "Allow": {
                        "description": "The methods the path takes.",
                        "schema": {"type": "string"},
                    },
                },
            },
        },
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": (
                    "`Authorization: Bearer <ALLOT_ADMIN_TOKEN>`, or a desk token where a desk "
                    "may act (pickups and assisted reservations at its own site)."
                ),
            },
        },
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1.0 document of every endpoint of the contract, built once per process.

    Every call returns the same dict: read it, never change it."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "allot",
            "version": "1.0.0",
            "summary": "Fair reservation of scarce goods under a flash crowd.",
            "description": (
                "Bodies are JSON (`application/json`, UTF-8) unless said otherwise; times are "
                f"RFC 3339 with an offset. Bodies larger than {JSON_SIZE} ({CSV_SIZE} for CSV "
                "batches) are refused with 413. Every error is `application/problem+json` "
                "(RFC 9457) with `type`, `title`, `status`, `detail` and a stable `code`. A "
                "method a path does not take is answered 405 with code `method-not-allowed` "
                "(see `components.responses.MethodNotAllowed`). No request is answered with a "
                "5xx other than 503."
            ),
        },
        "tags": [
            {"name": CITIZENS, "description": "Citizens reserve and cancel; no login."},
            {
                "name": OPERATORS,
                "description": "Operators' tools; `Authorization: Bearer <ALLOT_ADMIN_TOKEN>`.",
            },
            {
                "name": DESKS,
                "description": (
                    "Desk staff of one site (a pharmacy counter, a community desk) with a desk "
                    "token; the operator token may do the same."
                ),
            },
            {"name": OPERATIONS, "description": "Health, readiness, metrics, this document."},
        ],
        "paths": _paths(),
        "components": _components(),
    }


@functools.cache
def openapi_json() -> bytes:
    """The document as served: JSON, serialised once per process."""
    return orjson.dumps(openapi_document())
