"""Lottery entries: a citizen's registration decided in Redis (enter.lua), withdrawal, look-up.

``enter_many`` packs any number of entries on one round into one EVALSHA (the admission queue
sends each batch through it, like claims) and decodes one outcome per entry. Every change goes
to the round's ledger stream (kind ``entry``), which allocator/ledger.py copies to PostgreSQL's
``entries`` table; the freeze (allocator/lottery.py) reads the list from there.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from allocator.catalogue import Catalogue
from allocator.claims import CHANNELS, DESK, NO_CLIENT, in_cooldown
from allocator.entitlement import age_band
from allocator.errors import AlreadyEntered, NotFound, Problem, RoundNotOpen, WrongMode
from allocator.gate import Gate
from allocator.identity import Hasher, mask_citizen_id
from allocator.integrity import Lost
from allocator.keys import Keys
from allocator.losswatch import LossWatch, round_refusal
from allocator.model import Entry, ms_to_rfc3339
from allocator.redistyping import awaited
from allocator.rules import ENTRY_ID
from allocator.scripts import Scripts
from allocator.store import Store
from allocator.topology import ReplicaWait

_ID_BYTES = 16  # 128 random bits in every entry_id


def fresh_entry_ids(round_id: str, count: int) -> list[str]:
    """``count`` new entry_ids (``<22 URL-safe base64>.<round_id>``), from one OS random read."""
    raw = os.urandom(_ID_BYTES * count)
    return [
        f"{base64.urlsafe_b64encode(raw[i : i + _ID_BYTES]).rstrip(b'=').decode()}.{round_id}"
        for i in range(0, len(raw), _ID_BYTES)
    ]


@dataclass(frozen=True, slots=True)
class EntryRequest:
    """One citizen's entry; like ClaimRequest, the ID is hashed and masked at once."""

    round_id: str
    site_id: str
    citizen_hash: str
    masked_id: str
    phone: str  # validated; hashed by enter_many, never stored in clear
    accept_district: bool
    client: str
    channel: str = "api"  # desk | web | mini-program | api; a desk skips the client bucket
    age_band: str = "18-39"  # at the round's opening date, from the clear ID (entry_request)


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    entry: Entry | None = None
    created: bool = False
    refusal: Problem | None = None


class Entries:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        hasher: Hasher,
        scripts: Scripts,
        gate: Gate,
        catalogue: Catalogue,
        watch: LossWatch,
        *,
        now_ms: Callable[[], int],
        replicas: ReplicaWait | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.hasher = hasher
        self.scripts = scripts
        self.gate = gate
        self.catalogue = catalogue
        self.watch = watch
        self.now_ms = now_ms
        # [redis] wait_replicas: an entry's 201 and a withdrawal's 200 go out only once a replica
        # has them (the facade passes the one ReplicaWait it shares; allocator/topology.py)
        self.replicas = replicas or ReplicaWait(store.redis, 0, 0)

    def entry_request(
        self,
        round_id: str,
        site_id: str,
        citizen_id: str,
        phone: str,
        accept_district: bool,
        client: str = "",
        *,
        channel: str = "api",
        opens_on: dt.date,
    ) -> EntryRequest:
        """Hash and mask the canonical ID once; only its age band at ``opens_on`` (the round's
        opening date) is kept besides, for the fairness report."""
        return EntryRequest(
            round_id=round_id,
            site_id=site_id,
            citizen_hash=self.hasher.citizen(citizen_id),
            masked_id=mask_citizen_id(citizen_id),
            phone=phone,
            accept_district=accept_district,
            client=client,
            channel=channel if channel in CHANNELS else "api",
            age_band=age_band(citizen_id, opens_on),
        )

    async def enter_many(self, round_id: str, items: Sequence[EntryRequest]) -> list[EntryOutcome]:
        """Admit (the gate) and decide several entries on one round in one script call."""
        rk = await self.catalogue.round_keys(round_id, prompt=True)
        # a node found down a moment ago: answered now, without the floor and snapshots first
        self.store.refuse_if_down(rk.round)
        even, odd = self.gate.claim_buckets(rk)  # the claims' bucket hashes: one gate
        keys = [
            rk.round,
            rk.entries,
            rk.entrants,
            rk.tally,
            rk.ledger,
            rk.entitled,  # the programme's cooldowns, same slot (allocator/keys.py)
            even,
            odd,
        ]

        sites = await self.catalogue.sites(prompt=True)
        known = [i.site_id in sites or await self.catalogue.site_exists(i.site_id) for i in items]
        outcomes: list[EntryOutcome | None] = [
            None if ok else EntryOutcome(refusal=NotFound(f"There is no site {i.site_id!r}."))
            for i, ok in zip(items, known, strict=True)
        ]
        asked = [i for i, ok in zip(items, known, strict=True) if ok]
        if not asked:
            return [o for o in outcomes if o is not None]
        floor = await self.watch.floor(round_id)
        args: list[str | int | float] = [len(asked), *self.gate.args, floor]
        entry_ids = fresh_entry_ids(round_id, len(asked))
        phone_hashes = [self.hasher.phone(item.phone) for item in asked]
        for item, entry_id, phone_hash in zip(asked, entry_ids, phone_hashes, strict=True):
            args.append(  # one argument per item, laid out as lua/enter.lua's ARGV[9..]
                item.citizen_hash
                + phone_hash
                + (NO_CLIENT if item.channel == DESK else self.hasher.client(item.client))
                + f" {item.site_id} {item.masked_id} {entry_id}"
                f" {'1' if item.accept_district else '0'} {item.channel} {item.age_band}"
            )
        # the script, then (wait_replicas > 0) WAIT on its connection. Past the wait every item
        # is answered 503; the entries were made, and each citizen's retry gets 200 with the
        # same entry (enter.lua: "existing")
        replies = await self.store.redis_call(
            self.replicas.run(self.scripts.enter, keys, args), key=rk.round, prompt=True
        )
        if replies and replies[0][0] == b"lost":
            self.watch.note_lost(Lost.from_mark(round_id, replies[0][1]))
            return [EntryOutcome(refusal=round_refusal()) for _ in items]
        self.watch.seen_whole(round_id)
        decided = iter(
            [
                EntryOutcome(
                    entry=Entry(
                        entry_id=entry_id,
                        round_id=round_id,
                        site_id=item.site_id,
                        accept_district=item.accept_district,
                        status="registered",
                        citizen_hash=item.citizen_hash,
                        phone_hash=phone_hash,
                        citizen_id_masked=item.masked_id,
                        created_ms=int(reply[1]),
                        updated_ms=int(reply[1]),
                        channel=item.channel,
                        age_band=item.age_band,
                    ),
                    created=True,
                )
                if reply[0] == b"created"  # the record is the item's (lua/enter.lua)
                else await self._outcome(round_id, reply)
                for item, entry_id, phone_hash, reply in zip(
                    asked, entry_ids, phone_hashes, replies, strict=True
                )
            ]
        )
        return [o if o is not None else next(decided) for o in outcomes]

    async def _outcome(self, round_id: str, reply: list[bytes]) -> EntryOutcome:
        status = reply[0].decode()
        if status == "existing":
            return EntryOutcome(entry=Entry.from_record(round_id, reply[1]))
        if status == "gated":
            return EntryOutcome(refusal=self.gate.refusal(reply[2].decode(), int(reply[1])))
        if status == "no-round":
            if self.watch.knows(round_id):
                return EntryOutcome(refusal=round_refusal())
            return EntryOutcome(refusal=NotFound(f"There is no round {round_id!r}."))
        if status == "wrong-mode":
            return EntryOutcome(
                refusal=WrongMode(
                    f"Round {round_id!r} is first come, first served: reserve"
                    f" (POST /api/v1/rounds/{round_id}/reservations) instead of entering."
                )
            )
        if status == "not-open":
            opens, closes = (ms_to_rfc3339(int(x)) for x in reply[1:3])
            when = "has not opened yet" if self.now_ms() < int(reply[1]) else "has closed"
            return EntryOutcome(
                refusal=RoundNotOpen(
                    f"Round {round_id!r} {when}: entries are taken from {opens} to {closes}.",
                    opens_at=opens,
                    closes_at=closes,
                )
            )
        if status == "in-cooldown":
            rnd = await self.catalogue.round(round_id)
            return EntryOutcome(refusal=in_cooldown(rnd, int(reply[1])))
        if status == "already-entered":
            return EntryOutcome(
                refusal=AlreadyEntered(
                    "This citizen ID already holds an entry in this round with another phone "
                    "number."
                )
            )
        raise AssertionError(f"enter.lua answered {status!r}")

    # -- one entry ----------------------------------------------------------------------------

    async def entry(self, entry_id: str) -> Entry:
        round_id = _round_of(entry_id)
        self.watch.refuse_if_lost(round_id)
        rk = await self.catalogue.round_keys(round_id)
        record = await self.store.redis_call(awaited(self.store.redis.hget(rk.entries, entry_id)))
        if record is None:
            await self.catalogue.find_round(round_id)  # 503, not 404, for a lost round
            if self.watch.floors.get(round_id) > 0:
                await self.watch.verify(round_id)
            raise NotFound("There is no such entry.")
        return Entry.from_record(round_id, record)

    async def withdraw(self, entry_id: str) -> Entry:
        round_id = _round_of(entry_id)
        rk = await self.catalogue.round_keys(round_id)
        floor = await self.watch.floor(round_id)
        # a 503 past the replica wait: the retry answers 200 withdrawn (withdraw.lua is idempotent)
        reply = await self.store.redis_call(
            self.replicas.run(
                self.scripts.withdraw,
                [rk.round, rk.entries, rk.entrants, rk.tally, rk.ledger],
                [entry_id, floor],
            ),
            key=rk.round,
        )
        status = self.watch.whole_or_lost(round_id, reply)
        if status == "not-found":
            if self.watch.knows(round_id):
                await self.catalogue.find_round(round_id)
            raise NotFound("There is no such entry.")
        entry = Entry.from_record(round_id, reply[1])
        if status == "not-open":
            rnd = await self.catalogue.round(round_id)
            raise RoundNotOpen(
                f"Round {round_id!r} has closed: entries can be withdrawn only until"
                f" {rnd.closes_at.isoformat()}.",
                opens_at=rnd.opens_at.isoformat(),
                closes_at=rnd.closes_at.isoformat(),
            )
        return entry


def _round_of(entry_id: str) -> str:
    match = ENTRY_ID.fullmatch(entry_id)
    if match is None:
        raise NotFound("There is no such entry.")
    return match.group(2)
