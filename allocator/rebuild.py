"""``allot rebuild``: restore a round's Redis state from the ledger after Redis lost its data.

The ledger holds every batch and every reservation that reached it, so stock is recomputed as
loaded minus the units of live and collected reservations. What was in the Redis stream and not
yet written is gone with Redis; that is why a rebuild refuses to overwrite a round whose stream
still has entries (``--force`` overrides, and says what it discards).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from allocator.keys import Keys
from allocator.ledger import GROUP
from allocator.model import Site
from allocator.redistyping import awaited

log = logging.getLogger("allot.rebuild")


class RebuildRefused(Exception):
    """Rebuilding would discard state that exists only in Redis."""


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


async def rebuild_round(
    redis: Redis, con: asyncpg.Connection, keys: Keys, round_id: str, *, force: bool = False
) -> dict[str, Any]:
    row = await con.fetchrow("SELECT * FROM rounds WHERE round_id = $1", round_id)
    if row is None:
        raise RebuildRefused(f"round {round_id!r} is not in the ledger")
    rk = keys.round(round_id)
    backlog = int(await redis.xlen(rk.ledger))
    if backlog and not force:
        raise RebuildRefused(
            f"round {round_id!r} still has {backlog} ledger entries in Redis that are not yet in"
            " PostgreSQL; let the writer drain them (or pass --force to discard them)"
        )
    if await awaited(redis.hlen(rk.reservations)) and not force:
        raise RebuildRefused(
            f"Redis still holds reservations of round {round_id!r}; rebuild replaces them"
            " (pass --force if that is what you want)"
        )
    # spec is the round hash exactly as the service wrote it (allocator.model.Round.to_redis)
    round_hash: dict[str, Any] = orjson.loads(row["spec"])

    loaded: dict[str, int] = defaultdict(int)
    digests: dict[str, str] = {}
    for b in await con.fetch(
        "SELECT batch_id, digest, items FROM batches WHERE round_id = $1", round_id
    ):
        digests[b["batch_id"]] = b["digest"]
        for site_id, units in orjson.loads(b["items"]):
            loaded[site_id] += int(units)

    records: dict[str, bytes] = {}
    holders: dict[str, str] = {}
    codes: dict[str, dict[str, str]] = defaultdict(dict)
    site_holders: dict[str, set[str]] = defaultdict(set)
    tally: dict[str, int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    for r in await con.fetch(
        "SELECT * FROM reservations WHERE round_id = $1 ORDER BY created_at", round_id
    ):
        status = "confirmed" if r["status"] == "expired" else r["status"]  # expiry is derived
        records[r["reservation_id"]] = orjson.dumps(
            {
                "id": r["reservation_id"],
                "site": r["site_id"],
                "qty": r["quantity"],
                "status": status,
                "code": r["pickup_code"],
                "cit": r["citizen_hash"],
                "ph": r["phone_hash"],
                "mask": r["citizen_id_masked"],
                "created": _ms(r["created_at"]),
                "updated": _ms(r["updated_at"]),
            }
        )
        codes[r["site_id"]][r["pickup_code"]] = r["reservation_id"]
        site_holders[r["site_id"]].add(r["citizen_hash"])
        tally["created"] += 1
        if status != "cancelled":
            holders[r["citizen_hash"]] = r["reservation_id"]
            field = "reserved" if status == "confirmed" else "collected"
            tally[f"{field}:{r['site_id']}"] += r["quantity"]
            held[r["site_id"]] += r["quantity"]
    stock = {site: loaded[site] - held.get(site, 0) for site in loaded}

    sites = [
        Site(s["site_id"], s["name"], s["address"], s["district"])
        for s in await con.fetch("SELECT site_id, name, address, district FROM sites")
    ]
    stale = [
        k
        for pattern in (rk.codes("*"), rk.site_holders("*"))
        async for k in redis.scan_iter(match=pattern, count=1000)
    ]

    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*rk.all_static(), *stale)
        pipe.hset(rk.round, mapping=round_hash)
        if stock:
            pipe.hset(rk.stock, mapping=stock)
            pipe.hset(rk.loaded, mapping=dict(loaded))
        if digests:
            pipe.hset(rk.batches, mapping=digests)
        if records:
            pipe.hset(rk.reservations, mapping=records)
        if holders:
            pipe.hset(rk.holders, mapping=holders)
        if tally:
            pipe.hset(rk.tally, mapping=dict(tally))
        for site_id, mapping in codes.items():
            pipe.hset(rk.codes(site_id), mapping=mapping)
        for site_id, members in site_holders.items():
            pipe.sadd(rk.site_holders(site_id), *members)
        await pipe.execute()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.sadd(keys.rounds, round_id)
        if sites:
            pipe.hset(
                keys.sites,
                mapping={
                    s.site_id: orjson.dumps(
                        {"name": s.name, "address": s.address, "district": s.district}
                    )
                    for s in sites
                },
            )
        await pipe.execute()
    try:
        await redis.xgroup_create(rk.ledger, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    summary = {
        "round_id": round_id,
        "loaded": sum(loaded.values()),
        "remaining": sum(stock.values()),
        "reservations": len(records),
        "live": len(holders),
        "batches": len(digests),
        "discarded_backlog": backlog,
    }
    log.info("rebuilt round %s from the ledger: %s", round_id, summary)
    return summary


async def ledger_round_ids(con: asyncpg.Connection) -> list[str]:
    return [r["round_id"] for r in await con.fetch("SELECT round_id FROM rounds ORDER BY round_id")]
