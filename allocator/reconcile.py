"""``allot reconcile``: prove, per round and site, that Redis and the ledger tell the same story.

Checks, per site: Redis balances (loaded = remaining + reserved + collected + expired +
carried_out, remaining >= 0); and, once the stream backlog is drained, Redis agrees with
PostgreSQL (units loaded by recorded batches, units of confirmed reservations, units collected,
units of expired reservations not carried over, units carried out by recorded carry-overs,
number of reservations). Per round: every carry-over recorded on it (lua/carry.lua, step (a))
was loaded into its later round under its batch_id with the same contents (step (b)); a carry
interrupted between the two is named with the request that heals it. Per round:
Redis is not behind the ledger (its change sequence ``seq`` against ``rounds.ledger_seq``, see
allocator/integrity.py); reservation by reservation, every one the ledger has is in Redis with
the same status, and every one Redis has is in the ledger, leaving out those whose entries still
wait in the stream (ledger lag, not loss); no citizen holds two live reservations in the ledger;
the dead-letter stream is empty. For a round of a programme: every live reservation whose
cooldown has not ended has its bar in the programme's entitlement hash, and no bar of the round
there belongs to a reservation the ledger has cancelled or lacks; and Redis's round -> key tag
mapping agrees with the ledger's. For a lottery round: its entries, one by one and counted per
status and site (allocator/reconcile_entries.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import defaultdict
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from allocator.carryover import carry_items
from allocator.integrity import check_round, tally_counts
from allocator.keys import Keys, RoundKeys
from allocator.operators import batch_digest
from allocator.reconcile_entries import entry_report
from allocator.redistyping import awaited
from allocator.tags import ledger_tag, load_tags

LISTED = 50  # reservations named per kind of difference; the counts are always complete


async def wait_for_ledger(redis: Redis, streams: list[str], wait: float) -> None:
    """Give the writer up to ``wait`` seconds to drain every round's stream."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while loop.time() < deadline:
        if not any([await redis.xlen(stream) for stream in streams]):
            return
        await asyncio.sleep(0.2)


async def reconcile(
    redis: Redis,
    con: asyncpg.Connection,
    keys: Keys,
    round_ids: list[str] | None = None,
    *,
    wait: float = 30.0,
) -> dict[str, Any]:
    if round_ids is None:
        round_ids = sorted(m.decode() for m in await awaited(redis.smembers(keys.rounds)))
    # each round's keys under the tag the ledger records (Redis's mapping for a round the
    # ledger lacks); a mapping that disagrees with the ledger is reported per round
    mapped = await load_tags(redis, keys)
    tags = {r: await ledger_tag(con, r) or mapped.get(r) for r in round_ids}
    round_keys = {r: keys.round(r, tags[r]) for r in round_ids}
    await wait_for_ledger(redis, [rk.ledger for rk in round_keys.values()], wait)
    rounds = [
        await _round(redis, con, keys, round_keys[r], r, mapped.get(r), tags[r]) for r in round_ids
    ]
    return {"ok": all(r["ok"] for r in rounds), "rounds": rounds}


async def _round(
    redis: Redis,
    con: asyncpg.Connection,
    keys: Keys,
    rk: RoundKeys,
    round_id: str,
    mapped: str | None,
    tag: str | None,
) -> dict[str, Any]:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(rk.loaded)
        pipe.hgetall(rk.stock)
        pipe.hgetall(rk.tally)
        pipe.hlen(rk.reservations)
        pipe.xlen(rk.ledger)
        pipe.xlen(rk.dead)
        pipe.exists(rk.round)
        pipe.hgetall(rk.carries)
        (
            loaded_raw,
            stock_raw,
            tally_raw,
            n_res,
            backlog,
            dead,
            exists,
            carries_raw,
        ) = await pipe.execute()
    loaded = {k.decode(): int(v) for k, v in loaded_raw.items()}
    stock = {k.decode(): int(v) for k, v in stock_raw.items()}
    tally = tally_counts(tally_raw)
    ledger_seq = await con.fetchval("SELECT ledger_seq FROM rounds WHERE round_id = $1", round_id)
    lost = (
        await check_round(redis, keys, round_id, int(ledger_seq), tag)
        if ledger_seq is not None
        else None
    )
    differences = await _differences(redis, con, rk, round_id)
    cooldowns = await _cooldowns(redis, con, rk, round_id)
    entries = await entry_report(redis, con, rk, round_id, backlog=backlog)

    ledger_loaded: dict[str, int] = defaultdict(int)
    for row in await con.fetch("SELECT items FROM batches WHERE round_id = $1", round_id):
        for site_id, units in orjson.loads(row["items"]):
            ledger_loaded[site_id] += int(units)
    by_status: dict[tuple[str, str], int] = {}
    for row in await con.fetch(
        "SELECT site_id, status, sum(quantity) AS units FROM reservations"
        " WHERE round_id = $1 GROUP BY site_id, status",
        round_id,
    ):
        by_status[(row["site_id"], row["status"])] = int(row["units"])
    ledger_carried: dict[str, int] = defaultdict(int)
    ledger_carried_expired: dict[str, int] = defaultdict(int)
    for row in await con.fetch("SELECT parts FROM carries WHERE from_round = $1", round_id):
        for site_id, from_remaining, from_expired in orjson.loads(row["parts"]):
            ledger_carried[site_id] += int(from_remaining) + int(from_expired)
            ledger_carried_expired[site_id] += int(from_expired)
    carries = await _carries(redis, con, keys, carries_raw)
    recorded = await con.fetchval("SELECT count(*) FROM reservations WHERE round_id = $1", round_id)
    doubles = await con.fetchval(
        "SELECT count(*) FROM (SELECT citizen_hash FROM reservations"
        " WHERE round_id = $1 AND status <> 'cancelled'"
        " GROUP BY citizen_hash HAVING count(*) > 1) d",
        round_id,
    )

    problems: list[str] = []
    if not exists:
        problems.append("the round is not in Redis (lost? see `allot rebuild`)")
    if lost is not None:
        problems.append(lost.describe())
    for kind, text in (
        ("in_ledger_not_redis", "in the ledger but not in Redis (Redis lost them)"),
        ("in_redis_not_ledger", "in Redis but not in the ledger (beyond the stream's lag)"),
        ("status_differs", "with another status in Redis than in the ledger"),
    ):
        if differences[kind]["count"]:
            problems.append(f"{differences[kind]['count']} reservation(s) {text}")
    if backlog:
        problems.append(f"{backlog} ledger entries still wait in Redis; ledger figures are behind")
    if dead:
        problems.append(f"{dead} ledger entries are in the dead-letter stream {rk.dead}")
    if doubles:
        problems.append(f"{doubles} citizen(s) hold two live reservations in the ledger")
    if mapped != tag and not (mapped is None and tag == Keys.tag_for(round_id, None)):
        problems.append(
            f"Redis maps the round to key tag {mapped!r}, the ledger to {tag!r}"
            " (see `allot rebuild`)"
        )
    if cooldowns is not None and not backlog:
        for kind, text in (
            ("missing", "live reservation(s) whose cooldown is not in Redis"),
            ("stale", "cooldown(s) in Redis of reservations the ledger has not live"),
        ):
            if cooldowns[kind]["count"]:
                problems.append(f"{cooldowns[kind]['count']} {text}")
    if entries is not None:  # a lottery round's entries (allocator/reconcile_entries.py)
        problems.extend(f"entries: {p}" for p in entries["problems"])
    if not backlog and recorded != n_res:
        problems.append(f"Redis has {n_res} reservations, the ledger {recorded}")
    for carry in carries:
        if carry["loaded_into_later_round"] is not True:
            problems.append(
                f"carry-over {carry['batch_id']!r} into round {carry['to_round']!r}:"
                f" {carry['units']} unit(s) carried out of this round, but that round"
                f" {carry['loaded_into_later_round']}; replay the same request (POST"
                f" /api/v1/admin/rounds/{carry['to_round']}/batches with batch_id"
                f" {carry['batch_id']!r} and carry_from {round_id!r}) to load them"
            )

    sites = []
    for site_id in sorted(set(loaded) | set(stock) | set(ledger_loaded)):
        reserved = tally.get(f"reserved:{site_id}", 0)
        collected = tally.get(f"collected:{site_id}", 0)
        expired = tally.get(f"expired:{site_id}", 0)
        carried_out = tally.get(f"carried_out:{site_id}", 0)
        remaining = stock.get(site_id, 0)
        ledger = {
            "loaded": ledger_loaded.get(site_id, 0),
            "live": by_status.get((site_id, "confirmed"), 0),  # units of confirmed ones
            "collected": by_status.get((site_id, "collected"), 0),
            # units of expired reservations, less those a carry-over took away
            "expired": by_status.get((site_id, "expired"), 0)
            - ledger_carried_expired.get(site_id, 0),
            "carried_out": ledger_carried.get(site_id, 0),
        }
        site_problems = []
        if loaded.get(site_id, 0) != remaining + reserved + collected + expired + carried_out:
            site_problems.append(
                f"loaded {loaded.get(site_id, 0)} != remaining {remaining}"
                f" + reserved {reserved} + collected {collected} + expired {expired}"
                f" + carried_out {carried_out}"
            )
        if remaining < 0:
            site_problems.append(f"remaining is negative ({remaining})")
        if not backlog:
            for name, redis_value in (
                ("loaded", loaded.get(site_id, 0)),
                ("live", reserved),
                ("collected", collected),
                ("expired", expired),
                ("carried_out", carried_out),
            ):
                if ledger[name] != redis_value:
                    site_problems.append(f"{name}: Redis {redis_value}, ledger {ledger[name]}")
        sites.append(
            {
                "site_id": site_id,
                "loaded": loaded.get(site_id, 0),
                "remaining": remaining,
                "reserved": reserved,
                "collected": collected,
                "expired": expired,
                "carried_out": carried_out,
                "ledger": ledger,
                "ok": not site_problems,
                "problems": site_problems,
            }
        )
    ok = not problems and all(s["ok"] for s in sites)
    return {
        "round_id": round_id,
        "ok": ok,
        "backlog": backlog,
        "dead_letters": dead,
        "reservations": {"redis": n_res, "ledger": recorded},
        "differences": differences,
        "cooldowns": cooldowns,
        "entries": entries,
        "seq": {"redis": tally.get("seq", 0), "ledger": ledger_seq},
        "lost": lost.public() if lost is not None else None,
        "carries": carries,
        "problems": problems,
        "sites": sites,
    }


async def _cooldowns(
    redis: Redis, con: asyncpg.Connection, rk: RoundKeys, round_id: str
) -> dict[str, Any] | None:
    """For a round of a programme: the bars its live reservations set (claim.lua) against the
    programme's entitlement hash. ``missing``: a live reservation of the ledger whose cooldown
    has not ended (by the round's cooldown_days now) and whose citizen has no bar of it in
    Redis; ``stale``: a bar of this round in Redis for a reservation the ledger has not live.
    None for a round in no programme."""
    row = await con.fetchrow(
        "SELECT programme, cooldown_days FROM rounds WHERE round_id = $1", round_id
    )
    if row is None or not row["programme"]:
        return None
    live = {
        r["reservation_id"]: r
        for r in await con.fetch(
            "SELECT reservation_id, citizen_hash, citizen_id_masked, created_at"
            " FROM reservations WHERE round_id = $1 AND status <> 'cancelled'",
            round_id,
        )
    }
    now = dt.datetime.now(dt.UTC)
    days = dt.timedelta(days=int(row["cooldown_days"]))
    bars: dict[str, str] = {}
    async for citizen, value in redis.hscan_iter(rk.entitled, count=1000):
        _, _, held = value.decode().partition(" ")
        bars[citizen.decode()] = held
    ours = {c: held for c, held in bars.items() if held.rpartition(".")[2] == round_id}
    missing = [
        rid
        for rid, r in live.items()
        if days and r["created_at"] + days > now and bars.get(r["citizen_hash"]) != rid
    ]
    stale = sorted(held for held in ours.values() if held not in live)
    return {
        "programme": row["programme"],
        "cooldown_days": int(row["cooldown_days"]),
        "bars_of_round": len(ours),
        "missing": {
            "count": len(missing),
            "listed": [
                {"reservation": _ref(rid), "citizen_id_masked": live[rid]["citizen_id_masked"]}
                for rid in missing[:LISTED]
            ],
        },
        "stale": {"count": len(stale), "listed": [_ref(rid) for rid in stale[:LISTED]]},
    }


async def _carries(
    redis: Redis, con: asyncpg.Connection, keys: Keys, raw: dict[bytes, bytes]
) -> list[dict[str, Any]]:
    """Every carry-over recorded on a round (step (a)), and whether its later round loaded it
    (step (b): the batch_id there, with the same contents); a carry of 0 units needs no load."""
    found = []
    for name in sorted(raw):
        record = orjson.loads(raw[name])
        items = carry_items(raw[name])
        to_round, batch_id = str(record["to"]), str(record["batch_id"])
        status: bool | str = True
        if items:
            later = keys.round(to_round, await ledger_tag(con, to_round))
            digest = await awaited(redis.hget(later.batches, batch_id))
            if digest is None:
                status = "never loaded them (interrupted between the two steps?)"
            elif _text(digest) != batch_digest(items):
                status = "holds that batch_id with other contents"
        found.append(
            {
                "to_round": to_round,
                "batch_id": batch_id,
                "units": sum(q for _, q in items),
                "loaded_into_later_round": status,
            }
        )
    return found


async def _differences(
    redis: Redis, con: asyncpg.Connection, rk: RoundKeys, round_id: str
) -> dict[str, Any]:
    """Reservations Redis and the ledger disagree on, one by one; those with an entry still in
    the stream are left out (the ledger has simply not written them yet)."""
    pending: set[str] = set()
    for _, fields in await redis.xrange(rk.ledger):
        if fields.get(b"kind") == b"reservation":
            pending.add(orjson.loads(fields[b"record"]).get("id", ""))
    in_redis: dict[str, dict[str, Any]] = {}
    async for rid, record in redis.hscan_iter(rk.reservations, count=1000):
        in_redis[rid.decode()] = orjson.loads(record)
    in_ledger = {
        r["reservation_id"]: r
        for r in await con.fetch(
            "SELECT reservation_id, site_id, status, citizen_id_masked, created_at"
            " FROM reservations WHERE round_id = $1 ORDER BY created_at",
            round_id,
        )
    }

    def from_ledger(rid: str) -> dict[str, Any]:
        r = in_ledger[rid]
        return {
            "reservation": _ref(rid),
            "site_id": r["site_id"],
            "status": r["status"],
            "citizen_id_masked": r["citizen_id_masked"],
            "created_at": r["created_at"].isoformat(),
        }

    def from_redis(rid: str) -> dict[str, Any]:
        r = in_redis[rid]
        return {
            "reservation": _ref(rid),
            "site_id": r.get("site"),
            "status": r.get("status"),
            "citizen_id_masked": r.get("mask"),
        }

    lacking = [rid for rid in in_ledger if rid not in in_redis and rid not in pending]
    unrecorded = sorted(rid for rid in in_redis if rid not in in_ledger and rid not in pending)
    differing = [
        rid
        for rid in in_ledger
        if rid in in_redis
        and rid not in pending
        and str(in_redis[rid].get("status")) != in_ledger[rid]["status"]
    ]
    return {
        "in_ledger_not_redis": {
            "count": len(lacking),
            "listed": [from_ledger(r) for r in lacking[:LISTED]],
        },
        "in_redis_not_ledger": {
            "count": len(unrecorded),
            "listed": [from_redis(r) for r in unrecorded[:LISTED]],
        },
        "status_differs": {
            "count": len(differing),
            "listed": [
                {**from_ledger(r), "status_in_redis": in_redis[r].get("status")}
                for r in differing[:LISTED]
            ],
        },
        "in_stream": len(pending),
    }


def _text(value: bytes | str) -> str:
    """redis-py's typing says str; this client (no decode_responses) answers bytes."""
    return value.decode() if isinstance(value, bytes) else value


def _ref(reservation_id: str) -> str:
    """The first 8 characters: enough to find the row, not enough to act as its holder (the
    reservation_id is the citizen's key; the rest stays out of reports and tickets)."""
    return reservation_id[:8] + "…"
