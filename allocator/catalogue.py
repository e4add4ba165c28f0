"""The catalogue: what a worker knows of rounds, sites and stock, from short-lived snapshots.

Under a flash crowd thousands of requests ask for the same round or stock in the same
millisecond; each snapshot is loaded once (allocator/cache.py) and served for up to
SNAPSHOT_TTL. A round Redis has lost data of is refused here (allocator/losswatch.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

from allocator.cache import TtlCache
from allocator.errors import NotFound, Unavailable
from allocator.keys import Keys, RoundKeys
from allocator.losswatch import LossWatch, round_refusal
from allocator.model import Alternative, Round, Site, SiteStock
from allocator.redistyping import awaited
from allocator.store import Store
from allocator.tags import RoundTags

SNAPSHOT_TTL = 1.0  # seconds a worker may serve a cached round, site list or stock snapshot
MAX_ALTERNATIVES = 5


class Catalogue:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        watch: LossWatch,
        tags: RoundTags,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.keys = keys
        self.watch = watch
        self.tags = tags
        self.rounds_cache: TtlCache[str, Round | None] = TtlCache(SNAPSHOT_TTL, monotonic)
        self.round_ids_cache: TtlCache[None, list[str]] = TtlCache(SNAPSHOT_TTL, monotonic)
        self.sites_cache: TtlCache[None, dict[str, Site]] = TtlCache(SNAPSHOT_TTL, monotonic)
        self.stock_cache: TtlCache[str, dict[str, int]] = TtlCache(SNAPSHOT_TTL, monotonic)

    # -- rounds -------------------------------------------------------------------------------

    async def find_round(self, round_id: str) -> Round | None:
        """The round from Redis; None when nobody has it; RoundLost (unavailable) when the
        ledger has it but Redis does not, or Redis is behind the ledger on it."""
        self.watch.refuse_if_lost(round_id)
        found = await self._round_as_stored(round_id)
        if found is None and self.watch.knows(round_id):
            raise round_refusal()  # the ledger has it: lost, or not yet mirrored (a moment)
        return found

    async def _round_as_stored(self, round_id: str) -> Round | None:
        return await self.rounds_cache.get(round_id, lambda: self._load_round(round_id))

    async def _load_round(self, round_id: str) -> Round | None:
        rk = await self.tags.round_keys(round_id)
        h = await self.store.redis_call(awaited(self.store.redis.hgetall(rk.round)), key=rk.round)
        return Round.from_redis(round_id, h) if h else None

    async def round_before_claim(self, round_id: str) -> Round:
        """The round for what is checked before a claim is queued (eligibility): the worker's
        last snapshot of it however old, while a fresh one loads in the background; awaited
        only when the worker has none. So a slow or hung Redis holds claims in the admission
        queue (bounded, answered) rather than in front of it. A stale snapshot is safe here:
        eligibility cannot change once the round has opened, and the claim script decides the
        round window itself."""
        self.watch.refuse_if_lost(round_id)
        last = self.rounds_cache.last(round_id)
        if last is None:
            return await self.round(round_id)
        self.rounds_cache.refresh(round_id, lambda: self._load_round(round_id))
        return last

    async def round_keys(self, round_id: str, *, prompt: bool = False) -> RoundKeys:
        """The round's keys under its hash tag (from the worker's snapshot of the tags;
        ``prompt``: see :meth:`RoundTags.round_keys`)."""
        return await self.tags.round_keys(round_id, prompt=prompt)

    async def round(self, round_id: str) -> Round:
        found = await self.find_round(round_id)
        if found is None:
            raise NotFound(f"There is no round {round_id!r}.")
        return found

    async def round_ids(self) -> list[str]:
        async def load() -> list[str]:
            members = await self.store.redis_call(
                awaited(self.store.redis.smembers(self.keys.rounds)), key=self.keys.rounds
            )
            return sorted(m.decode() for m in members)

        return await self.round_ids_cache.get_or_last(None, load, Unavailable)

    async def rounds(self) -> list[Round]:
        """Every round Redis holds. One Redis has lost data of is still listed (so it does not
        vanish from the citizen page and the console), while its own calls raise RoundLost."""
        found = [await self._round_as_stored(r) for r in await self.round_ids()]
        return sorted((r for r in found if r is not None), key=lambda r: (r.opens_at, r.round_id))

    # -- sites and stock ----------------------------------------------------------------------

    async def sites(self, *, fresh: bool = False, prompt: bool = False) -> dict[str, Site]:
        """Every site, from a snapshot at most SNAPSHOT_TTL old; ``prompt`` (a claim or entry
        batch): at most twice that, an expired one serving while a fresh one loads (as
        :meth:`RoundTags.round_keys`)."""

        async def load() -> dict[str, Site]:
            raw = await self.store.redis_call(
                awaited(self.store.redis.hgetall(self.keys.sites)), key=self.keys.sites
            )
            return {k.decode(): Site(site_id=k.decode(), **orjson.loads(v)) for k, v in raw.items()}

        if fresh:
            self.sites_cache.invalidate()
            return await self.sites_cache.get(None, load)
        # the sites hash lives on one node: while it fails over, the last snapshot serves
        return await self.sites_cache.get_or_last(
            None, load, Unavailable, grace=SNAPSHOT_TTL if prompt else 0.0
        )

    async def stock(self, round_id: str) -> dict[str, int]:
        """Units left per site with stock loaded in the round; may lag by up to SNAPSHOT_TTL."""

        async def load() -> dict[str, int]:
            rk = await self.tags.round_keys(round_id)
            raw = await self.store.redis_call(
                awaited(self.store.redis.hgetall(rk.stock)), key=rk.stock
            )
            return {k.decode(): int(v) for k, v in raw.items()}

        return await self.stock_cache.get(round_id, load)

    async def remaining(self, round_id: str) -> int:
        """Units left in the whole round (from the stock snapshot)."""
        return sum((await self.stock(round_id)).values())

    async def site_exists(self, site_id: str) -> bool:
        """From the snapshot; only a site missing there is looked up afresh (it may be new)."""
        return site_id in await self.sites() or site_id in await self.sites(fresh=True)

    async def site_list(self, round_id: str) -> list[SiteStock]:
        """The round's sites with stock loaded, by district then site_id."""
        await self.round(round_id)
        stock = await self.stock(round_id)
        sites = await self.sites()
        return [
            SiteStock(sites[s], units)
            for s, units in sorted(stock.items(), key=lambda kv: _site_order(sites, kv[0]))
            if s in sites
        ]

    async def alternatives(self, rnd: Round, site_id: str) -> list[Alternative]:
        """Up to 5 other sites that can still serve a share: same district first, then most left."""
        stock = await self.stock(rnd.round_id)
        sites = await self.sites()
        here = sites.get(site_id)
        options = [
            (s.district != (here.district if here else None), -units, s.site_id, s)
            for sid, units in stock.items()
            if sid != site_id and units >= rnd.per_person and (s := sites.get(sid)) is not None
        ]
        options.sort(key=lambda o: o[:3])
        return [
            Alternative(s.site_id, s.name, s.district, -neg)
            for _, neg, _, s in options[:MAX_ALTERNATIVES]
        ]

    # -- forgetting ---------------------------------------------------------------------------

    def forget_round(self, round_id: str) -> None:
        """The round changed, or is in doubt: its snapshot and stock are loaded afresh."""
        self.rounds_cache.invalidate(round_id)
        self.stock_cache.invalidate(round_id)

    def forget_stock(self, round_id: str) -> None:
        self.stock_cache.invalidate(round_id)

    def forget_round_list(self) -> None:
        self.round_ids_cache.invalidate()

    def forget_sites(self) -> None:
        self.sites_cache.invalidate()


def _site_order(sites: dict[str, Site], site_id: str) -> tuple[str, str]:
    s = sites.get(site_id)
    return (s.district, site_id) if s else ("", site_id)
