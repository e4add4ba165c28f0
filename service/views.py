"""Request handlers: parse and check, call the allocator, shape the answer. Nothing else."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web

from allocator.errors import Problem
from allocator.throttle import OPERATOR
from service.appkeys import (
    ADMISSION,
    ALLOCATOR,
    AUTH_THROTTLE,
    METRICS,
    SETTINGS,
    TRUSTED_PROXIES,
)
from service.client import client_address
from service.openapi import openapi_document
from service.problems import Unauthorized
from service.shapes import batch_body, reservation_body, round_body, site_body, stats_body
from service.validation import (
    CSV_LIMIT,
    media_type,
    parse_batch_csv,
    parse_batch_json,
    parse_pickup,
    parse_reservation,
    parse_round,
    parse_sites,
    path_id,
    read_body,
    read_json,
)

routes = web.RouteTableDef()


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


async def require_operator(request: web.Request) -> None:
    """The operator token, or 401; after too many wrong ones from an address, 429 for it
    (allocator/throttle.py; desk tokens will go through the same throttle).

    Header bytes that are not UTF-8 reach us as surrogates: compared as the bytes they were,
    they are simply a wrong token (401), not a server error.
    """
    token = request.app[SETTINGS].admin_token
    if not token:
        raise Unauthorized("Operator endpoints are disabled: ALLOT_ADMIN_TOKEN is not set.")
    throttle = request.app[AUTH_THROTTLE]
    client = client_address(request, request.app[TRUSTED_PROXIES])
    await throttle.check(OPERATOR, client)
    header = request.headers.get("Authorization")
    scheme, _, value = (header or "").partition(" ")
    given = value.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, token.encode()):
        if header is not None:  # no header at all guesses nothing: refused, not counted
            await throttle.failed(OPERATOR, client)
        raise Unauthorized("Operator endpoints need 'Authorization: Bearer <ALLOT_ADMIN_TOKEN>'.")


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
    allocator = request.app[ALLOCATOR]
    metrics = request.app[METRICS]
    try:
        round_id = path_id(request, "round_id")
        ask = parse_reservation(await read_json(request))
        # from the worker's last snapshot of the round: no Redis call, no wait
        allocator.check_eligibility(await allocator.round_before_claim(round_id), ask.citizen_id)
        claim = allocator.claim_request(
            round_id,
            ask.site_id,
            ask.citizen_id,
            ask.phone,
            client_address(request, request.app[TRUSTED_PROXIES]),
        )
        reservation, created = await request.app[ADMISSION].reserve(claim)
        rnd = await allocator.round(round_id)
    except Problem as problem:
        metrics.count_reservation(problem.code)
        raise
    metrics.count_reservation("created" if created else "existing")
    body = reservation_body(reservation, rnd, allocator.now_ms())
    if not created:
        return json_response(body)
    location = f"/api/v1/reservations/{reservation.reservation_id}"
    return json_response(body, status=201, headers={"Location": location})


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
        batch = parse_batch_json(body, await allocator.sites(fresh=True))
    result = await allocator.load_batch(round_id, batch.batch_id, batch.items)
    return json_response(batch_body(result), status=201 if result.created else 200)


@routes.get("/api/v1/admin/rounds/{round_id}/stats")
async def get_stats(request: web.Request) -> web.Response:
    await require_operator(request)
    stats = await request.app[ALLOCATOR].stats(path_id(request, "round_id"))
    return json_response(stats_body(stats))


@routes.post("/api/v1/admin/pickups")
async def post_pickup(request: web.Request) -> web.Response:
    await require_operator(request)
    allocator = request.app[ALLOCATOR]
    ask = parse_pickup(await read_json(request))
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
