"""The public (API) shapes of the domain's values: the bodies of successful answers.

The domain (allocator/) returns dataclasses; these functions build the JSON members API.md
names, and nothing else does (service/schemas.py declares the same shapes for the document;
the contract tests validate every body against it).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from allocator.model import Reservation, Round, SiteStock, ms_to_rfc3339, to_ms
from allocator.operators import BatchResult
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
        "draw": None,  # the draw record of a lottery round; an fcfs round has none
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


def reservation_body(reservation: Reservation, rnd: Round, now_ms: int) -> dict[str, Any]:
    return {
        "reservation_id": reservation.reservation_id,
        "round_id": reservation.round_id,
        "site_id": reservation.site_id,
        "quantity": reservation.quantity,
        "status": reservation.effective_status(now_ms, to_ms(rnd.pickup_end)),
        "pickup_code": reservation.pickup_code,
        "pickup_start": rnd.pickup_start.isoformat(),
        "pickup_end": rnd.pickup_end.isoformat(),
        "created_at": ms_to_rfc3339(reservation.created_ms),
        "citizen_id_masked": reservation.citizen_id_masked,
    }


def batch_body(result: BatchResult) -> dict[str, Any]:
    return {"batch_id": result.batch_id, "units_added": result.units_added, "sites": result.sites}


def stats_body(stats: RoundStats) -> dict[str, Any]:
    return {
        "round_id": stats.round_id,
        "loaded": stats.loaded,
        "reserved": stats.reserved,
        "collected": stats.collected,
        "remaining": stats.remaining,
        "reservations": stats.reservations,
        "sites": [
            {
                "site_id": s.site_id,
                "loaded": s.loaded,
                "reserved": s.reserved,
                "remaining": s.remaining,
            }
            for s in stats.sites
        ],
        "ledger": {"recorded": stats.recorded, "lag": stats.lag},
        "lost": stats.lost.public() if stats.lost is not None else None,
    }
