"""Loss seen: each worker compares Redis with the ledger's high-water marks and refuses a round
Redis has lost data of (allocator/integrity.py holds the marks and the verdicts).

Every script that changes a round is passed the round's floor (``floor``); a reply ``lost`` is
recorded here (``whole_or_lost``), and the round is refused (``RoundLost``, unavailable) until
``allot rebuild`` heals it. ``watch`` checks every round once a second even when nobody changes
it; ``ping`` is the readiness check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from allocator import topology
from allocator.errors import RetryLater, RoundLost, Unavailable
from allocator.integrity import Floors, Lost, ledger_marks
from allocator.keys import Keys
from allocator.redistyping import awaited
from allocator.scripts import Scripts
from allocator.store import Store
from allocator.tags import RoundTags

log = logging.getLogger("allot.allocator")

FLOOR_WAIT = 0.5  # seconds a script call waits for the ledger's marks after a Redis failure
WATCH_EVERY = 1.0  # seconds between a worker's integrity checks of every round
LOST_LOG_EVERY = 60.0  # seconds between ERROR lines for a round that stays lost
LOST_RETRY_AFTER = 10  # seconds: a lost round stays refused until an operator rebuilds it


def round_refusal() -> RoundLost:
    """What a citizen or an operator is told about a round Redis has lost data of."""
    return RoundLost(
        "This round's reservations are being restored after a fault; please try again later.",
        retry_after=LOST_RETRY_AFTER,
    )


class LossWatch:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        scripts: Scripts,
        floors: Floors,
        tags: RoundTags,
        *,
        forget: Callable[[str], None] = lambda round_id: None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.scripts = scripts
        self.floors = floors
        self.tags = tags
        # called with a round found lost or whole again: what a worker remembers of it
        # (cached snapshots, sold-out marks) must not outlive the finding
        self.forget = forget
        self._floor_reload: asyncio.Future[None] | None = None
        self._lost: dict[str, Lost] = {}
        self._lost_logged: dict[str, float] = {}
        self._marks_warned = -LOST_LOG_EVERY

    # -- the floor passed to the scripts ------------------------------------------------------

    async def floor(self, round_id: str) -> int:
        """The floor to pass to a script: the ledger's high-water mark for the round, reloaded
        first (for at most FLOOR_WAIT) when Redis failed since the last load, or -1."""
        if self.floors.suspect and self.store.pool is not None:
            task = self._floor_reload
            if task is None or task.done():
                task = self._floor_reload = asyncio.ensure_future(self._reload_floors())
                task.add_done_callback(_retrieved)  # a caller that stopped waiting left it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), FLOOR_WAIT)
        return self.floors.get(round_id)

    async def _reload_floors(self) -> None:
        generation = self.floors.generation()
        try:
            async with asyncio.timeout(2 * FLOOR_WAIT):
                async with self.store.pg() as con:
                    marks = await ledger_marks(con)
        except (Unavailable, TimeoutError, OSError, asyncpg.PostgresError) as exc:
            # without the ledger, compare with the last marks known (they only ever rise)
            now = self.store.monotonic()
            if now - self._marks_warned >= LOST_LOG_EVERY:
                self._marks_warned = now
                log.warning(
                    "the ledger's marks are not readable (%s); comparing Redis with the last ones",
                    type(exc).__name__,
                )
            self.floors.settle(generation)
            return
        self.floors.load(marks, generation)

    # -- checks -------------------------------------------------------------------------------

    async def integrity(self, round_ids: Sequence[str]) -> dict[str, Lost | str]:
        """Each round compared with the ledger's mark (marking it lost when Redis is behind):
        a Lost, ``"missing"`` (the ledger has the round, Redis not), ``"absent"`` (neither has
        it) or ``"ok"``. Records what it finds."""
        if not round_ids:
            return {}
        tags = await self.tags.all()
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for round_id in round_ids:
                rk = self.keys.round(round_id, tags.get(round_id))
                await self.scripts.integrity(
                    keys=[rk.round, rk.tally], args=[self.floors.get(round_id)], client=pipe
                )
            replies = await self.store.redis_call(pipe.execute())
        verdicts: dict[str, Lost | str] = {}
        for round_id, reply in zip(round_ids, replies, strict=True):
            exists = bool(int(reply[2]))
            if reply[0] == b"lost":
                lost = Lost.from_mark(round_id, reply[1], in_redis=exists)
                self.note_lost(lost)
                verdicts[round_id] = lost
                continue
            self.seen_whole(round_id)
            if exists:
                verdicts[round_id] = "ok"
            else:
                verdicts[round_id] = "missing" if self.floors.knows(round_id) else "absent"
        return verdicts

    async def check(self, round_id: str) -> Lost | None:
        """What Redis has lost of the round, checked now; None when it is whole."""
        verdict = (await self.integrity([round_id]))[round_id]
        return verdict if isinstance(verdict, Lost) else None

    async def verify(self, round_id: str) -> None:
        """Raise RoundLost when Redis is behind the ledger on this round."""
        await self.floor(round_id)
        if await self.check(round_id) is not None:
            raise round_refusal()

    async def ping(self) -> None:
        """Readiness: Redis runs a real script, PostgreSQL answers, and Redis holds every round
        the ledger has, none of them behind it; else Unavailable naming each round that is not.
        In cluster mode every primary serving one of the ledger's rounds must answer PING (all
        primaries when there is no round yet), else Unavailable naming it."""
        cluster = topology.is_cluster(self.store.redis)
        if not cluster:
            await self.store.redis_call(awaited(self.store.redis.eval("return 1", 0)))
        generation = self.floors.generation()
        async with self.store.pg() as con:
            marks = await ledger_marks(con)
        self.floors.load(marks, generation)
        if cluster:
            await self._primaries_answer(sorted(marks))
        verdicts = await self.integrity(sorted(marks))
        lost = [v for v in verdicts.values() if isinstance(v, Lost)]
        missing = sorted(r for r, v in verdicts.items() if v == "missing")
        if lost or missing:
            details = [v.describe() for v in lost] + [
                f"round {r}: in the ledger but not in Redis; `allot rebuild --round {r}`"
                for r in missing
            ]
            raise Unavailable(
                "Redis does not hold what the ledger has: " + "; ".join(details),
                retry_after=LOST_RETRY_AFTER,
                lost_rounds=sorted([v.round_id for v in lost] + missing),
            )

    async def _primaries_answer(self, round_ids: Sequence[str]) -> None:
        """Cluster mode: Unavailable naming each primary of these rounds that does not answer."""
        try:
            tags = await self.tags.all()
        except RetryLater:  # Unavailable, or Overloaded (a timeout in a busy loop)
            tags = {}  # the node of the round-tags hash is down: the rounds' own tags, then
        keys = {r: self.keys.round(r, tags.get(r)).round for r in round_ids}
        try:
            async with asyncio.timeout(2 * self.store.timeout + 0.5):
                down = await topology.down_primaries(
                    self.store.redis, list(keys.values()), self.store.timeout
                )
        except TimeoutError:
            down = ["(the cluster does not answer)"]
        if not down:
            return
        serving: dict[str, list[str]] = {}
        for round_id, key in keys.items():
            node = topology.node_name(self.store.redis, key) or "?"
            serving.setdefault(node, []).append(round_id)
        details = [
            f"Redis primary {node} is not answering"
            + (f" (rounds {', '.join(serving[node])})" if serving.get(node) else "")
            for node in down
        ]
        raise Unavailable("; ".join(details), retry_after=1)

    async def watch(self, stop: asyncio.Event, every: float = WATCH_EVERY) -> None:
        """In every worker: reload the ledger's marks and check every round, once a second,
        so that a lost round is refused, logged and shown even when nobody changes it."""
        await self.check_persistence()
        while not stop.is_set():
            try:
                if self.store.pool is not None:
                    await self._reload_floors()
                await self.integrity(self.floors.rounds())
            except RetryLater:  # Unavailable, or Overloaded (a timeout in a busy loop)
                pass  # Redis is down: the breaker and /readyz say so
            except Exception:
                log.exception("integrity check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def check_persistence(self) -> None:
        """Warn once when Redis may lose acknowledged writes on a power loss."""
        try:
            async with asyncio.timeout(self.store.timeout):
                config = await awaited(self.store.redis.config_get("appendonly", "appendfsync"))
        except (RedisError, OSError, TimeoutError):
            return  # Redis not up yet, or CONFIG disabled (managed Redis): nothing to say
        appendonly = _text(config.get("appendonly", config.get(b"appendonly")))
        appendfsync = _text(config.get("appendfsync", config.get(b"appendfsync")))
        if appendonly != "yes" or appendfsync != "always":
            log.warning(
                "redis runs with appendonly %s, appendfsync %s: a power loss can lose reservations"
                " already answered 201; set appendonly yes, appendfsync always"
                " (docs/architecture.md, failure modes)",
                appendonly,
                appendfsync,
            )

    # -- what this worker knows ---------------------------------------------------------------

    def knows(self, round_id: str) -> bool:
        """The ledger has this round (so Redis lacking it is a loss, not "no such round")."""
        return self.floors.knows(round_id)

    def any_lost(self) -> bool:
        return bool(self._lost)

    def refuse_if_lost(self, round_id: str) -> None:
        if round_id in self._lost:
            raise round_refusal()

    def whole_or_lost(self, round_id: str, reply: list[bytes]) -> str:
        """The reply's status; a ``lost`` reply is recorded and raised as RoundLost."""
        status = reply[0].decode()
        if status == "lost":
            self.note_lost(Lost.from_mark(round_id, reply[1]))
            raise round_refusal()
        self.seen_whole(round_id)
        return status

    def note_lost(self, lost: Lost) -> None:
        """Record a lost round; log it at ERROR when first seen, and once a minute after."""
        self._lost[lost.round_id] = lost
        self.forget(lost.round_id)  # no answer from memory of a round in doubt
        now = self.store.monotonic()
        if now - self._lost_logged.get(lost.round_id, -LOST_LOG_EVERY) >= LOST_LOG_EVERY:
            self._lost_logged[lost.round_id] = now
            log.error("%s", lost.describe())

    def seen_whole(self, round_id: str) -> None:
        if self._lost.pop(round_id, None) is not None:
            self._lost_logged.pop(round_id, None)
            self.forget(round_id)
            log.warning("round %s: Redis agrees with the ledger again (rebuilt); serving", round_id)

    def lost_rounds(self) -> list[Lost]:
        """The rounds this worker knows to be lost."""
        return [self._lost[r] for r in sorted(self._lost)]


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("reloading the ledger's marks failed: %r", future.exception())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
