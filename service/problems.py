"""Every problem ``code`` of the contract, with its HTTP status and title, declared once, and
the one mapping of a refusal (``allocator/errors.py``) to its problem+json answer.

This is API.md's error table as data. The OpenAPI document (``service/openapi.py``) derives each
operation's error answers from it: a route names the codes it can answer, and their statuses,
``Retry-After`` headers and extension members come from here. ``problem_response`` reads the
same table: a refusal's ``code`` gives its status and title, its ``retry_after`` the
``Retry-After`` header; its ``extra`` data become the body's extension members. The refusals
only HTTP can give (a body that is not JSON, a wrong method, a missing token) are declared here
too, not in the domain.

The codes of the lottery, entitlement and expiry parts of the contract are listed too,
marked ``served=False``: no endpoint answers them yet. They are kept here so that the work that
adds those endpoints finds its codes, statuses and titles already agreed, and flips one flag;
they are left out of the document, which describes the answers this service gives today (a
client generated from it would otherwise carry branches for answers that never come).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import orjson
from aiohttp import web

from allocator.errors import Problem, RetryLater


@dataclass(frozen=True, slots=True)
class ProblemCode:
    code: str
    status: int
    title: str
    when: str  # what the code means, for the document (Markdown)
    served: bool = True  # False: in the contract, not answered by any endpoint yet
    retry_after: bool = False  # the answer carries a Retry-After header
    members: tuple[str, ...] = ()  # members the contract adds to the problem body (required)
    extensions: tuple[str, ...] = ()  # members beyond the contract it may add (optional)
    beyond_contract: bool = False  # the code itself is an extension of API.md's table


PROBLEM_CODES: tuple[ProblemCode, ...] = (
    ProblemCode(
        "bad-request",
        400,
        "Malformed HTTP request",
        "not a well-formed HTTP/1.1 request (framing, request line, headers); answered by the "
        "connection layer (service/http.py), which then closes the connection.",
        beyond_contract=True,
    ),
    ProblemCode(
        "malformed-json",
        400,
        "Body is not a JSON object",
        "the body is not JSON, or not a JSON object.",
    ),
    ProblemCode(
        "unauthorized",
        401,
        "Operator token missing or wrong",
        "the `Authorization: Bearer <ALLOT_ADMIN_TOKEN>` header (or, where a desk may act, a "
        "desk token) is missing, wrong, malformed or revoked (every operator-only endpoint "
        "answers 401 while `ALLOT_ADMIN_TOKEN` is unset).",
    ),
    ProblemCode(
        "forbidden",
        403,
        "Not allowed with this token",
        "a desk token used outside its own site or for an operator-only endpoint.",
    ),
    ProblemCode("not-found", 404, "Not found", "unknown round, site, reservation or pickup code."),
    ProblemCode(
        "method-not-allowed",
        405,
        "Method not allowed",
        "the path exists but does not take this method.",
        beyond_contract=True,
    ),
    ProblemCode(
        "round-not-open",
        409,
        "The round is not open for reservations",
        "before `opens_at` or after `closes_at`.",
        extensions=("opens_at", "closes_at"),
    ),
    ProblemCode(
        "sold-out",
        409,
        "Sold out at this site",
        "the site has fewer than `per_person` units left; the body adds `alternatives`, up to "
        "5 `{site_id, name, district, remaining}` with stock, same district first.",
        members=("alternatives",),
    ),
    ProblemCode(
        "already-reserved",
        409,
        "Already reserved in this round",
        "the citizen holds a live reservation in this round at another site, or with another "
        "phone.",
    ),
    ProblemCode(
        "batch-conflict",
        409,
        "batch_id already loaded with other contents",
        "this `batch_id` was already loaded with other contents.",
    ),
    ProblemCode(
        "not-collectable",
        409,
        "This reservation cannot be collected",
        "the reservation is collected, cancelled or expired.",
        extensions=("reason",),
    ),
    ProblemCode(
        "wrong-mode",
        409,
        "Not taken by this kind of round",
        "a reservation on a `lottery` round, or an entry on an `fcfs` round.",
    ),
    ProblemCode(
        "already-entered",
        409,
        "Already entered in this round",
        "the citizen holds an entry in this lottery round with another phone.",
    ),
    ProblemCode(
        "not-eligible",
        409,
        "Not eligible for this round",
        "the citizen fails a rule of the round's `eligibility`; the body adds `rule`.",
        members=("rule",),
    ),
    ProblemCode(
        "in-cooldown",
        409,
        "In cooldown for this programme",
        "the citizen won or reserved in a round of the same `programme` within its cooldown; "
        "the body adds `until`.",
        members=("until",),
    ),
    ProblemCode(
        "draw-not-ready",
        409,
        "The entry list is not frozen yet",
        "a draw asked for before the entry list is frozen.",
    ),
    ProblemCode(
        "draw-conflict",
        409,
        "Already drawn with other randomness",
        "a draw asked for again with a different `public_randomness`.",
    ),
    ProblemCode(
        "carry-not-ready",
        409,
        "The earlier round's pickup has not ended",
        "a carry-over from a round whose pickup window has not ended.",
    ),
    ProblemCode(
        "request-timeout",
        408,
        "The request did not arrive in time",
        "the request's head or body did not arrive within its deadline "
        "(`[service] header_timeout_ms`, `body_timeout_ms`); the connection is closed.",
        beyond_contract=True,
    ),
    ProblemCode("payload-too-large", 413, "Body too large", "the body is over the limit."),
    ProblemCode(
        "unsupported-media-type",
        415,
        "Unsupported media type",
        "the body is not `application/json`.",
    ),
    ProblemCode(
        "invalid-request",
        422,
        "Invalid request",
        "a field is missing or wrong; the body adds `errors: [{field, message}]`, one per bad "
        "field.",
        members=("errors",),
    ),
    ProblemCode(
        "rate-limited",
        429,
        "Too many requests",
        "a token bucket (whole service, client address or citizen) refused the request.",
        retry_after=True,
    ),
    ProblemCode(
        "overloaded",
        429,
        "Too busy right now",
        "the admission queue is full or the wait in it ran out.",
        retry_after=True,
    ),
    ProblemCode(
        "unavailable",
        503,
        "Service temporarily unavailable",
        "Redis (or, for operator writes, PostgreSQL) cannot be reached, or Redis has lost data "
        "of the round that the ledger has (the round is refused until `allot rebuild`, rather "
        "than served from an older state). Answered within 1 s, never a hang.",
        retry_after=True,
        extensions=("lost_rounds",),
    ),
)

PROBLEMS: dict[str, ProblemCode] = {p.code: p for p in PROBLEM_CODES}


def served() -> Iterator[ProblemCode]:
    """The codes some endpoint answers today, in table order."""
    return (p for p in PROBLEM_CODES if p.served)


PROBLEM_TYPE = "urn:allot:problem:"
PROBLEM_JSON = "application/problem+json"


# -- the refusals only the HTTP layer gives ---------------------------------------------------


class MalformedJson(Problem):
    code = "malformed-json"


class BadRequest(Problem):
    """Not a well-formed HTTP/1.1 request (framing, request line, headers): the contract's
    table has no code for it, and ``malformed-json`` would misname a header error."""

    code = "bad-request"


class RequestTimeout(Problem):
    code = "request-timeout"


class Unauthorized(Problem):
    code = "unauthorized"


class Forbidden(Problem):
    """A desk token on an operator-only endpoint, or acting for another site (service/auth.py)."""

    code = "forbidden"


class MethodNotAllowed(Problem):
    code = "method-not-allowed"

    def __init__(self, detail: str, allow: str = "") -> None:
        super().__init__(detail)
        self.allow = allow  # the methods the path takes: the answer's Allow header


class PayloadTooLarge(Problem):
    code = "payload-too-large"


class UnsupportedMediaType(Problem):
    code = "unsupported-media-type"


# -- a refusal as an HTTP answer --------------------------------------------------------------

# One serialised body per shared refusal (Problem.same_as: one sold-out mark answers a herd
# from memory); it goes when the mark does.
_BODIES: WeakKeyDictionary[object, bytes] = WeakKeyDictionary()


def status_of(problem: Problem) -> int:
    return PROBLEMS[problem.code].status


def problem_headers(problem: Problem) -> dict[str, str]:
    """Retry-After in whole seconds (rounded up, at least 1) for a retryable refusal."""
    headers: dict[str, str] = {}
    if isinstance(problem, RetryLater):
        headers["Retry-After"] = str(max(1, math.ceil(problem.retry_after)))
    if isinstance(problem, MethodNotAllowed):
        headers["Allow"] = problem.allow
    return headers


def problem_body(problem: Problem) -> bytes:
    shared = problem.same_as
    if shared is not None:
        body = _BODIES.get(shared)
        if body is not None:
            return body
    row = PROBLEMS[problem.code]
    members: dict[str, Any] = {
        "type": PROBLEM_TYPE + row.code,
        "title": row.title,
        "status": row.status,
        "detail": problem.detail,
        "code": row.code,
        **problem.extra,
    }
    body = orjson.dumps(members)
    if shared is not None:
        _BODIES[shared] = body
    return body


def problem_response(problem: Problem) -> web.Response:
    return web.Response(
        body=problem_body(problem),
        status=status_of(problem),
        content_type=PROBLEM_JSON,
        headers=problem_headers(problem),
    )
