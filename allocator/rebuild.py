"""``allot rebuild``: restore a round's Redis state from the ledger after Redis lost its data.

The ledger holds every batch, reservation and carry-over that reached it, so stock is
recomputed as loaded minus the units of confirmed, collected and expired reservations and of what
carry-overs took (less the expired units among them, which the expired reservations already
count): loaded = remaining + reserved + collected + expired + carried_out again. Expired
reservations come back expired (their holders kept), carry records come back (so a replayed
carry answers as before), and the expiry sweep's marks are dropped (a new sweep finds whatever
the ledger still has as confirmed past pickup_end). For a round of a programme the cooldowns its
live reservations set come back into the programme's entitlement hash (only this round's: the
hash is shared with the programme's other rounds, which may be serving), computed with the
round's ``cooldown_days`` as the ledger has it now; the round -> hash tag mapping
(allocator/tags.py) is restored from ``rounds.key_tag``. What was in the Redis stream and not
yet written is gone with Redis; that is why a rebuild refuses to overwrite a round whose stream
still has entries (``--force`` overrides, and says what it discards).

A round Redis has lost data of (its ``seq`` is behind the ledger's ``ledger_seq``, or it is
gone; allocator/integrity.py) is what rebuild is for: it is rebuilt without ``--force`` once its
stream has drained, and the rebuild restores ``seq`` and clears the ``lost`` mark, so every
worker serves the round again within a second. A round that is whole and still holds
reservations in Redis is left alone unless ``--force``. The rewrite runs under ``WATCH`` of the
round's tally, which every change to the round touches: a change made meanwhile aborts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import WatchError

from allocator.entitlement import cooldown_until_ms
from allocator.integrity import check_round
from allocator.keys import Keys, RoundKeys
from allocator.ledger import create_group
from allocator.model import Site
from allocator.redistyping import awaited
from allocator.scripts import script_source
from allocator.tags import ledger_tag

log = logging.getLogger("allot.rebuild")


class RebuildRefused(Exception):
    """Rebuilding would discard state that exists only in Redis."""


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


async def needs_rebuild(redis: Redis, con: asyncpg.Connection, keys: Keys, round_id: str) -> bool:
    """Redis has lost data of the round that the ledger has, or lacks the round altogether."""
    floor = await con.fetchval("SELECT ledger_seq FROM rounds WHERE round_id = $1", round_id)
    if floor is None:
        return False
    tag = await ledger_tag(con, round_id)
    if await check_round(redis, keys, round_id, int(floor), tag) is not None:
        return True
    found = await awaited(redis.hget(keys.round_tags, round_id))
    mapped = found.decode() if isinstance(found, bytes) else found
    if mapped != tag and not (mapped is None and tag == Keys.tag_for(round_id, None)):
        return True  # the round -> tag mapping is gone or wrong: readers cannot find the round
    return not await redis.exists(keys.round(round_id, tag).round)


async def rebuild_round(
    redis: Redis,
    con: asyncpg.Connection,
    keys: Keys,
    round_id: str,
    *,
    force: bool = False,
    wait: float = 0.0,
) -> dict[str, Any]:
    """Rewrite the round's Redis state from the ledger; ``wait`` seconds for its stream to drain
    (the writers of a running service do that) before refusing."""
    floor = await con.fetchval("SELECT ledger_seq FROM rounds WHERE round_id = $1", round_id)
    if floor is None:
        raise RebuildRefused(f"round {round_id!r} is not in the ledger")
    tag = await ledger_tag(con, round_id)
    rk = keys.round(round_id, tag)
    # marks the round lost first when it is behind: no worker changes it from here on
    lost = await check_round(redis, keys, round_id, int(floor), tag)
    backlog = await _drained(redis, rk.ledger, wait)
    if backlog and not force:
        raise RebuildRefused(
            f"round {round_id!r} still has {backlog} ledger entries in Redis that are not yet in"
            " PostgreSQL; let the writer drain them (or pass --force to discard them)"
        )
    dead = int(await redis.xlen(rk.dead))
    if dead and not force:
        raise RebuildRefused(
            f"round {round_id!r} has {dead} entries in {rk.dead}, changes the ledger refused;"
            " a rebuild would drop them from Redis (pass --force if that is what you want)"
        )
    held: int = await awaited(redis.hlen(rk.reservations))
    if lost is None and held and not force:
        raise RebuildRefused(
            f"Redis still holds reservations of round {round_id!r} and has lost nothing the"
            " ledger has; rebuild replaces them (pass --force if that is what you want)"
        )
    for _ in range(3):
        try:
            summary = await _rewrite(redis, con, keys, round_id)
        except WatchError:
            log.warning("round %s changed while it was being rebuilt; again", round_id)
            continue
        summary["discarded_backlog"] = backlog
        summary["was_lost"] = lost.public() if lost is not None else None
        log.info("rebuilt round %s from the ledger: %s", round_id, summary)
        return summary
    raise RebuildRefused(f"round {round_id!r} kept changing during the rebuild; is it served?")


async def _drained(redis: Redis, stream: str, wait: float) -> int:
    """The stream's length, after waiting up to ``wait`` seconds for it to reach 0."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        backlog = int(await redis.xlen(stream))
        if not backlog or loop.time() >= deadline:
            return backlog
        await asyncio.sleep(0.2)


async def _rewrite(
    redis: Redis, con: asyncpg.Connection, keys: Keys, round_id: str
) -> dict[str, Any]:
    tag = await ledger_tag(con, round_id)
    if tag is None:
        raise RebuildRefused(f"round {round_id!r} is not in the ledger")
    rk = keys.round(round_id, tag)
    # readers find the round's keys through this mapping (allocator/tags.py); it is fixed for
    # a round that holds anything, so writing it first changes nothing a worker relies on
    await awaited(redis.hset(keys.round_tags, round_id, tag))
    async with redis.pipeline(transaction=True) as pipe:
        # every change to the round writes its tally (seq): one made from here on aborts EXEC
        await pipe.watch(rk.tally)
        redis_seq = int(await awaited(pipe.hget(rk.tally, "seq")) or 0)
        # the rows and their high-water mark as of one snapshot of the ledger
        async with con.transaction(isolation="repeatable_read", readonly=True):
            return await _rewrite_from(pipe, redis, con, keys, rk, round_id, redis_seq)


async def _rewrite_from(
    pipe: Any,
    redis: Redis,
    con: asyncpg.Connection,
    keys: Keys,
    rk: RoundKeys,
    round_id: str,
    redis_seq: int,
) -> dict[str, Any]:
    row = await con.fetchrow("SELECT * FROM rounds WHERE round_id = $1", round_id)
    if row is None:
        raise RebuildRefused(f"round {round_id!r} is not in the ledger")
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
    # the cooldowns the round's live reservations set in its programme (claim.lua's bars), with
    # the round's cooldown_days as the ledger has it now
    cooldown_days = int(row["cooldown_days"]) if row["programme"] else 0
    bars: list[str] = []
    districts = {
        s["site_id"]: s["district"] for s in await con.fetch("SELECT site_id, district FROM sites")
    }
    askers: dict[str, set[str]] = defaultdict(set)  # the fairness report's, from the ledger
    for r in await con.fetch(
        "SELECT * FROM reservations WHERE round_id = $1 ORDER BY created_at", round_id
    ):
        status = r["status"]  # expiry is recorded (the sweep), not derived
        record: dict[str, Any] = {
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
            "ch": r["channel"],
        }
        if r["age_band"] is not None:
            record["age"] = r["age_band"]
            askers[rk.fair_asked("age_band", r["age_band"])].add(r["citizen_hash"])
        if r["region"] is not None:
            record["reg"] = r["region"]
        records[r["reservation_id"]] = orjson.dumps(record)
        askers[rk.fair_asked("channel", r["channel"])].add(r["citizen_hash"])
        if r["site_id"] in districts:
            askers[rk.fair_asked("district", districts[r["site_id"]])].add(r["citizen_hash"])
        codes[r["site_id"]][r["pickup_code"]] = r["reservation_id"]
        site_holders[r["site_id"]].add(r["citizen_hash"])
        tally["created"] += 1
        if status != "cancelled":
            if cooldown_days:
                until = cooldown_until_ms(_ms(r["created_at"]), cooldown_days)
                bars += (r["citizen_hash"], str(until), r["reservation_id"])
            holders[r["citizen_hash"]] = r["reservation_id"]
            field = {"confirmed": "reserved", "collected": "collected", "expired": "expired"}
            tally[f"{field[status]}:{r['site_id']}"] += r["quantity"]
            held[r["site_id"]] += r["quantity"]
    # carry-overs out of this round (lua/carry.lua): their units left the stock, and the expired
    # units among them left the `expired` tally
    carries: dict[str, bytes] = {}
    carried: dict[str, int] = defaultdict(int)
    for c in await con.fetch(
        "SELECT to_round, batch_id, items, parts, carried_at FROM carries WHERE from_round = $1",
        round_id,
    ):
        parts = orjson.loads(c["parts"])
        carries[f"{c['to_round']}/{c['batch_id']}"] = orjson.dumps(
            {
                "to": c["to_round"],
                "batch_id": c["batch_id"],
                "items": orjson.loads(c["items"]),
                "parts": parts,
                "at": _ms(c["carried_at"]),
            }
        )
        for site_id, from_remaining, from_expired in parts:
            carried[site_id] += int(from_remaining)
            tally[f"carried_out:{site_id}"] += int(from_remaining) + int(from_expired)
            if int(from_expired):
                tally[f"expired:{site_id}"] -= int(from_expired)
                tally[f"carried_expired:{site_id}"] += int(from_expired)
    stock = {site: loaded[site] - held.get(site, 0) - carried.get(site, 0) for site in loaded}
    # a lottery round's entries (the ledger's kind=entry rows) and its draw's status
    entries: dict[str, bytes] = {}
    entrants: dict[str, str] = {}
    for e in await con.fetch(
        "SELECT * FROM entries WHERE round_id = $1 ORDER BY created_at", round_id
    ):
        status = "registered" if e["status"] == "not-drawn" else e["status"]
        record = {
            "id": e["entry_id"],
            "site": e["site_id"],
            "acc": int(e["accept_district"]),
            "status": status,  # not-drawn is derived from the draw, as enter.lua stores it
            "cit": e["citizen_hash"],
            "ph": e["phone_hash"],
            "mask": e["citizen_id_masked"],
            "created": _ms(e["created_at"]),
            "updated": _ms(e["updated_at"]),
            "ch": e["channel"],
        }
        if e["age_band"] is not None:
            record["age"] = e["age_band"]
        if e["reservation_id"]:
            record["res"] = e["reservation_id"]
        if e["weight"] is not None and e["weight"] > 1:
            record["w"] = e["weight"]  # the freeze's loss weight (lua/settle.lua)
        entries[e["entry_id"]] = orjson.dumps(record)
        if status != "withdrawn":
            entrants[e["citizen_hash"]] = e["entry_id"]
            tally[f"entries:{e['site_id']}"] += 1
    draw_row = await con.fetchrow(
        "SELECT status, drawn_at IS NOT NULL AS drawn FROM draws WHERE round_id = $1", round_id
    )
    if draw_row is not None:
        round_hash["draw"] = draw_row["status"]
        round_hash["drawn"] = "1" if draw_row["drawn"] else "0"
    # changes go on from the ledger's mark (or Redis's own, if that is higher): never backwards
    seq = max(int(row["ledger_seq"]), redis_seq)
    tally["seq"] = seq

    sites = [
        Site(s["site_id"], s["name"], s["address"], s["district"])
        for s in await con.fetch("SELECT site_id, name, address, district FROM sites")
    ]
    stale = [
        k
        for pattern in (rk.codes("*"), rk.site_holders("*"))
        async for k in redis.scan_iter(match=pattern, count=1000)
    ]

    pipe.multi()
    pipe.delete(*rk.all_static(), *stale)  # the tally with its `lost` mark among them
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
    if carries:
        pipe.hset(rk.carries, mapping=carries)
    if entries:
        pipe.hset(rk.entries, mapping=entries)
    if entrants:
        pipe.hset(rk.entrants, mapping=entrants)
    pipe.hset(rk.tally, mapping=dict(tally))
    for site_id, mapping in codes.items():
        pipe.hset(rk.codes(site_id), mapping=mapping)
    for site_id, members in site_holders.items():
        pipe.sadd(rk.site_holders(site_id), *members)
    # Askers only grow: the ledger's reservers are added back; citizens only ever refused
    # sold-out are not in the ledger, and are lost with the Redis that lost them.
    for key, members in askers.items():
        pipe.sadd(key, *members)
    if row["programme"]:
        # the programme's hash is shared with its other rounds: only this round's bars change
        restore = redis.register_script(script_source("restore_cooldowns"))
        await restore(keys=[rk.entitled], args=[round_id, *bars], client=pipe)
    replies = await pipe.execute()
    cooldowns = replies[-1][1] if row["programme"] else 0
    async with redis.pipeline(transaction=False) as after:
        after.sadd(keys.rounds, round_id)
        if sites:
            after.hset(
                keys.sites,
                mapping={
                    s.site_id: orjson.dumps(
                        {"name": s.name, "address": s.address, "district": s.district}
                    )
                    for s in sites
                },
            )
        await after.execute()
    await create_group(redis, rk.ledger)
    return {
        "round_id": round_id,
        "loaded": sum(loaded.values()),
        "remaining": sum(stock.values()),
        "reservations": len(records),
        "live": len(holders),
        "batches": len(digests),
        "carries": len(carries),
        "entries": len(entries),
        "seq": seq,
        "cooldowns": int(cooldowns),
    }


async def ledger_round_ids(con: asyncpg.Connection) -> list[str]:
    return [r["round_id"] for r in await con.fetch("SELECT round_id FROM rounds ORDER BY round_id")]
