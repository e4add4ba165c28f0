"""The fairness report: who asked and who got a share, by district, age band and channel.

Kept without clear IDs. When a claim is made (``claims.py``, ``claim.lua``) the clear, canonical
ID gives its age band at the round's opening date (``entitlement.age_band``) and its six-digit
issuing region (``entitlement.region``); only those, the channel and the citizen hash (the HMAC
the service already keys everything by) are kept.

* **asked** — distinct citizens who reserved, or were refused sold-out, in the group: per group
  one Redis set of citizen hashes, ``<p>:{r:<round>}:fair:asked:<dimension>:<group>`` (exact
  counts with SCARD; about 100 bytes a member). ``claim.lua`` adds to the sets in the same
  atomic step as its answer; a refusal the worker gives from memory (the sold-out fast path,
  ``soldout.py``) is noted here and added in batches every quarter second (:class:`Asks`).
  ``allot rebuild`` adds back every citizen of the ledger's reservations; citizens who were
  only ever refused sold-out are not in the ledger and are lost with a Redis that lost them.
* **granted** — distinct citizens holding a reservation in the round that was not cancelled
  (confirmed, collected or expired), counted in the ledger (``reservations.channel``,
  ``age_band``, ``region``), which trails Redis by a few seconds at most.
* ``share_of_asked`` / ``share_of_granted`` — the group's part of all askers / all granted in
  that dimension (0 when nobody asked).

``district`` is the district of the site asked for.

A **lottery round** is counted from the ledger's ``entries`` alone (an entry is made and
changed only through the ledger stream, which trails Redis by a few seconds at most):

* **asked** — distinct citizens with a live entry (any status but ``withdrawn``: ``excluded``
  entrants, in cooldown at the freeze, did ask), by the district of the site chosen, the age
  band and channel the entry was made with (``entries.age_band``, ``channel``, fixed by
  ``enter.lua``) and, from the freeze on, the ``weight`` it was given there (groups ``1`` to
  ``4``; before the freeze there is no weight dimension);
* **granted** — distinct citizens whose entry ``won`` and whose reservation was not cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from allocator.catalogue import Catalogue
from allocator.errors import Unavailable
from allocator.keys import Keys
from allocator.ratelog import RateLimitedLog
from allocator.store import Store

log = logging.getLogger("allot.fairness")

AGE_BANDS = ("0-17", "18-39", "40-64", "65+")
CHANNELS = ("desk", "web", "mini-program", "api")
DIMENSIONS = ("district", "age_band", "channel", "weight")
WEIGHTS = ("1", "2", "3", "4")
FLUSH_EVERY = 0.25  # seconds between batches of asks answered from memory
MAX_PENDING = 100_000  # asks waiting for a batch; more are dropped (and logged)

GRANTED = """
SELECT s.district, r.age_band, r.channel, count(DISTINCT r.citizen_hash) AS n,
       GROUPING(s.district) AS no_district, GROUPING(r.age_band) AS no_age
  FROM reservations r LEFT JOIN sites s USING (site_id)
 WHERE r.round_id = $1 AND r.status <> 'cancelled'
 GROUP BY GROUPING SETS ((s.district), (r.age_band), (r.channel))
"""

# A lottery round: every live entry asks; a winner whose reservation stands is granted.
# `w` is NULL before the freeze (and for entries not in the frozen list); entries_shown
# (migration 0009) reads the frozen list's unwritten weights as 1.
LOTTERY = """
SELECT s.district, e.age_band, e.channel, e.weight::text AS w,
       count(DISTINCT e.citizen_hash) AS asked,
       count(DISTINCT e.citizen_hash) FILTER (
           WHERE e.status = 'won' AND coalesce(r.status, 'confirmed') <> 'cancelled'
       ) AS granted,
       GROUPING(s.district) AS no_district, GROUPING(e.age_band) AS no_age,
       GROUPING(e.channel) AS no_channel
  FROM entries_shown e
  LEFT JOIN sites s USING (site_id)
  LEFT JOIN reservations r ON r.reservation_id = e.reservation_id
 WHERE e.round_id = $1 AND e.status <> 'withdrawn'
 GROUP BY GROUPING SETS ((s.district), (e.age_band), (e.channel), (e.weight))
"""


class Asks:
    """Asks a worker refused from memory, added to the askers' sets in batches."""

    def __init__(self, store: Store, keys: Keys, catalogue: Catalogue) -> None:
        self.store = store
        self.keys = keys
        self.catalogue = catalogue
        # (round_id, site_id, age band, channel, citizen hash)
        self._pending: set[tuple[str, str, str, str, str]] = set()
        self._log = RateLimitedLog(log)

    def note(self, round_id: str, site_id: str, age: str, channel: str, citizen: str) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._log.warning("asks-dropped", "too many asks waiting; some are not counted")
            return
        self._pending.add((round_id, site_id, age, channel, citizen))

    async def flush(self) -> None:
        """Add what is waiting (what Redis does not take is dropped, and logged)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, set()
        sites = await self.catalogue.sites()
        # the keys of each group (round, site, age band, channel) built once, not once an ask:
        # a sold-out herd is one or a few groups of many citizens
        groups: dict[tuple[str, str, str, str], list[str]] = {}
        for round_id, site_id, age, channel, citizen in pending:
            group = groups.get((round_id, site_id, age, channel))
            if group is None:
                group = groups[(round_id, site_id, age, channel)] = []
            group.append(citizen)
        members: dict[str, set[str]] = {}
        for (round_id, site_id, age, channel), citizens in groups.items():
            rk = await self.catalogue.round_keys(round_id)
            site = sites.get(site_id)
            targets = [rk.fair_asked("age_band", age), rk.fair_asked("channel", channel)]
            if site is not None:
                targets.append(rk.fair_asked("district", site.district))
            for key in targets:
                members.setdefault(key, set()).update(citizens)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for key, found in members.items():
                pipe.sadd(key, *found)
            try:
                await self.store.redis_call(pipe.execute())
            except Unavailable:
                self._log.warning("asks-lost", "Redis did not take %d asks", len(pending))

    async def run(self, stop: asyncio.Event, every: float = FLUSH_EVERY) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            try:
                await self.flush()
            except Exception:
                log.exception("asks: flush failed")


class Fairness:
    def __init__(self, store: Store, keys: Keys, catalogue: Catalogue, asks: Asks) -> None:
        self.store = store
        self.keys = keys
        self.catalogue = catalogue
        self.asks = asks

    async def report(self, round_id: str) -> dict[str, Any]:
        rnd = await self.catalogue.round(round_id)  # NotFound, or RoundLost, first
        if rnd.lottery:
            return await self._lottery(round_id)
        await self.asks.flush()  # this worker's asks from memory, counted now
        sites = await self.catalogue.sites(fresh=True)
        groups: list[tuple[str, str]] = [
            *(("district", d) for d in sorted({s.district for s in sites.values()})),
            *(("age_band", a) for a in AGE_BANDS),
            *(("channel", c) for c in CHANNELS),
        ]
        rk = await self.catalogue.round_keys(round_id)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for dimension, group in groups:
                pipe.scard(rk.fair_asked(dimension, group))
            counts: Sequence[int] = await self.store.redis_call(pipe.execute())
        asked = dict(zip(groups, counts, strict=True))
        granted: dict[tuple[str, str], int] = {}
        async with self.store.pg() as con:
            for row in await con.fetch(GRANTED, round_id):
                if not row["no_district"]:
                    key = ("district", row["district"])
                elif not row["no_age"]:
                    key = ("age_band", row["age_band"])
                else:
                    key = ("channel", row["channel"])
                if key[1] is not None:
                    granted[key] = int(row["n"])
                    if key not in asked:  # a site since renamed into another district
                        groups.append(key)
                        asked[key] = 0
        return {"round_id": round_id, "groups": _shares(groups, asked, granted)}

    async def _lottery(self, round_id: str) -> dict[str, Any]:
        sites = await self.catalogue.sites(fresh=True)
        groups: list[tuple[str, str]] = [
            *(("district", d) for d in sorted({s.district for s in sites.values()})),
            *(("age_band", a) for a in AGE_BANDS),
            *(("channel", c) for c in CHANNELS),
            *(("weight", w) for w in WEIGHTS),
        ]
        asked: dict[tuple[str, str], int] = {}
        granted: dict[tuple[str, str], int] = {}
        async with self.store.pg() as con:
            rows = await con.fetch(LOTTERY, round_id)
        for row in rows:
            if not row["no_district"]:
                key = ("district", row["district"])
            elif not row["no_age"]:
                key = ("age_band", row["age_band"])
            elif not row["no_channel"]:
                key = ("channel", row["channel"])
            else:
                key = ("weight", row["w"])
            if key[1] is None:  # no site, no band (made before bands), no weight (not frozen)
                continue
            asked[key], granted[key] = int(row["asked"]), int(row["granted"])
            if key not in groups:  # a site since renamed into another district
                groups.append(key)
        return {"round_id": round_id, "groups": _shares(groups, asked, granted)}


def _shares(
    groups: Sequence[tuple[str, str]],
    asked: dict[tuple[str, str], int],
    granted: dict[tuple[str, str], int],
) -> list[dict[str, Any]]:
    """One line per group anybody asked or was granted in, with its shares of the dimension."""
    total_asked = {d: sum(n for (dim, _), n in asked.items() if dim == d) for d in DIMENSIONS}
    total_granted = {d: sum(n for (dim, _), n in granted.items() if dim == d) for d in DIMENSIONS}
    out = []
    for key in groups:
        dimension, group = key
        a, g = asked.get(key, 0), granted.get(key, 0)
        if a == 0 and g == 0:
            continue
        out.append(
            {
                "dimension": dimension,
                "group": group,
                "asked": a,
                "granted": g,
                "share_of_asked": round(a / total_asked[dimension], 4) if a else 0.0,
                "share_of_granted": round(g / total_granted[dimension], 4) if g else 0.0,
            }
        )
    return out
