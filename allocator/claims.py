"""Claims: a citizen's reservation decided in Redis (claim.lua), then cancel and pickup.

``claim_many`` packs any number of claims on one round into one EVALSHA (the admission queue
sends each batch through it) and decodes one outcome per claim; ``cancel`` and ``pickup`` run
their own scripts. Every script is passed the round's floor (allocator/losswatch.py), and every
state change it makes goes to the round's ledger stream, which allocator/ledger.py copies to
PostgreSQL.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from allocator.catalogue import Catalogue
from allocator.entitlement import Rule, age_band, region
from allocator.errors import (
    AlreadyReserved,
    InCooldown,
    NotCollectable,
    NotEligible,
    NotFound,
    Problem,
    RoundNotOpen,
    SoldOut,
    Unavailable,
    WrongMode,
)
from allocator.gate import Gate
from allocator.identity import Hasher, mask_citizen_id
from allocator.integrity import Lost
from allocator.keys import Keys, RoundKeys, ScriptKeys
from allocator.losswatch import LossWatch, round_refusal
from allocator.model import (
    PICKUP_ALPHABET,
    RESERVATION_ID,
    Reservation,
    Round,
    Site,
    ms_to_rfc3339,
    to_ms,
)
from allocator.redistyping import awaited
from allocator.scripts import Scripts
from allocator.soldout import SoldOutBoard
from allocator.stock_events import StockEvents
from allocator.store import Store
from allocator.topology import ReplicaWait

log = logging.getLogger("allot.allocator")

CODE_CANDIDATES = 3
DESK = "desk"
# Every reservation's channel: `desk` for the desk's route, else the X-Allot-Channel header if
# it is one of the last two, else `api` (service/views.py).
CHANNELS = (DESK, "web", "mini-program", "api")
NO_CLIENT = "-" * 32  # claim.lua's item: no client address hash (a desk's claim)

# byte -> letter: the alphabet has 32 letters, so byte % 32 is uniform (40 random bits a code)
_TO_LETTER = bytes(ord(PICKUP_ALPHABET[b % 32]) for b in range(256))
_ID_BYTES = 16  # 128 random bits in every reservation_id
_ITEM_BYTES = _ID_BYTES + 8 * CODE_CANDIDATES


def fresh_identifiers(round_id: str, count: int) -> list[tuple[str, list[str]]]:
    """A new reservation_id and CODE_CANDIDATES pickup codes for each of ``count`` claims, all
    from one read of the OS's random source (not one per identifier or per character)."""
    raw = os.urandom(_ITEM_BYTES * count)
    fresh = []
    for i in range(0, len(raw), _ITEM_BYTES):
        token = base64.urlsafe_b64encode(raw[i : i + _ID_BYTES]).rstrip(b"=").decode()
        letters = raw[i + _ID_BYTES : i + _ITEM_BYTES].translate(_TO_LETTER).decode()
        codes = [letters[j : j + 8] for j in range(0, len(letters), 8)]
        fresh.append((f"{token}.{round_id}", codes))
    return fresh


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# the 22nd character of a 16-byte token carries its last 2 bits and 4 zero bits: from the same
# character of an 18-byte group (whose last 4 of those 6 bits are the next byte's), canonical
_LAST = {c: _B64[i & 0b110000] for i, c in enumerate(_B64)}
_GROUP_BYTES = 18  # base64 of 18 bytes is 24 characters, no padding: groups encode alone


def fresh_batch(round_id: str, count: int) -> tuple[list[str], str]:
    """What :func:`fresh_identifiers` makes, for claim.lua's packing: ``count`` new
    reservation_ids, and one string of ``count`` * 24 pickup-code letters (claim ``i``'s three
    candidates are ``[24 i, 24 i + 24)``, 8 each). One read of the OS's random source, one
    base64 encoding and one translation for the whole batch: each reservation_id is the first
    21 characters of its 18-byte group's encoding and the canonical 22nd, i.e. exactly
    ``urlsafe_b64encode(16 random bytes)`` without padding, 128 random bits."""
    raw = os.urandom((_GROUP_BYTES + 8 * CODE_CANDIDATES) * count)
    split = _GROUP_BYTES * count
    text = base64.urlsafe_b64encode(raw[:split]).decode()
    suffix = "." + round_id
    last = _LAST
    ids = [text[i : i + 21] + last[text[i + 21]] + suffix for i in range(0, 24 * count, 24)]
    return ids, raw[split:].translate(_TO_LETTER).decode()


def wrong_mode_for_reservation(round_id: str) -> WrongMode:
    return WrongMode(
        f"Round {round_id!r} is a lottery: register an entry"
        f" (POST /api/v1/rounds/{round_id}/entries) instead of reserving."
    )


def new_reservation_id(round_id: str) -> str:
    return fresh_identifiers(round_id, 1)[0][0]


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One citizen's claim. The citizen hash is computed at once (the sold-out fast path needs
    it); the phone and client hashes only when the claim goes to Redis."""

    round_id: str
    site_id: str
    citizen_hash: str
    masked_id: str
    phone: str  # validated; hashed by claim_many, never stored in clear
    client: str  # the client address; hashed by claim_many for its token bucket
    channel: str = "api"  # desk | web | mini-program | api; a desk skips the client bucket
    age_band: str = "18-39"  # at the round's opening date, from the clear ID (claim_request)
    region: str = "000000"  # the ID's six-digit issuing prefix


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """What one claim came to: a reservation (created or the existing one), or a refusal."""

    reservation: Reservation | None = None
    created: bool = False
    refusal: Problem | None = None


def in_cooldown(rnd: Round, until_ms: int) -> Problem:
    """409 in-cooldown (a claim's or an entry's), with ``until`` in the offset the operator
    gave the round's times."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    until = (epoch + dt.timedelta(milliseconds=until_ms)).astimezone(rnd.opens_at.tzinfo)
    shown = until.isoformat(timespec="seconds" if until_ms % 1000 == 0 else "milliseconds")
    return InCooldown(
        f"This citizen ID has a reservation in another round of programme "
        f"{rnd.programme!r}; it may take part again from {shown}.",
        until=shown,
    )


class Claims:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        hasher: Hasher,
        scripts: Scripts,
        gate: Gate,
        catalogue: Catalogue,
        watch: LossWatch,
        board: SoldOutBoard,
        events: StockEvents,
        *,
        clock: Callable[[], float] = time.time,
        replicas: ReplicaWait | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.hasher = hasher
        self.scripts = scripts
        self.gate = gate
        self.catalogue = catalogue
        self.watch = watch
        self.board = board
        self.events = events
        self.clock = clock
        # [redis] wait_replicas: every script whose answer someone receives runs through it
        # (the facade passes the one it shares; allocator/topology.py)
        self.replicas = replicas or ReplicaWait(store.redis, 0, 0)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def check_eligibility(self, rnd: Round, citizen_id: str) -> None:
        """NotEligible naming the first rule of the round's ``eligibility`` the citizen fails.

        From the canonical ID and the cached round alone, before any Redis work: a citizen who
        may not take part spends no token and touches no stock. Ages are counted on the
        calendar date of ``opens_at`` in the offset the operator gave.
        """
        if rnd.eligibility is None:
            return
        rule = rnd.eligibility.check(citizen_id, rnd.opens_at.date())
        if rule is not None:
            raise NotEligible(_not_eligible(rnd, rule), rule=rule)

    def claim_request(
        self,
        round_id: str,
        site_id: str,
        citizen_id: str,
        phone: str,
        client: str = "",
        *,
        channel: str = "api",
        opens_on: dt.date | None = None,
    ) -> ClaimRequest:
        """Hash and mask the canonical ID once; it goes no further in clear. Only its age band
        at ``opens_on`` (the round's opening date; today when not given) and its six-digit
        issuing region are kept, for the fairness report."""
        return ClaimRequest(  # positional, in the fields' order: a request's one dataclass
            round_id,
            site_id,
            self.hasher.citizen(citizen_id),
            mask_citizen_id(citizen_id),
            phone,
            client,
            channel if channel in CHANNELS else "api",
            age_band(citizen_id, opens_on or self.now().date()),
            region(citizen_id),
        )

    # -- claim.lua: packing and decoding ------------------------------------------------------

    async def claim_many(self, round_id: str, items: Sequence[ClaimRequest]) -> list[ClaimOutcome]:
        """Admit (the gate) and decide several claims on one round in one script call."""
        rk = await self.catalogue.round_keys(round_id, prompt=True)
        # a node found down a moment ago: answered now, without the floor and snapshots first
        self.store.refuse_if_down(rk.round)
        even, odd = self.gate.claim_buckets(rk)
        keys = [
            rk.round,
            rk.stock,
            rk.holders,
            rk.reservations,
            rk.tally,
            rk.ledger,
            even,
            odd,
            rk.entitled,
        ]
        refs = ScriptKeys(keys)

        args: list[str | int | float] = [
            len(items),
            *self.gate.args,
            await self.watch.floor(round_id),
        ]
        sites = await self.catalogue.sites(prompt=True)
        ids, letters = fresh_batch(round_id, len(items))
        phone = self.hasher.phone
        client = self.hasher.client
        phones: list[str] = []  # each item's phone hash: a created reply's record needs it
        # claims of one (site, age band, channel) share their five key references and site: made
        # once per group and call, in the order ScriptKeys would have met them item by item
        # (tests/test_claim_packing.py compares with the item-by-item packing)
        groups: dict[tuple[str, str, str], str] = {}
        at = 0
        for item, reservation_id in zip(items, ids, strict=True):
            group = (item.site_id, item.age_band, item.channel)
            shared = groups.get(group)
            if shared is None:
                shared = groups[group] = _group_fields(refs, rk, sites.get(item.site_id), *group)
            phone_hash = phone(item.phone)
            phones.append(phone_hash)
            # one argument per item, laid out as lua/claim.lua's ARGV[9..] says: the three
            # hashes at fixed widths (a desk's claim skips the per-address bucket: no client
            # hash), then the other fields after a space each
            args.append(
                f"{item.citizen_hash}{phone_hash}"
                f"{NO_CLIENT if item.channel == DESK else client(item.client)} {shared}"
                f" {item.masked_id} {reservation_id} {item.channel} {item.age_band} {item.region}"
                f" {letters[at : at + 8]} {letters[at + 8 : at + 16]} {letters[at + 16 : at + 24]}"
            )
            at += 24
        # the script, then (wait_replicas > 0) WAIT on its connection: allocator/topology.py
        replies = await self.store.redis_call(
            self.replicas.run(self.scripts.claim, keys, args), key=rk.round, prompt=True
        )
        if replies and replies[0][0] == b"lost":
            self.watch.note_lost(Lost.from_mark(round_id, replies[0][1]))
            return [ClaimOutcome(refusal=round_refusal()) for _ in items]
        self.watch.seen_whole(round_id)
        outcomes: list[ClaimOutcome] = []
        for item, reservation_id, phone_hash, reply in zip(
            items, ids, phones, replies, strict=True
        ):
            if reply[0] == b"created":  # the record claim.lua wrote, from this item and its reply
                _, code, created_ms, quantity = reply
                # positional, in the fields' order (model.py): half the cost of keywords
                reservation = Reservation(
                    reservation_id,
                    round_id,
                    item.site_id,
                    quantity,
                    "confirmed",
                    code.decode(),
                    item.citizen_hash,
                    phone_hash,
                    item.masked_id,
                    created_ms,
                    created_ms,
                    item.channel,
                    item.age_band,
                    item.region,
                )
                outcomes.append(ClaimOutcome(reservation, True))
            else:
                outcomes.append(await self._outcome(round_id, item, reply))
        return outcomes

    async def _outcome(self, round_id: str, item: ClaimRequest, reply: list[bytes]) -> ClaimOutcome:
        status = reply[0].decode()
        if status == "existing":
            return ClaimOutcome(reservation=Reservation.from_record(round_id, reply[1]))
        if status == "gated":
            return ClaimOutcome(refusal=self.gate.refusal(reply[2].decode(), int(reply[1])))
        if status == "no-round":
            if self.watch.knows(round_id):  # the ledger has it, Redis not: lost, or a moment early
                return ClaimOutcome(refusal=round_refusal())
            return ClaimOutcome(refusal=NotFound(f"There is no round {round_id!r}."))
        if status == "wrong-mode":
            return ClaimOutcome(refusal=wrong_mode_for_reservation(round_id))
        if status == "not-open":
            opens, closes = (ms_to_rfc3339(int(x)) for x in reply[1:3])
            when = "has not opened yet" if self.now_ms() < int(reply[1]) else "has closed"
            return ClaimOutcome(
                refusal=RoundNotOpen(
                    f"Round {round_id!r} {when}: reservations are taken from {opens} to {closes}.",
                    opens_at=opens,
                    closes_at=closes,
                )
            )
        if status == "already-reserved":
            return ClaimOutcome(
                refusal=AlreadyReserved(
                    "This citizen ID already holds a reservation in this round "
                    "(at another site or with another phone number)."
                )
            )
        if status == "in-cooldown":
            return ClaimOutcome(refusal=await self._in_cooldown(round_id, int(reply[1])))
        if status == "sold-out":
            return ClaimOutcome(refusal=await self._sold_out(round_id, item.site_id, int(reply[1])))
        if status == "no-code":
            log.error("all %d pickup-code candidates were taken; retry", CODE_CANDIDATES)
            return ClaimOutcome(refusal=Unavailable("Please try again."))
        raise AssertionError(f"claim.lua answered {status!r}")

    async def _in_cooldown(self, round_id: str, until_ms: int) -> Problem:
        return in_cooldown(await self.catalogue.round(round_id), until_ms)

    async def _sold_out(self, round_id: str, site_id: str, left: int) -> Problem:
        """The refusal, with alternatives; the site is marked on the sold-out board."""
        if left == 0 and not await self.catalogue.site_exists(site_id):
            return NotFound(f"There is no site {site_id!r}.")
        rnd = await self.catalogue.round(round_id)
        refusal = SoldOut(
            f"Site {site_id!r} has {left} unit(s) left; a share is {rnd.per_person}.",
            alternatives=await self.catalogue.alternatives(rnd, site_id),
        )
        if not self.board.marked(round_id, site_id):
            rk = await self.catalogue.round_keys(round_id)
            holders = await self.store.redis_call(
                awaited(self.store.redis.smembers(rk.site_holders(site_id)))
            )
            self.board.mark(round_id, site_id, frozenset(h.decode() for h in holders), refusal)
        return refusal

    # -- one reservation ----------------------------------------------------------------------

    async def reservation(self, reservation_id: str) -> Reservation:
        round_id = _round_of(reservation_id)
        self.watch.refuse_if_lost(round_id)
        rk = await self.catalogue.round_keys(round_id)
        record = await self.store.redis_call(
            awaited(self.store.redis.hget(rk.reservations, reservation_id))
        )
        if record is None:
            # before saying 404: a round Redis lost data of answers 503 (the ledger may have it)
            await self.catalogue.find_round(round_id)
            if self.watch.floors.get(round_id) > 0:
                await self.watch.verify(round_id)
            raise NotFound("There is no such reservation.")
        return Reservation.from_record(round_id, record)

    async def cancel(self, reservation_id: str) -> Reservation:
        round_id = _round_of(reservation_id)
        rk = await self.catalogue.round_keys(round_id)
        floor = await self.watch.floor(round_id)
        # a 503 past the replica wait: the retry answers 200 cancelled (cancel.lua is idempotent)
        reply = await self.store.redis_call(
            self.replicas.run(
                self.scripts.cancel,
                [
                    rk.round,
                    rk.stock,
                    rk.holders,
                    rk.reservations,
                    rk.tally,
                    rk.ledger,
                    rk.entitled,
                ],
                [reservation_id, floor],
            ),
            key=rk.round,
        )
        status = self.watch.whole_or_lost(round_id, reply)
        if status == "not-found":
            if self.watch.knows(round_id):
                await self.catalogue.find_round(round_id)  # RoundLost, not NotFound, if lost
            raise NotFound("There is no such reservation.")
        reservation = Reservation.from_record(round_id, reply[1])
        if status == "not-collectable":
            shown = self.shown_status(reservation, await self.catalogue.round(round_id))
            raise NotCollectable(
                f"This reservation is {shown} and can no longer be cancelled.", reason=shown
            )
        await self.events.units_returned(round_id, [reservation.site_id])
        return reservation

    def shown_status(self, reservation: Reservation, rnd: Round) -> str:
        return reservation.effective_status(self.now_ms(), to_ms(rnd.pickup_end))

    # -- pickup -------------------------------------------------------------------------------

    async def pickup(
        self, site_id: str, code: str, citizen_id: str | None, round_id: str | None = None
    ) -> Reservation:
        """Hand over at the counter; without a round, the round whose code it is is found."""
        round_id = round_id or await self._round_of_code(site_id, code)
        if round_id is None:
            if self.watch.any_lost():  # the code may be of a round Redis lost: not "no such code"
                raise round_refusal()
            raise NotFound(f"No reservation has pickup code {code!r} at site {site_id!r}.")
        rk = await self.catalogue.round_keys(round_id)
        citizen = self.hasher.citizen(citizen_id) if citizen_id else ""
        floor = await self.watch.floor(round_id)
        # a 503 past the replica wait: the retry answers 409 not-collectable, reason collected
        reply = await self.store.redis_call(
            self.replicas.run(
                self.scripts.pickup,
                [rk.round, rk.reservations, rk.codes(site_id), rk.tally, rk.ledger],
                [code, citizen, floor],
            ),
            key=rk.round,
        )
        status = self.watch.whole_or_lost(round_id, reply)
        if status == "not-found":
            if self.watch.knows(round_id):
                await self.catalogue.find_round(round_id)  # RoundLost, not NotFound, if lost
            raise NotFound(f"No reservation has pickup code {code!r} at site {site_id!r}.")
        reservation = Reservation.from_record(round_id, reply[1])
        if status == "not-collectable":
            why = reply[2].decode()  # collected | cancelled | expired | citizen
            if why == "citizen":
                raise NotCollectable(
                    "The ID number does not match this reservation's holder.", reason=why
                )
            raise NotCollectable(f"This reservation is {why} and cannot be collected.", reason=why)
        return reservation

    async def _round_of_code(self, site_id: str, code: str) -> str | None:
        """The round holding this code at this site; a round in its pickup window wins a tie."""
        round_ids = await self.catalogue.round_ids()
        tags = await self.catalogue.tags.all()
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for r in round_ids:
                pipe.hexists(self.keys.round(r, tags.get(r)).codes(site_id), code)
            found: list[bool] = await self.store.redis_call(pipe.execute())
        holders = [r for r, hit in zip(round_ids, found, strict=True) if hit]
        if len(holders) <= 1:
            return holders[0] if holders else None
        now = self.now()
        for r in holders:
            rnd = await self.catalogue.find_round(r)
            if rnd is not None and rnd.pickup_start <= now < rnd.pickup_end:
                return r
        return holders[-1]


def _group_fields(
    refs: ScriptKeys,
    rk: RoundKeys,
    site: Site | None,
    site_id: str,
    age_band: str,
    channel: str,
) -> str:
    """An item's fields that depend only on its site, age band and channel (claim.lua's ARGV
    item: the codes and site-holders key indexes, the three askers' indexes, the site_id)."""
    return " ".join(
        (
            refs.ref(rk.codes(site_id)),
            refs.ref(rk.site_holders(site_id)),
            # the fairness report's askers; an unknown site is nobody's district
            refs.ref(rk.fair_asked("district", site.district)) if site else "0",
            refs.ref(rk.fair_asked("age_band", age_band)),
            refs.ref(rk.fair_asked("channel", channel)),
            site_id,
        )
    )


def _not_eligible(rnd: Round, rule: Rule) -> str:
    """One sentence for the citizen: who the round is for, by the rule they failed."""
    rules = rnd.eligibility
    assert rules is not None
    on = rnd.opens_at.date().isoformat()
    if rule == "regions":
        return f"This round is only for IDs issued in region(s) {', '.join(rules.regions or ())}."
    if rule == "birth_year_last_digit":
        digits = ", ".join(str(d) for d in sorted(rules.birth_year_last_digit or ()))
        return f"This round is only for citizens whose year of birth ends in {digits}."
    if rule == "min_age":
        return f"This round is only for citizens aged at least {rules.min_age} on {on}."
    return f"This round is only for citizens aged at most {rules.max_age} on {on}."


def _round_of(reservation_id: str) -> str:
    match = RESERVATION_ID.fullmatch(reservation_id)
    if match is None:
        raise NotFound("There is no such reservation.")
    return match.group(2)
