"""The lottery part of ``allot reconcile``: a round's entries in Redis against the ledger's.

Redis keeps, per round, every entry's record (``entries``: entry_id -> JSON, lua/enter.lua,
withdraw.lua, award.lua), the live entry of each citizen (``entrants``: citizen hash ->
entry_id) and a live-entry counter per site in the tally (``entries:<site>``). The ledger's
``entries`` table is what the freeze lists and the draw is replayed from, so a difference here
is an entry a citizen was answered for that the draw would not see (or the other way round).

Checked, leaving out entries whose change still waits in the round's stream (ledger lag, not
loss): every entry Redis has is in the ledger with the same site_id, accept_district, status,
citizen and reservation; every entry the ledger has is in Redis; the counts per status and the
live entries per site agree; Redis's own counters agree with its records (``entries:<site>``
with the live records, ``entrants`` with the live records' citizens); and no citizen holds two
live entries in the ledger.

Statuses: Redis stores ``registered`` | ``withdrawn`` | ``won``; the freeze writes ``excluded``
into the ledger only and the draw's ``not-drawn`` is derived there (the ``entries_shown`` view,
migration 0009, read here; allocator/drawjob.py; the citizen is shown both through
service/shapes.py), so a Redis ``registered`` matches a ledger ``registered``,
``excluded`` or ``not-drawn``. Should Redis ever store those two itself, they compare as they
are.

Kept apart from allocator/reconcile.py (which calls :func:`entry_report` once per round and
adds its problems) so the reservation checks there and these can change independently.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from allocator.keys import RoundKeys

LISTED = 50  # entries named per kind of difference; the counts are always complete

# what a ledger status may be while Redis still says "registered" (set by the freeze/draw only)
_LEDGER_ONLY = frozenset({"excluded", "not-drawn"})
_FIELDS = ("site_id", "accept_district", "status", "citizen", "reservation_id")


def same_status(in_redis: str, in_ledger: str) -> bool:
    return in_redis == in_ledger or (in_redis == "registered" and in_ledger in _LEDGER_ONLY)


def _counted_status(in_redis: str, in_ledger: str | None) -> str:
    """The status an entry is counted under on the Redis side: the ledger's own when the two
    agree (a registered entry the draw marked not-drawn counts as not-drawn on both sides)."""
    if in_ledger is not None and same_status(in_redis, in_ledger):
        return in_ledger
    return in_redis


async def entry_report(
    redis: Redis, con: asyncpg.Connection, rk: RoundKeys, round_id: str, *, backlog: int
) -> dict[str, Any] | None:
    """The round's entries, Redis against the ledger; None for a round that has none in either
    and is not a lottery round. ``problems`` lists what does not match; comparisons with the
    ledger's totals are skipped while ``backlog`` (the round's stream) is not empty, the
    entry-by-entry ones leave out the entries still in it."""
    mode = await con.fetchval("SELECT mode FROM rounds WHERE round_id = $1", round_id)
    pending: set[str] = set()
    for _, fields in await redis.xrange(rk.ledger):
        if fields.get(b"kind") == b"entry":
            pending.add(str(orjson.loads(fields[b"record"]).get("id", "")))
    in_redis: dict[str, dict[str, Any]] = {}
    async for eid, record in redis.hscan_iter(rk.entries, count=1000):
        in_redis[eid.decode()] = orjson.loads(record)
    entrants: dict[str, str] = {}
    async for citizen, eid in redis.hscan_iter(rk.entrants, count=1000):
        entrants[citizen.decode()] = eid.decode()
    counters = {
        k.decode().partition(":")[2]: int(v)
        for k, v in (await redis.hgetall(rk.tally)).items()  # type: ignore[misc]
        if k.startswith(b"entries:")
    }
    in_ledger = {
        r["entry_id"]: r
        for r in await con.fetch(
            "SELECT entry_id, site_id, accept_district, status, citizen_hash, reservation_id,"
            " citizen_id_masked FROM entries_shown WHERE round_id = $1 ORDER BY created_at",
            round_id,
        )
    }
    if mode != "lottery" and not in_redis and not in_ledger:
        return None

    def redis_fields(eid: str) -> dict[str, Any]:
        r = in_redis[eid]
        return {
            "site_id": r.get("site"),
            "accept_district": bool(int(r.get("acc", 0))),
            "status": r.get("status"),
            "citizen": r.get("cit"),
            "reservation_id": r.get("res") or None,
        }

    def ledger_fields(eid: str) -> dict[str, Any]:
        r = in_ledger[eid]
        return {
            "site_id": r["site_id"],
            "accept_district": bool(r["accept_district"]),
            "status": r["status"],
            "citizen": r["citizen_hash"],
            "reservation_id": r["reservation_id"] or None,
        }

    lacking = [e for e in in_ledger if e not in in_redis and e not in pending]
    unrecorded = sorted(e for e in in_redis if e not in in_ledger and e not in pending)
    differing: list[dict[str, Any]] = []
    for eid in in_ledger:
        if eid not in in_redis or eid in pending:
            continue
        mine, theirs = redis_fields(eid), ledger_fields(eid)
        fields = [
            f
            for f in _FIELDS
            if not (same_status(mine[f], theirs[f]) if f == "status" else mine[f] == theirs[f])
        ]
        if fields:
            differing.append(
                {
                    "entry": _ref(eid),
                    "citizen_id_masked": in_ledger[eid]["citizen_id_masked"],
                    "fields": fields,
                    # the citizen hash is named by whether it matches, never shown
                    "redis": _public({f: mine[f] for f in fields}),
                    "ledger": _public({f: theirs[f] for f in fields}),
                }
            )

    redis_status = Counter(
        _counted_status(str(r.get("status")), in_ledger[e]["status"] if e in in_ledger else None)
        for e, r in in_redis.items()
    )
    ledger_status = Counter(r["status"] for r in in_ledger.values())
    live_records = {e: r for e, r in in_redis.items() if r.get("status") != "withdrawn"}
    redis_live = Counter(str(r.get("site")) for r in live_records.values())
    ledger_live = Counter(r["site_id"] for r in in_ledger.values() if r["status"] != "withdrawn")
    live_citizens = {str(r.get("cit")): e for e, r in live_records.items()}
    doubles = await con.fetchval(
        "SELECT count(*) FROM (SELECT citizen_hash FROM entries"
        " WHERE round_id = $1 AND status <> 'withdrawn'"
        " GROUP BY citizen_hash HAVING count(*) > 1) d",
        round_id,
    )

    problems: list[str] = []
    for count, text in (
        (len(lacking), "in the ledger but not in Redis (Redis lost them)"),
        (len(unrecorded), "in Redis but not in the ledger (beyond the stream's lag)"),
        (len(differing), "that Redis and the ledger record differently"),
    ):
        if count:
            problems.append(f"{count} entr{'y' if count == 1 else 'ies'} {text}")
    if not backlog:
        if dict(redis_status) != dict(ledger_status):
            problems.append(
                f"entries by status: Redis {dict(sorted(redis_status.items()))},"
                f" ledger {dict(sorted(ledger_status.items()))}"
            )
        for site in sorted(set(redis_live) | set(ledger_live)):
            if redis_live[site] != ledger_live[site]:
                problems.append(
                    f"live entries at {site}: Redis {redis_live[site]}, ledger {ledger_live[site]}"
                )
    for site in sorted(set(counters) | set(redis_live)):
        if counters.get(site, 0) != redis_live[site]:
            problems.append(
                f"Redis counts {counters.get(site, 0)} live entries at {site} (tally"
                f" entries:{site}) but holds {redis_live[site]}"
            )
    if entrants != live_citizens:
        wrong = sum(
            1 for c in set(entrants) | set(live_citizens) if entrants.get(c) != live_citizens.get(c)
        )
        problems.append(
            f"{wrong} citizen(s) whose live entry in Redis's entrants hash is not their live"
            " entry record"
        )
    if doubles:
        problems.append(f"{doubles} citizen(s) hold two live entries in the ledger")

    sites = [
        {
            "site_id": site,
            "live": {"redis": redis_live[site], "ledger": ledger_live[site]},
            "counter": counters.get(site, 0),
        }
        for site in sorted(set(redis_live) | set(ledger_live) | set(counters))
    ]
    return {
        "ok": not problems,
        "entries": {"redis": len(in_redis), "ledger": len(in_ledger), "in_stream": len(pending)},
        "by_status": {
            "redis": dict(sorted(redis_status.items())),
            "ledger": dict(sorted(ledger_status.items())),
        },
        "sites": sites,
        "in_ledger_not_redis": {
            "count": len(lacking),
            "listed": [
                {
                    "entry": _ref(e),
                    **_public(ledger_fields(e)),
                    "citizen_id_masked": in_ledger[e]["citizen_id_masked"],
                }
                for e in lacking[:LISTED]
            ],
        },
        "in_redis_not_ledger": {
            "count": len(unrecorded),
            "listed": [
                {
                    "entry": _ref(e),
                    **_public(redis_fields(e)),
                    "citizen_id_masked": in_redis[e].get("mask"),
                }
                for e in unrecorded[:LISTED]
            ],
        },
        "differ": {"count": len(differing), "listed": differing[:LISTED]},
        "problems": problems,
    }


def _public(fields: dict[str, Any]) -> dict[str, Any]:
    """An entry's fields for the report: the citizen hash stays out of it, and a won entry's
    reservation_id (its holder's key) is cut as the entry_id is."""
    shown = {k: v for k, v in fields.items() if k != "citizen"}
    if shown.get("reservation_id"):
        shown["reservation_id"] = _ref(shown["reservation_id"])
    return shown


def _ref(entry_id: str) -> str:
    """The first 8 characters: the entry_id is the citizen's only key (API.md), so the rest
    stays out of reports and tickets."""
    return entry_id[:8] + "…"
