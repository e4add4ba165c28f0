"""The guarded stores: every Redis and PostgreSQL call of a worker passes through here.

A store that fails or does not answer within ``timeout`` becomes ``Unavailable`` (with a
``retry_after``), never a hang. After a Redis connection failure or timeout the breaker stays open
for ``breaker`` seconds: calls then fail at once instead of each waiting out the timeout, and
the first call after that tries Redis again, so the worker recovers by itself.

In cluster mode (allocator/topology.py) there is one breaker per primary: a call that names its
``key`` opens and obeys only the breaker of the node serving that key, so one shard's failover
costs only the rounds on that shard. A call without a key has no breaker there (it waits out its
timeout at most): the snapshots every round needs (allocator/catalogue.py, allocator/tags.py)
name the key they read.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from redis.asyncio import Redis
from redis.exceptions import ClusterDownError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from allocator import topology
from allocator.db import TRANSIENT_PG_ERRORS
from allocator.errors import Overloaded, Unavailable
from allocator.looplag import LoopLag

log = logging.getLogger("allot.allocator")

T = TypeVar("T")


class Store:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool | None,
        *,
        timeout: float = 0.8,
        breaker: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
        on_redis_failure: Callable[[], None] = lambda: None,
        replica_wait: float = 0.0,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.timeout = timeout
        self.monotonic = monotonic  # the breaker's clock; tests pass a fake one
        self.loop_lag = LoopLag()  # its run() is started by the app, next to the dispatcher
        self._breaker = breaker
        self._down_until = 0.0
        self._cluster = topology.is_cluster(redis)
        # Cluster mode: the socket timeout (the same ``timeout``) must fire first. A cancelled
        # cluster pipeline never gives its connection back to the node's pool (redis-py 7.4),
        # and a few dozen of those exhaust it; a socket timeout closes the connection cleanly.
        # A claim or entry batch (``prompt``) is given the deadline too, but waited for at most
        # ``timeout`` (:meth:`_waited`): a call that also had to connect (a hung node accepts
        # the connection and says nothing) ran to the deadline, and a claim's 503 came after
        # 1.0 s instead of 0.8 (tests/test_cluster.py, a hung shard). Never less than what its
        # replica waits may take when they answer (``replica_wait``, ``[redis] wait_timeout_ms``
        # when waited for): twice, after a NOSCRIPT (allocator/topology.py, ReplicaWait.run).
        self._deadline = timeout + 0.2 if self._cluster else timeout
        self._prompt = min(self._deadline, max(timeout, 2 * replica_wait + 0.1))
        self._node_down_until: dict[str, float] = {}  # cluster mode: host:port -> until
        # the Redis that answers after a failure may be an older copy: the loss watch
        # (allocator/losswatch.py) compares it with the ledger before trusting it again
        self._on_redis_failure = on_redis_failure

    async def redis_call(
        self, aw: Awaitable[T], *, key: str | None = None, prompt: bool = False
    ) -> T:
        """Await a Redis call, turning any store failure into a prompt Unavailable. ``key``: a
        key the call touches, whose node's breaker applies in cluster mode. ``prompt`` (a
        claim or entry batch, whose citizens wait): in cluster mode, waited for at most
        ``timeout`` in all (or its replica waits), not to the deadline."""
        node = topology.node_name(self.redis, key) if self._cluster and key else None
        if self._open(node):
            if inspect.iscoroutine(aw):
                aw.close()  # never awaited: close it, or Python warns
            raise Unavailable("The reservation store is not answering; please try again.")
        try:
            if self._cluster and prompt:
                return await self._waited(aw)
            async with asyncio.timeout(self._deadline):
                return await aw
        except ResponseError as exc:
            if isinstance(exc, NoScriptError) or _is_transient_response(exc):
                self._on_redis_failure()  # LOADING, or an empty script cache: a new server
                topology.mark_stale(self.redis)
            else:
                log.error("redis refused a command: %s", exc)
            raise Unavailable("The reservation store is busy; please try again.") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            self._on_redis_failure()
            topology.mark_stale(self.redis, node)  # cluster mode: a primary may have changed
            if isinstance(exc, TimeoutError | RedisTimeoutError) and self.loop_lag.saturated():
                # the reply most likely sat unread while this worker was saturated: shed load
                raise Overloaded("Too busy right now; please try again.", retry_after=1) from exc
            if not self._cluster:
                self._down_until = self.monotonic() + self._breaker
            elif node is not None:
                self._node_down_until[node] = self.monotonic() + self._breaker
            log.warning("redis: %s: %s", type(exc).__name__, exc)
            raise Unavailable("The reservation store is not answering; please try again.") from exc

    async def _waited(self, aw: Awaitable[T]) -> T:
        """Cluster mode: the call, waited for at most ``_prompt`` (then TimeoutError). Past that
        it is left to finish in the background, within its deadline, never cancelled by the
        wait (see ``_deadline``); its outcome is dropped. Leaving a claim batch that
        way is safe as a timeout is: the claim may have been made, and its retry gets the same
        reservation back (claim.lua's "existing"), as every script's retry does its own."""
        call = asyncio.ensure_future(_within(aw, self._deadline))
        try:
            done, _ = await asyncio.wait((call,), timeout=self._prompt)
        except asyncio.CancelledError:
            call.add_done_callback(_dropped)  # the caller went away; the call ends by itself
            raise
        if not done:
            call.add_done_callback(_dropped)
            raise TimeoutError(f"no answer within {self._prompt} s")
        return call.result()

    def refuse_if_down(self, key: str) -> None:
        """Unavailable now when the breaker that a call on ``key`` obeys is open: for a batch,
        before its other work (the floor from the ledger, snapshots), which would only delay
        the same answer."""
        node = topology.node_name(self.redis, key) if self._cluster else None
        if self._open(node):
            raise Unavailable("The reservation store is not answering; please try again.")

    def _open(self, node: str | None) -> bool:
        if self._cluster:
            down_until = self._node_down_until.get(node, 0.0) if node else 0.0
        else:
            down_until = self._down_until
        return self.monotonic() < down_until

    def nodes_down(self) -> list[str]:
        """Cluster mode: the primaries whose breaker is open now."""
        now = self.monotonic()
        return sorted(n for n, until in self._node_down_until.items() if until > now)

    @asynccontextmanager
    async def pg(self) -> AsyncIterator[PoolConnectionProxy]:
        """A ledger connection, or Unavailable when PostgreSQL is not configured or answering."""
        if self.pool is None:
            raise Unavailable("The ledger database is not configured.")
        try:
            async with self.pool.acquire(timeout=2) as con:
                yield con
        except TRANSIENT_PG_ERRORS as exc:
            raise Unavailable("The ledger database is not answering; please try again.") from exc


async def _within(aw: Awaitable[T], deadline: float) -> T:
    async with asyncio.timeout(deadline):
        return await aw


def _dropped(call: asyncio.Future[Any]) -> None:
    """The outcome of a call nobody waits for any more: retrieved, so that asyncio does not
    log it as never retrieved; the failure was already counted when the wait ran out."""
    if not call.cancelled():
        call.exception()


def _is_transient_response(exc: ResponseError) -> bool:
    # CLUSTERDOWN: a cluster node refuses while a shard has no primary (a failover under way)
    return isinstance(exc, ClusterDownError) or str(exc).startswith(
        ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")
    )
