"""The public (API) shapes of the domain's values: the bodies of successful answers.

The domain (allocator/) returns dataclasses; these functions build the JSON members API.md
names, and nothing else does (service/schemas.py declares the same shapes for the document;
the contract tests validate every body against it).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from allocator.draw import entry_receipt
from allocator.model import Entry, Reservation, Round, SiteStock, ms_to_rfc3339, to_ms
from allocator.operators import BatchResult
from allocator.receipts import DrawKey
from allocator.stats import RoundStats


def round_body(rnd: Round, now: dt.datetime, remaining: int) -> dict[str, Any]:
    return {
        "round_id": rnd.round_id,
        "title": rnd.title,
        "opens_at": rnd.opens_at.isoformat(),
        "closes_at": rnd.closes_at.isoformat(),
        "per_person": rnd.per_person,
        "pickup_start": rnd.pickup_start.isoformat(),
        "pickup_end": rnd.pickup_end.isoformat(),
        "mode": rnd.mode,
        "status": rnd.status(now),
        "remaining": remaining,
        "programme": rnd.programme,
        "cooldown_days": rnd.cooldown_days,
        "eligibility": rnd.eligibility.to_json() if rnd.eligibility else None,
        "draw": round_draw(rnd),
    }


def round_draw(rnd: Round) -> dict[str, Any] | None:
    """Round's ``draw`` member: null for fcfs; for a lottery round what is public from its
    creation (the commitment, the named randomness source) and the draw's status. The full
    record is GET /api/v1/rounds/{round_id}/draw."""
    if not rnd.lottery:
        return None
    return {
        "commitment": rnd.commitment,
        "public_randomness_source": rnd.public_randomness_source,
        "status": rnd.draw_status or "registering",
    }


def site_body(entry: SiteStock) -> dict[str, Any]:
    site = entry.site
    return {
        "site_id": site.site_id,
        "name": site.name,
        "address": site.address,
        "district": site.district,
        "remaining": entry.remaining,
    }


class _PickupWindow:
    """The last round's pickup window as a reservation body shows it. A worker answers a crowd
    from one snapshot of a round (the same object for up to a second), so its strings are
    made once per snapshot, not once per answer."""

    __slots__ = ("end_ms", "rnd", "shown")

    def __init__(self, rnd: Round | None) -> None:
        self.rnd = rnd
        self.end_ms = 0
        self.shown = ("", "")
        if rnd is not None:
            self.end_ms = to_ms(rnd.pickup_end)
            self.shown = (rnd.pickup_start.isoformat(), rnd.pickup_end.isoformat())


_window = _PickupWindow(None)


def reservation_body(reservation: Reservation, rnd: Round, now_ms: int) -> dict[str, Any]:
    global _window
    window = _window
    if window.rnd is not rnd:
        window = _window = _PickupWindow(rnd)
    start, end = window.shown
    return {
        "reservation_id": reservation.reservation_id,
        "round_id": reservation.round_id,
        "site_id": reservation.site_id,
        "quantity": reservation.quantity,
        "status": reservation.effective_status(now_ms, window.end_ms),
        "pickup_code": reservation.pickup_code,
        "pickup_start": start,
        "pickup_end": end,
        "created_at": ms_to_rfc3339(reservation.created_ms),
        "citizen_id_masked": reservation.citizen_id_masked,
    }


def entry_status(entry: Entry, rnd: Round) -> str:
    """What the citizen is shown: the stored status (registered, withdrawn, won), except that a
    registered entry the draw did not place is ``not-drawn`` once the results exist."""
    if entry.status == "registered" and rnd.drawn:
        return "not-drawn"
    return entry.status


def entry_weight(entry: Entry, rnd: Round) -> int | None:
    """``weight``: null until the freeze, and for an entry not in the frozen list (withdrawn,
    excluded); then the weight in entries.csv: the entry's own when the freeze gave it more
    than 1 (loss weighting, copied in by lua/settle.lua), else 1."""
    frozen = rnd.draw_status in ("frozen", "drawing", "drawn")
    if not frozen or entry.status in ("withdrawn", "excluded"):
        return None
    return entry.weight or 1


def entry_body(entry: Entry, rnd: Round, key: DrawKey) -> dict[str, Any]:
    receipt = entry_receipt(entry.round_id, entry.entry_id)
    return {
        "entry_id": entry.entry_id,
        "round_id": entry.round_id,
        "site_id": entry.site_id,
        "accept_district": entry.accept_district,
        "status": entry_status(entry, rnd),
        "receipt": receipt,
        "signature": key.sign_entry(entry.round_id, receipt, entry.site_id, entry.accept_district),
        "weight": entry_weight(entry, rnd),
        "created_at": ms_to_rfc3339(entry.created_ms),
        "citizen_id_masked": entry.citizen_id_masked,
        "reservation_id": entry.reservation_id,
    }


def batch_body(result: BatchResult) -> dict[str, Any]:
    body: dict[str, Any] = {
        "batch_id": result.batch_id,
        "units_added": result.units_added,
        "sites": result.sites,
    }
    if result.carried_from is not None:
        body["carried_from"] = result.carried_from
    return body


def stats_body(stats: RoundStats) -> dict[str, Any]:
    body = {
        "round_id": stats.round_id,
        "loaded": stats.loaded,
        "reserved": stats.reserved,
        "collected": stats.collected,
        "expired": stats.expired,
        "carried_out": stats.carried_out,
        "remaining": stats.remaining,
        "reservations": stats.reservations,
        "sites": [
            {
                "site_id": s.site_id,
                "loaded": s.loaded,
                "reserved": s.reserved,
                "collected": s.collected,
                "expired": s.expired,
                "carried_out": s.carried_out,
                "remaining": s.remaining,
                **({"entries": s.entries} if s.entries is not None else {}),
            }
            for s in stats.sites
        ],
        "ledger": {"recorded": stats.recorded, "lag": stats.lag},
        "lost": stats.lost.public() if stats.lost is not None else None,
    }
    if stats.entries is not None:
        body["entries"] = stats.entries
    return body
