"""The operators' writes: sites, rounds and inventory batches, to PostgreSQL and then Redis.

PostgreSQL holds what an operator wrote (sites, rounds); Redis holds the mirror the scripts
read. A batch is loaded in Redis all or nothing by load_batch.lua, once per ``batch_id``, and
reaches the ledger through the round's stream like every other change.

A round's ``mode``, ``programme``, ``eligibility``, ``loss_weighting`` and
``public_randomness_source`` cannot change once it has opened (422 naming the field). Its
``programme`` decides the hash tag of its Redis keys (allocator/keys.py), so a change of
programme moves the round to another tag: allowed only while the round holds nothing in Redis
or the ledger but its definition (no batch, no reservation), else 422 naming ``programme``.
Writes of one round are serialised by a PostgreSQL advisory lock held until Redis has the new
definition.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from allocator import draw
from allocator.catalogue import Catalogue
from allocator.entitlement import Eligibility
from allocator.errors import BatchConflict, InvalidRequest, NotFound
from allocator.keys import Keys, RoundKeys
from allocator.ledger import create_group
from allocator.losswatch import LossWatch, round_refusal
from allocator.model import Round, Site
from allocator.redistyping import awaited
from allocator.scripts import Scripts
from allocator.stock_events import StockEvents
from allocator.store import Store
from allocator.tags import RoundTags
from allocator.topology import ReplicaWait

#: Round fields that cannot change once the round has opened (API.md).
FIXED_ONCE_OPEN = ("mode", "programme", "eligibility", "loss_weighting", "public_randomness_source")


def batch_digest(items: Sequence[tuple[str, int]]) -> str:
    """Same contents, same digest, whatever the order of the rows or the form (JSON or CSV)."""
    return hashlib.sha256(orjson.dumps(sorted(items))).hexdigest()


@dataclass(frozen=True, slots=True)
class BatchResult:
    batch_id: str
    units_added: int  # the batch's units (also on a replay, which adds nothing again)
    sites: int
    created: bool  # False: the same batch was loaded before; nothing changed
    carried_from: str | None = None  # a carry-over's earlier round (allocator/carryover.py)


class Operators:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        scripts: Scripts,
        catalogue: Catalogue,
        watch: LossWatch,
        events: StockEvents,
        tags: RoundTags,
        *,
        clock: Callable[[], float] = time.time,
        replicas: ReplicaWait | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.scripts = scripts
        self.catalogue = catalogue
        self.watch = watch
        self.events = events
        self.tags = tags
        self.clock = clock
        # [redis] wait_replicas: a batch's 201 and a retire go out only once a replica has them
        # (the facade passes the one ReplicaWait it shares; allocator/topology.py)
        self.replicas = replicas or ReplicaWait(store.redis, 0, 0)
        self._known_groups: set[str] = set()

    # -- sites --------------------------------------------------------------------------------

    async def upsert_sites(self, sites: Sequence[Site]) -> int:
        async with self.store.pg() as con, con.transaction():
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
            await self.store.redis_call(
                awaited(self.store.redis.hset(self.keys.sites, mapping=mapping))
            )
        self.catalogue.forget_sites()

    # -- rounds -------------------------------------------------------------------------------

    async def upsert_round(self, rnd: Round) -> bool:
        """Write the round to PostgreSQL, then to Redis; True when it is new (read it back for
        a lottery round's commitment).

        Refused (422 naming the field, nothing changed) when a field of FIXED_ONCE_OPEN differs
        from the stored round and that has opened, or when the programme changes while the
        round holds anything but its definition. A lottery round's secret is drawn when the
        round first becomes a lottery and kept in ``draws`` (only PostgreSQL holds it until the
        freeze publishes it).
        """
        tag = Keys.tag_for(rnd.round_id, rnd.programme)
        async with self.store.pg() as con:
            # one writer of this round at a time, until Redis has what PostgreSQL has: the
            # secret is drawn exactly once, and a move of tag is never raced
            await con.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", _lock(rnd))
            try:
                async with con.transaction():
                    before = await con.fetchrow(
                        "SELECT spec, key_tag FROM rounds WHERE round_id = $1", rnd.round_id
                    )
                    if before is not None:
                        stored = _round_from_spec(rnd.round_id, orjson.loads(before["spec"]))
                        self._refuse_fixed(stored, rnd)
                        old_tag = before["key_tag"] or Keys.tag_for(rnd.round_id, None)
                        if old_tag != tag:
                            await self._move(con, rnd.round_id, old_tag)
                    secret: bytes | None = None
                    if rnd.lottery:
                        commitment = await con.fetchval(
                            "SELECT commitment FROM draws WHERE round_id = $1", rnd.round_id
                        )
                        if commitment is None:
                            secret = draw.new_secret()
                            commitment = draw.commitment(secret)
                        rnd = replace(rnd, commitment=commitment)
                    spec = orjson.dumps(rnd.to_redis()).decode()
                    created = await con.fetchval(
                        "INSERT INTO rounds (round_id, title, opens_at, closes_at, per_person,"
                        " pickup_start, pickup_end, mode, spec, programme, cooldown_days,"
                        " key_tag) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"
                        " ON CONFLICT (round_id) DO UPDATE SET title = EXCLUDED.title,"
                        " opens_at = EXCLUDED.opens_at, closes_at = EXCLUDED.closes_at,"
                        " per_person = EXCLUDED.per_person,"
                        " pickup_start = EXCLUDED.pickup_start,"
                        " pickup_end = EXCLUDED.pickup_end, mode = EXCLUDED.mode,"
                        " spec = EXCLUDED.spec, programme = EXCLUDED.programme,"
                        " cooldown_days = EXCLUDED.cooldown_days, key_tag = EXCLUDED.key_tag,"
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
                        rnd.programme,
                        rnd.cooldown_days,
                        tag,
                    )
                    if secret is not None:
                        await con.execute(
                            "INSERT INTO draws (round_id, secret, commitment) VALUES ($1, $2, $3)",
                            rnd.round_id,
                            secret,
                            commitment,
                        )
                await self.mirror_round(rnd)
            finally:
                await con.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", _lock(rnd))
        return bool(created)

    def _refuse_fixed(self, stored: Round, rnd: Round) -> None:
        """422 naming each field of FIXED_ONCE_OPEN that would change on an opened round."""
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        if now < stored.opens_at:
            return
        changed = [
            name
            for name in FIXED_ONCE_OPEN
            if _comparable(getattr(stored, name)) != _comparable(getattr(rnd, name))
        ]
        if changed:
            raise InvalidRequest(
                [
                    {
                        "field": name,
                        "message": "cannot change once the round has opened "
                        f"(it opened at {stored.opens_at.isoformat()})",
                    }
                    for name in changed
                ]
            )

    async def _move(self, con: Any, round_id: str, old_tag: str) -> None:
        """Before a change of programme: refuse unless the round holds nothing but its
        definition, then remove that definition from under the old tag (retire.lua), so that
        no worker still using the old tag can load a batch or take a claim there."""
        held = await con.fetchval(
            "SELECT EXISTS (SELECT 1 FROM batches WHERE round_id = $1)"
            " OR EXISTS (SELECT 1 FROM reservations WHERE round_id = $1)",
            round_id,
        )
        old = self.keys.round(round_id, old_tag)
        if not held:
            # a 503 past the replica wait rolls the PostgreSQL change back; the operator's retry
            # retires again (retire.lua: "retired" when the round hash is already gone)
            reply = await self.store.redis_call(
                self.replicas.run(
                    self.scripts.retire,
                    [
                        old.round,
                        old.stock,
                        old.loaded,
                        old.batches,
                        old.tally,
                        old.reservations,
                        old.holders,
                        old.ledger,
                    ],
                    [await self.watch.floor(round_id)],
                ),
                key=old.round,
            )
            held = reply[0] != b"retired"
        if held:
            raise InvalidRequest.one(
                "programme",
                "cannot change once a batch has been loaded into the round (its keys in Redis "
                "are grouped by programme); create a new round for the other programme",
            )
        self.catalogue.forget_round(round_id)

    async def mirror_round(self, rnd: Round) -> None:
        """The round's definition into Redis, under its programme's tag, and the round -> tag
        mapping first (readers find the keys through it)."""
        tag = Keys.tag_for(rnd.round_id, rnd.programme)
        rk = self.keys.round(rnd.round_id, tag)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.round_tags, rnd.round_id, tag)
            pipe.hset(rk.round, mapping=rnd.to_redis())
            pipe.sadd(self.keys.rounds, rnd.round_id)
            await self.store.redis_call(pipe.execute())
        await self.ensure_ledger_group(rk)
        self.tags.forget()
        self.catalogue.forget_round(rnd.round_id)
        self.catalogue.forget_round_list()

    async def ensure_ledger_group(self, rk: RoundKeys) -> None:
        """The round's stream and its consumer group (allocator/ledger.py), once a worker."""
        if rk.ledger in self._known_groups:
            return
        await self.store.redis_call(create_group(self.store.redis, rk.ledger))
        self._known_groups.add(rk.ledger)

    # -- batches ------------------------------------------------------------------------------

    async def load_batch(
        self, round_id: str, batch_id: str, items: Sequence[tuple[str, int]]
    ) -> BatchResult:
        """Add a batch all or nothing; the same batch_id and items again change nothing."""
        await self.catalogue.round(round_id)
        sites = await self.catalogue.sites(fresh=True)
        unknown = sorted({s for s, _ in items if s not in sites})
        if unknown:  # the HTTP layer names each row; this guards every other caller
            raise InvalidRequest.one("items", f"unknown site(s): {', '.join(unknown)}")
        # the tag read afresh: a round moved a moment ago is never loaded under its old tag
        rk = await self.tags.round_keys(round_id, fresh=True)
        canonical = sorted(items)
        floor = await self.watch.floor(round_id)
        # a 503 past the replica wait: the batch was loaded on the primary, and the operator's
        # retry with the same batch_id is a replay (200, nothing added twice)
        reply = await self.store.redis_call(
            self.replicas.run(
                self.scripts.load_batch,
                [rk.round, rk.stock, rk.loaded, rk.batches, rk.ledger, rk.tally],
                [
                    batch_id,
                    batch_digest(items),
                    orjson.dumps(canonical).decode(),
                    floor,
                    *(v for pair in canonical for v in pair),
                ],
            ),
            key=rk.round,
        )
        status = self.watch.whole_or_lost(round_id, reply)
        if status == "no-round":
            if self.watch.knows(round_id):
                raise round_refusal()
            raise NotFound(f"There is no round {round_id!r}.")
        if status == "conflict":
            raise BatchConflict(f"Batch {batch_id!r} was already loaded with other contents.")
        if status == "loaded":
            await self.events.units_returned(round_id, [s for s, _ in items])
        return BatchResult(
            batch_id=batch_id,
            units_added=sum(q for _, q in items),
            sites=len(items),
            created=status == "loaded",
        )


def _lock(rnd: Round) -> str:
    return f"allot:round:{rnd.round_id}"


def _round_from_spec(round_id: str, spec: dict[str, Any]) -> Round:
    """The round as stored in ``rounds.spec`` (the round hash as written)."""
    return Round.from_redis(round_id, {k.encode(): str(v).encode() for k, v in spec.items()})


def _comparable(value: object) -> object:
    """Eligibility rules compare by meaning: the order regions were listed in is not a change."""
    if isinstance(value, Eligibility):
        regions = frozenset(value.regions) if value.regions is not None else None
        return (value.birth_year_last_digit, value.min_age, value.max_age, regions)
    return value
