"""Expiry: after a round's ``pickup_end``, its uncollected reservations are recorded as expired.

Every worker runs ``Expiry.run``: about every ``SWEEP_EVERY`` seconds it looks at each round whose
pickup window has ended and runs lua/expire.lua over the round's reservations in chunks of
``CHUNK`` (one HSCAN step per call, so no call holds Redis for long). Each chunk moves the
``confirmed`` reservations it finds to ``expired`` (units from ``reserved:<site>`` to
``expired:<site>``, ``seq`` bumped, one ledger entry each): atomic and idempotent, so a chunk run
twice, or by two workers at once, moves each reservation exactly once.

Runners are coordinated by a lock in the round's sweep hash, under the round's hash tag: the
first runner takes it for ``LOCK_MS`` and renews it with every chunk, the others are told
``busy`` and skip the round until their next pass. A runner that dies leaves the lock to run out;
the next one starts the round again from the beginning (finding nothing left to do for what was
done). A finished sweep marks the round ``done`` for its pickup_end, so later passes cost one
short script call per round; moving pickup_end gives the round a new sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from allocator.catalogue import Catalogue
from allocator.errors import RetryLater, RoundLost
from allocator.keys import Keys
from allocator.losswatch import LossWatch
from allocator.model import to_ms
from allocator.scripts import Scripts
from allocator.store import Store

log = logging.getLogger("allot.expiry")

SWEEP_EVERY = 10.0  # seconds between a worker's passes: expiry lands within ~10 s of pickup_end
CHUNK = 200  # reservations looked at per script call (the HSCAN COUNT)
LOCK_MS = 30_000  # a runner's lock on a round, renewed with every chunk


@dataclass(frozen=True, slots=True)
class SweepResult:
    round_id: str
    status: str  # swept | done | not-yet | busy | no-round
    expired: int  # reservations this runner moved to expired


class Expiry:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        scripts: Scripts,
        catalogue: Catalogue,
        watch: LossWatch,
        *,
        clock: Callable[[], float] = time.time,
        chunk: int = CHUNK,
        lock_ms: int = LOCK_MS,
    ) -> None:
        self.store = store
        self.keys = keys
        self.scripts = scripts
        self.catalogue = catalogue
        self.watch = watch
        self.clock = clock
        self.chunk = chunk
        self.lock_ms = lock_ms
        # unique to this runner: the lock's owner (host, process, and a random part)
        self.runner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    async def sweep_round(self, round_id: str, *, locked: bool = True) -> SweepResult:
        """Run expire.lua over the round to the end (or until told done, busy, not yet).
        ``locked=False`` runs without the lock and the done mark: the carry-over uses it to make
        sure nothing confirmed is left, without waiting for another runner."""
        rk = await self.catalogue.round_keys(round_id)
        cursor = "0"
        expired = 0
        while True:
            floor = await self.watch.floor(round_id)
            # Not through ReplicaWait ([redis] wait_replicas): the sweep answers nobody. A chunk
            # that a failover undoes leaves those reservations confirmed on the promoted replica
            # (the ledger, which WAITs too, never saw them expire), and the next pass expires
            # them again. The carry-over's sweep (locked=False) is covered by the WAIT after its
            # carry.lua on the same primary (allocator/carryover.py).
            reply = await self.store.redis_call(
                self.scripts.expire(
                    keys=[rk.round, rk.reservations, rk.tally, rk.ledger, rk.sweep],
                    args=[cursor, self.chunk, self.runner if locked else "", self.lock_ms, floor],
                )
            )
            status = self.watch.whole_or_lost(round_id, reply)  # RoundLost when lost
            if status != "swept":
                return SweepResult(round_id, status, expired)
            expired += int(reply[2])
            cursor = reply[1].decode()
            if cursor == "0":
                if expired:
                    log.info("round %s: %d reservation(s) expired", round_id, expired)
                return SweepResult(round_id, status, expired)

    async def sweep(self) -> list[SweepResult]:
        """One pass: every round whose pickup window has ended by this worker's clock (the
        script decides by Redis TIME). A lost round is skipped: it is refused until rebuilt."""
        now_ms = int(self.clock() * 1000)
        results = []
        for rnd in await self.catalogue.rounds():
            if to_ms(rnd.pickup_end) > now_ms:
                continue
            try:
                results.append(await self.sweep_round(rnd.round_id))
            except RoundLost:
                continue
        return results

    async def run(self, stop: asyncio.Event, every: float = SWEEP_EVERY) -> None:
        """In every worker until ``stop``: a pass about every ``every`` seconds."""
        while not stop.is_set():
            try:
                await self.sweep()
            except RetryLater:  # Unavailable, or Overloaded (a timeout in a busy loop)
                pass  # Redis is down: the breaker and /readyz say so; the next pass retries
            except (RedisError, OSError, TimeoutError) as exc:  # a store hiccup, not a bug
                log.warning(
                    "expiry sweep: %s: %s; retrying at the next pass", type(exc).__name__, exc
                )
            except Exception:
                log.exception("expiry sweep failed; retrying at the next pass")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
