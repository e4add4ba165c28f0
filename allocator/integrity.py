"""Loss seen: noticing that Redis has lost changes which the ledger in PostgreSQL already has.

Redis decides and the ledger writer copies each change into PostgreSQL a moment later. If Redis
then loses its most recent writes (a power loss with ``appendfsync everysec``, an old AOF
restored, an emptied or replaced server), PostgreSQL holds reservations that Redis no longer
knows: their owners would be told not-found, could reserve again, and the stock would be handed
out twice.

The guard is a sequence number per round:

* every script that changes a round (claim, cancel, pickup, load_batch, expire, carry) bumps the
  round's ``seq`` (tally field) and writes it into the ledger entry, in the same atomic step;
* the ledger writer raises ``rounds.ledger_seq`` to the highest committed ``seq``, in the same
  transaction as the rows (``GREATEST``, so redelivery or reordering never lowers it);
* every worker keeps a copy of ``ledger_seq`` per round (:class:`Floors`, a lower bound of the
  truth) and passes it to each script as its floor. A Redis whose ``seq`` is below the floor
  has lost changes: the script marks the round lost (tally field ``lost``), changes nothing, and
  every later call on the round, by any worker, is refused until ``allot rebuild`` rewrites it.

This module holds the pieces that neither the scripts nor the allocator own: the worker's
floors, the description of a lost round, and the one query of the ledger's marks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy
from redis.asyncio import Redis

from allocator.keys import Keys
from allocator.scripts import script_source

LEDGER_MARKS = "SELECT round_id, ledger_seq FROM rounds"

RAISE_LEDGER_SEQ = (
    "UPDATE rounds SET ledger_seq = GREATEST(ledger_seq, $2) WHERE round_id = $1"
    " AND ledger_seq < $2"
)

# The same for several rounds in one statement: one (round_id, seq) per round.
RAISE_LEDGER_SEQS = (
    "UPDATE rounds r SET ledger_seq = GREATEST(r.ledger_seq, m.seq)"
    " FROM unnest($1::text[], $2::bigint[]) AS m(round_id, seq)"
    " WHERE r.round_id = m.round_id AND r.ledger_seq < m.seq"
)


async def ledger_marks(con: asyncpg.Connection | PoolConnectionProxy) -> dict[str, int]:
    """round_id -> the highest change sequence number the ledger has committed, for every round."""
    return {r["round_id"]: int(r["ledger_seq"]) for r in await con.fetch(LEDGER_MARKS)}


def tally_counts(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    """The round's tally hash as counters: everything but the ``lost`` mark."""
    return {k.decode(): int(v) for k, v in raw.items() if k != b"lost"}


async def check_round(
    redis: Redis, keys: Keys, round_id: str, floor: int, tag: str | None = None
) -> Lost | None:
    """integrity.lua for one round, outside a worker (reconcile, rebuild): Lost, or None.
    ``tag``: the hash tag of the round's keys (allocator/tags.py)."""
    rk = keys.round(round_id, tag)
    script = redis.register_script(script_source("integrity"))
    reply = await script(keys=[rk.round, rk.tally], args=[floor])
    if reply[0] == b"lost":
        return Lost.from_mark(round_id, reply[1], in_redis=bool(int(reply[2])))
    return None


@dataclass(frozen=True, slots=True)
class Lost:
    """A round whose Redis state is behind the ledger, as the mark in its tally says."""

    round_id: str
    redis_seq: int  # the round's seq in Redis when the loss was first seen
    ledger_seq: int  # the ledger's high-water mark then
    at_ms: int  # when it was first seen (Redis TIME)
    in_redis: bool = True  # False: the round hash itself is gone (the whole dataset was lost)

    @classmethod
    def from_mark(cls, round_id: str, mark: bytes | str, *, in_redis: bool = True) -> Lost:
        m: dict[str, Any] = orjson.loads(mark)
        return cls(round_id, int(m["redis"]), int(m["ledger"]), int(m["at"]), in_redis)

    @property
    def since(self) -> str:
        return dt.datetime.fromtimestamp(self.at_ms / 1000, dt.UTC).isoformat(timespec="seconds")

    def describe(self) -> str:
        if not self.in_redis or self.redis_seq == 0:
            what = "Redis no longer holds the round"
        else:
            what = f"Redis holds it only up to change {self.redis_seq}"
        return (
            f"round {self.round_id}: Redis has lost data the ledger has ({what}; the ledger has"
            f" {self.ledger_seq} changes), since {self.since}; refused until"
            f" `allot rebuild --round {self.round_id}`"
        )

    def public(self) -> dict[str, Any]:
        return {
            "round_id": self.round_id,
            "since": self.since,
            "redis_seq": self.redis_seq,
            "ledger_seq": self.ledger_seq,
            "detail": self.describe(),
        }


class Floors:
    """One worker's copy of the ledger's high-water mark per round.

    A lower bound of the truth: it only rises, from the ledger's own query (about once a second)
    and from this worker's ledger commits. A round the ledger does not know has no floor (-1).
    Until the first load, and after any Redis failure (the Redis that comes back may be an older
    one), the floors are *suspect*: the next script call first reloads them from PostgreSQL,
    so that a restored Redis is compared with everything the ledger has, before it has taken any
    new change that could lift its ``seq`` back over the floor.
    """

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._failures = 1  # counts Redis failures (and the start); reloads catch up with it
        self._reloaded = 0

    def get(self, round_id: str) -> int:
        return self._values.get(round_id, -1)

    def knows(self, round_id: str) -> bool:
        """The ledger has this round (so Redis must have it too)."""
        return round_id in self._values

    def rounds(self) -> list[str]:
        return sorted(self._values)

    @property
    def suspect(self) -> bool:
        return self._reloaded < self._failures

    def redis_failed(self) -> None:
        self._failures += 1

    def generation(self) -> int:
        """Taken before a reload starts; ``loaded(generation)`` clears suspicion up to it."""
        return self._failures

    def load(self, marks: Mapping[str, int], generation: int | None = None) -> None:
        """The ledger's marks as just read; with the generation taken before reading them."""
        for round_id, seq in marks.items():
            self.raise_to(round_id, seq)
        if generation is not None:
            self.settle(generation)

    def settle(self, generation: int) -> None:
        """Stop suspecting failures up to ``generation`` (reloaded, or the ledger is down too)."""
        self._reloaded = max(self._reloaded, generation)

    def raise_to(self, round_id: str, seq: int) -> None:
        if seq > self._values.get(round_id, -1):
            self._values[round_id] = seq
