"""The spread claim protocol's driver: one round's claims over N citizen shards and M stock
sub-pools (docs/scaling.md, "Design: one hot round over several primaries").

A batch of claims goes through three stages, each one script call per shard touched, the calls
of a stage sent at once (as ``Claims.claim_many`` sends one claim.lua call per batch):

1. ``entitle.lua`` on each citizen shard k (k = HMAC(citizen) mod N): a pending holder entry;
2. ``take.lua`` on each stock shard: a unit of the site's sub-pool there. A citizen's sub-pools
   are tried in an order of its own (the first one from its hash, so the crowd spreads evenly);
   one refused sold-out tries the next in a further wave, so a claim is refused sold-out only
   when every sub-pool of the site was short;
3. ``confirm.lua`` (taken) and ``release.lua`` (sold out everywhere, or fenced) on the citizen
   shards, together.

A worker that dies after stage 1 or 2 leaves pending entries; :meth:`Spread.reap` deals with
those past their expiry: ``reap.lua`` on every stock shard fences the id or finds its record,
then the entry is confirmed or released. Nothing here is wired into the service.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.crc import key_slot

from allocator import topology
from allocator.claims import fresh_batch
from allocator.redistyping import awaited

HOLD_MS = 5000  # a pending entry's life: how long a dead worker can keep a citizen waiting
DAY_MS = 86_400_000
SCRIPT_NAMES = ("entitle", "take", "confirm", "release", "reap", "cancel")
Stage = Literal["entitle", "take"]
OPEN_GATE = (1e9, 10**9, 1e9, 10**9, 1e9, 10**9)  # shard, client, citizen: rate, burst


def script_source(name: str) -> str:
    return (Path(__file__).resolve().parent / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one round's keys live: N citizen-shard tags (of the round's programme) and M
    stock-shard tags (of the round), each a hash tag of its own."""

    prefix: str
    programme: str
    round_id: str
    citizen_tags: tuple[str, ...]
    stock_tags: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.citizen_tags)

    @property
    def m(self) -> int:
        return len(self.stock_tags)

    def citizen_shard(self, cit: str) -> int:
        """k = HMAC(citizen) mod N (the citizen hash is that HMAC, in hex)."""
        return int(cit[:12], 16) % self.n

    def stock_order(self, cit: str) -> tuple[int, ...]:
        """The sub-pools a citizen's claim tries, in order: from one chosen by its hash (other
        bits than the citizen shard's), then the next ones round the ring."""
        start = int(cit[12:24], 16) % self.m
        return tuple((start + i) % self.m for i in range(self.m))

    def _c(self, k: int) -> str:
        return f"{self.prefix}:{{{self.citizen_tags[k]}}}:"

    def _s(self, j: int) -> str:
        return f"{self.prefix}:{{{self.stock_tags[j]}}}:"

    def holders(self, k: int) -> str:
        return f"{self._c(k)}holders:{self.round_id}"

    def pending(self, k: int) -> str:
        return f"{self._c(k)}pending:{self.round_id}"

    def bars(self, k: int) -> str:
        return f"{self._c(k)}entitled"

    def entitle_keys(self, k: int) -> list[str]:
        return [self.holders(k), self.pending(k), self.bars(k), f"{self._c(k)}gate:{self.round_id}"]

    def citizen_keys(self, k: int) -> list[str]:
        """confirm.lua's and release.lua's KEYS."""
        c = self._c(k)
        return [self.holders(k), self.pending(k), self.bars(k), f"{c}tally", f"{c}ledger"]

    def stock(self, j: int) -> str:
        return f"{self._s(j)}stock"

    def records(self, j: int) -> str:
        return f"{self._s(j)}records"

    def stock_keys(self, j: int) -> list[str]:
        """take.lua's and cancel.lua's fixed KEYS."""
        s = self._s(j)
        return [self.stock(j), self.records(j), f"{s}tally", f"{s}ledger"]

    def codes(self, j: int, site: str) -> str:
        return f"{self._s(j)}codes:{site}"

    def site_holders(self, j: int, site: str) -> str:
        return f"{self._s(j)}siteholders:{site}"

    def asked(self, j: int, dimension: str, group: str) -> str:
        return f"{self._s(j)}fair:asked:{dimension}:{group}"

    def all_tags(self) -> list[str]:
        return [*self.citizen_tags, *self.stock_tags]


def spread_tags(
    kind: str, name: str, count: int, node_of_slot: Callable[[int], str], nodes: Sequence[str]
) -> tuple[str, ...]:
    """``count`` hash tags ``<kind>:<name>:<i>[.<salt>]``, the i-th in a slot served by
    ``nodes[i % len(nodes)]`` (the salt is the first that lands there)."""
    tags = []
    for i in range(count):
        want = nodes[i % len(nodes)]
        salt = 0
        while True:
            tag = f"{kind}:{name}:{i}" + (f".{salt}" if salt else "")
            if node_of_slot(key_slot(tag.encode())) == want:
                break
            salt += 1
        tags.append(tag)
    return tuple(tags)


@dataclass(frozen=True, slots=True)
class Claim:
    """One citizen's claim, already hashed (as ``ClaimRequest`` is after claim_many)."""

    cit: str  # citizen hash, 64 hex
    site: str
    client: str = "0" * 32  # client address hash
    phone: str = "0" * 64  # phone hash
    mask: str = "110***********123X"
    channel: str = "web"
    age_band: str = "18-39"
    region: str = "110000"
    district: str = "d0"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the citizen is answered. ``ok``: 201 (confirmed); ``existing``: the citizen's
    confirmed share at this site (200); ``already-reserved``, ``in-cooldown``, ``sold-out``
    (409); ``pending`` (another claim of the citizen is in flight), ``void`` (the reaper fenced
    this claim: the worker was too slow), ``gated``, ``no-code``: 503 / 429, try again."""

    status: str
    reservation_id: str | None = None
    stock: int | None = None  # the sub-pool (stock shard) holding an ``ok`` share
    code: str | None = None
    created_ms: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Taken:
    stock: int
    code: str
    created_ms: int


@dataclass(slots=True)
class Run:
    """One claim_many call: the answers (None: the worker died or stalled before giving any),
    and what the worker learnt on the way (the stateful test's model follows it)."""

    outcomes: list[Outcome] | None
    claims: list[Claim]
    ids: list[str]
    letters: str  # the pickup-code candidates, 24 letters a claim
    done: str = ""  # the last stage done: entitle | take | finish
    answered: dict[int, Outcome] = field(default_factory=dict)  # refused at entitle
    entitled: dict[int, int] = field(default_factory=dict)  # item -> pending expires_ms
    taken: dict[int, Taken] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)  # item -> sold-out | void | no-code
    stages: int = 0  # sequential round trips (one call per shard each, sent at once)
    calls: int = 0  # script calls in all


@dataclass(slots=True)
class Reaped:
    confirmed: list[tuple[str, str]] = field(default_factory=list)  # (cit, reservation_id)
    released: list[tuple[str, str]] = field(default_factory=list)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Spread:
    """The protocol's driver for one round (see the module's docstring)."""

    def __init__(
        self,
        client: Redis,
        layout: Layout,
        *,
        clock_ms: Callable[[], int],
        hold_ms: int = HOLD_MS,
        cooldown_ms: int = 7 * DAY_MS,
        per_person: int = 1,
        gate: tuple[float, ...] = OPEN_GATE,
    ) -> None:
        self.client = client
        self.layout = layout
        self.clock_ms = clock_ms
        self.hold_ms = hold_ms
        self.cooldown_ms = cooldown_ms
        self.per_person = per_person
        self.gate = gate
        self.scripts: dict[str, AsyncScript] = {
            name: topology.script(client, script_source(name)) for name in SCRIPT_NAMES
        }

    async def _call(self, name: str, keys: list[str], args: Sequence[str | int | float]) -> Any:
        return await self.scripts[name](keys=keys, args=args)

    # -- stock ---------------------------------------------------------------------------------

    async def load(self, site: str, units: int) -> list[int]:
        """``units`` more for ``site``, split as evenly as can be over the M sub-pools (the
        first ones get the remainder); what each got, by sub-pool."""
        m = self.layout.m
        parts = [units // m + (1 if j < units % m else 0) for j in range(m)]
        await asyncio.gather(
            *(
                awaited(self.client.hincrby(self.layout.stock(j), site, part))
                for j, part in enumerate(parts)
                if part
            )
        )
        return parts

    # -- claims --------------------------------------------------------------------------------

    async def claim_many(self, claims: Sequence[Claim], *, die_after: Stage | None = None) -> Run:
        """Decide a batch of claims; ``die_after`` stops the worker after that stage, as a
        crash would (the pending entries it leaves are the reaper's), or as a stalled worker
        would (:meth:`resume` carries on later)."""
        ids, letters = fresh_batch(self.layout.round_id, len(claims))
        run = Run(None, list(claims), ids, letters)
        await self._entitle(run)
        if die_after == "entitle":
            return run
        return await self.resume(run, die_after=die_after)

    async def resume(self, run: Run, *, die_after: Stage | None = None) -> Run:
        """Carry on with a run from the stage after the last one it did."""
        if run.done == "entitle":
            await self._take_waves(run)
            if die_after == "take":
                return run
        await self._finish(run)
        return run

    async def _entitle(self, run: Run) -> None:
        """Stage 1: one entitle.lua call per citizen shard."""
        lay, claims, ids = self.layout, run.claims, run.ids
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i, c in enumerate(claims):
            by_shard[lay.citizen_shard(c.cit)].append(i)
        now = self.clock_ms()
        calls = [
            self._call(
                "entitle",
                lay.entitle_keys(k),
                [
                    now,
                    self.hold_ms,
                    *self.gate,
                    *(f"{claims[i].cit} {claims[i].client} {ids[i]} {claims[i].site}" for i in idx),
                ],
            )
            for k, idx in by_shard.items()
        ]
        run.stages, run.calls, run.done = 1, len(calls), "entitle"
        for idx, replies in zip(by_shard.values(), await asyncio.gather(*calls), strict=True):
            for i, reply in zip(idx, replies, strict=True):
                status = _text(reply[0])
                if status == "ok":
                    run.entitled[i] = int(reply[1])
                elif status == "held":
                    state, held_id, site = (_text(x) for x in reply[1:4])
                    if state == "P":
                        run.answered[i] = Outcome("pending", held_id)
                    elif site == claims[i].site:
                        run.answered[i] = Outcome("existing", held_id)
                    else:
                        run.answered[i] = Outcome("already-reserved")
                else:  # in-cooldown (until_ms), gated (bucket)
                    run.answered[i] = Outcome(status, detail=_text(reply[1]))

    async def _take_waves(self, run: Run) -> None:
        """Stage 2, in waves: wave w sends each claim still short to its w-th sub-pool, one
        take.lua call per stock shard."""
        lay, claims = self.layout, run.claims
        waiting = sorted(run.entitled)
        for wave in range(lay.m):
            if not waiting:
                break
            on: dict[int, list[int]] = defaultdict(list)
            for i in waiting:
                on[lay.stock_order(claims[i].cit)[wave]].append(i)
            now = self.clock_ms()
            calls = [self._take(j, idx, run, now) for j, idx in on.items()]
            run.stages += 1
            run.calls += len(calls)
            waiting = []
            for (j, idx), replies in zip(on.items(), await asyncio.gather(*calls), strict=True):
                for i, reply in zip(idx, replies, strict=True):
                    status = _text(reply[0])
                    if status == "taken":
                        run.taken[i] = Taken(j, _text(reply[1]), int(reply[2]))
                    elif status == "sold-out" and wave < lay.m - 1:
                        waiting.append(i)
                    else:  # sold-out on the last sub-pool, void (fenced), no-code
                        run.refused[i] = status
        run.done = "take"

    async def _finish(self, run: Run) -> None:
        """Stage 3: confirm what was taken, release what was not, one call per citizen shard
        and kind, all at once; then the answers."""
        lay, claims, ids = self.layout, run.claims, run.ids
        confirm: dict[int, list[int]] = defaultdict(list)
        release: dict[int, list[int]] = defaultdict(list)
        for i in run.taken:
            confirm[lay.citizen_shard(claims[i].cit)].append(i)
        for i in run.refused:
            release[lay.citizen_shard(claims[i].cit)].append(i)
        confirm_calls = [
            self._call(
                "confirm",
                lay.citizen_keys(k),
                [
                    self.cooldown_ms,
                    *(f"{claims[i].cit} {ids[i]} {run.taken[i].created_ms}" for i in idx),
                ],
            )
            for k, idx in confirm.items()
        ]
        release_calls = [
            self._call("release", lay.citizen_keys(k), [f"{claims[i].cit} {ids[i]}" for i in idx])
            for k, idx in release.items()
        ]
        if confirm_calls or release_calls:
            run.stages += 1
            run.calls += len(confirm_calls) + len(release_calls)
        done = await asyncio.gather(*confirm_calls, *release_calls)
        answered = dict(run.answered)
        already: dict[int, list[int]] = defaultdict(list)  # stock shard -> items
        for idx, replies in zip(confirm.values(), done[: len(confirm_calls)], strict=True):
            for i, reply in zip(idx, replies, strict=True):
                t = run.taken[i]
                status = _text(reply)
                if status == "confirmed":
                    answered[i] = Outcome("ok", ids[i], t.stock, t.code, t.created_ms)
                elif status == "already":
                    already[t.stock].append(i)
                else:
                    # gone: only for a worker slower than the reaper, whose entry the reaper
                    # confirmed and the citizen (shown it as "existing") has cancelled since
                    answered[i] = Outcome("void", ids[i], t.stock, detail="gone")
        if already:
            await self._check_already(run, already, answered)
        for i, why in run.refused.items():
            answered[i] = Outcome(why)
        run.outcomes = [answered[i] for i in range(len(claims))]
        run.done = "finish"

    async def _check_already(
        self, run: Run, already: dict[int, list[int]], answered: dict[int, Outcome]
    ) -> None:
        """Entries confirmed before this worker's confirm (by the reaper: the worker was slower
        than it): the citizen may have been shown the share and cancelled it since, and a cancel
        that died between its halves (cancel.lua, then release.lua) leaves the confirmed entry
        in place. So the record on its stock shard decides: 201 only if it is still confirmed
        when read (a cancel after the read is a cancel after the 201), else void (503). One
        read per stock shard, at once; only on this slow path."""
        ids = run.ids
        idx_of = list(already.items())
        records = await asyncio.gather(
            *(
                awaited(self.client.hmget(self.layout.records(j), [ids[i] for i in idx]))
                for j, idx in idx_of
            )
        )
        run.stages += 1  # reads, not script calls: ``run.calls`` does not count them
        for (_, idx), found in zip(idx_of, records, strict=True):
            for i, rec in zip(idx, found, strict=True):
                t = run.taken[i]
                # a taken id's record is never replaced by the fence (reap.lua), so it is JSON
                status = str(orjson.loads(rec)["status"]) if rec is not None else "missing"
                if status == "confirmed":
                    answered[i] = Outcome("ok", ids[i], t.stock, t.code, t.created_ms)
                else:
                    answered[i] = Outcome("void", ids[i], t.stock, detail=status)

    def _take(self, j: int, idx: list[int], run: Run, now: int) -> Any:
        claims, ids, letters = run.claims, run.ids, run.letters
        lay = self.layout
        keys = lay.stock_keys(j)
        index: dict[str, int] = {}

        def ref(name: str) -> int:
            at = index.get(name)
            if at is None:
                keys.append(name)
                at = index[name] = len(keys)
            return at

        items = []
        for i in idx:
            c = claims[i]
            codes = letters[24 * i : 24 * i + 24]
            items.append(
                f"{c.cit} {c.phone} {c.mask} {ids[i]} {c.site} {c.channel} {c.age_band}"
                f" {c.region} {ref(lay.codes(j, c.site))} {ref(lay.site_holders(j, c.site))}"
                f" {ref(lay.asked(j, 'district', c.district))}"
                f" {ref(lay.asked(j, 'age_band', c.age_band))}"
                f" {ref(lay.asked(j, 'channel', c.channel))}"
                f" {codes[:8]} {codes[8:16]} {codes[16:]}"
            )
        return self._call("take", keys, [now, self.per_person, *items])

    # -- the reaper ----------------------------------------------------------------------------

    async def reap(self) -> Reaped:
        """Every pending entry past its expiry (by the driver's clock): confirmed if a stock
        shard has its record, else fenced on every stock shard and released."""
        lay = self.layout
        now = self.clock_ms()
        found: list[tuple[int, str, str]] = []  # (citizen shard, cit, id)
        for k in range(lay.n):
            cits = await awaited(self.client.zrangebyscore(lay.pending(k), "-inf", f"({now}"))
            if not cits:
                continue
            entries = await awaited(self.client.hmget(lay.holders(k), cits))
            for cit, entry in zip(cits, entries, strict=True):
                if entry is None:
                    continue
                state, held_id, _site, expires = _text(entry).split(" ")
                if state == "P" and int(expires) < now:
                    found.append((k, _text(cit), held_id))
        reaped = Reaped()
        if not found:
            return reaped
        ids = [held_id for _, _, held_id in found]
        answers = await asyncio.gather(
            *(self._call("reap", [lay.records(j)], list(ids)) for j in range(lay.m))
        )
        confirm: dict[int, list[str]] = defaultdict(list)
        release: dict[int, list[str]] = defaultdict(list)
        for at, (k, cit, held_id) in enumerate(found):
            taken = [a[at] for a in answers if _text(a[at][0]) == "taken"]
            if taken:
                confirm[k].append(f"{cit} {held_id} {int(taken[0][2])}")
                reaped.confirmed.append((cit, held_id))
            else:
                release[k].append(f"{cit} {held_id}")
                reaped.released.append((cit, held_id))
        await asyncio.gather(
            *(
                self._call("confirm", lay.citizen_keys(k), [self.cooldown_ms, *items])
                for k, items in confirm.items()
            ),
            *(self._call("release", lay.citizen_keys(k), items) for k, items in release.items()),
        )
        return reaped

    # -- cancel --------------------------------------------------------------------------------

    async def cancel(
        self, reservation_id: str, cit: str, stock: int, *, die_between: bool = False
    ) -> str:
        """Stock first (the record cancelled, its units back), then the citizen's holder entry
        and bar; ``die_between`` stops after the first, as a crash would."""
        lay = self.layout
        reply = await self._call("cancel", lay.stock_keys(stock), [reservation_id, self.clock_ms()])
        status = _text(reply[0])
        if status != "cancelled" or die_between:
            return status
        k = lay.citizen_shard(cit)
        await self._call("release", lay.citizen_keys(k), [f"{cit} {reservation_id}"])
        return status


# -- what Redis holds, for the invariants ---------------------------------------------------------


@dataclass(slots=True)
class Holder:
    state: str  # P | C
    reservation_id: str
    site: str
    at_ms: int  # P: expires; C: created


@dataclass(slots=True)
class Snapshot:
    holders: dict[str, Holder]  # citizen hash -> entry (one per citizen: one shard each)
    pending: dict[str, int]  # citizen hash -> score in the pending index
    bars: dict[str, tuple[int, str]]  # citizen hash -> (until_ms, reservation_id)
    left: dict[tuple[str, int], int]  # (site, sub-pool) -> units left
    records: dict[str, tuple[int, dict[str, Any]]]  # id -> (sub-pool, record)
    void: dict[str, set[int]]  # id -> the sub-pools where reap.lua fenced it


async def snapshot(client: Redis, layout: Layout) -> Snapshot:
    snap = Snapshot({}, {}, {}, {}, {}, {})
    for k in range(layout.n):
        for cit, entry in (await awaited(client.hgetall(layout.holders(k)))).items():
            state, held_id, site, at = _text(entry).split(" ")
            snap.holders[_text(cit)] = Holder(state, held_id, site, int(at))
        for cit, score in await awaited(client.zrange(layout.pending(k), 0, -1, withscores=True)):
            snap.pending[_text(cit)] = int(score)
        for cit, bar in (await awaited(client.hgetall(layout.bars(k)))).items():
            until, held_id = _text(bar).split(" ")
            snap.bars[_text(cit)] = (int(until), held_id)
    for j in range(layout.m):
        for site, left in (await awaited(client.hgetall(layout.stock(j)))).items():
            snap.left[(_text(site), j)] = int(left)
        for rid, rec in (await awaited(client.hgetall(layout.records(j)))).items():
            if rec == b"void":
                snap.void.setdefault(_text(rid), set()).add(j)
            else:
                snap.records[_text(rid)] = (j, orjson.loads(rec))
    return snap
