"""Carry-over: a later round takes the unclaimed units of an earlier one, site by site, once.

A batch with ``carry_from`` is done in two atomic steps, because the two rounds may live on
different Redis Cluster slots:

(a) lua/carry.lua on the earlier round: after its pickup_end, and once nothing is still reserved
    (its confirmed reservations are expired first, by lua/expire.lua), every site's remaining
    stock and expired units move to ``carried_out``, and the amounts are recorded under
    ``<later round>/<batch_id>``; a replay answers the recorded amounts and changes nothing;
(b) lua/load_batch.lua on the later round, with those amounts as the items, under the same
    batch_id (a replay there changes nothing either).

A crash between (a) and (b) leaves units carried out of the earlier round and not yet loaded into
the later one; replaying the same request heals it, and ``allot reconcile`` flags such a carry
until then. No unit is carried twice: what (a) carries leaves the earlier round's stock and
``expired`` tally, so a second carry finds nothing to take (it records 0).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from allocator.catalogue import Catalogue
from allocator.errors import BatchConflict, CarryNotReady, InvalidRequest, NotFound, Unavailable
from allocator.expiry import Expiry
from allocator.keys import Keys
from allocator.losswatch import LossWatch, round_refusal
from allocator.model import ms_to_rfc3339
from allocator.operators import BatchResult, Operators
from allocator.scripts import Scripts
from allocator.store import Store
from allocator.topology import ReplicaWait

log = logging.getLogger("allot.carryover")

SWEEP_ATTEMPTS = 3  # expire-then-carry attempts before answering "try again"


def carry_name(to_round: str, batch_id: str) -> str:
    """The field of the earlier round's carries hash that records one carry."""
    return f"{to_round}/{batch_id}"


def carry_items(record: bytes | str) -> list[tuple[str, int]]:
    """The [site, units] pairs of a carry record (an empty Lua list is encoded as {})."""
    parsed: dict[str, Any] = orjson.loads(record)
    return [(str(site), int(units)) for site, units in (parsed.get("items") or [])]


class CarryOver:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        scripts: Scripts,
        catalogue: Catalogue,
        watch: LossWatch,
        operators: Operators,
        expiry: Expiry,
        *,
        replicas: ReplicaWait | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.scripts = scripts
        self.catalogue = catalogue
        self.watch = watch
        self.operators = operators
        self.expiry = expiry
        # [redis] wait_replicas: step (a) is answered only once a replica has it, and so is (b)
        # (Operators.load_batch); the facade passes the one ReplicaWait it shares
        self.replicas = replicas or ReplicaWait(store.redis, 0, 0)

    async def carry(self, round_id: str, batch_id: str, carry_from: str) -> BatchResult:
        """Carry ``carry_from``'s unclaimed units into ``round_id`` as batch ``batch_id``."""
        if carry_from == round_id:
            raise InvalidRequest.one("carry_from", "must name another round than this one")
        await self.catalogue.round(round_id)
        try:
            await self.catalogue.round(carry_from)
        except NotFound:
            raise NotFound(f"There is no round {carry_from!r} to carry over from.") from None
        earlier = await self.catalogue.round_keys(carry_from)
        later = await self.catalogue.round_keys(round_id)
        name = carry_name(round_id, batch_id)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.hexists(earlier.carries, name)
            pipe.hexists(later.batches, batch_id)
            recorded, taken = await self.store.redis_call(pipe.execute())
        if taken and not recorded:  # checked before (a): a conflict must not carry anything
            raise BatchConflict(f"Batch {batch_id!r} was already loaded with other contents.")
        status, record = await self._take(carry_from, round_id, batch_id)
        items = carry_items(record)
        if items:
            loaded = await self.operators.load_batch(round_id, batch_id, items)
            created = loaded.created
        else:
            created = status == "carried"
        if status == "replay" and created:
            log.warning(
                "carry %s from round %s: loaded into round %s only now (healed by the replay)",
                batch_id,
                carry_from,
                round_id,
            )
        return BatchResult(
            batch_id=batch_id,
            units_added=sum(q for _, q in items),
            sites=len(items),
            created=created,
            carried_from=carry_from,
        )

    async def _take(self, carry_from: str, round_id: str, batch_id: str) -> tuple[str, bytes]:
        """Step (a): carry.lua on the earlier round, expiring what is still confirmed first."""
        rk = await self.catalogue.round_keys(carry_from)
        for _ in range(SWEEP_ATTEMPTS):
            floor = await self.watch.floor(carry_from)
            # WAIT after carry.lua also covers the expire.lua chunks the sweep below ran on the
            # same primary before it. A 503 past the wait: the retry replays (a), then (b)
            reply = await self.store.redis_call(
                self.replicas.run(
                    self.scripts.carry,
                    [rk.round, rk.stock, rk.tally, rk.ledger, rk.carries],
                    [round_id, batch_id, floor],
                ),
                key=rk.round,
            )
            status = self.watch.whole_or_lost(carry_from, reply)
            if status in ("carried", "replay"):
                return status, reply[1]
            if status == "not-ready":
                ends = ms_to_rfc3339(int(reply[1]))
                raise CarryNotReady(
                    f"Round {carry_from!r} is in its pickup window until {ends}: its leftovers"
                    " can be carried over after that."
                )
            if status == "no-round":
                if self.watch.knows(carry_from):
                    raise round_refusal()
                raise NotFound(f"There is no round {carry_from!r} to carry over from.")
            if status != "unswept":
                raise AssertionError(f"carry.lua answered {status!r}")
            await self.expiry.sweep_round(carry_from, locked=False)
        raise Unavailable(
            f"Round {carry_from!r} still has reservations being expired; please try again.",
            retry_after=1,
        )
