"""Helpers for tests that are neither fixtures nor scenario steps."""

from __future__ import annotations

from allocator.facade import Allocator
from allocator.model import Reservation


class FakeClock:
    """A monotonic clock that moves only when the test says so.

    Pass it as ``monotonic=`` to ``create_app`` or ``Allocator`` (or as ``clock=`` to a TtlCache
    or the SoldOutBoard): caches, sold-out marks and the Redis breaker then expire on
    ``advance()``, at once, instead of after a real sleep.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.now += seconds


async def claim_once(
    allocator: Allocator, round_id: str, site_id: str, citizen_id: str, phone: str
) -> tuple[Reservation, bool]:
    """One claim straight to the allocator, past the admission queue: ``claim_many`` with one
    item (as the queue sends a batch of one). The reservation and whether it is new; a refusal
    is raised."""
    request = allocator.claim_request(round_id, site_id, citizen_id, phone)
    [outcome] = await allocator.claim_many(round_id, [request])
    if outcome.refusal is not None:
        raise outcome.refusal
    assert outcome.reservation is not None
    return outcome.reservation, outcome.created
