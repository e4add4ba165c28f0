"""The lottery's heavy steps, run in a process of their own: the freeze, the draw and a pass.

Each job opens its own PostgreSQL connection, takes the round's draw lock (a transaction-level
advisory lock, so one worker of one node does it) and the ``draws`` row ``FOR UPDATE``, checks
that the round is in the state the step starts from, computes with allocator/draw.py and writes
the result in the same transaction. A job asked for twice, or by two workers at once, does the
work once; the other answers the status it found. Nothing here touches Redis: the winners'
reservations are made afterwards by the worker (allocator/lottery.py, lua/award.lua), from the
``draw_awards`` rows written here.

The entry points (``freeze``, ``draw_round``, ``next_pass``) are plain functions of picklable
arguments, for a ``ProcessPoolExecutor``: a draw of a million entries sorts and hashes for
seconds, and must not hold any worker's event loop (nor, as a thread, its GIL).
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections import defaultdict
from typing import Any

import asyncpg
import orjson

from allocator import draw as d

DRAW_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext($1))"


def lock_name(round_id: str) -> str:
    return f"allot-draw:{round_id}"


# -- the files back into the draw's values ---------------------------------------------------


def _rows(data: bytes) -> list[list[str]]:
    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    next(reader)
    return list(reader)


def frozen_from_files(entries_csv: bytes, stock_csv: bytes) -> d.FrozenList:
    """The frozen list as published; the files rebuilt from it must be the same bytes."""
    stock = [d.StockLine(s, dist, int(u)) for s, dist, u in _rows(stock_csv)]
    entries = [d.EntryLine(r, s, dist, a == "1", int(w)) for r, s, dist, a, w in _rows(entries_csv)]
    frozen = d.freeze(entries, stock)
    if frozen.entries_csv != entries_csv or frozen.stock_csv != stock_csv:
        raise d.DrawInputError("the stored files do not rebuild byte for byte")
    return frozen


async def _site_units(con: asyncpg.Connection, round_id: str) -> dict[str, int]:
    """Units ever loaded into the round (batches in the ledger) plus units of cancelled
    reservations (in a lottery round every reservation is a win: cancelled ones came back)."""
    units: dict[str, int] = defaultdict(int)
    for b in await con.fetch("SELECT items FROM batches WHERE round_id = $1", round_id):
        for site_id, q in orjson.loads(b["items"]):
            units[site_id] += int(q)
    for r in await con.fetch(
        "SELECT site_id, sum(quantity) AS q FROM reservations"
        " WHERE round_id = $1 AND status = 'cancelled' GROUP BY site_id",
        round_id,
    ):
        units[r["site_id"]] += int(r["q"])
    return units


async def _locked_draw(con: asyncpg.Connection, round_id: str) -> asyncpg.Record | str | None:
    """The round's draws row, locked; ``"busy"`` when another job holds the round's lock."""
    if not await con.fetchval(DRAW_LOCK, lock_name(round_id)):
        return "busy"
    row: asyncpg.Record | None = await con.fetchrow(
        "SELECT d.*, r.per_person, r.ledger_seq FROM draws d JOIN rounds r USING (round_id)"
        " WHERE round_id = $1 FOR UPDATE OF d",
        round_id,
    )
    return row


def _sites(frozen: d.FrozenList, winners: list[int] | None) -> list[dict[str, str | int | None]]:
    entries = [0] * len(frozen.stock)
    index = {s.site_id: i for i, s in enumerate(frozen.stock)}
    for e in frozen.entries:
        entries[index[e.site_id]] += 1
    return [
        {
            "site_id": s.site_id,
            "district": s.district,
            "stock": s.units,
            "entries": entries[i],
            "winners": winners[i] if winners is not None else None,
        }
        for i, s in enumerate(frozen.stock)
    ]


# -- step 1-2: the freeze --------------------------------------------------------------------


async def _freeze(database_url: str, round_id: str, redis_seq: int) -> str:
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            row = await _locked_draw(con, round_id)
            if row is None or isinstance(row, str):
                return row or "no-draw"
            if row["status"] != "registering":
                return str(row["status"])
            if int(row["ledger_seq"]) < redis_seq:
                return "behind"  # an entry answered 201/200 is not in the ledger yet
            districts = {
                r["site_id"]: r["district"]
                for r in await con.fetch("SELECT site_id, district FROM sites")
            }
            entries = await con.fetch(
                "SELECT receipt, site_id, accept_district FROM entries"
                " WHERE round_id = $1 AND status = 'registered'",
                round_id,
            )
            units = await _site_units(con, round_id)
            chosen = {e["site_id"] for e in entries}
            stock = [
                d.StockLine(s, districts[s], units.get(s, 0))
                for s in sorted(set(units) | chosen)
                if s in districts
            ]
            lines = (
                d.EntryLine(
                    e["receipt"], e["site_id"], districts[e["site_id"]], e["accept_district"], 1
                )
                for e in entries
            )
            frozen = d.freeze(lines, stock)
            await con.execute(
                "UPDATE draws SET status = 'frozen', frozen_at = now(), entries = $2,"
                " entries_csv = $3, stock_csv = $4, entries_digest = $5, stock_digest = $6,"
                " accounted = $7, sites = $8, updated_at = now() WHERE round_id = $1",
                round_id,
                len(frozen.entries),
                frozen.entries_csv,
                frozen.stock_csv,
                frozen.entries_digest,
                frozen.stock_digest,
                orjson.dumps({s.site_id: s.units for s in frozen.stock}).decode(),
                orjson.dumps(_sites(frozen, None)).decode(),
            )
            await con.execute(
                "UPDATE entries SET weight = 1 WHERE round_id = $1 AND status = 'registered'",
                round_id,
            )
            return "frozen"
    finally:
        await con.close()


def freeze(database_url: str, round_id: str, redis_seq: int) -> str:
    """Freeze the round's entry list and stock: ``frozen``, or the status found instead
    (``busy``, ``behind``: the ledger has not every change up to ``redis_seq`` yet)."""
    return asyncio.run(_freeze(database_url, round_id, redis_seq))


# -- steps 3-6: the draw ---------------------------------------------------------------------


async def _award_rows(
    con: asyncpg.Connection, round_id: str, number: int, placed: list[d.Placed]
) -> None:
    ids = {
        r["receipt"]: r["entry_id"]
        for r in await con.fetch(
            "SELECT receipt, entry_id FROM entries WHERE round_id = $1", round_id
        )
    }
    await con.copy_records_to_table(
        "draw_awards",
        records=[(round_id, ids[p.receipt], number, p.rank, p.site_id) for p in placed],
        columns=["round_id", "entry_id", "pass", "rank", "site_id"],
    )


async def _draw(database_url: str, round_id: str, public_randomness: str) -> str:
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            row = await _locked_draw(con, round_id)
            if row is None or isinstance(row, str):
                return row or "no-draw"
            if row["status"] != "frozen":
                return str(row["status"])
            frozen = frozen_from_files(row["entries_csv"], row["stock_csv"])
            result = d.draw(
                round_id, int(row["per_person"]), bytes(row["secret"]), public_randomness, frozen
            )
            winners = list(result.winners())
            await _award_rows(con, round_id, 0, winners)
            await con.execute(
                "UPDATE entries SET status = 'not-drawn' WHERE round_id = $1"
                " AND status = 'registered' AND entry_id NOT IN"
                " (SELECT entry_id FROM draw_awards WHERE round_id = $1)",
                round_id,
            )
            await con.execute(
                "UPDATE draws SET status = 'drawing', public_randomness = $2, seed = $3,"
                " drawn_at = now(), results_csv = $4, results_digest = $5, sites = $6,"
                " updated_at = now() WHERE round_id = $1",
                round_id,
                result.public_randomness,
                result.seed,
                result.results_csv,
                result.results_digest,
                orjson.dumps([_summary(s) for s in result.sites()]).decode(),
            )
            return "drawing"
    finally:
        await con.close()


def _summary(s: d.SiteSummary) -> dict[str, Any]:
    return {
        "site_id": s.site_id,
        "district": s.district,
        "stock": s.stock,
        "entries": s.entries,
        "winners": s.winners,
    }


def draw_round(database_url: str, round_id: str, public_randomness: str) -> str:
    """Draw a frozen round: ``drawing`` (results stored, awards to make), or the status found."""
    return asyncio.run(_draw(database_url, round_id, public_randomness))


# -- step 7: a pass --------------------------------------------------------------------------


def _replayed(row: asyncpg.Record, round_id: str) -> d.Draw:
    frozen = frozen_from_files(row["entries_csv"], row["stock_csv"])
    result = d.draw(
        round_id, int(row["per_person"]), bytes(row["secret"]), row["public_randomness"], frozen
    )
    if result.results_csv != row["results_csv"]:
        raise d.DrawInputError("the stored results do not replay")
    return result


async def _next_pass(database_url: str, round_id: str) -> str:
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            row = await _locked_draw(con, round_id)
            if row is None or isinstance(row, str):
                return row or "no-draw"
            if row["status"] != "drawn":
                return str(row["status"])
            result = _replayed(row, round_id)
            previous: list[d.Pass] = []
            stored = await con.fetch(
                "SELECT pass, released, csv FROM draw_passes WHERE round_id = $1 ORDER BY pass",
                round_id,
            )
            for p in stored:
                again = d.next_pass(result, previous, dict(orjson.loads(p["released"])))
                if again.csv != p["csv"]:
                    raise d.DrawInputError(f"pass {p['pass']} does not replay")
                previous.append(again)
            accounted: dict[str, int] = orjson.loads(row["accounted"])
            units = await _site_units(con, round_id)
            released = {s: units.get(s, 0) - given for s, given in accounted.items()}
            released = {s: u for s, u in released.items() if u > 0}
            done = d.next_pass(result, previous, released)
            await con.execute(
                "INSERT INTO draw_passes (round_id, pass, at, released, csv, digest)"
                " VALUES ($1, $2, now(), $3, $4, $5)",
                round_id,
                done.number,
                orjson.dumps([list(x) for x in done.released]).decode(),
                done.csv,
                done.digest,
            )
            await _award_rows(con, round_id, done.number, list(done.drawn))
            for s, u in released.items():
                accounted[s] += u
            await con.execute(
                "UPDATE draws SET status = 'drawing', accounted = $2, updated_at = now()"
                " WHERE round_id = $1",
                round_id,
                orjson.dumps(accounted).decode(),
            )
            return "drawing"
    finally:
        await con.close()


def next_pass(database_url: str, round_id: str) -> str:
    """One more pass of a drawn round: ``drawing`` (awards to make), or the status found."""
    return asyncio.run(_next_pass(database_url, round_id))
