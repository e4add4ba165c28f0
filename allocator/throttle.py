"""Failed authentications, counted per client address and shared by every worker through Redis.

At most ``limit`` failures per address in a fixed window of ``window`` seconds (from the first
failure); then every attempt from that address, right or wrong, is refused (``RateLimited``,
its ``retry_after`` the rest of the window) until the window ends, so a guess that happens to
be right teaches the guesser nothing. Each scope keeps its own count: ``operator`` for the
operator token, ``desk`` for desk tokens (``service/auth.py`` calls ``check`` before looking at
the token and ``failed`` when it is wrong; a bearer value with the desk tokens' prefix counts as
a desk attempt, any other as an operator one).

Redis: one key per scope and address hash (``Keys.auth_failures``), a counter that expires with
its window; one round trip per check and per failure. Each worker also remembers the blocks it
has seen, so a guesser's flood is refused from memory, without Redis.
Addresses appear in keys and logs only as keyed hashes; tokens appear nowhere.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from allocator.errors import RateLimited
from allocator.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from allocator.facade import Allocator

log = logging.getLogger("allot.auth")

OPERATOR = "operator"
DESK = "desk"
_MEMO_MAX = 10_000


class FailureThrottle:
    def __init__(
        self,
        allocator: Allocator,
        *,
        limit: int,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allocator = allocator
        self.limit = limit
        self.window = window
        self._clock = clock
        self._blocked: dict[str, float] = {}  # key -> clock() when the block ends (this worker)
        self._log = RateLimitedLog(log)

    def _key(self, scope: str, client: str) -> tuple[str, str]:
        digest = self._allocator.hasher.client(client)
        return self._allocator.keys.auth_failures(scope, digest), digest[:12]

    def _refuse(self, seconds: float) -> RateLimited:
        return RateLimited(
            "Too many failed sign-in attempts from your address; please wait.",
            retry_after=max(1.0, seconds),
        )

    async def check(self, scope: str, client: str) -> None:
        """Raise RateLimited while ``client`` is blocked in ``scope``."""
        if self.limit <= 0:
            return
        key, _ = self._key(scope, client)
        now = self._clock()
        until = self._blocked.get(key)
        if until is not None:
            if now < until:
                raise self._refuse(until - now)
            del self._blocked[key]
        redis = self._allocator.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            count, ttl_ms = await self._allocator.store.redis_call(pipe.execute())  # its 503 guard
        if count is not None and int(count) >= self.limit and ttl_ms > 0:
            self._remember(key, now + ttl_ms / 1000)
            raise self._refuse(ttl_ms / 1000)

    async def failed(self, scope: str, client: str) -> None:
        """Count one failure of ``client`` in ``scope``, and log it (hashed, rate-limited)."""
        if self.limit <= 0:
            return
        key, who = self._key(scope, client)
        window_ms = max(1, math.ceil(self.window * 1000))
        redis = self._allocator.redis
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, nx=True, px=window_ms)
            pipe.incr(key)
            pipe.pttl(key)
            _, count, ttl_ms = await self._allocator.store.redis_call(pipe.execute())
        if count >= self.limit:
            ttl = ttl_ms / 1000 if ttl_ms > 0 else self.window
            self._remember(key, self._clock() + ttl)
            self._log.warning(
                f"{scope}:blocked",
                "%s authentication: client %s blocked for %d s after %d failures",
                scope,
                who,
                math.ceil(ttl),
                count,
            )
        else:
            self._log.warning(
                f"{scope}:failed",
                "%s authentication failed for client %s (%d of %d allowed in %g s)",
                scope,
                who,
                count,
                self.limit,
                self.window,
            )

    def _remember(self, key: str, until: float) -> None:
        if len(self._blocked) >= _MEMO_MAX:
            now = self._clock()
            self._blocked = {k: u for k, u in self._blocked.items() if u > now}
            if len(self._blocked) >= _MEMO_MAX:
                return  # Redis still refuses them; only the memo is full
        self._blocked[key] = until
