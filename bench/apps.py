"""The two comparison servers of `make bench`, each a single process on uvloop.

- bare:  the ceiling of any aiohttp handler: read the body, answer a constant 201.
- naive: the design allot replaces: the same validation and the same claim.lua, but one
         redis-py EVALSHA per request, straight from the handler (no queue, no batching).

usage: python bench/apps.py bare|naive PORT   (naive reads ALLOT_* like `allot serve`)
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import orjson
import uvloop
from aiohttp import web

from allocator.config import load_settings
from allocator.errors import Problem
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from service.app import redis_client
from service.problems import status_of
from service.shapes import reservation_body
from service.validation import parse_reservation, read_json

CONSTANT = orjson.dumps({"reservation_id": "x", "status": "confirmed"})


async def bare(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=CONSTANT, status=201, content_type="application/json")


def naive_app() -> web.Application:
    settings = load_settings()
    app = web.Application()
    key = web.AppKey("allocator", Allocator)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        redis = redis_client(settings)
        app[key] = Allocator(
            redis, None, Keys(settings.service.redis_prefix), Hasher(settings.pepper_bytes),
            gate=settings.gate,
        )  # fmt: skip
        yield
        await redis.aclose()

    async def reserve(request: web.Request) -> web.Response:
        allocator = request.app[key]
        round_id = request.match_info["round_id"]
        try:
            ask = parse_reservation(await read_json(request))
            claim = allocator.claim_request(round_id, ask.site_id, ask.citizen_id, ask.phone)
            [outcome] = await allocator.claim_many(round_id, [claim])  # one EVALSHA, no queue
            if outcome.refusal is not None:
                raise outcome.refusal
            assert outcome.reservation is not None
            rnd = await allocator.round(round_id)
        except Problem as p:
            return web.Response(body=orjson.dumps({"code": p.code}), status=status_of(p))
        return web.Response(
            body=orjson.dumps(reservation_body(outcome.reservation, rnd, allocator.now_ms())),
            status=201 if outcome.created else 200,
            content_type="application/json",
        )

    app.cleanup_ctx.append(ctx)
    app.router.add_post("/api/v1/rounds/{round_id}/reservations", reserve)
    return app


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "bare":
        app = web.Application()
        app.router.add_post("/api/v1/rounds/{round_id}/reservations", bare)
    else:
        app = naive_app()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())  # fmt: skip


if __name__ == "__main__":
    main()
