"""The allocator: every citizen and operator action, decided in Redis, recorded in PostgreSQL.

Handlers call these methods and never touch Redis or PostgreSQL themselves. Each method either
returns a value or raises a ``Problem`` from allocator.errors; store failures become
``Unavailable`` (503 with Retry-After) within the configured timeout, never a hang.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from allocator.cache import TtlCache
from allocator.config import GateSettings
from allocator.db import TRANSIENT_PG_ERRORS
from allocator.errors import (
    AlreadyReserved,
    BatchConflict,
    InvalidRequest,
    NotCollectable,
    NotFound,
    Overloaded,
    Problem,
    RateLimited,
    RoundLost,
    RoundNotOpen,
    SoldOut,
    Unavailable,
)
from allocator.identity import Hasher, mask_citizen_id
from allocator.integrity import Floors, Lost, ledger_marks, tally_counts
from allocator.keys import Keys, RoundKeys
from allocator.looplag import LoopLag
from allocator.model import (
    PICKUP_ALPHABET,
    RESERVATION_ID,
    Reservation,
    Round,
    Site,
    ms_to_rfc3339,
    to_ms,
)
from allocator.redistyping import awaited
from allocator.scripts import Scripts
from allocator.soldout import SoldOutBoard

log = logging.getLogger("allot.allocator")

T = TypeVar("T")

LEDGER_GROUP = "ledger"
CODE_CANDIDATES = 3
SNAPSHOT_TTL = 1.0  # seconds a worker may serve a cached round, site list or stock snapshot
FLOOR_WAIT = 0.5  # seconds a script call waits for the ledger's marks after a Redis failure
WATCH_EVERY = 1.0  # seconds between a worker's integrity checks of every round
LOST_LOG_EVERY = 60.0  # seconds between ERROR lines for a round that stays lost
LOST_RETRY_AFTER = 10  # seconds: a lost round stays refused until an operator rebuilds it


# byte -> letter: the alphabet has 32 letters, so byte % 32 is uniform (40 random bits a code)
_TO_LETTER = bytes(ord(PICKUP_ALPHABET[b % 32]) for b in range(256))
_ID_BYTES = 16  # 128 random bits in every reservation_id
_ITEM_BYTES = _ID_BYTES + 8 * CODE_CANDIDATES


def fresh_identifiers(round_id: str, count: int) -> list[tuple[str, list[str]]]:
    """A new reservation_id and CODE_CANDIDATES pickup codes for each of ``count`` claims, all
    from one read of the OS's random source (not one per identifier or per character)."""
    raw = os.urandom(_ITEM_BYTES * count)
    fresh = []
    for i in range(0, len(raw), _ITEM_BYTES):
        token = base64.urlsafe_b64encode(raw[i : i + _ID_BYTES]).rstrip(b"=").decode()
        letters = raw[i + _ID_BYTES : i + _ITEM_BYTES].translate(_TO_LETTER).decode()
        codes = [letters[j : j + 8] for j in range(0, len(letters), 8)]
        fresh.append((f"{token}.{round_id}", codes))
    return fresh


def new_reservation_id(round_id: str) -> str:
    return fresh_identifiers(round_id, 1)[0][0]


def batch_digest(items: Sequence[tuple[str, int]]) -> str:
    """Same contents, same digest, whatever the order of the rows or the form (JSON or CSV)."""
    return hashlib.sha256(orjson.dumps(sorted(items))).hexdigest()


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One citizen's claim. The citizen hash is computed at once (the sold-out fast path needs
    it); the phone and client hashes only when the claim goes to Redis."""

    round_id: str
    site_id: str
    citizen_hash: str
    masked_id: str
    phone: str  # validated; hashed by claim_many, never stored in clear
    client: str  # the client address; hashed by claim_many for its token bucket


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """What one claim came to: a reservation (created or the existing one), or a refusal."""

    reservation: Reservation | None = None
    created: bool = False
    refusal: Problem | None = None


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    body: dict[str, Any]
    created: bool


class Allocator:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool | None,
        keys: Keys,
        hasher: Hasher,
        *,
        timeout: float = 0.8,
        gate: GateSettings | None = None,
        breaker: float = 0.5,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.hasher = hasher
        self.timeout = timeout
        self.clock = clock
        self.scripts = Scripts.register(redis)
        self._monotonic = monotonic  # caches, sold-out board, breaker; tests pass a fake one
        self._rounds: TtlCache[str, Round | None] = TtlCache(SNAPSHOT_TTL, monotonic)
        self._round_ids: TtlCache[None, list[str]] = TtlCache(SNAPSHOT_TTL, monotonic)
        self._sites: TtlCache[None, dict[str, Site]] = TtlCache(SNAPSHOT_TTL, monotonic)
        self._stock: TtlCache[str, dict[str, int]] = TtlCache(SNAPSHOT_TTL, monotonic)
        self._known_groups: set[str] = set()
        gate = gate or GateSettings()
        self._gate_args = (
            gate.global_rate,
            gate.global_burst,
            gate.client_rate,
            gate.client_burst,
            gate.citizen_rate,
            gate.citizen_burst,
        )
        self.sold_out = SoldOutBoard(clock=monotonic)
        self.loop_lag = LoopLag()  # its run() is started by the app, next to the dispatcher
        self._breaker = breaker
        self._down_until = 0.0
        # loss seen (allocator/integrity.py): the ledger's marks, and the rounds found lost
        self.floors = Floors()
        self._floor_reload: asyncio.Future[None] | None = None
        self._lost: dict[str, Lost] = {}
        self._lost_logged: dict[str, float] = {}
        self._marks_warned = -LOST_LOG_EVERY

    # -- guards ------------------------------------------------------------------------------

    async def _redis(self, aw: Awaitable[T]) -> T:
        """Await a Redis call, turning any store failure into a prompt 503.

        After a connection failure or timeout the breaker stays open for ``breaker`` seconds:
        calls then fail at once instead of each waiting out the timeout, and the first call
        after that tries Redis again (so the service recovers by itself).
        """
        if self._monotonic() < self._down_until:
            if inspect.iscoroutine(aw):
                aw.close()  # never awaited: close it, or Python warns
            raise Unavailable("The reservation store is not answering; please try again.")
        try:
            async with asyncio.timeout(self.timeout):
                return await aw
        except ResponseError as exc:
            if isinstance(exc, NoScriptError) or _is_transient_response(exc):
                self.floors.redis_failed()  # LOADING, or an empty script cache: a new server
            else:
                log.error("redis refused a command: %s", exc)
            raise Unavailable("The reservation store is busy; please try again.") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            # the Redis that answers next may be an older copy: compare it with the ledger first
            self.floors.redis_failed()
            if isinstance(exc, TimeoutError | RedisTimeoutError) and self.loop_lag.saturated():
                # the reply most likely sat unread while this worker was saturated: shed load
                raise Overloaded("Too busy right now; please try again.", retry_after=1) from exc
            self._down_until = self._monotonic() + self._breaker
            log.warning("redis: %s: %s", type(exc).__name__, exc)
            raise Unavailable("The reservation store is not answering; please try again.") from exc

    @asynccontextmanager
    async def _pg(self) -> AsyncIterator[PoolConnectionProxy]:
        if self.pool is None:
            raise Unavailable("The ledger database is not configured.")
        try:
            async with self.pool.acquire(timeout=2) as con:
                yield con
        except TRANSIENT_PG_ERRORS as exc:
            raise Unavailable("The ledger database is not answering; please try again.") from exc

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    # -- cached reads --------------------------------------------------------------------------

    async def find_round(self, round_id: str) -> Round | None:
        """The round from Redis; None when nobody has it; RoundLost (503) when the ledger has
        it but Redis does not, or Redis is behind the ledger on it."""
        self._refuse_if_lost(round_id)
        found = await self._round_as_stored(round_id)
        if found is None and self.floors.knows(round_id):
            raise _round_refusal()  # the ledger has it: lost, or not yet mirrored (a moment)
        return found

    async def _round_as_stored(self, round_id: str) -> Round | None:
        async def load() -> Round | None:
            h = await self._redis(awaited(self.redis.hgetall(self.keys.round(round_id).round)))
            return Round.from_redis(round_id, h) if h else None

        return await self._rounds.get(round_id, load)

    async def round(self, round_id: str) -> Round:
        found = await self.find_round(round_id)
        if found is None:
            raise NotFound(f"There is no round {round_id!r}.")
        return found

    async def round_ids(self) -> list[str]:
        async def load() -> list[str]:
            members = await self._redis(awaited(self.redis.smembers(self.keys.rounds)))
            return sorted(m.decode() for m in members)

        return await self._round_ids.get(None, load)

    async def rounds(self) -> list[Round]:
        """Every round Redis holds. One Redis has lost data of is still listed (so it does not
        vanish from the citizen page and the console), while its own endpoints answer 503."""
        found = [await self._round_as_stored(r) for r in await self.round_ids()]
        return sorted((r for r in found if r is not None), key=lambda r: (r.opens_at, r.round_id))

    async def sites(self, *, fresh: bool = False) -> dict[str, Site]:
        async def load() -> dict[str, Site]:
            raw = await self._redis(awaited(self.redis.hgetall(self.keys.sites)))
            return {k.decode(): Site(site_id=k.decode(), **orjson.loads(v)) for k, v in raw.items()}

        if fresh:
            self._sites.invalidate()
        return await self._sites.get(None, load)

    async def stock(self, round_id: str) -> dict[str, int]:
        """Units left per site with stock loaded in the round; may lag by up to SNAPSHOT_TTL."""

        async def load() -> dict[str, int]:
            raw = await self._redis(awaited(self.redis.hgetall(self.keys.round(round_id).stock)))
            return {k.decode(): int(v) for k, v in raw.items()}

        return await self._stock.get(round_id, load)

    async def _site_exists(self, site_id: str) -> bool:
        """From the snapshot; only a site missing there is looked up afresh (it may be new)."""
        return site_id in await self.sites() or site_id in await self.sites(fresh=True)

    async def round_public(self, rnd: Round) -> dict[str, Any]:
        return rnd.public(self.now(), sum((await self.stock(rnd.round_id)).values()))

    async def site_list(self, round_id: str) -> list[dict[str, Any]]:
        await self.round(round_id)
        stock = await self.stock(round_id)
        sites = await self.sites()
        return [
            sites[s].public(units)
            for s, units in sorted(stock.items(), key=lambda kv: _site_order(sites, kv[0]))
            if s in sites
        ]

    async def alternatives(self, rnd: Round, site_id: str) -> list[dict[str, Any]]:
        """Up to 5 other sites that can still serve a share: same district first, then most left."""
        stock = await self.stock(rnd.round_id)
        sites = await self.sites()
        here = sites.get(site_id)
        options = [
            (s.district != (here.district if here else None), -units, s.site_id, s)
            for sid, units in stock.items()
            if sid != site_id and units >= rnd.per_person and (s := sites.get(sid)) is not None
        ]
        options.sort(key=lambda o: o[:3])
        return [
            {"site_id": s.site_id, "name": s.name, "district": s.district, "remaining": -neg}
            for _, neg, _, s in options[:5]
        ]

    # -- citizens ------------------------------------------------------------------------------

    def claim_request(
        self, round_id: str, site_id: str, citizen_id: str, phone: str, client: str = ""
    ) -> ClaimRequest:
        """Hash and mask the ID once; it goes no further in clear."""
        return ClaimRequest(
            round_id=round_id,
            site_id=site_id,
            citizen_hash=self.hasher.citizen(citizen_id),
            masked_id=mask_citizen_id(citizen_id),
            phone=phone,
            client=client,
        )

    async def claim_many(self, round_id: str, items: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Admit and decide several claims on one round in one script call; one result each."""
        rk = self.keys.round(round_id)
        keys = [
            rk.round,
            rk.stock,
            rk.holders,
            rk.reservations,
            rk.tally,
            rk.ledger,
            rk.gate_global,
        ]
        index: dict[str, int] = {}

        def key(name: str) -> int:
            """1-based position of ``name`` in KEYS, each key passed once."""
            if name not in index:
                keys.append(name)
                index[name] = len(keys)
            return index[name]

        args: list[str | int | float] = [len(items), *self._gate_args, await self._floor(round_id)]
        for item, (reservation_id, codes) in zip(
            items, fresh_identifiers(round_id, len(items)), strict=True
        ):
            args.append(  # one space-separated argument per item: see lua/claim.lua
                " ".join(
                    (
                        str(key(rk.codes(item.site_id))),
                        str(key(rk.site_holders(item.site_id))),
                        str(key(rk.gate_client(self.hasher.client(item.client)))),
                        str(key(rk.gate_citizen(item.citizen_hash))),
                        item.site_id,
                        item.citizen_hash,
                        self.hasher.phone(item.phone),
                        item.masked_id,
                        reservation_id,
                        *codes,
                    )
                )
            )
        replies = await self._redis(self.scripts.claim(keys=keys, args=args))
        if replies and replies[0][0] == b"lost":
            self._note_lost(Lost.from_mark(round_id, replies[0][1]))
            return [ClaimOutcome(refusal=_round_refusal()) for _ in items]
        self._seen_whole(round_id)
        return [
            await self._claim_outcome(round_id, item, reply)
            for item, reply in zip(items, replies, strict=True)
        ]

    async def _claim_outcome(
        self, round_id: str, item: ClaimRequest, reply: list[bytes]
    ) -> ClaimOutcome:
        status = reply[0].decode()
        if status in ("created", "existing"):
            reservation = Reservation.from_record(round_id, reply[1])
            return ClaimOutcome(reservation=reservation, created=status == "created")
        if status == "gated":
            bucket = reply[2].decode()
            return ClaimOutcome(
                refusal=RateLimited(_GATED[bucket], retry_after=int(reply[1]) / 1000)
            )
        if status == "no-round":
            if self.floors.knows(round_id):  # the ledger has it, Redis not: lost, or a moment early
                return ClaimOutcome(refusal=_round_refusal())
            return ClaimOutcome(refusal=NotFound(f"There is no round {round_id!r}."))
        if status == "not-open":
            opens, closes = (ms_to_rfc3339(int(x)) for x in reply[1:3])
            when = "has not opened yet" if self.now_ms() < int(reply[1]) else "has closed"
            return ClaimOutcome(
                refusal=RoundNotOpen(
                    f"Round {round_id!r} {when}: reservations are taken from {opens} to {closes}.",
                    opens_at=opens,
                    closes_at=closes,
                )
            )
        if status == "already-reserved":
            return ClaimOutcome(
                refusal=AlreadyReserved(
                    "This citizen ID already holds a reservation in this round "
                    "(at another site or with another phone number)."
                )
            )
        if status == "sold-out":
            left = int(reply[1])
            if left == 0 and not await self._site_exists(item.site_id):
                return ClaimOutcome(refusal=NotFound(f"There is no site {item.site_id!r}."))
            rnd = await self.round(round_id)
            refusal = SoldOut(
                f"Site {item.site_id!r} has {left} unit(s) left; a share is {rnd.per_person}.",
                alternatives=await self.alternatives(rnd, item.site_id),
            )
            if not self.sold_out.marked(round_id, item.site_id):
                holders = await self._redis(
                    awaited(
                        self.redis.smembers(self.keys.round(round_id).site_holders(item.site_id))
                    )
                )
                self.sold_out.mark(
                    round_id, item.site_id, frozenset(h.decode() for h in holders), refusal
                )
            return ClaimOutcome(refusal=refusal)
        if status == "no-code":
            log.error("all %d pickup-code candidates were taken; retry", CODE_CANDIDATES)
            return ClaimOutcome(refusal=Unavailable("Please try again."))
        raise AssertionError(f"claim.lua answered {status!r}")

    async def reserve(
        self, round_id: str, site_id: str, citizen_id: str, phone: str
    ) -> tuple[Reservation, bool]:
        [outcome] = await self.claim_many(
            round_id, [self.claim_request(round_id, site_id, citizen_id, phone)]
        )
        if outcome.refusal is not None:
            raise outcome.refusal
        assert outcome.reservation is not None
        return outcome.reservation, outcome.created

    async def reservation(self, reservation_id: str) -> Reservation:
        round_id = _round_of(reservation_id)
        self._refuse_if_lost(round_id)
        record = await self._redis(
            awaited(self.redis.hget(self.keys.round(round_id).reservations, reservation_id))
        )
        if record is None:
            # before saying 404: a round Redis lost data of answers 503 (the ledger may have it)
            await self.find_round(round_id)
            if self.floors.get(round_id) > 0:
                await self.verify(round_id)
            raise NotFound("There is no such reservation.")
        return Reservation.from_record(round_id, record)

    async def cancel(self, reservation_id: str) -> Reservation:
        round_id = _round_of(reservation_id)
        rk = self.keys.round(round_id)
        floor = await self._floor(round_id)
        reply = await self._redis(
            self.scripts.cancel(
                keys=[rk.round, rk.stock, rk.holders, rk.reservations, rk.tally, rk.ledger],
                args=[reservation_id, floor],
            )
        )
        status = self._whole_or_lost(round_id, reply)
        if status == "not-found":
            if self.floors.knows(round_id):
                await self.find_round(round_id)  # 503, not 404, when Redis lost the round
            raise NotFound("There is no such reservation.")
        reservation = Reservation.from_record(round_id, reply[1])
        if status == "not-collectable":
            shown = self._shown_status(reservation, await self.round(round_id))
            raise NotCollectable(
                f"This reservation is {shown} and can no longer be cancelled.", reason=shown
            )
        await self.units_returned(round_id, [reservation.site_id])
        return reservation

    async def units_returned(self, round_id: str, site_ids: Sequence[str]) -> None:
        """Units came back: forget sold-out marks here, and tell every other worker."""
        self._stock.invalidate(round_id)
        for site_id in site_ids:
            self.sold_out.clear(round_id, site_id)
        try:
            await self._redis(
                awaited(self.redis.publish(self.keys.stock_events, " ".join([round_id, *site_ids])))
            )
        except Unavailable:
            log.warning(
                "could not announce returned units of %s; marks expire within 1 s", round_id
            )

    async def follow_stock_events(self, stop: asyncio.Event) -> None:
        """Clear this worker's sold-out marks when another worker announces returned units."""
        while not stop.is_set():
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as ps:
                    await ps.subscribe(self.keys.stock_events)
                    while not stop.is_set():
                        msg = await ps.get_message(timeout=min(0.5, self.timeout / 2))
                        if msg and msg.get("type") == "message":
                            round_id, *site_ids = msg["data"].decode().split()
                            self._stock.invalidate(round_id)
                            for site_id in site_ids:
                                self.sold_out.clear(round_id, site_id)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("stock events: %s: %s; resubscribing", type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    def _shown_status(self, reservation: Reservation, rnd: Round) -> str:
        return reservation.effective_status(self.now_ms(), to_ms(rnd.pickup_end))

    # -- operators -----------------------------------------------------------------------------

    async def upsert_sites(self, sites: Sequence[Site]) -> int:
        async with self._pg() as con, con.transaction():
            await con.executemany(
                "INSERT INTO sites (site_id, name, address, district) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (site_id) DO UPDATE SET name = EXCLUDED.name,"
                " address = EXCLUDED.address, district = EXCLUDED.district, updated_at = now()",
                [(s.site_id, s.name, s.address, s.district) for s in sites],
            )
        await self.mirror_sites(sites)
        return len(sites)

    async def mirror_sites(self, sites: Sequence[Site]) -> None:
        mapping = {
            s.site_id: orjson.dumps({"name": s.name, "address": s.address, "district": s.district})
            for s in sites
        }
        if mapping:
            await self._redis(awaited(self.redis.hset(self.keys.sites, mapping=mapping)))
        self._sites.invalidate()

    async def upsert_round(self, rnd: Round) -> bool:
        """Write the round to PostgreSQL, then to Redis; True when it is new."""
        spec = orjson.dumps(rnd.to_redis()).decode()
        async with self._pg() as con:
            created = await con.fetchval(
                "INSERT INTO rounds (round_id, title, opens_at, closes_at, per_person,"
                " pickup_start, pickup_end, mode, spec) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
                " ON CONFLICT (round_id) DO UPDATE SET title = EXCLUDED.title,"
                " opens_at = EXCLUDED.opens_at, closes_at = EXCLUDED.closes_at,"
                " per_person = EXCLUDED.per_person, pickup_start = EXCLUDED.pickup_start,"
                " pickup_end = EXCLUDED.pickup_end, mode = EXCLUDED.mode, spec = EXCLUDED.spec,"
                " updated_at = now() RETURNING (xmax = 0)",
                rnd.round_id,
                rnd.title,
                rnd.opens_at,
                rnd.closes_at,
                rnd.per_person,
                rnd.pickup_start,
                rnd.pickup_end,
                rnd.mode,
                spec,
            )
        await self.mirror_round(rnd)
        return bool(created)

    async def mirror_round(self, rnd: Round) -> None:
        rk = self.keys.round(rnd.round_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(rk.round, mapping=rnd.to_redis())
            pipe.sadd(self.keys.rounds, rnd.round_id)
            await self._redis(pipe.execute())
        await self.ensure_ledger_group(rk)
        self._rounds.invalidate(rnd.round_id)
        self._round_ids.invalidate()

    async def ensure_ledger_group(self, rk: RoundKeys) -> None:
        """The consumer group starts at 0, so no entry written before it existed is skipped."""
        if rk.ledger in self._known_groups:
            return
        try:
            await self._redis(
                awaited(self.redis.xgroup_create(rk.ledger, LEDGER_GROUP, id="0", mkstream=True))
            )
        except Unavailable as exc:
            if "BUSYGROUP" not in str(exc.__cause__):
                raise
        self._known_groups.add(rk.ledger)

    async def load_batch(
        self, round_id: str, batch_id: str, items: Sequence[tuple[str, int]]
    ) -> BatchAnswer:
        """Add a batch all or nothing; the same batch_id and items again change nothing."""
        await self.round(round_id)
        sites = await self.sites(fresh=True)
        unknown = sorted({s for s, _ in items if s not in sites})
        if unknown:  # the HTTP layer names each row; this guards every other caller
            raise InvalidRequest.one("items", f"unknown site(s): {', '.join(unknown)}")
        rk = self.keys.round(round_id)
        canonical = sorted(items)
        floor = await self._floor(round_id)
        reply = await self._redis(
            self.scripts.load_batch(
                keys=[rk.round, rk.stock, rk.loaded, rk.batches, rk.ledger, rk.tally],
                args=[
                    batch_id,
                    batch_digest(items),
                    orjson.dumps(canonical).decode(),
                    floor,
                    *(v for pair in canonical for v in pair),
                ],
            )
        )
        status = self._whole_or_lost(round_id, reply)
        if status == "no-round":
            if self.floors.knows(round_id):
                raise _round_refusal()
            raise NotFound(f"There is no round {round_id!r}.")
        if status == "conflict":
            raise BatchConflict(f"Batch {batch_id!r} was already loaded with other contents.")
        if status == "loaded":
            await self.units_returned(round_id, [s for s, _ in items])
        body = {
            "batch_id": batch_id,
            "units_added": sum(q for _, q in items),
            "sites": len(items),
        }
        return BatchAnswer(body=body, created=status == "loaded")

    async def pickup(
        self, site_id: str, code: str, citizen_id: str | None, round_id: str | None = None
    ) -> Reservation:
        """Hand over at the counter; without a round, the round whose code it is is found."""
        round_id = round_id or await self._round_of_code(site_id, code)
        if round_id is None:
            if self._lost:  # the code may be one of a round Redis lost: do not say "no such code"
                raise _round_refusal()
            raise NotFound(f"No reservation has pickup code {code!r} at site {site_id!r}.")
        rk = self.keys.round(round_id)
        citizen = self.hasher.citizen(citizen_id) if citizen_id else ""
        floor = await self._floor(round_id)
        reply = await self._redis(
            self.scripts.pickup(
                keys=[rk.round, rk.reservations, rk.codes(site_id), rk.tally, rk.ledger],
                args=[code, citizen, floor],
            )
        )
        status = self._whole_or_lost(round_id, reply)
        if status == "not-found":
            if self.floors.knows(round_id):
                await self.find_round(round_id)  # 503, not 404, when Redis lost the round
            raise NotFound(f"No reservation has pickup code {code!r} at site {site_id!r}.")
        reservation = Reservation.from_record(round_id, reply[1])
        if status == "not-collectable":
            why = reply[2].decode()  # collected | cancelled | expired | citizen
            if why == "citizen":
                raise NotCollectable(
                    "The ID number does not match this reservation's holder.", reason=why
                )
            raise NotCollectable(f"This reservation is {why} and cannot be collected.", reason=why)
        return reservation

    async def _round_of_code(self, site_id: str, code: str) -> str | None:
        """The round holding this code at this site; a round in its pickup window wins a tie."""
        round_ids = await self.round_ids()
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in round_ids:
                pipe.hexists(self.keys.round(r).codes(site_id), code)
            found: list[bool] = await self._redis(pipe.execute())
        holders = [r for r, hit in zip(round_ids, found, strict=True) if hit]
        if len(holders) <= 1:
            return holders[0] if holders else None
        now = self.now()
        for r in holders:
            rnd = await self.find_round(r)
            if rnd is not None and rnd.pickup_start <= now < rnd.pickup_end:
                return r
        return holders[-1]

    async def stats(self, round_id: str) -> dict[str, Any]:
        """The round's figures from Redis, the ledger's count, and ``lost`` (null, or what
        Redis has lost of the round): an operator sees a lost round here rather than a 503."""
        with contextlib.suppress(RoundLost):
            await self.round(round_id)  # NotFound for a round nobody has
        rk = self.keys.round(round_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(rk.loaded)
            pipe.hgetall(rk.stock)
            pipe.hgetall(rk.tally)
            pipe.hlen(rk.holders)
            pipe.xlen(rk.ledger)
            loaded_raw, stock_raw, tally_raw, live, backlog = await self._redis(pipe.execute())
        loaded = {k.decode(): int(v) for k, v in loaded_raw.items()}
        stock = {k.decode(): int(v) for k, v in stock_raw.items()}
        tally = tally_counts(tally_raw)
        recorded: int | None
        try:
            async with self._pg() as con:
                row = await con.fetchrow(
                    "SELECT (SELECT count(*) FROM reservations WHERE round_id = $1) AS recorded,"
                    " (SELECT ledger_seq FROM rounds WHERE round_id = $1) AS ledger_seq",
                    round_id,
                )
            assert row is not None
            recorded = row["recorded"]
            if row["ledger_seq"] is not None:
                self.floors.raise_to(round_id, int(row["ledger_seq"]))
        except Unavailable:
            recorded = None
        lost = await self.check(round_id)
        site_ids = sorted(set(loaded) | set(stock))
        return {
            "round_id": round_id,
            "loaded": sum(loaded.values()),
            "reserved": sum(v for k, v in tally.items() if k.startswith("reserved:")),
            "collected": sum(v for k, v in tally.items() if k.startswith("collected:")),
            "remaining": sum(stock.values()),
            "reservations": live,
            "sites": [
                {
                    "site_id": s,
                    "loaded": loaded.get(s, 0),
                    "reserved": tally.get(f"reserved:{s}", 0),
                    "remaining": stock.get(s, 0),
                }
                for s in site_ids
            ],
            "ledger": {"recorded": recorded, "lag": backlog},
            "lost": lost.public() if lost is not None else None,
        }

    async def ping(self) -> None:
        """Readiness: Redis runs a real script, PostgreSQL answers, and Redis holds every round
        the ledger has, none of them behind it; else 503 naming each round that is not."""
        await self._redis(awaited(self.redis.eval("return 1", 0)))
        generation = self.floors.generation()
        async with self._pg() as con:
            marks = await ledger_marks(con)
        self.floors.load(marks, generation)
        verdicts = await self._integrity(sorted(marks))
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

    # -- loss seen (allocator/integrity.py) ---------------------------------------------------

    async def _floor(self, round_id: str) -> int:
        """The floor to pass to a script: the ledger's high-water mark for the round, reloaded
        first (for at most FLOOR_WAIT) when Redis failed since the last load, or -1."""
        if self.floors.suspect and self.pool is not None:
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
                async with self._pg() as con:
                    marks = await ledger_marks(con)
        except (Unavailable, TimeoutError, OSError, asyncpg.PostgresError) as exc:
            # without the ledger, compare with the last marks known (they only ever rise)
            now = self._monotonic()
            if now - self._marks_warned >= LOST_LOG_EVERY:
                self._marks_warned = now
                log.warning(
                    "the ledger's marks are not readable (%s); comparing Redis with the last ones",
                    type(exc).__name__,
                )
            self.floors.settle(generation)
            return
        self.floors.load(marks, generation)

    async def _integrity(self, round_ids: Sequence[str]) -> dict[str, Lost | str]:
        """Each round compared with the ledger's mark (marking it lost when Redis is behind):
        a Lost, ``"missing"`` (the ledger has the round, Redis not), ``"absent"`` (neither has
        it) or ``"ok"``. Records what it finds."""
        if not round_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for round_id in round_ids:
                rk = self.keys.round(round_id)
                await self.scripts.integrity(
                    keys=[rk.round, rk.tally], args=[self.floors.get(round_id)], client=pipe
                )
            replies = await self._redis(pipe.execute())
        verdicts: dict[str, Lost | str] = {}
        for round_id, reply in zip(round_ids, replies, strict=True):
            exists = bool(int(reply[2]))
            if reply[0] == b"lost":
                lost = Lost.from_mark(round_id, reply[1], in_redis=exists)
                self._note_lost(lost)
                verdicts[round_id] = lost
                continue
            self._seen_whole(round_id)
            if exists:
                verdicts[round_id] = "ok"
            else:
                verdicts[round_id] = "missing" if self.floors.knows(round_id) else "absent"
        return verdicts

    async def check(self, round_id: str) -> Lost | None:
        """What Redis has lost of the round, checked now; None when it is whole."""
        verdict = (await self._integrity([round_id]))[round_id]
        return verdict if isinstance(verdict, Lost) else None

    async def verify(self, round_id: str) -> None:
        """Raise RoundLost (503) when Redis is behind the ledger on this round."""
        await self._floor(round_id)
        if await self.check(round_id) is not None:
            raise _round_refusal()

    async def watch_integrity(self, stop: asyncio.Event, every: float = WATCH_EVERY) -> None:
        """In every worker: reload the ledger's marks and check every round, once a second,
        so that a lost round is refused, logged and shown even when nobody changes it."""
        await self._check_persistence()
        while not stop.is_set():
            try:
                if self.pool is not None:
                    await self._reload_floors()
                await self._integrity(self.floors.rounds())
            except Unavailable:
                pass  # Redis is down: the breaker and /readyz say so
            except Exception:
                log.exception("integrity check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def _check_persistence(self) -> None:
        """Warn once when Redis may lose acknowledged writes on a power loss."""
        try:
            async with asyncio.timeout(self.timeout):
                config = await awaited(self.redis.config_get("appendonly", "appendfsync"))
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

    def _refuse_if_lost(self, round_id: str) -> None:
        if round_id in self._lost:
            raise _round_refusal()

    def _whole_or_lost(self, round_id: str, reply: list[bytes]) -> str:
        """The reply's status; a ``lost`` reply is recorded and raised as RoundLost."""
        status = reply[0].decode()
        if status == "lost":
            self._note_lost(Lost.from_mark(round_id, reply[1]))
            raise _round_refusal()
        self._seen_whole(round_id)
        return status

    def _note_lost(self, lost: Lost) -> None:
        """Record a lost round; log it at ERROR when first seen, and once a minute after."""
        self._lost[lost.round_id] = lost
        self._rounds.invalidate(lost.round_id)
        self._stock.invalidate(lost.round_id)
        self.sold_out.clear(lost.round_id)  # no answer from memory of a round in doubt
        now = self._monotonic()
        if now - self._lost_logged.get(lost.round_id, -LOST_LOG_EVERY) >= LOST_LOG_EVERY:
            self._lost_logged[lost.round_id] = now
            log.error("%s", lost.describe())

    def _seen_whole(self, round_id: str) -> None:
        if self._lost.pop(round_id, None) is not None:
            self._lost_logged.pop(round_id, None)
            self._rounds.invalidate(round_id)
            self._stock.invalidate(round_id)
            log.warning("round %s: Redis agrees with the ledger again (rebuilt); serving", round_id)

    def lost_rounds(self) -> list[Lost]:
        """The rounds this worker knows to be lost."""
        return [self._lost[r] for r in sorted(self._lost)]


_GATED = {
    "global": "Very many people are reserving right now; please try again in a moment.",
    "client": "Too many requests from your address; please wait a moment.",
    "citizen": "Too many attempts for this ID number; please wait a moment.",
}


def _round_refusal() -> RoundLost:
    """What a citizen or an operator is told about a round Redis has lost data of."""
    return RoundLost(
        "This round's reservations are being restored after a fault; please try again later.",
        retry_after=LOST_RETRY_AFTER,
    )


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("reloading the ledger's marks failed: %r", future.exception())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _round_of(reservation_id: str) -> str:
    match = RESERVATION_ID.fullmatch(reservation_id)
    if match is None:
        raise NotFound("There is no such reservation.")
    return match.group(2)


def _site_order(sites: dict[str, Site], site_id: str) -> tuple[str, str]:
    s = sites.get(site_id)
    return (s.district, site_id) if s else ("", site_id)


def _is_transient_response(exc: ResponseError) -> bool:
    return str(exc).startswith(("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN"))
