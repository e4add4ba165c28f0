"""The operators' writes: sites, rounds and inventory batches, to PostgreSQL and then Redis.

PostgreSQL holds what an operator wrote (sites, rounds); Redis holds the mirror the scripts
read. A batch is loaded in Redis all or nothing by load_batch.lua, once per ``batch_id``, and
reaches the ledger through the round's stream like every other change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from allocator import draw
from allocator.catalogue import Catalogue
from allocator.errors import BatchConflict, InvalidRequest, NotFound
from allocator.keys import Keys, RoundKeys
from allocator.ledger import create_group
from allocator.losswatch import LossWatch, round_refusal
from allocator.model import Round, Site
from allocator.redistyping import awaited
from allocator.scripts import Scripts
from allocator.stock_events import StockEvents
from allocator.store import Store


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
    ) -> None:
        self.store = store
        self.keys = keys
        self.scripts = scripts
        self.catalogue = catalogue
        self.watch = watch
        self.events = events
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

        A lottery round's secret is drawn when the round first becomes a lottery and kept in
        ``draws`` (only PostgreSQL holds it until the freeze publishes it). ``mode`` and
        ``public_randomness_source`` cannot change once the round has opened (422 naming each).
        """
        async with self.store.pg() as con, con.transaction():
            # one writer of this round at a time: the secret is drawn exactly once
            await con.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"round:{rnd.round_id}")
            before = await con.fetchrow(
                "SELECT mode, spec, opens_at <= now() AS opened FROM rounds WHERE round_id = $1",
                rnd.round_id,
            )
            if before is not None and before["opened"]:
                _refuse_fixed_changes(rnd, before["mode"], orjson.loads(before["spec"]))
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
            if secret is not None:
                await con.execute(
                    "INSERT INTO draws (round_id, secret, commitment) VALUES ($1, $2, $3)",
                    rnd.round_id,
                    secret,
                    commitment,
                )
        await self.mirror_round(rnd)
        return bool(created)

    async def mirror_round(self, rnd: Round) -> None:
        rk = self.keys.round(rnd.round_id)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.hset(rk.round, mapping=rnd.to_redis())
            pipe.sadd(self.keys.rounds, rnd.round_id)
            await self.store.redis_call(pipe.execute())
        await self.ensure_ledger_group(rk)
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
        rk = self.keys.round(round_id)
        canonical = sorted(items)
        floor = await self.watch.floor(round_id)
        reply = await self.store.redis_call(
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


def _refuse_fixed_changes(rnd: Round, mode: str, spec: dict[str, Any]) -> None:
    """API.md: mode and public_randomness_source cannot change once the round has opened."""
    errors = []
    if rnd.mode != mode:
        errors.append({"field": "mode", "message": "cannot change once the round has opened"})
    if rnd.public_randomness_source != spec.get("prs"):
        errors.append(
            {
                "field": "public_randomness_source",
                "message": "cannot change once the round has opened",
            }
        )
    if errors:
        raise InvalidRequest(errors)
