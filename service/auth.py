"""Who is asking, and what they may do: the operator, a desk of one site, or nobody.

One function, :func:`authenticate`, turns the request's ``Authorization: Bearer`` value into a
:class:`Principal` (the operator, or a desk token bound to its site) or None. The handlers then
ask for what they need:

* :func:`require_operator` — every operator endpoint: the operator, else 403 ``forbidden`` for a
  desk token, else 401 ``unauthorized``;
* :func:`require_staff` — the endpoints a desk may use (pickups, assisted reservations): the
  operator or a desk token, else 401; then :func:`check_site` refuses a desk acting for another
  site with 403 ``forbidden`` before anything is changed.

Failed attempts are counted per client address in Redis (``allocator/throttle.py``): a value
with the desk tokens' prefix in the ``desk`` scope, any other in the ``operator`` scope. A
request without the header guesses nothing and is not counted. Tokens are never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from allocator.desk import DeskToken, looks_like_desk_token
from allocator.throttle import DESK, OPERATOR
from service.appkeys import AUTH_THROTTLE, DESK_TOKENS, SETTINGS, TRUSTED_PROXIES
from service.client import client_address
from service.problems import Forbidden, Unauthorized


@dataclass(frozen=True, slots=True)
class Principal:
    """The operator (``desk`` None) or one desk token."""

    desk: DeskToken | None = None

    @property
    def is_operator(self) -> bool:
        return self.desk is None

    @property
    def site_id(self) -> str | None:
        return self.desk.site_id if self.desk is not None else None


OPERATOR_PRINCIPAL = Principal()


async def authenticate(request: web.Request) -> Principal | None:
    """The principal the bearer token names, or None (missing, malformed, wrong, revoked).

    Raises RateLimited while the client address is blocked for too many failures in the
    token's scope. Header bytes that are not UTF-8 reach us as surrogates: compared as the
    bytes they were, they are simply a wrong token.
    """
    header = request.headers.get("Authorization")
    if header is None:
        return None  # no header at all guesses nothing: refused, not counted
    scheme, _, value = header.partition(" ")
    value = value.strip()
    throttle = request.app[AUTH_THROTTLE]
    client = client_address(request, request.app[TRUSTED_PROXIES])
    if looks_like_desk_token(value):
        await throttle.check(DESK, client)
        desk = await request.app[DESK_TOKENS].resolve(value) if scheme.lower() == "bearer" else None
        if desk is None:
            await throttle.failed(DESK, client)
            return None
        return Principal(desk)
    admin = request.app[SETTINGS].admin_token
    if not admin:
        return None  # operator endpoints are disabled: nothing to guess
    await throttle.check(OPERATOR, client)
    given = value.encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, admin.encode()):
        await throttle.failed(OPERATOR, client)
        return None
    return OPERATOR_PRINCIPAL


def _unauthorized(request: web.Request, operator_only: bool) -> Unauthorized:
    if operator_only and not request.app[SETTINGS].admin_token:
        return Unauthorized("Operator endpoints are disabled: ALLOT_ADMIN_TOKEN is not set.")
    if operator_only:
        return Unauthorized("Operator endpoints need 'Authorization: Bearer <ALLOT_ADMIN_TOKEN>'.")
    return Unauthorized("This endpoint needs 'Authorization: Bearer <operator or desk token>'.")


async def require_operator(request: web.Request) -> None:
    """The operator token, or 403 for a desk token, or 401."""
    principal = await authenticate(request)
    if principal is None:
        raise _unauthorized(request, operator_only=True)
    if not principal.is_operator:
        raise Forbidden("A desk token may only collect and reserve at its own site.")


async def require_staff(request: web.Request) -> Principal:
    """The operator or a desk token, or 401."""
    principal = await authenticate(request)
    if principal is None:
        raise _unauthorized(request, operator_only=False)
    return principal


def check_site(principal: Principal, site_id: str) -> None:
    """403 for a desk token acting for another site than its own."""
    if principal.desk is not None and principal.desk.site_id != site_id:
        raise Forbidden(
            f"This desk token belongs to site {principal.desk.site_id!r}, not {site_id!r}."
        )
