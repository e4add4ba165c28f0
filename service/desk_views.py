"""Desk staff: the operator's desk-token endpoints, the desk's assisted reservation and entry.

What a desk token may do is decided in ``service/auth.py``; tokens live in ``allocator/desk.py``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from allocator.desk import DeskToken
from service.appkeys import DESK_TOKENS
from service.auth import check_site, require_operator, require_staff
from service.validation import parse_desk_token, path_id, read_json
from service.views import enter, json_response, reserve

routes = web.RouteTableDef()


def desk_token_body(desk: DeskToken) -> dict[str, Any]:
    """A desk token's public fields (never the token, never its hash)."""
    return {
        "token_id": desk.token_id,
        "site_id": desk.site_id,
        "label": desk.label,
        "created_at": desk.created_at.isoformat(),
        "revoked_at": desk.revoked_at.isoformat() if desk.revoked_at is not None else None,
    }


# -- operators --------------------------------------------------------------------------------


@routes.post("/api/v1/admin/desk-tokens")
async def create_desk_token(request: web.Request) -> web.Response:
    await require_operator(request)
    ask = parse_desk_token(await read_json(request))
    token, desk = await request.app[DESK_TOKENS].create(ask.site_id, ask.label)
    body = {"token": token, "token_id": desk.token_id, "site_id": desk.site_id, "label": desk.label}
    return json_response(body, status=201, headers={"Cache-Control": "no-store"})


@routes.get("/api/v1/admin/desk-tokens")
async def list_desk_tokens(request: web.Request) -> web.Response:
    """Beyond the contract, for the console: every desk token, without the tokens."""
    await require_operator(request)
    found = await request.app[DESK_TOKENS].list()
    return json_response({"desk_tokens": [desk_token_body(d) for d in found]})


@routes.delete("/api/v1/admin/desk-tokens/{token_id}")
async def revoke_desk_token(request: web.Request) -> web.Response:
    await require_operator(request)
    desk = await request.app[DESK_TOKENS].revoke(path_id(request, "token_id"))
    return json_response(desk_token_body(desk))


# -- desks ------------------------------------------------------------------------------------


@routes.get("/api/v1/desk/me")
async def whoami(request: web.Request) -> web.Response:
    """Beyond the contract, for the console: what the bearer token is (operator or desk)."""
    principal = await require_staff(request)
    if principal.desk is None:
        return json_response({"role": "operator", "token_id": None, "site_id": None, "label": None})
    d = principal.desk
    return json_response(
        {"role": "desk", "token_id": d.token_id, "site_id": d.site_id, "label": d.label}
    )


@routes.post("/api/v1/desk/rounds/{round_id}/reservations")
async def desk_reservation(request: web.Request) -> web.Response:
    """A reservation on behalf of a walk-in citizen, at the desk's own site."""
    principal = await require_staff(request)

    async def allowed(site_id: str) -> None:
        check_site(principal, site_id)

    return await reserve(request, allowed, channel="desk")


@routes.post("/api/v1/desk/rounds/{round_id}/entries")
async def desk_entry(request: web.Request) -> web.Response:
    """A lottery entry on behalf of a walk-in citizen, at the desk's own site."""
    principal = await require_staff(request)

    async def allowed(site_id: str) -> None:
        check_site(principal, site_id)

    return await enter(request, allowed, channel="desk")
