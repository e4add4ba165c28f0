"""A round's figures for operators: Redis's counts, the ledger's, and what Redis has lost."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from allocator.catalogue import Catalogue
from allocator.errors import RoundLost, Unavailable
from allocator.integrity import Lost, tally_counts
from allocator.keys import Keys
from allocator.losswatch import LossWatch
from allocator.store import Store


@dataclass(frozen=True, slots=True)
class SiteFigures:
    """One site's units; always loaded = remaining + reserved + collected + expired +
    carried_out (expired: units of expired reservations not yet carried over)."""

    site_id: str
    loaded: int
    reserved: int
    collected: int
    expired: int
    carried_out: int
    remaining: int
    entries: int | None = None  # lottery rounds: live entries choosing the site


@dataclass(frozen=True, slots=True)
class RoundStats:
    round_id: str
    loaded: int
    reserved: int
    collected: int
    expired: int
    carried_out: int
    remaining: int
    reservations: int  # live holders
    sites: list[SiteFigures]
    recorded: int | None  # reservations in the ledger; None when PostgreSQL does not answer
    lag: int  # entries in the round's stream (the ledger writer trims what it has recorded)
    lost: Lost | None  # what Redis has lost of the round, or None when it is whole
    entries: int | None = None  # lottery rounds: live (not withdrawn) entries


class Stats:
    def __init__(self, store: Store, keys: Keys, catalogue: Catalogue, watch: LossWatch) -> None:
        self.store = store
        self.keys = keys
        self.catalogue = catalogue
        self.watch = watch

    async def round_stats(self, round_id: str) -> RoundStats:
        """The round's figures from Redis, the ledger's count, and ``lost``: an operator sees a
        lost round here rather than a refusal."""
        rnd = None
        with contextlib.suppress(RoundLost):
            rnd = await self.catalogue.round(round_id)  # NotFound for a round nobody has
        lottery = rnd is not None and rnd.lottery
        rk = await self.catalogue.round_keys(round_id)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(rk.loaded)
            pipe.hgetall(rk.stock)
            pipe.hgetall(rk.tally)
            pipe.hlen(rk.holders)
            pipe.xlen(rk.ledger)
            pipe.hlen(rk.entrants)
            loaded_raw, stock_raw, tally_raw, live, backlog, entrants = await self.store.redis_call(
                pipe.execute()
            )
        loaded = {k.decode(): int(v) for k, v in loaded_raw.items()}
        stock = {k.decode(): int(v) for k, v in stock_raw.items()}
        tally = tally_counts(tally_raw)
        recorded: int | None
        try:
            async with self.store.pg() as con:
                row = await con.fetchrow(
                    "SELECT (SELECT count(*) FROM reservations WHERE round_id = $1) AS recorded,"
                    " (SELECT ledger_seq FROM rounds WHERE round_id = $1) AS ledger_seq",
                    round_id,
                )
            assert row is not None
            recorded = row["recorded"]
            if row["ledger_seq"] is not None:
                self.watch.floors.raise_to(round_id, int(row["ledger_seq"]))
        except Unavailable:
            recorded = None
        lost = await self.watch.check(round_id)
        sites = [
            SiteFigures(
                site_id=s,
                loaded=loaded.get(s, 0),
                reserved=tally.get(f"reserved:{s}", 0),
                collected=tally.get(f"collected:{s}", 0),
                expired=tally.get(f"expired:{s}", 0),
                carried_out=tally.get(f"carried_out:{s}", 0),
                remaining=stock.get(s, 0),
                entries=tally.get(f"entries:{s}", 0) if lottery else None,
            )
            for s in sorted(set(loaded) | set(stock) | _entry_sites(tally))
        ]
        return RoundStats(
            round_id=round_id,
            loaded=sum(loaded.values()),
            reserved=sum(v for k, v in tally.items() if k.startswith("reserved:")),
            collected=sum(v for k, v in tally.items() if k.startswith("collected:")),
            expired=sum(v for k, v in tally.items() if k.startswith("expired:")),
            carried_out=sum(v for k, v in tally.items() if k.startswith("carried_out:")),
            remaining=sum(stock.values()),
            reservations=live,
            sites=sites,
            recorded=recorded,
            lag=backlog,
            lost=lost,
            entries=int(entrants) if lottery else None,
        )


def _entry_sites(tally: dict[str, int]) -> set[str]:
    """Sites that entries chose (a lottery site may have no stock loaded yet)."""
    return {k.removeprefix("entries:") for k, v in tally.items() if k.startswith("entries:") and v}
