"""Plain values of the domain. Their public (API) shapes are built in service/shapes.py."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

import orjson

from allocator.entitlement import Eligibility

# The patterns live in allocator/rules.py; these names stay importable from here for the
# modules that read them from the model (allocator/claims.py, the state-machine test).
from allocator.rules import PICKUP_ALPHABET as PICKUP_ALPHABET
from allocator.rules import PICKUP_CODE as PICKUP_CODE
from allocator.rules import RESERVATION_ID as RESERVATION_ID


def ms_to_rfc3339(ms: int) -> str:
    """``datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")``, the
    second's text made once (a batch's reservations share their second)."""
    seconds, milli = divmod(ms, 1000)
    return f"{_second_text(seconds)}.{milli:03d}+00:00"


@functools.lru_cache(maxsize=256)
def _second_text(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")[:-6]


def to_ms(value: dt.datetime) -> int:
    return int(value.timestamp() * 1000)


def parse_rfc3339(value: str) -> dt.datetime:
    """An aware datetime; raises ValueError for anything without an offset."""
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("needs an offset, e.g. 2026-03-01T09:00:00+08:00")
    return parsed


@dataclass(frozen=True, slots=True)
class Site:
    site_id: str
    name: str
    address: str
    district: str


@dataclass(frozen=True, slots=True)
class SiteStock:
    """A site serving a round, and the units it has left (from a snapshot)."""

    site: Site
    remaining: int


@dataclass(frozen=True, slots=True)
class Alternative:
    """Another site that can still serve a share, offered with a sold-out refusal. Its fields
    are the contract's ``alternatives`` members, in order (the service serialises it as is)."""

    site_id: str
    name: str
    district: str
    remaining: int


@dataclass(frozen=True, slots=True)
class Round:
    round_id: str
    title: str
    opens_at: dt.datetime
    closes_at: dt.datetime
    per_person: int
    pickup_start: dt.datetime
    pickup_end: dt.datetime
    mode: str = "fcfs"
    # Entitlement (API.md): the programme the round belongs to, the cooldown a reservation in it
    # sets, who may take part, and loss weighting (read by lottery rounds only)
    programme: str | None = None
    cooldown_days: int = 0
    eligibility: Eligibility | None = None
    loss_weighting: bool = False
    # lottery rounds (API.md, Lottery rounds): the named source of the public randomness, the
    # commitment to the round's secret (allocator/draw.py), and the draw's status as last
    # published to Redis (the round hash's `draw` field: registering, frozen, drawing, drawn)
    public_randomness_source: str | None = None
    commitment: str | None = None
    draw_status: str | None = None
    drawn: bool = False  # the draw's results exist (a later pass may be running)

    @property
    def lottery(self) -> bool:
        return self.mode == "lottery"

    def status(self, now: dt.datetime) -> str:
        if now < self.opens_at:
            return "upcoming"
        if now < self.closes_at:
            return "open"
        return "closed"

    def to_redis(self) -> dict[str, str | int]:
        """Fields of the round hash; the *_ms ones are what the Lua scripts read."""
        return {
            "title": self.title,
            "opens_at": self.opens_at.isoformat(),
            "closes_at": self.closes_at.isoformat(),
            "pickup_start": self.pickup_start.isoformat(),
            "pickup_end": self.pickup_end.isoformat(),
            "opens_ms": to_ms(self.opens_at),
            "closes_ms": to_ms(self.closes_at),
            "pickup_end_ms": to_ms(self.pickup_end),
            "per_person": self.per_person,
            "mode": self.mode,
            # read by claim.lua: "" is no programme; a reservation bars for cooldown_days
            "programme": self.programme or "",
            "cooldown_days": self.cooldown_days,
            "eligibility": (
                orjson.dumps(self.eligibility.to_json()).decode() if self.eligibility else ""
            ),
            "loss_weighting": int(self.loss_weighting),
            **({"prs": self.public_randomness_source} if self.public_randomness_source else {}),
            **({"commitment": self.commitment} if self.commitment else {}),
        }

    @classmethod
    def from_redis(cls, round_id: str, h: dict[bytes, bytes]) -> Round:
        return cls(
            round_id=round_id,
            title=h[b"title"].decode(),
            opens_at=parse_rfc3339(h[b"opens_at"].decode()),
            closes_at=parse_rfc3339(h[b"closes_at"].decode()),
            per_person=int(h[b"per_person"]),
            pickup_start=parse_rfc3339(h[b"pickup_start"].decode()),
            pickup_end=parse_rfc3339(h[b"pickup_end"].decode()),
            mode=h[b"mode"].decode(),
            # rounds written before programmes existed lack these fields: none, 0, anyone, off
            programme=h.get(b"programme", b"").decode() or None,
            cooldown_days=int(h.get(b"cooldown_days", b"0")),
            eligibility=Eligibility.parse(orjson.loads(h[b"eligibility"]))
            if h.get(b"eligibility")
            else None,
            loss_weighting=h.get(b"loss_weighting", b"0") == b"1",
            public_randomness_source=_text(h.get(b"prs")),
            commitment=_text(h.get(b"commitment")),
            draw_status=_text(h.get(b"draw")),
            drawn=h.get(b"drawn") == b"1",
        )


def _text(raw: bytes | None) -> str | None:
    return raw.decode() if raw is not None else None


@dataclass(frozen=True, slots=True)
class Reservation:
    """One citizen's claim, as recorded by the Lua scripts (see lua/claim.lua)."""

    reservation_id: str
    round_id: str
    site_id: str
    quantity: int
    status: str  # as stored: confirmed | collected | cancelled; 'expired' is derived
    pickup_code: str
    citizen_hash: str
    phone_hash: str
    citizen_id_masked: str
    created_ms: int
    updated_ms: int
    # the fairness report's groups, fixed at claim time; never the ID itself
    channel: str = "api"  # desk | web | mini-program | api
    age_band: str | None = None  # 0-17 | 18-39 | 40-64 | 65+ at the round's opening date
    region: str | None = None  # the ID's six-digit issuing prefix

    @classmethod
    def from_record(cls, round_id: str, record: bytes | str) -> Reservation:
        r = orjson.loads(record)
        return cls(
            reservation_id=r["id"],
            round_id=round_id,
            site_id=r["site"],
            quantity=int(r["qty"]),
            status=r["status"],
            pickup_code=r["code"],
            citizen_hash=r["cit"],
            phone_hash=r["ph"],
            citizen_id_masked=r["mask"],
            created_ms=int(r["created"]),
            updated_ms=int(r["updated"]),
            channel=r.get("ch") or "api",
            age_band=r.get("age"),
            region=r.get("reg"),
        )

    def effective_status(self, now_ms: int, pickup_end_ms: int) -> str:
        """A confirmed reservation not collected by the end of the pickup window has expired."""
        if self.status == "confirmed" and now_ms >= pickup_end_ms:
            return "expired"
        return self.status


@dataclass(frozen=True, slots=True)
class Entry:
    """One citizen's entry in a lottery round, as recorded by lua/enter.lua.

    ``status`` is as stored: registered | withdrawn | excluded (cooldown, from the freeze or
    an award) | won (with ``reservation_id``); what a
    citizen is shown (not-drawn, weight) also depends on the draw: service/shapes.py."""

    entry_id: str
    round_id: str
    site_id: str
    accept_district: bool
    status: str
    citizen_hash: str
    phone_hash: str
    citizen_id_masked: str
    created_ms: int
    updated_ms: int
    reservation_id: str | None = None
    channel: str = "api"  # desk | web | mini-program | api, of the request that created it
    age_band: str | None = None  # at the round's opening date (None in entries made before)
    weight: int | None = None  # set at the freeze only when above 1 (lua/settle.lua)

    @classmethod
    def from_record(cls, round_id: str, record: bytes | str) -> Entry:
        r = orjson.loads(record)
        return cls(
            entry_id=r["id"],
            round_id=round_id,
            site_id=r["site"],
            accept_district=bool(int(r["acc"])),
            status=r["status"],
            citizen_hash=r["cit"],
            phone_hash=r["ph"],
            citizen_id_masked=r["mask"],
            created_ms=int(r["created"]),
            updated_ms=int(r["updated"]),
            reservation_id=r.get("res") or None,
            channel=r.get("ch") or "api",
            age_band=r.get("age") or None,
            weight=int(r["w"]) if r.get("w") else None,
        )
