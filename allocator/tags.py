"""Which hash tag a round's Redis keys use: ``r:<round_id>``, or ``p:<programme>`` for a round of
a programme (allocator/keys.py says why).

The ``round-tags`` hash holds round_id -> tag. It is written when a round is created or moved
(allocator/operators.py) and by ``allot rebuild``; PostgreSQL keeps the same in
``rounds.key_tag``. A round missing from the hash uses ``r:<round_id>`` (rounds created before
programmes existed, until their next ``PUT`` or ``allot rebuild`` writes their entry, and rounds
that do not exist). A round's tag changes only while the round has
not opened and holds nothing in Redis but its definition (no batch, no reservation), so a worker
may serve a snapshot of the hash up to ``ttl`` old (a claim or entry batch: up to twice that, see
``round_keys``): in the second or two after such a move its requests for the round find no
round under the old tag (404, or 503 when the ledger has it) and change nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from allocator.cache import TtlCache
from allocator.errors import Unavailable
from allocator.keys import Keys, RoundKeys
from allocator.redistyping import awaited
from allocator.store import Store


async def load_tags(redis: Redis, keys: Keys) -> dict[str, str]:
    """round_id -> tag, for every round in the ``round-tags`` hash (outside a worker)."""
    raw = await awaited(redis.hgetall(keys.round_tags))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def round_keys(redis: Redis, keys: Keys, round_id: str) -> RoundKeys:
    """The round's keys, its tag read from Redis now (outside a worker)."""
    tag = await awaited(redis.hget(keys.round_tags, round_id))
    # redis-py types replies as str; this client returns bytes (decode_responses is off)
    text = tag.decode() if isinstance(tag, bytes) else tag
    return keys.round(round_id, text)


async def ledger_tag(con: Any, round_id: str) -> str | None:
    """The round's tag as the ledger records it (``rounds.key_tag``; rounds written before it
    existed are in no programme: ``r:<round_id>``); None when the ledger lacks the round."""
    row = await con.fetchrow("SELECT key_tag, programme FROM rounds WHERE round_id = $1", round_id)
    if row is None:
        return None
    return str(row["key_tag"] or Keys.tag_for(round_id, row["programme"]))


MISS_EVERY = 0.1  # seconds between fresh loads for rounds missing from a worker's snapshot


class RoundTags:
    """A worker's snapshot of the ``round-tags`` hash, loaded once per ``ttl`` (single flight)."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        *,
        ttl: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.keys = keys
        self.monotonic = monotonic
        self._ttl = ttl
        self._cache: TtlCache[None, dict[str, str]] = TtlCache(ttl, monotonic)
        self._last_miss = -MISS_EVERY

    async def all(self, *, fresh: bool = False, prompt: bool = False) -> dict[str, str]:
        async def load() -> dict[str, str]:
            raw = await self.store.redis_call(
                awaited(self.store.redis.hgetall(self.keys.round_tags)), key=self.keys.round_tags
            )
            return {k.decode(): v.decode() for k, v in raw.items()}

        if fresh:
            self._cache.invalidate()
            return await self._cache.get(None, load)
        # a round's tag never changes once set: while the hash's node fails over, the last
        # snapshot serves (cluster mode; a single Redis down fails the call after it anyway)
        return await self._cache.get_or_last(
            None, load, Unavailable, grace=self._ttl if prompt else 0.0
        )

    async def round_keys(
        self, round_id: str, *, fresh: bool = False, prompt: bool = False
    ) -> RoundKeys:
        """The round's keys. A round missing from the snapshot (created a moment ago on another
        worker, or unknown) is looked up afresh, at most once per MISS_EVERY seconds, so that
        requests for made-up round ids cannot make every request reload the hash.

        ``prompt`` (a claim or entry batch): a snapshot expired less than ``ttl`` ago serves
        while a fresh one loads in the background, so the batch's one Redis wait is its
        script's. Awaiting the reload, a batch waited out a hung node's timeout twice: for
        the hash, then for its script on another node (tests/test_cluster.py, a hung cluster)."""
        tags = await self.all(fresh=fresh, prompt=prompt)
        if round_id not in tags and not fresh:
            now = self.monotonic()
            if now - self._last_miss >= MISS_EVERY:
                self._last_miss = now
                tags = await self.all(fresh=True)
        return self.keys.round(round_id, tags.get(round_id))

    def forget(self) -> None:
        self._cache.invalidate()
