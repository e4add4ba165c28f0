"""The OpenAPI 3.1 document of allot's HTTP interface, served at ``GET /api/v1/openapi.json``.

It describes every endpoint of the public contract (``API.md``): the citizens' endpoints, the
operators' endpoints under ``/api/v1/admin/`` (bearer token), and the operations endpoints. It is
written by hand as plain dicts and lists, so that reading it is reading the contract: each
operation lists every status the contract allows it, with the problem ``code`` values that can
come with that status. The few things the implementation offers beyond the contract are marked
"Extension beyond the contract" in their descriptions.

``tests/test_openapi.py`` validates the document against the OpenAPI 3.1 specification and checks
that every path and method of the contract is in it.
"""

from __future__ import annotations

from typing import Any

ID_PATTERN = r"^[a-z0-9_-]{1,64}$"
RESERVATION_ID_PATTERN = r"^[A-Za-z0-9_-]{22}\.[a-z0-9_-]{1,64}$"
CITIZEN_ID_PATTERN = r"^[0-9]{17}[0-9Xx]$"
CITIZEN_ID_MASKED_PATTERN = r"^[0-9]{6}\*{8}[0-9]{3}[0-9X]$"
PHONE_PATTERN = r"^1[3-9][0-9]{9}$"
PICKUP_CODE_PATTERN = r"^[23456789ABCDEFGHJKLMNPQRSTUVWXYZ]{8}$"
MAX_TEXT = 200  # names, addresses, districts and titles (service/validation.py)
MAX_PER_PERSON = 1000
MAX_BATCH_UNITS = 10_000_000
MAX_SITES_AT_ONCE = 10_000

PROBLEM_CODES = [
    "malformed-json",
    "unauthorized",
    "not-found",
    "method-not-allowed",
    "round-not-open",
    "sold-out",
    "already-reserved",
    "batch-conflict",
    "not-collectable",
    "payload-too-large",
    "unsupported-media-type",
    "invalid-request",
    "rate-limited",
    "overloaded",
    "unavailable",
]

CITIZENS = "citizens"
OPERATORS = "operators"
OPERATIONS = "operations"
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]


# -- small builders ----------------------------------------------------------------------------


def _schema(name: str) -> dict[str, Any]:
    """A reference to ``#/components/schemas/<name>``."""
    return {"$ref": f"#/components/schemas/{name}"}


def _parameter(name: str) -> dict[str, Any]:
    """A reference to ``#/components/parameters/<name>``."""
    return {"$ref": f"#/components/parameters/{name}"}


def _json_body(schema_name: str, description: str) -> dict[str, Any]:
    """A required ``application/json`` request body."""
    return {
        "required": True,
        "description": description,
        "content": {"application/json": {"schema": _schema(schema_name)}},
    }


def _ok(schema_name: str, description: str) -> dict[str, Any]:
    """A successful ``application/json`` answer."""
    return {
        "description": description,
        "content": {"application/json": {"schema": _schema(schema_name)}},
    }


def _problem(description: str) -> dict[str, Any]:
    """An error answer: ``application/problem+json`` (RFC 9457)."""
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _schema("Problem")}},
    }


AUTH_THROTTLED = (
    "`rate-limited`: too many wrong operator tokens from this client address within a minute"
    " (`[service] auth_failures_per_minute`); every attempt from it waits out `Retry-After`."
)


def _retry_later(description: str) -> dict[str, Any]:
    """An error answer that carries a ``Retry-After`` header (429 and 503)."""
    response = _problem(description)
    response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return response


# -- the error answers, shared by many operations ----------------------------------------------

MALFORMED_JSON = "`malformed-json`: the body is not JSON, or not a JSON object."
UNAUTHORIZED = (
    "`unauthorized`: the `Authorization: Bearer <ALLOT_ADMIN_TOKEN>` header is missing or wrong "
    "(every operator endpoint answers 401 while `ALLOT_ADMIN_TOKEN` is unset)."
)
TOO_LARGE = "`payload-too-large`: the body is larger than 16 KiB."
NOT_JSON = "`unsupported-media-type`: the body is not `application/json`."
INVALID = (
    "`invalid-request`: a field is missing or wrong; the body adds `errors: [{field, message}]`, "
    "one per bad field."
)
RATE_LIMITED = (
    "`rate-limited`: a token bucket (whole service, client address or citizen) refused the "
    "request. `Retry-After` says when to try again."
)
RATE_LIMITED_OR_OVERLOADED = (
    "`rate-limited`: a token bucket (whole service, client address or citizen) refused the "
    "request; `overloaded`: the admission queue is full or the wait in it ran out. "
    "`Retry-After` says when to try again."
)
UNAVAILABLE = (
    "`unavailable`: Redis (or, for operator writes, PostgreSQL) cannot be reached. Answered "
    "within 1 s, never a hang; `Retry-After` says when to try again."
)


def _body_errors(too_large: str = TOO_LARGE, media: str = NOT_JSON) -> dict[str, Any]:
    """The answers every endpoint that reads a JSON body can give to a bad body."""
    return {
        "400": _problem(MALFORMED_JSON),
        "413": _problem(too_large),
        "415": _problem(media),
        "422": _problem(INVALID),
    }


# -- components --------------------------------------------------------------------------------


def _schemas() -> dict[str, Any]:
    return {
        "Id": {
            "type": "string",
            "pattern": ID_PATTERN,
            "description": "A `round_id`, `site_id` or `batch_id`: 1-64 chars of `[a-z0-9_-]`.",
            "examples": ["spring-2026"],
        },
        "ReservationId": {
            "type": "string",
            "pattern": RESERVATION_ID_PATTERN,
            "description": (
                "Unguessable (128 random bits as 22 URL-safe base64 characters), a dot, then the "
                "`round_id`. It is the citizen's only key to the reservation."
            ),
            "examples": ["Qm9vdHN0cmFwcGluZ0lEeA.spring-2026"],
        },
        "CitizenId": {
            "type": "string",
            "pattern": CITIZEN_ID_PATTERN,
            "description": (
                "An 18-character PRC resident ID: 17 digits and an ISO 7064 MOD 11-2 check "
                "character, with a valid date of birth in chars 7-14. A lower-case `x` is "
                "accepted and normalised to `X`."
            ),
            "examples": ["11010519491231002X"],
        },
        "Phone": {
            "type": "string",
            "pattern": PHONE_PATTERN,
            "description": "11 digits: `1`, then `3`-`9`, then 9 digits.",
            "examples": ["13800138000"],
        },
        "PickupCode": {
            "type": "string",
            "pattern": PICKUP_CODE_PATTERN,
            "description": (
                "8 characters of `23456789ABCDEFGHJKLMNPQRSTUVWXYZ`, unique within its site and "
                "round."
            ),
            "examples": ["7KQ2MZ9P"],
        },
        "Timestamp": {
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 with an offset.",
            "examples": ["2026-03-01T09:00:00+08:00"],
        },
        "Round": {
            "type": "object",
            "description": "One distribution campaign.",
            "required": [
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
            ],
            "properties": {
                "round_id": _schema("Id"),
                "title": {"type": "string"},
                "opens_at": _schema("Timestamp"),
                "closes_at": _schema("Timestamp"),
                "per_person": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Units in one citizen's share.",
                },
                "pickup_start": _schema("Timestamp"),
                "pickup_end": _schema("Timestamp"),
                "mode": {
                    "type": "string",
                    "enum": ["fcfs"],
                    "description": "First come, first served. A `lottery` mode will come.",
                },
                "status": {"type": "string", "enum": ["upcoming", "open", "closed"]},
                "remaining": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Units left over all sites.",
                },
            },
        },
        "RoundList": {
            "type": "object",
            "required": ["rounds"],
            "properties": {"rounds": {"type": "array", "items": _schema("Round")}},
        },
        "RoundSpec": {
            "type": "object",
            "description": "What an operator sets on a round.",
            "required": [
                "title",
                "opens_at",
                "closes_at",
                "per_person",
                "pickup_start",
                "pickup_end",
            ],
            "properties": {
                "title": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
                "opens_at": _schema("Timestamp"),
                "closes_at": {
                    "$ref": "#/components/schemas/Timestamp",
                    "description": "After `opens_at`.",
                },
                "per_person": {"type": "integer", "minimum": 1, "maximum": MAX_PER_PERSON},
                "pickup_start": _schema("Timestamp"),
                "pickup_end": {
                    "$ref": "#/components/schemas/Timestamp",
                    "description": "After `pickup_start`, and not before `closes_at`.",
                },
                "mode": {
                    "type": "string",
                    "enum": ["fcfs"],
                    "default": "fcfs",
                    "description": "Extension beyond the contract. Optional; only `fcfs` for now.",
                },
            },
        },
        "Site": {
            "type": "object",
            "description": "A pickup point, as an operator declares it.",
            "required": ["site_id", "name", "address", "district"],
            "properties": {
                "site_id": _schema("Id"),
                "name": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
                "address": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
                "district": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
            },
        },
        "SiteStock": {
            "type": "object",
            "description": "A pickup point with its remaining units in one round.",
            "required": ["site_id", "name", "address", "district", "remaining"],
            "properties": {
                "site_id": _schema("Id"),
                "name": {"type": "string"},
                "address": {"type": "string"},
                "district": {"type": "string"},
                "remaining": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Units left; may lag the truth by up to 2 s.",
                },
            },
        },
        "SiteList": {
            "type": "object",
            "required": ["sites"],
            "properties": {"sites": {"type": "array", "items": _schema("SiteStock")}},
        },
        "SitesUpsert": {
            "type": "object",
            "required": ["sites"],
            "properties": {
                "sites": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_SITES_AT_ONCE,
                    "items": _schema("Site"),
                    "description": "Each `site_id` at most once.",
                },
            },
        },
        "SitesUpserted": {
            "type": "object",
            "required": ["upserted"],
            "properties": {"upserted": {"type": "integer", "minimum": 0}},
        },
        "ReservationRequest": {
            "type": "object",
            "required": ["citizen_id", "phone", "site_id"],
            "properties": {
                "citizen_id": _schema("CitizenId"),
                "phone": _schema("Phone"),
                "site_id": _schema("Id"),
            },
        },
        "Reservation": {
            "type": "object",
            "description": "One citizen's claim of `per_person` units at one site in one round.",
            "required": [
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
            ],
            "properties": {
                "reservation_id": _schema("ReservationId"),
                "round_id": _schema("Id"),
                "site_id": _schema("Id"),
                "quantity": {"type": "integer", "minimum": 1},
                "status": {
                    "type": "string",
                    "enum": ["confirmed", "collected", "cancelled", "expired"],
                },
                "pickup_code": _schema("PickupCode"),
                "pickup_start": _schema("Timestamp"),
                "pickup_end": _schema("Timestamp"),
                "created_at": _schema("Timestamp"),
                "citizen_id_masked": {
                    "type": "string",
                    "pattern": CITIZEN_ID_MASKED_PATTERN,
                    "description": "The first 6 and last 4 characters of the ID, `*` between.",
                    "examples": ["110105********002X"],
                },
            },
        },
        "BatchItem": {
            "type": "object",
            "required": ["site_id", "quantity"],
            "properties": {
                "site_id": _schema("Id"),
                "quantity": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_BATCH_UNITS,
                    "description": "Whole units.",
                },
            },
        },
        "Batch": {
            "type": "object",
            "description": "Inventory loaded into a round, once per `batch_id`.",
            "required": ["batch_id", "items"],
            "properties": {
                "batch_id": _schema("Id"),
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "items": _schema("BatchItem"),
                    "description": "Each `site_id` at most once; every site must exist.",
                },
            },
        },
        "BatchCsv": {
            "type": "string",
            "description": (
                "CSV with the header `site_id,quantity`, then one row per site. The `batch_id` "
                "comes in the query."
            ),
            "examples": ["site_id,quantity\npharmacy-12,500\ncentre-3,200\n"],
        },
        "BatchAnswer": {
            "type": "object",
            "required": ["batch_id", "units_added", "sites"],
            "properties": {
                "batch_id": _schema("Id"),
                "units_added": {"type": "integer", "minimum": 0},
                "sites": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "How many sites the batch names.",
                },
            },
        },
        "SiteStats": {
            "type": "object",
            "description": "One site's units in the round.",
            "required": ["site_id", "loaded", "reserved", "remaining"],
            "properties": {
                "site_id": _schema("Id"),
                "loaded": {"type": "integer", "minimum": 0},
                "reserved": {"type": "integer", "minimum": 0},
                "remaining": {"type": "integer", "minimum": 0},
            },
        },
        "Stats": {
            "type": "object",
            "description": (
                "A round's figures in units, except `reservations` (live reservations) and "
                "`ledger` (reservations)."
            ),
            "required": [
                "round_id",
                "loaded",
                "reserved",
                "collected",
                "remaining",
                "reservations",
                "sites",
                "ledger",
            ],
            "properties": {
                "round_id": _schema("Id"),
                "loaded": {"type": "integer", "minimum": 0},
                "reserved": {"type": "integer", "minimum": 0},
                "collected": {"type": "integer", "minimum": 0},
                "remaining": {"type": "integer", "minimum": 0},
                "reservations": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Live reservations.",
                },
                "sites": {"type": "array", "items": _schema("SiteStats")},
                "ledger": {
                    "type": "object",
                    "required": ["recorded", "lag"],
                    "properties": {
                        "recorded": {
                            "type": ["integer", "null"],
                            "minimum": 0,
                            "description": (
                                "Reservations recorded in PostgreSQL; `null` while PostgreSQL "
                                "cannot be reached."
                            ),
                        },
                        "lag": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Ledger entries not yet written to PostgreSQL.",
                        },
                    },
                },
            },
        },
        "PickupRequest": {
            "type": "object",
            "required": ["site_id", "pickup_code"],
            "properties": {
                "site_id": _schema("Id"),
                "pickup_code": _schema("PickupCode"),
                "citizen_id": {
                    "$ref": "#/components/schemas/CitizenId",
                    "description": "Optional: when given, it must be the reservation holder's.",
                },
                "round_id": {
                    "$ref": "#/components/schemas/Id",
                    "description": (
                        "Extension beyond the contract. Optional: when absent, the server finds "
                        "the round holding that pickup code at that site."
                    ),
                },
            },
        },
        "FieldError": {
            "type": "object",
            "required": ["field", "message"],
            "properties": {
                "field": {"type": "string", "examples": ["items[3].quantity"]},
                "message": {"type": "string"},
            },
        },
        "Alternative": {
            "type": "object",
            "description": "Another site that still has stock for a share.",
            "required": ["site_id", "name", "district", "remaining"],
            "properties": {
                "site_id": _schema("Id"),
                "name": {"type": "string"},
                "district": {"type": "string"},
                "remaining": {"type": "integer", "minimum": 0},
            },
        },
        "Health": {
            "type": "object",
            "description": "A probe's answer; informational, the status code is what counts.",
            "properties": {"status": {"type": "string", "examples": ["ok", "ready"]}},
        },
        "Problem": {
            "type": "object",
            "description": (
                "Every error answer (RFC 9457, `application/problem+json`), with a stable `code`."
            ),
            "required": ["type", "title", "status", "detail", "code"],
            "properties": {
                "type": {
                    "type": "string",
                    "format": "uri-reference",
                    "examples": ["urn:allot:problem:sold-out"],
                },
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "code": {"type": "string", "enum": PROBLEM_CODES},
                "errors": {
                    "type": "array",
                    "description": "With `invalid-request`: one entry per bad field.",
                    "items": _schema("FieldError"),
                },
                "alternatives": {
                    "type": "array",
                    "description": (
                        "With `sold-out`: up to 5 sites with stock, same district first."
                    ),
                    "maxItems": 5,
                    "items": _schema("Alternative"),
                },
                "reason": {
                    "type": "string",
                    "enum": ["collected", "cancelled", "expired", "citizen"],
                    "description": (
                        "Extension beyond the contract. With `not-collectable`: why, for "
                        "programs (`citizen`: the given ID does not match the holder)."
                    ),
                },
                "opens_at": {
                    "$ref": "#/components/schemas/Timestamp",
                    "description": "Extension beyond the contract. With `round-not-open`.",
                },
                "closes_at": {
                    "$ref": "#/components/schemas/Timestamp",
                    "description": "Extension beyond the contract. With `round-not-open`.",
                },
            },
        },
    }


def _components() -> dict[str, Any]:
    return {
        "schemas": _schemas(),
        "parameters": {
            "RoundId": {
                "name": "round_id",
                "in": "path",
                "required": True,
                "schema": _schema("Id"),
            },
            "ReservationId": {
                "name": "reservation_id",
                "in": "path",
                "required": True,
                "schema": _schema("ReservationId"),
            },
            "BatchId": {
                "name": "batch_id",
                "in": "query",
                "required": False,
                "description": "Required with a `text/csv` body; not used with a JSON body.",
                "schema": _schema("Id"),
            },
        },
        "headers": {
            "Retry-After": {
                "description": "Whole seconds (at least 1) to wait before trying again.",
                "schema": {"type": "integer", "minimum": 1},
            },
            "Location": {
                "description": "`/api/v1/reservations/{reservation_id}` of the new reservation.",
                "schema": {"type": "string", "format": "uri-reference"},
            },
        },
        "responses": {
            "MethodNotAllowed": {
                **_problem("`method-not-allowed`: the path exists but does not take this method."),
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
                "description": "`Authorization: Bearer <ALLOT_ADMIN_TOKEN>`.",
            },
        },
    }


# -- paths -------------------------------------------------------------------------------------


def _citizen_paths() -> dict[str, Any]:
    return {
        "/api/v1/rounds": {
            "get": {
                "tags": [CITIZENS],
                "operationId": "listRounds",
                "summary": "List the rounds",
                "responses": {
                    "200": _ok("RoundList", "All rounds."),
                    "429": _retry_later(RATE_LIMITED),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
        "/api/v1/rounds/{round_id}": {
            "parameters": [_parameter("RoundId")],
            "get": {
                "tags": [CITIZENS],
                "operationId": "getRound",
                "summary": "Get one round",
                "responses": {
                    "200": _ok("Round", "The round."),
                    "404": _problem("`not-found`: unknown round."),
                    "429": _retry_later(RATE_LIMITED),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
        "/api/v1/rounds/{round_id}/sites": {
            "parameters": [_parameter("RoundId")],
            "get": {
                "tags": [CITIZENS],
                "operationId": "listRoundSites",
                "summary": "List a round's sites with their remaining units",
                "description": "`remaining` may lag the truth by up to 2 s.",
                "responses": {
                    "200": _ok("SiteList", "The round's sites."),
                    "404": _problem("`not-found`: unknown round."),
                    "429": _retry_later(RATE_LIMITED),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
        "/api/v1/rounds/{round_id}/reservations": {
            "parameters": [_parameter("RoundId")],
            "post": {
                "tags": [CITIZENS],
                "operationId": "createReservation",
                "summary": "Reserve a share at a site",
                "description": (
                    "A citizen holds at most one live reservation per round, whatever the site. "
                    "A retry after a timeout is safe: it answers 200 with the same reservation."
                ),
                "requestBody": _json_body("ReservationRequest", "Who reserves, and where."),
                "responses": {
                    "201": {
                        "description": "A new reservation.",
                        "headers": {"Location": {"$ref": "#/components/headers/Location"}},
                        "content": {"application/json": {"schema": _schema("Reservation")}},
                    },
                    "200": _ok(
                        "Reservation",
                        "The same citizen with the same phone already holds a live reservation "
                        "at this same site in this round: that reservation, unchanged.",
                    ),
                    **_body_errors(),
                    "404": _problem("`not-found`: unknown round or site."),
                    "409": _problem(
                        "`round-not-open`: before `opens_at` or after `closes_at`. "
                        "`sold-out`: the site has fewer than `per_person` units left; the body "
                        "adds `alternatives`, up to 5 `{site_id, name, district, remaining}` "
                        "with stock, same district first. "
                        "`already-reserved`: the citizen holds a live reservation in this round "
                        "at another site, or with another phone."
                    ),
                    "429": _retry_later(RATE_LIMITED_OR_OVERLOADED),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
        "/api/v1/reservations/{reservation_id}": {
            "parameters": [_parameter("ReservationId")],
            "get": {
                "tags": [CITIZENS],
                "operationId": "getReservation",
                "summary": "Get a reservation",
                "responses": {
                    "200": _ok("Reservation", "The reservation."),
                    "404": _problem("`not-found`: unknown reservation."),
                    "429": _retry_later(RATE_LIMITED),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
            "delete": {
                "tags": [CITIZENS],
                "operationId": "cancelReservation",
                "summary": "Cancel a reservation",
                "description": (
                    "Its units go back to the site at once. Cancelling again answers the same."
                ),
                "responses": {
                    "200": _ok("Reservation", "The reservation, now `cancelled`."),
                    "404": _problem("`not-found`: unknown reservation."),
                    "409": _problem(
                        "`not-collectable`: the reservation is collected (or has expired) and "
                        "can no longer be cancelled."
                    ),
                    "429": _retry_later(RATE_LIMITED),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
    }


def _operator_paths() -> dict[str, Any]:
    return {
        "/api/v1/admin/sites": {
            "put": {
                "tags": [OPERATORS],
                "operationId": "upsertSites",
                "summary": "Create or update pickup sites",
                "security": ADMIN_SECURITY,
                "requestBody": _json_body("SitesUpsert", "The sites to create or update."),
                "responses": {
                    "200": _ok("SitesUpserted", "How many sites were written."),
                    **_body_errors(),
                    "401": _problem(UNAUTHORIZED),
                    "429": _retry_later(AUTH_THROTTLED),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
        "/api/v1/admin/rounds/{round_id}": {
            "parameters": [_parameter("RoundId")],
            "put": {
                "tags": [OPERATORS],
                "operationId": "putRound",
                "summary": "Create or update a round",
                "security": ADMIN_SECURITY,
                "requestBody": _json_body("RoundSpec", "The round's settings."),
                "responses": {
                    "201": _ok("Round", "The round was created."),
                    "200": _ok("Round", "The round was updated."),
                    **_body_errors(),
                    "401": _problem(UNAUTHORIZED),
                    "429": _retry_later(AUTH_THROTTLED),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
        "/api/v1/admin/rounds/{round_id}/batches": {
            "parameters": [_parameter("RoundId")],
            "post": {
                "tags": [OPERATORS],
                "operationId": "loadBatch",
                "summary": "Load a batch of inventory into a round",
                "description": (
                    "All or nothing: one bad row is answered 422 naming it, and nothing is "
                    "loaded. The same `batch_id` with the same contents again answers 200 with "
                    "the first answer and leaves the stock unchanged."
                ),
                "security": ADMIN_SECURITY,
                "parameters": [_parameter("BatchId")],
                "requestBody": {
                    "required": True,
                    "description": (
                        "JSON with `batch_id` and `items`, or CSV (`site_id,quantity` header) "
                        "with `?batch_id=` in the query."
                    ),
                    "content": {
                        "application/json": {"schema": _schema("Batch")},
                        "text/csv": {"schema": _schema("BatchCsv")},
                    },
                },
                "responses": {
                    "201": _ok("BatchAnswer", "The batch was loaded."),
                    "200": _ok(
                        "BatchAnswer",
                        "This `batch_id` was already loaded with the same contents: the first "
                        "answer; the stock is unchanged.",
                    ),
                    **_body_errors(
                        too_large=(
                            "`payload-too-large`: the body is larger than 16 KiB (JSON) "
                            "or 1 MiB (CSV)."
                        ),
                        media="`unsupported-media-type`: the body is neither JSON nor CSV.",
                    ),
                    "401": _problem(UNAUTHORIZED),
                    "429": _retry_later(AUTH_THROTTLED),
                    "404": _problem("`not-found`: unknown round."),
                    "409": _problem(
                        "`batch-conflict`: this `batch_id` was already loaded with other contents."
                    ),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
        "/api/v1/admin/rounds/{round_id}/stats": {
            "parameters": [_parameter("RoundId")],
            "get": {
                "tags": [OPERATORS],
                "operationId": "getRoundStats",
                "summary": "A round's figures",
                "security": ADMIN_SECURITY,
                "responses": {
                    "200": _ok("Stats", "The round's figures."),
                    "401": _problem(UNAUTHORIZED),
                    "429": _retry_later(AUTH_THROTTLED),
                    "404": _problem("`not-found`: unknown round."),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
        "/api/v1/admin/pickups": {
            "post": {
                "tags": [OPERATORS],
                "operationId": "recordPickup",
                "summary": "Hand over a reservation at the counter",
                "description": (
                    "Extension beyond the contract: the body may name the `round_id`; when it "
                    "does not, the server finds the round holding that pickup code at that site."
                ),
                "security": ADMIN_SECURITY,
                "requestBody": _json_body("PickupRequest", "The site and the pickup code."),
                "responses": {
                    "200": _ok("Reservation", "The reservation, now `collected`."),
                    **_body_errors(),
                    "401": _problem(UNAUTHORIZED),
                    "429": _retry_later(AUTH_THROTTLED),
                    "404": _problem("`not-found`: unknown pickup code at that site."),
                    "409": _problem(
                        "`not-collectable`: the reservation is collected, cancelled or expired; "
                        "or `citizen_id` was given and does not match, with a detail saying so."
                    ),
                    "503": _retry_later(UNAVAILABLE),
                },
            },
        },
    }


def _operations_paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": {
                "tags": [OPERATIONS],
                "operationId": "healthz",
                "summary": "Liveness",
                "responses": {"200": _ok("Health", "The process runs.")},
            },
        },
        "/readyz": {
            "get": {
                "tags": [OPERATIONS],
                "operationId": "readyz",
                "summary": "Readiness",
                "responses": {
                    "200": _ok("Health", "Redis and PostgreSQL answer."),
                    "503": _retry_later("`unavailable`: Redis or PostgreSQL does not answer."),
                },
            },
        },
        "/metrics": {
            "get": {
                "tags": [OPERATIONS],
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "description": (
                    "Served only on the operations listener (`[service] ops_port`, env "
                    "`ALLOT_OPS_PORT`, default 9180, bound to 127.0.0.1 unless `ops_host` says "
                    "otherwise), which also answers `/healthz` and `/readyz`. The public port "
                    "answers this path with 404."
                ),
                "responses": {
                    "200": {
                        "description": (
                            "Prometheus text exposition format; at least "
                            "`allot_reservations_total{outcome}`, "
                            "`allot_request_duration_seconds` (histogram), `allot_queue_depth` "
                            "and `allot_ledger_lag`."
                        ),
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                },
            },
        },
        "/api/v1/openapi.json": {
            "get": {
                "tags": [OPERATIONS],
                "operationId": "getOpenapi",
                "summary": "This document",
                "description": (
                    "The OpenAPI 3.1 document of all endpoints. Extension beyond the contract "
                    "in that the contract does not describe itself; it is documented here too."
                ),
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                },
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1.0 document of every endpoint of the contract; a fresh dict each call."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "allot",
            "version": "1.0.0",
            "summary": "Fair reservation of scarce goods under a flash crowd.",
            "description": (
                "Bodies are JSON (`application/json`, UTF-8) unless said otherwise; times are "
                "RFC 3339 with an offset. Bodies larger than 16 KiB (1 MiB for CSV batches) are "
                "refused with 413. Every error is `application/problem+json` (RFC 9457) with "
                "`type`, `title`, `status`, `detail` and a stable `code`. A method a path does "
                "not take is answered 405 with code `method-not-allowed` (see "
                "`components.responses.MethodNotAllowed`). No request is answered with a 5xx "
                "other than 503."
            ),
        },
        "tags": [
            {"name": CITIZENS, "description": "Citizens reserve and cancel; no login."},
            {
                "name": OPERATORS,
                "description": "Operators' tools; `Authorization: Bearer <ALLOT_ADMIN_TOKEN>`.",
            },
            {"name": OPERATIONS, "description": "Health, readiness, metrics, this document."},
        ],
        "paths": {**_citizen_paths(), **_operator_paths(), **_operations_paths()},
        "components": _components(),
    }
