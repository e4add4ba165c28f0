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
from allocator import entitlement

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


async def _site_units(con: asyncpg.Connection, round_id: str, per_person: int) -> dict[str, int]:
    """Units ever loaded into the round (batches in the ledger) plus units of cancelled
    reservations (in a lottery round every reservation is a win: cancelled ones came back) plus
    the shares of winners award.lua refused for a cooldown (entries ``excluded`` after being
    placed: their units never left the site)."""
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
    for r in await con.fetch(
        "SELECT a.site_id, count(*) AS n FROM draw_awards a JOIN entries e USING (entry_id)"
        " WHERE a.round_id = $1 AND e.status = 'excluded' GROUP BY a.site_id",
        round_id,
    ):
        units[r["site_id"]] += int(r["n"]) * per_person
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

#: ``_freeze`` answers: ``frozen``; the draw's status when it is past registering; ``busy``;
#: ``behind`` (the ledger lacks a change Redis has, of this round or of another round of its
#: programme); ``waiting`` (an earlier-closing lottery round of the programme is not drawn yet).
WAITING = "waiting"


async def _programme_ready(
    con: asyncpg.Connection, rnd: asyncpg.Record, redis_seqs: dict[str, int]
) -> str | None:
    """Why a round of a programme cannot be frozen yet, or None.

    Lottery rounds of one programme are frozen and drawn in the order they close (ties: by
    round_id): a round is frozen only once every earlier-closing lottery round of its programme
    is ``drawn`` (its winners' reservations made), because the cooldowns and the loss weights
    fixed at this freeze depend on those results. And every change Redis had made to the
    programme's rounds when the worker looked (after this round's close) must be in the ledger,
    so that the cooldowns read below are every reservation made before the close."""
    earlier = await con.fetchval(
        "SELECT count(*) FROM rounds r JOIN draws d USING (round_id)"
        " WHERE r.programme = $1 AND r.round_id <> $2 AND d.status <> 'drawn'"
        " AND (r.closes_at, r.round_id) < ($3, $2)",
        rnd["programme"],
        rnd["round_id"],
        rnd["closes_at"],
    )
    if earlier:
        return WAITING
    behind = await con.fetchval(
        "SELECT count(*) FROM rounds r JOIN unnest($1::text[], $2::bigint[]) AS s(round_id, seq)"
        " USING (round_id) WHERE r.programme = $3 AND r.ledger_seq < s.seq",
        list(redis_seqs),
        list(redis_seqs.values()),
        rnd["programme"],
    )
    return "behind" if behind else None


async def _in_cooldown(con: asyncpg.Connection, rnd: asyncpg.Record) -> set[str]:
    """Citizens (hashes) of this round's registered entries who are in the programme's cooldown
    now (the freeze's time): a reservation in another round of the programme, not cancelled,
    with created_at + that round's cooldown_days after now. The ledger is the record."""
    rows = await con.fetch(
        "SELECT DISTINCT res.citizen_hash FROM reservations res JOIN rounds r USING (round_id)"
        " WHERE r.programme = $1 AND res.round_id <> $2 AND res.status <> 'cancelled'"
        " AND r.cooldown_days > 0 AND res.created_at + r.cooldown_days * interval '1 day' > now()"
        " AND res.citizen_hash IN"
        " (SELECT citizen_hash FROM entries WHERE round_id = $2 AND status = 'registered')",
        rnd["programme"],
        rnd["round_id"],
    )
    return {r["citizen_hash"] for r in rows}


async def _loss_weights(
    con: asyncpg.Connection, rnd: asyncpg.Record, citizens: list[str]
) -> dict[str, int]:
    """``loss_weighting``: weight = 1 + the citizen's losing streak over the programme's lottery
    rounds drawn before this freeze (allocator/entitlement.py). Only the three most recently
    drawn rounds are read, as the ledger shows them (entries_shown): an entry still registered
    there was placed by the draw (its award refused: no stock, already reserved) and counts as
    drawn, not as a loss."""
    drawn = [
        (r["round_id"], r["drawn_at"])
        for r in await con.fetch(
            "SELECT d.round_id, d.drawn_at FROM draws d JOIN rounds r USING (round_id)"
            " WHERE r.programme = $1 AND d.round_id <> $2 AND d.drawn_at IS NOT NULL"
            " AND d.drawn_at < now()",
            rnd["programme"],
            rnd["round_id"],
        )
    ]
    recent = entitlement.recent_rounds(drawn)
    rows = await con.fetch(
        "SELECT e.round_id, e.citizen_hash, CASE WHEN e.status <> 'registered' THEN e.status"
        " ELSE 'won' END AS outcome FROM entries_shown e WHERE e.round_id = ANY($1::text[])",
        recent,
    )
    return entitlement.loss_weights(
        drawn, ((r["round_id"], r["citizen_hash"], r["outcome"]) for r in rows), citizens
    )


async def _freeze(database_url: str, round_id: str, redis_seqs: dict[str, int]) -> str:
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            row = await _locked_draw(con, round_id)
            if row is None or isinstance(row, str):
                return row or "no-draw"
            if row["status"] != "registering":
                return str(row["status"])
            if int(row["ledger_seq"]) < redis_seqs.get(round_id, 0):
                return "behind"  # an entry answered 201/200 is not in the ledger yet
            rnd = await con.fetchrow(
                "SELECT round_id, programme, closes_at,"
                " coalesce(spec->>'loss_weighting', '0') = '1' AS loss_weighting"
                " FROM rounds WHERE round_id = $1",
                round_id,
            )
            assert rnd is not None  # draws.round_id references rounds
            barred: set[str] = set()
            weights: dict[str, int] = {}
            if rnd["programme"] is not None:
                why = await _programme_ready(con, rnd, redis_seqs)
                if why is not None:
                    return why
                barred = await _in_cooldown(con, rnd)
            districts = {
                r["site_id"]: r["district"]
                for r in await con.fetch("SELECT site_id, district FROM sites")
            }
            registered = await con.fetch(
                "SELECT entry_id, receipt, site_id, accept_district, citizen_hash FROM entries"
                " WHERE round_id = $1 AND status = 'registered'",
                round_id,
            )
            entries = [e for e in registered if e["citizen_hash"] not in barred]
            if rnd["programme"] is not None and rnd["loss_weighting"]:
                weights = await _loss_weights(con, rnd, [e["citizen_hash"] for e in entries])
            units = await _site_units(con, round_id, int(row["per_person"]))
            chosen = {e["site_id"] for e in entries}
            stock = [
                d.StockLine(s, districts[s], units.get(s, 0))
                for s in sorted(set(units) | chosen)
                if s in districts
            ]
            lines = (
                d.EntryLine(
                    e["receipt"],
                    e["site_id"],
                    districts[e["site_id"]],
                    e["accept_district"],
                    weights.get(e["citizen_hash"], 1),
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
            if barred:  # in cooldown at the freeze: excluded, not in entries.csv, no weight
                await con.execute(
                    "UPDATE entries SET status = 'excluded' WHERE round_id = $1"
                    " AND status = 'registered' AND citizen_hash = ANY($2::text[])",
                    round_id,
                    list(barred),
                )
            # only the weights above 1 are written: the rest of the frozen list keeps NULL and
            # reads as 1 (the entries_shown view, migration 0009), so that a freeze of a million
            # entries does not rewrite a million rows
            heavier = [(e["entry_id"], weights.get(e["citizen_hash"], 1)) for e in entries]
            heavier = [(i, w) for i, w in heavier if w > 1]
            if heavier:
                await con.execute(
                    "UPDATE entries e SET weight = w.weight"
                    " FROM unnest($1::text[], $2::int[]) AS w(entry_id, weight)"
                    " WHERE e.entry_id = w.entry_id",
                    [i for i, _ in heavier],
                    [w for _, w in heavier],
                )
            return "frozen"
    finally:
        await con.close()


def freeze(database_url: str, round_id: str, redis_seqs: dict[str, int]) -> str:
    """Freeze the round's entry list and stock: ``frozen``, or the status found instead
    (``busy``; ``behind``: the ledger has not every change up to ``redis_seqs``, Redis's ``seq``
    of this round and of the other rounds of its programme, read after the close; ``waiting``:
    an earlier-closing lottery round of the programme is not drawn yet)."""
    return asyncio.run(_freeze(database_url, round_id, redis_seqs))


# -- steps 3-6: the draw ---------------------------------------------------------------------


async def _award_rows(
    con: asyncpg.Connection, round_id: str, number: int, placed: list[d.Placed]
) -> None:
    """The placed entries' draw_awards rows; only their ids are read (receipt is unique)."""
    ids = {
        r["receipt"]: r["entry_id"]
        for r in await con.fetch(
            "SELECT receipt, entry_id FROM entries WHERE round_id = $1"
            " AND receipt = ANY($2::text[])",
            round_id,
            [p.receipt for p in placed],
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
            # not-drawn is not written: a registered entry of a drawn round without a pass-0
            # award reads as not-drawn (the entries_shown view, migration 0009)
            await _award_rows(con, round_id, 0, winners)
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
            units = await _site_units(con, round_id, int(row["per_person"]))
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
