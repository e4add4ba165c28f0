"""The sold-out board: a worker's memory of sites that cannot serve a share right now.

Once Redis answers sold-out for a site, the same answer is given from memory for up to a second,
so a herd pressing "reserve" on an empty site costs Redis nothing. It is never given to a citizen
who may hold a reservation at that site (their retry must reach Redis and get it back with 200):
the board keeps a snapshot of the site's holders, a superset that only grows. A cancel or batch
that brings units back clears the mark in every worker at once (allocator/stock_events.py).
Every answer from one mark is the same refusal (``same_as`` is the mark), so the service
serialises it once per mark, not once per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from allocator.errors import SoldOut
from allocator.model import Alternative

TTL = 1.0  # seconds an answer from memory may be stale, at most


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class _Mark:
    expires: float
    holders: frozenset[str]
    detail: str
    alternatives: list[Alternative]


class SoldOutBoard:
    def __init__(self, ttl: float = TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._marks: dict[tuple[str, str], _Mark] = {}

    def marked(self, round_id: str, site_id: str) -> bool:
        mark = self._marks.get((round_id, site_id))
        return mark is not None and mark.expires > self._clock()

    def mark(self, round_id: str, site_id: str, holders: frozenset[str], refusal: SoldOut) -> None:
        self._marks[(round_id, site_id)] = _Mark(
            self._clock() + self._ttl,
            holders,
            refusal.detail,
            refusal.extra.get("alternatives", []),
        )

    def check(self, round_id: str, site_id: str, citizen_hash: str) -> SoldOut | None:
        """The answer from memory, or None when Redis must decide."""
        mark = self._marks.get((round_id, site_id))
        if mark is None or mark.expires <= self._clock() or citizen_hash in mark.holders:
            return None
        refusal = SoldOut(mark.detail, alternatives=mark.alternatives)
        refusal.same_as = mark
        return refusal

    def clear(self, round_id: str, site_id: str | None = None) -> None:
        if site_id is not None:
            self._marks.pop((round_id, site_id), None)
        else:
            for key in [k for k in self._marks if k[0] == round_id]:
                del self._marks[key]
