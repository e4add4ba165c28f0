"""Request handlers: parse and check, call the allocator, shape the answer. Nothing else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from allocator.admission import AdmissionQueue
from allocator.errors import Problem, SoldOut
from allocator.facade import Allocator
from service.appkeys import ADMISSION, ALLOCATOR, METRICS, TRUSTED_PROXIES
from service.auth import check_site, require_operator, require_staff
from service.client import Network, client_address
from service.http import ReadyResponse
from service.metrics import Metrics
from service.openapi import openapi_document
from service.problems import PROBLEM_JSON, problem_body, problem_headers, status_of
from service.shapes import (
    batch_body,
    entry_body,
    reservation_body,
    round_body,
    site_body,
    stats_body,
)
from service.validation import (
    CSV_LIMIT,
    media_type,
    parse_batch_csv,
    parse_batch_json,
    parse_draw,
    parse_entry,
    parse_pickup,
    parse_reservation,
    parse_round,
    parse_sites,
    path_id,
    read_body,
    read_json,
)

routes = web.RouteTableDef()
CITIZEN_CHANNELS = ("web", "mini-program")  # X-Allot-Channel values taken as given


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


# -- citizens ---------------------------------------------------------------------------------


@routes.get("/api/v1/rounds")
async def list_rounds(request: web.Request) -> web.Response:
    allocator = request.app[ALLOCATOR]
    now = allocator.now()
    return json_response(
        {
            "rounds": [
                round_body(r, now, await allocator.remaining(r.round_id))
                for r in await allocator.rounds()
            ]
        }
    )


@routes.get("/api/v1/rounds/{round_id}")
async def get_round(request: web.Request) -> web.Response:
    allocator = request.app[ALLOCATOR]
    rnd = await allocator.round(path_id(request, "round_id"))
    return json_response(round_body(rnd, allocator.now(), await allocator.remaining(rnd.round_id)))


@routes.get("/api/v1/rounds/{round_id}/sites")
async def list_sites(request: web.Request) -> web.Response:
    allocator = request.app[ALLOCATOR]
    sites = await allocator.site_list(path_id(request, "round_id"))
    return json_response({"sites": [site_body(s) for s in sites]})


@routes.post("/api/v1/rounds/{round_id}/reservations")
async def create_reservation(request: web.Request) -> web.Response:
    return await reserve(request)


async def reserve(
    request: web.Request,
    allowed: Callable[[str], Awaitable[None]] | None = None,
    channel: str | None = None,
) -> web.Response:
    """A reservation, for the citizen's own endpoint and the desk's (``allowed`` is then
    called with the site asked for before anything is claimed, and ``channel`` is ``desk``).
    A citizen's channel is its ``X-Allot-Channel`` header when that is ``web`` or
    ``mini-program``, else ``api``."""
    metrics = request.app[METRICS]
    try:
        round_id = path_id(request, "round_id")
    except Problem as problem:
        metrics.count_reservation(problem.code)
        raise
    outcome = await reservation_outcome(
        request,
        round_id,
        request.app[ALLOCATOR],
        request.app[ADMISSION],
        metrics,
        request.app[TRUSTED_PROXIES],
        channel if channel is not None else citizen_channel(request),
        allowed,
    )
    if isinstance(outcome, Problem):
        raise outcome
    body, created, location = outcome
    if not created:
        return json_response(body)
    return json_response(body, status=201, headers={"Location": location})


async def reservation_outcome(
    request: web.Request,
    round_id: str,
    allocator: Allocator,
    admission: AdmissionQueue,
    metrics: Metrics,
    trusted: tuple[Network, ...],
    channel: str,
    allowed: Callable[[str], Awaitable[None]] | None = None,
) -> tuple[dict[str, Any], bool, str] | SoldOut:
    """What both ways of serving a reservation share (:func:`reserve`, routed, and
    :func:`citizen_reservation`, the hot route): the body, whether it is new and its Location;
    or the sold-out board's refusal, returned, not raised (a raise costs the sold-out herd a
    few µs each). Every other refusal is raised. The metrics are counted here, once."""
    try:
        ask = parse_reservation(await read_json(request))
        if allowed is not None:
            await allowed(ask.site_id)
        # the worker's last snapshot of the round, never waiting for Redis before the queue:
        # its eligibility is checked on the ID here (before any token or unit is touched), and
        # its opening date gives the age band
        rnd = await allocator.round_before_claim(round_id)
        allocator.check_eligibility(rnd, ask.citizen_id)
        claim = allocator.claim_request(
            round_id,
            ask.site_id,
            ask.citizen_id,
            ask.phone,
            client_address(request, trusted),
            channel=channel,
            opens_on=rnd.opens_at.date(),
        )
        refusal = admission.from_memory(claim)
        if refusal is not None:
            metrics.count_reservation("sold-out")
            metrics.count_ask(channel, granted=False)
            return refusal
        reservation, created = await admission.claim(claim)
    except Problem as problem:
        metrics.count_reservation(problem.code)
        if problem.code == "sold-out":
            metrics.count_ask(channel, granted=False)
        raise
    metrics.count_reservation("created" if created else "existing")
    if created:
        metrics.count_ask(channel, granted=True)
    body = reservation_body(reservation, rnd, allocator.now_ms())
    return body, created, f"/api/v1/reservations/{reservation.reservation_id}"


async def citizen_reservation(
    request: web.Request,
    round_id: str,
    allocator: Allocator,
    admission: AdmissionQueue,
    metrics: Metrics,
    trusted: tuple[Network, ...],
) -> web.StreamResponse:
    """:func:`reserve` for a citizen, as the hot route serves it (service/app.py, HotRoutes):
    the same outcome, written in one piece. ``round_id`` is already known to be well-formed
    (the hot route's path pattern)."""
    outcome = await reservation_outcome(
        request, round_id, allocator, admission, metrics, trusted, citizen_channel(request)
    )
    if isinstance(outcome, Problem):
        return ready_problem(outcome)
    body, created, location = outcome
    if not created:
        return ReadyResponse(orjson.dumps(body), status=200, content_type="application/json")
    return ReadyResponse(
        orjson.dumps(body),
        status=201,
        content_type="application/json",
        headers={"Location": location},
    )


def ready_problem(problem: Problem) -> ReadyResponse:
    """:func:`service.problems.problem_response`, as the hot route writes it."""
    return ReadyResponse(
        problem_body(problem),
        status=status_of(problem),
        content_type=PROBLEM_JSON,
        headers=problem_headers(problem),
    )


@routes.post("/api/v1/rounds/{round_id}/entries")
async def create_entry(request: web.Request) -> web.Response:
    return await enter(request)


def citizen_channel(request: web.Request) -> str:
    """A citizen's channel: its ``X-Allot-Channel`` header when that is ``web`` or
    ``mini-program``, else ``api``."""
    channel = request.headers.get("X-Allot-Channel", "api")
    return channel if channel in CITIZEN_CHANNELS else "api"


async def enter(
    request: web.Request,
    allowed: Callable[[str], Awaitable[None]] | None = None,
    channel: str | None = None,
) -> web.Response:
    """A lottery entry, through the same gate, queue and batches as a reservation; for the
    citizen's own endpoint and the desk's (``allowed`` and ``channel`` as for :func:`reserve`)."""
    body, created, location = await entry_outcome(
        request,
        path_id(request, "round_id"),
        request.app[ALLOCATOR],
        request.app[ADMISSION],
        request.app[TRUSTED_PROXIES],
        channel if channel is not None else citizen_channel(request),
        allowed,
    )
    if not created:
        return json_response(body)
    return json_response(body, status=201, headers={"Location": location})


async def entry_outcome(
    request: web.Request,
    round_id: str,
    allocator: Allocator,
    admission: AdmissionQueue,
    trusted: tuple[Network, ...],
    channel: str,
    allowed: Callable[[str], Awaitable[None]] | None = None,
) -> tuple[dict[str, Any], bool, str]:
    """What both ways of serving an entry share (:func:`enter`, routed, and
    :func:`citizen_entry`, the hot route): the body, whether it is new and its Location;
    refusals are raised."""
    ask = parse_entry(await read_json(request))
    if allowed is not None:
        await allowed(ask.site_id)
    # the worker's last snapshot of the round, never waiting for Redis before the queue: who
    # may take part is checked on the ID here, and its opening date gives the age band
    rnd = await allocator.round_before_claim(round_id)
    allocator.check_eligibility(rnd, ask.citizen_id)
    key = await allocator.draw_key()  # before Redis: no entry is made that cannot be signed
    asked = allocator.entry_request(
        round_id,
        ask.site_id,
        ask.citizen_id,
        ask.phone,
        ask.accept_district,
        client_address(request, trusted),
        channel=channel,
        opens_on=rnd.opens_at.date(),
    )
    entry, created = await admission.enter(asked)
    body = entry_body(entry, await allocator.round(round_id), key)
    return body, created, f"/api/v1/entries/{entry.entry_id}"


async def citizen_entry(
    request: web.Request,
    round_id: str,
    allocator: Allocator,
    admission: AdmissionQueue,
    trusted: tuple[Network, ...],
) -> web.StreamResponse:
    """:func:`enter` for a citizen, as the hot route serves it (service/app.py, HotRoutes):
    the same outcome, written in one piece. ``round_id`` is already known to be well-formed
    (the hot route's path pattern)."""
    body, created, location = await entry_outcome(
        request, round_id, allocator, admission, trusted, citizen_channel(request)
    )
    if not created:
        return ReadyResponse(orjson.dumps(body), status=200, content_type="application/json")
    return ReadyResponse(
        orjson.dumps(body),
        status=201,
        content_type="application/json",
        headers={"Location": location},
    )


@routes.get("/api/v1/entries/{entry_id}")
async def get_entry(request: web.Request) -> web.Response:
    allocator = request.app[ALLOCATOR]
    entry = await allocator.entry(request.match_info["entry_id"])
    rnd = await allocator.round(entry.round_id)
    return json_response(entry_body(entry, rnd, await allocator.draw_key()))


@routes.delete("/api/v1/entries/{entry_id}")
async def withdraw_entry(request: web.Request) -> web.Response:
    allocator = request.app[ALLOCATOR]
    entry = await allocator.withdraw(request.match_info["entry_id"])
    rnd = await allocator.round(entry.round_id)
    return json_response(entry_body(entry, rnd, await allocator.draw_key()))


@routes.get("/api/v1/draw-key")
async def get_draw_key(request: web.Request) -> web.Response:
    key = await request.app[ALLOCATOR].draw_key()
    return json_response({"public_key": key.public_key()})


@routes.get("/api/v1/rounds/{round_id}/draw")
async def get_draw(request: web.Request) -> web.Response:
    """The draw record (API.md, Lottery rounds); public."""
    record = await request.app[ALLOCATOR].draw_record(path_id(request, "round_id"))
    return json_response(record)


async def _draw_file(request: web.Request, name: str) -> web.Response:
    data = await request.app[ALLOCATOR].draw_file(path_id(request, "round_id"), name)
    return web.Response(body=data, content_type="text/csv", charset="utf-8")


@routes.get("/api/v1/rounds/{round_id}/draw/entries.csv")
async def get_draw_entries(request: web.Request) -> web.Response:
    return await _draw_file(request, "entries.csv")


@routes.get("/api/v1/rounds/{round_id}/draw/stock.csv")
async def get_draw_stock(request: web.Request) -> web.Response:
    return await _draw_file(request, "stock.csv")


@routes.get("/api/v1/rounds/{round_id}/draw/results.csv")
async def get_draw_results(request: web.Request) -> web.Response:
    return await _draw_file(request, "results.csv")


@routes.get(r"/api/v1/rounds/{round_id}/draw/pass-{n:[0-9]+}.csv")
async def get_draw_pass(request: web.Request) -> web.Response:
    return await _draw_file(request, f"pass-{request.match_info['n']}.csv")


@routes.get("/api/v1/reservations/{reservation_id}")
async def get_reservation(request: web.Request) -> web.Response:
    allocator = request.app[ALLOCATOR]
    reservation = await allocator.reservation(request.match_info["reservation_id"])
    rnd = await allocator.round(reservation.round_id)
    return json_response(reservation_body(reservation, rnd, allocator.now_ms()))


@routes.delete("/api/v1/reservations/{reservation_id}")
async def cancel_reservation(request: web.Request) -> web.Response:
    allocator = request.app[ALLOCATOR]
    reservation = await allocator.cancel(request.match_info["reservation_id"])
    rnd = await allocator.round(reservation.round_id)
    return json_response(reservation_body(reservation, rnd, allocator.now_ms()))


# -- operators --------------------------------------------------------------------------------


@routes.put("/api/v1/admin/sites")
async def put_sites(request: web.Request) -> web.Response:
    await require_operator(request)
    sites = parse_sites(await read_json(request))
    return json_response({"upserted": await request.app[ALLOCATOR].upsert_sites(sites)})


@routes.put("/api/v1/admin/rounds/{round_id}")
async def put_round(request: web.Request) -> web.Response:
    await require_operator(request)
    allocator = request.app[ALLOCATOR]
    rnd = parse_round(request.match_info["round_id"], await read_json(request))
    created = await allocator.upsert_round(rnd)
    rnd = await allocator.round(rnd.round_id)  # as stored: a lottery round's commitment
    body = round_body(rnd, allocator.now(), await allocator.remaining(rnd.round_id))
    return json_response(body, status=201 if created else 200)


@routes.post("/api/v1/admin/rounds/{round_id}/batches")
async def post_batch(request: web.Request) -> web.Response:
    await require_operator(request)
    round_id = path_id(request, "round_id")
    allocator = request.app[ALLOCATOR]
    await allocator.round(round_id)  # 404 before reading a large body for nothing
    if media_type(request) == "text/csv":
        raw = await read_body(request, CSV_LIMIT)
        known = await allocator.sites(fresh=True)
        batch = parse_batch_csv(raw, request.query.get("batch_id"), known)
    else:
        body = await read_json(request)
        batch = parse_batch_json(body, await allocator.sites(fresh=True), round_id)
    if batch.carry_from is not None:
        result = await allocator.carry_batch(round_id, batch.batch_id, batch.carry_from)
    else:
        result = await allocator.load_batch(round_id, batch.batch_id, batch.items)
    return json_response(batch_body(result), status=201 if result.created else 200)


def _draw_answer(record: dict[str, Any]) -> web.Response:
    return json_response(record, status=202 if record["status"] == "drawing" else 200)


@routes.post("/api/v1/admin/rounds/{round_id}/draw")
async def post_draw(request: web.Request) -> web.Response:
    await require_operator(request)
    round_id = path_id(request, "round_id")
    value = parse_draw(await read_json(request))
    return _draw_answer(await request.app[ALLOCATOR].draw(round_id, value))


@routes.post("/api/v1/admin/rounds/{round_id}/draw/next")
async def post_draw_next(request: web.Request) -> web.Response:
    await require_operator(request)
    return _draw_answer(await request.app[ALLOCATOR].draw_next(path_id(request, "round_id")))


@routes.get("/api/v1/admin/rounds/{round_id}/stats")
async def get_stats(request: web.Request) -> web.Response:
    await require_operator(request)
    stats = await request.app[ALLOCATOR].stats(path_id(request, "round_id"))
    return json_response(stats_body(stats))


@routes.get("/api/v1/admin/rounds/{round_id}/fairness")
async def get_fairness(request: web.Request) -> web.Response:
    await require_operator(request)
    report = await request.app[ALLOCATOR].fairness_report(path_id(request, "round_id"))
    return json_response(report)


@routes.post("/api/v1/admin/pickups")
async def post_pickup(request: web.Request) -> web.Response:
    principal = await require_staff(request)  # the operator, or a desk of that site
    allocator = request.app[ALLOCATOR]
    ask = parse_pickup(await read_json(request))
    check_site(principal, ask.site_id)
    reservation = await allocator.pickup(ask.site_id, ask.pickup_code, ask.citizen_id, ask.round_id)
    rnd = await allocator.round(reservation.round_id)
    return json_response(reservation_body(reservation, rnd, allocator.now_ms()))


# -- operations -------------------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    await request.app[ALLOCATOR].ping()  # Unavailable -> 503 problem+json with Retry-After
    return json_response({"status": "ready"})


# /metrics is served only by the operations listener (service/ops.py): on this port it is 404.


@routes.get("/api/v1/admin/queue")
async def get_queue(request: web.Request) -> web.Response:
    """Beyond the contract, for the console: requests waiting in all workers' queues."""
    await require_operator(request)
    return json_response({"queue_depth": request.app[METRICS].queue_depth_total()})


@routes.get("/api/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())
