"""Desk tokens: least-privilege credentials for the staff of one pickup site.

An operator creates one token per counter (``POST /api/v1/admin/desk-tokens``), hands it to the
pharmacy or community desk, and revokes it when it is no longer needed. A desk token may collect
at its own site and reserve on behalf of a walk-in citizen there; nothing else
(``service/auth.py`` decides who may do what).

* **Shown once, stored hashed.** A token is ``allot-desk-`` and 43 URL-safe base64 characters
  (256 random bits); only its SHA-256 (hex) is stored, in PostgreSQL table ``desk_tokens``.
  With 256 random bits a plain hash is enough: nothing can be guessed from it, and it does not
  depend on ``ALLOT_ID_PEPPER`` (rotating the pepper does not sign every desk out).
* **PostgreSQL is the truth.** Each worker keeps what it looked up for at most ``ttl`` (1 s):
  a revocation is effective on every worker and node within that second even if nothing else
  happened. A revocation also publishes on the Redis channel ``<prefix>:desk-events``; every
  worker that hears it drops its whole cache at once, so in practice it takes effect at once.
* **PostgreSQL down.** A token this worker saw valid within the last ``stale_max`` (60 s) is
  still accepted while PostgreSQL does not answer (nobody can revoke one meanwhile: revocation
  writes PostgreSQL first); any other token is answered 503 ``unavailable``.

Tokens never appear in logs, keys or answers (but the one answer that creates them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from allocator import topology
from allocator.errors import InvalidRequest, NotFound, RetryLater, Unavailable
from allocator.keys import Keys

log = logging.getLogger("allot.desk")

DESK_PREFIX = "allot-desk-"
TOKEN_BYTES = 32  # 256 random bits
TOKEN_SHAPE = re.compile(r"allot-desk-[A-Za-z0-9_-]{43}", re.ASCII)
CACHE_TTL = 1.0  # seconds a worker may act on what it looked up
STALE_MAX = 60.0  # seconds a token seen valid is still accepted while PostgreSQL is down
CACHE_MAX = 10_000  # entries (wrong tokens are cached too; the throttle keeps them few)

RedisCall = Callable[[Awaitable[Any]], Awaitable[Any]]
PgAcquire = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


def new_token() -> str:
    return DESK_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def new_token_id() -> str:
    """The token's public name: ``desk-`` and 16 hex digits (a path segment, an ``Id``)."""
    return "desk-" + secrets.token_hex(8)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def looks_like_desk_token(value: str) -> bool:
    """Presented as a desk token (by its prefix), whether well formed or not."""
    return value.startswith(DESK_PREFIX)


@dataclass(frozen=True, slots=True)
class DeskToken:
    token_id: str
    site_id: str
    label: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> DeskToken:
        return cls(
            token_id=row["token_id"],
            site_id=row["site_id"],
            label=row["label"],
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
        )


class DeskTokens:
    """Create, revoke, list and resolve desk tokens; one per worker."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        redis_call: RedisCall,
        pg: PgAcquire,
        ttl: float = CACHE_TTL,
        stale_max: float = STALE_MAX,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._redis_call = redis_call  # the allocator's guard: timeout and breaker, 503
        self._pg = pg  # the allocator's guarded pool: 503 when PostgreSQL does not answer
        self.ttl = ttl
        self.stale_max = stale_max
        self._clock = monotonic
        # token hash -> (clock() when looked up, the token or None for "no such valid token")
        self._cache: dict[str, tuple[float, DeskToken | None]] = {}
        self._generation = 0  # bumped by forget(): a lookup older than that is not cached

    # -- operators ---------------------------------------------------------------------------

    async def create(self, site_id: str, label: str) -> tuple[str, DeskToken]:
        """A new token for ``site_id``: (the token, shown this once; its public record)."""
        token = new_token()
        async with self._pg() as con:
            try:
                row = await con.fetchrow(
                    "INSERT INTO desk_tokens (token_id, site_id, label, token_hash)"
                    " VALUES ($1, $2, $3, $4)"
                    " RETURNING token_id, site_id, label, created_at, revoked_at",
                    new_token_id(),
                    site_id,
                    label,
                    token_hash(token),
                )
            except asyncpg.ForeignKeyViolationError:
                raise InvalidRequest.one(
                    "site_id", f"there is no site {site_id!r} (PUT /api/v1/admin/sites first)"
                ) from None
        assert row is not None
        desk = DeskToken.from_row(row)
        log.info("desk token %s created for site %s", desk.token_id, desk.site_id)
        return token, desk

    async def revoke(self, token_id: str) -> DeskToken:
        """Revoke at once (again: the same answer); NotFound for an unknown ``token_id``."""
        async with self._pg() as con:
            row = await con.fetchrow(
                "UPDATE desk_tokens SET revoked_at = COALESCE(revoked_at, now())"
                " WHERE token_id = $1"
                " RETURNING token_id, site_id, label, created_at, revoked_at",
                token_id,
            )
        if row is None:
            raise NotFound(f"There is no desk token {token_id!r}.")
        desk = DeskToken.from_row(row)
        self.forget()
        try:
            await self._redis_call(topology.publish(self._redis, self._keys.desk_events, "revoked"))
        except RetryLater:  # Unavailable, or Overloaded (a timeout in a busy loop)
            # the revocation is in PostgreSQL: every worker acts on it within ``ttl`` anyway
            log.warning("desk token %s revoked; Redis did not take the announcement", token_id)
        log.info("desk token %s of site %s revoked", desk.token_id, desk.site_id)
        return desk

    async def list(self) -> list[DeskToken]:
        async with self._pg() as con:
            rows = await con.fetch(
                "SELECT token_id, site_id, label, created_at, revoked_at FROM desk_tokens"
                " ORDER BY site_id, created_at, token_id"
            )
        return [DeskToken.from_row(r) for r in rows]

    # -- authentication ----------------------------------------------------------------------

    async def resolve(self, token: str) -> DeskToken | None:
        """The valid (not revoked) desk token ``token`` is, or None. At most ``ttl`` old."""
        if not TOKEN_SHAPE.fullmatch(token):
            return None
        digest = token_hash(token)
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        generation = self._generation
        try:
            async with self._pg() as con:
                row = await con.fetchrow(
                    "SELECT token_id, site_id, label, created_at, revoked_at FROM desk_tokens"
                    " WHERE token_hash = $1 AND revoked_at IS NULL",
                    digest,
                )
        except Unavailable:
            if hit is not None and hit[1] is not None and now - hit[0] < self.stale_max:
                return hit[1]  # seen valid a moment ago; nobody can revoke it meanwhile
            raise
        found = DeskToken.from_row(row) if row is not None else None
        if generation == self._generation:  # no revocation was announced meanwhile
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (self._clock(), found)
        return found

    def forget(self) -> None:
        """Drop everything this worker remembers: the next use of any token looks it up."""
        self._generation += 1
        self._cache.clear()

    async def follow(self, stop: asyncio.Event, poll: float = 0.5) -> None:
        """Drop the cache whenever any worker or node announces a revocation (and after a
        lost subscription, since an announcement may have been missed meanwhile)."""
        while not stop.is_set():
            try:
                # cluster mode: one node's subscription hears all (allocator/topology.py)
                async with topology.subscription(self._redis, self._keys.desk_events) as ps:
                    self.forget()
                    while not stop.is_set():
                        msg = await ps.get_message(timeout=poll)
                        if msg and msg.get("type") == "message":
                            self.forget()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("desk events: %s: %s; resubscribing", type(exc).__name__, exc)
                self.forget()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
