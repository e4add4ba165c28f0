"""Stateful property test of lottery entries: the real allocator against a plain Python model.

The same approach as tests/test_stateful.py (whose machine drives an FCFS round), for a lottery
round: Hypothesis enters citizens (one at a time, through the admission queue, or several in
one enter.lua call with the same citizen twice), re-enters them (the same phone: 200, the last
choice counts; another phone: 409 already-entered), withdraws and looks entries up, loads
batches, flushes the script cache and restarts the worker, on real Redis and a real PostgreSQL
ledger; every answer and Redis's entries, entrants, counters and seq are compared with the
model after every step, and the drained ledger and ``reconcile`` (entries included,
allocator/reconcile_entries.py) at any point. Late in an example the round may close: entries
and withdrawals are then refused, the round is frozen and drawn, and the model draws the same
round by the contract's algorithm (API.md, "The draw, step by step") written out here in a few
lines of its own, from the published secret: the files byte for byte, the winners, their
reservations, and a pass after cancelled wins.

A separate machine rather than more rules on the FCFS one: a round is either kind, nothing of
one reaches the other, and rules added there would only thin out its claims.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import os
import sys
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import orjson
import pytest
from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from allocator import db
from allocator.admission import AdmissionQueue
from allocator.config import LedgerSettings, QueueSettings
from allocator.entries import fresh_entry_ids
from allocator.errors import Problem
from allocator.facade import Allocator
from allocator.identity import Hasher, mask_citizen_id
from allocator.keys import Keys
from allocator.ledger import LedgerWriter
from allocator.model import Entry, Round, Site
from allocator.reconcile import reconcile
from loadtest.servers import PrivateRedis
from tests.helpers import citizen_id, phone
from tests.test_stateful import OPEN_GATE, PEPPER

T = TypeVar("T")

SITES = ("s1", "s2", "s3")  # the round has the first 2 or 3; "s3" may be unknown
DISTRICT = {"s1": "d1", "s2": "d2", "s3": "d1"}  # s1 and s3 share a district
CITIZENS = 6
BATCH_IDS = ("b1", "b2")
CLOSE_AFTER = 15  # steps before the round may close: most of an example is registration
site_ids = st.sampled_from(("s1", "s2", "s1", "s2", "s3"))
entry_items = st.tuples(st.integers(0, CITIZENS - 1), st.integers(0, 1), site_ids, st.booleans())
SOURCE = "drand quicknet, the first round after closes_at"


def phone_of(n: int, k: int) -> str:
    return phone(2 * n + k)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def receipt_of(round_id: str, entry_id: str) -> str:
    """API.md: hex SHA-256 of "allot-receipt-1\\n" + round_id + "\\n" + entry_id."""
    return sha(f"allot-receipt-1\n{round_id}\n{entry_id}".encode())


@dataclass
class ModelEntry:
    entry_id: str
    citizen: int
    phone: str
    site_id: str
    accept: bool
    status: str = "registered"  # registered | withdrawn | won (as Redis stores it)
    reservation_id: str | None = None
    won_site: str | None = None


class LotteryMachine(RuleBasedStateMachine):
    """One lottery round on a fresh key prefix; the model is plain dicts."""

    entries = Bundle("entries")
    wins = Bundle("wins")  # reservation_ids of won entries

    def __init__(self, database_url: str, redis_url: str) -> None:
        super().__init__()
        self.database_url = database_url
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.keys = Keys(f"allot-test-{uuid.uuid4().hex[:12]}")
        self.round_id = f"l{uuid.uuid4().hex[:10]}"
        self.hasher = Hasher(PEPPER)
        self.redis = Redis.from_url(redis_url)
        self.pool: asyncpg.Pool = self.run(db.create_pool(database_url))
        self.jobs = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.allocator, self.door, self.dispatcher = self._start()
        self.ready = False
        self.steps = 0
        # -- the model --
        self.per_person = 1
        self.site_ids: tuple[str, ...] = ()
        self.loaded: dict[str, int] = {}
        self.batches: dict[str, tuple[tuple[str, int], ...]] = {}
        self.model: dict[str, ModelEntry] = {}
        self.entrants: dict[int, str] = {}  # citizen number -> live entry_id
        self.changes = 0  # the round's seq while registering
        self.closed = False
        self.drawn = False
        self.ranked: list[str] = []  # entry_ids in rank order (the model's draw)
        self.left: dict[str, int] = {}  # units left after the last pass, per site
        self.given: dict[str, int] = {}  # units the draw and passes gave, per site
        self.cancelled: dict[str, int] = {}  # units of cancelled wins, per site
        self.passes = 0

    # -- plumbing ----------------------------------------------------------------------------

    def run(self, aw: Awaitable[T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(15):
                return await aw

        return self.loop.run_until_complete(bounded())

    def attempt(self, aw: Awaitable[T]) -> tuple[T | None, Problem | None]:
        try:
            return self.run(aw), None
        except Problem as problem:
            return None, problem

    def _start(self) -> tuple[Allocator, AdmissionQueue, asyncio.Task[None]]:
        allocator = Allocator(
            self.redis,
            self.pool,
            self.keys,
            self.hasher,
            timeout=5,
            gate=OPEN_GATE,
            database_url=self.database_url,
        )
        # the freeze and the draw run in a thread instead of the service's spawned process:
        # the same functions (allocator/drawjob.py), without a process start per example
        allocator.lottery._pool = cast(Any, self.jobs)
        door = AdmissionQueue(allocator, QueueSettings(max_wait_ms=10_000))
        return allocator, door, self.loop.create_task(door.run())

    async def _stop(self) -> None:
        for task in self.allocator.lottery._tasks.values():
            task.cancel()
        self.dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.dispatcher

    def teardown(self) -> None:
        failing = sys.exc_info()[1] is not None
        # what the examples reached (pytest --hypothesis-show-statistics)
        event("drawn" if self.drawn else ("closed" if self.closed else "registering"))
        event(f"passes: {self.passes}")
        try:
            if self.ready and not failing:
                self.run(self._check_ledger())
                assert not self.loop_errors, f"unhandled errors in the loop: {self.loop_errors}"
        finally:
            self.run(self._close())
            self.jobs.shutdown(wait=True)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _close(self) -> None:
        await self._stop()
        try:
            found = [k async for k in self.redis.scan_iter(match=f"{self.keys.prefix}:*")]
            if found:
                await self.redis.delete(*found)
        finally:
            await self.redis.aclose()
            await self.pool.close()

    # -- the model's answers -----------------------------------------------------------------

    def expected_entry(self, n: int, ph: str, site_id: str) -> str:
        if site_id not in self.site_ids:
            return "not-found"  # an unknown site is refused before the script
        if self.closed:
            return "round-not-open"
        held = self.entrants.get(n)
        if held is not None:
            return "existing" if self.model[held].phone == ph else "already-entered"
        return "created"

    def check_entry(
        self, n: int, ph: str, site_id: str, accept: bool, got: Entry | None, created: bool,
        problem: Problem | None,
    ) -> str | None:  # fmt: skip
        """Compare one entry's outcome with the model and apply it; the new id if created."""
        expected = self.expected_entry(n, ph, site_id)
        if expected not in ("created", "existing"):
            assert got is None, (expected, got)
            assert problem is not None
            assert problem.code == expected, (expected, problem)
            return None
        assert problem is None, (expected, problem)
        assert got is not None
        assert created == (expected == "created")
        assert (got.site_id, got.accept_district, got.status) == (site_id, accept, "registered")
        assert got.citizen_id_masked == mask_citizen_id(citizen_id(n))
        assert got.citizen_hash == self.hasher.citizen(citizen_id(n))
        if expected == "existing":
            e = self.model[self.entrants[n]]
            assert got.entry_id == e.entry_id  # the same entry, now with this choice
            if (e.site_id, e.accept) != (site_id, accept):
                self.changes += 1
            e.site_id, e.accept = site_id, accept
            return None
        assert got.entry_id not in self.model
        assert got.entry_id.endswith(f".{self.round_id}")
        self.model[got.entry_id] = ModelEntry(got.entry_id, n, ph, site_id, accept)
        self.entrants[n] = got.entry_id
        self.changes += 1
        return got.entry_id

    # -- setup -------------------------------------------------------------------------------

    @initialize(
        per_person=st.integers(1, 2),
        n_sites=st.integers(2, 3),
        seed=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    )
    def open_round(self, per_person: int, n_sites: int, seed: list[int]) -> None:
        self.per_person = per_person
        self.site_ids = SITES[:n_sites]
        now = dt.datetime.now(dt.UTC)
        rnd = Round(
            round_id=self.round_id,
            title="Masks by lot",
            opens_at=now - dt.timedelta(minutes=1),
            closes_at=now + dt.timedelta(hours=1),
            per_person=per_person,
            pickup_start=now - dt.timedelta(minutes=1),
            pickup_end=now + dt.timedelta(hours=2),
            mode="lottery",
            public_randomness_source=SOURCE,
        )
        sites = [Site(s, f"Site {s}", f"{s} road 1", DISTRICT[s]) for s in self.site_ids]
        assert self.run(self.allocator.upsert_sites(sites)) == n_sites
        assert self.run(self.allocator.upsert_round(rnd)) is True
        self.ready = True
        items = [(s, units) for s, units in zip(self.site_ids, seed, strict=False) if units]
        if items:
            self.check_load("seed", items)

    # -- operators ---------------------------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(
        batch_id=st.sampled_from(BATCH_IDS),
        contents=st.dictionaries(site_ids, st.integers(1, 3), min_size=1, max_size=2),
    )
    def load(self, batch_id: str, contents: dict[str, int]) -> None:
        self.check_load(batch_id, sorted(contents.items()))

    def check_load(self, batch_id: str, items: list[tuple[str, int]]) -> None:
        answer, problem = self.attempt(self.allocator.load_batch(self.round_id, batch_id, items))
        if any(s not in self.site_ids for s, _ in items):
            assert problem is not None
            assert problem.code == "invalid-request", problem
            return
        seen = self.batches.get(batch_id)
        if seen is not None and seen != tuple(items):
            assert problem is not None
            assert problem.code == "batch-conflict", problem
            return
        assert problem is None, problem
        assert answer is not None
        assert answer.created == (seen is None)
        if seen is None:
            self.batches[batch_id] = tuple(items)
            self.changes += 1
            for site_id, units in items:
                self.loaded[site_id] = self.loaded.get(site_id, 0) + units

    @rule()
    def script_flush(self) -> None:
        self.run(self.redis.script_flush())

    @rule()
    def restart(self) -> None:
        self.run(self._stop())
        self.allocator, self.door, self.dispatcher = self._start()

    @rule()
    def drain_ledger(self) -> None:
        self.run(self._check_ledger())

    # -- citizens ----------------------------------------------------------------------------

    @rule(target=entries, item=entry_items, at_the_door=st.booleans())
    def enter(self, item: tuple[int, int, str, bool], at_the_door: bool) -> Any:
        """One entry: through the admission queue (as the service sends it) or straight to
        enter_many."""
        n, k, site_id, accept = item
        request = self.allocator.entry_request(
            self.round_id, site_id, citizen_id(n), phone_of(n, k), accept,
            opens_on=dt.date.today(),
        )  # fmt: skip
        got: Entry | None = None
        created = False
        problem: Problem | None = None
        if at_the_door:
            found, problem = self.attempt(self.door.enter(request))
            if found is not None:
                got, created = found
        else:
            [outcome] = self.run(self.allocator.enter_many(self.round_id, [request]))
            got, created, problem = outcome.entry, outcome.created, outcome.refusal
        new = self.check_entry(n, phone_of(n, k), site_id, accept, got, created, problem)
        return new if new is not None else multiple()

    @rule(
        target=entries,
        items=st.lists(entry_items, min_size=2, max_size=6),
        repeat_citizen=st.booleans(),
    )
    def enter_batch(self, items: list[tuple[int, int, str, bool]], repeat_citizen: bool) -> Any:
        """Several entries in one script call are decided in order, each seeing the ones
        before (the same citizen twice: the second is 200 or 409)."""
        if repeat_citizen:
            items[-1] = (items[0][0], *items[-1][1:])
        requests = [
            self.allocator.entry_request(
                self.round_id, s, citizen_id(n), phone_of(n, k), a, opens_on=dt.date.today()
            )
            for n, k, s, a in items
        ]
        outcomes = self.run(self.allocator.enter_many(self.round_id, requests))
        assert len(outcomes) == len(items)
        made = [
            self.check_entry(n, phone_of(n, k), s, a, o.entry, o.created, o.refusal)
            for (n, k, s, a), o in zip(items, outcomes, strict=True)
        ]
        return multiple(*(m for m in made if m is not None))

    @rule(entry_id=entries)
    def withdraw(self, entry_id: str) -> None:
        e = self.model[entry_id]
        got, problem = self.attempt(self.allocator.withdraw(entry_id))
        if e.status == "withdrawn":  # again: the same answer, before or after close
            assert problem is None, problem
            assert got is not None
            assert got.status == "withdrawn"
            return
        if self.closed:
            assert problem is not None
            assert problem.code == "round-not-open", problem
            return
        assert problem is None, problem
        assert got is not None
        assert (got.entry_id, got.status, got.site_id) == (entry_id, "withdrawn", e.site_id)
        e.status = "withdrawn"
        del self.entrants[e.citizen]
        self.changes += 1

    @rule(entry_id=entries)
    def look_up(self, entry_id: str) -> None:
        e = self.model[entry_id]
        got = self.run(self.allocator.entry(entry_id))
        assert (got.site_id, got.accept_district, got.status, got.reservation_id) == (
            e.site_id,
            e.accept,
            e.status,
            e.reservation_id,
        )

    @rule(unknown=st.sampled_from(["fresh", "garbage"]))
    def unknown_entry(self, unknown: str) -> None:
        eid = fresh_entry_ids(self.round_id, 1)[0] if unknown == "fresh" else "no-such-thing"
        for call in (self.allocator.entry, self.allocator.withdraw):
            _, problem = self.attempt(call(eid))
            assert problem is not None
            assert problem.code == "not-found", problem

    # -- the close, the freeze and the draw ----------------------------------------------------

    @precondition(lambda self: not self.closed and self.steps >= CLOSE_AFTER)
    @rule()
    def close(self) -> None:
        """The operator ends the registration: it closed a minute ago (by Redis TIME)."""
        rnd = self.run(self.allocator.round(self.round_id))
        now = dt.datetime.now(dt.UTC)
        moved = replace(rnd, closes_at=now - dt.timedelta(minutes=1))
        assert self.run(self.allocator.upsert_round(moved)) is False
        self.closed = True

    @precondition(lambda self: self.closed and not self.drawn)
    @rule(randomness=st.sampled_from(["7 12 19 23 31 42", "drand 4711: ab12", "x"]))
    def freeze_and_draw(self, randomness: str) -> None:
        """Freeze (once the ledger has every entry), draw, and compare with the model's draw."""
        self.run(self._check_ledger())
        rnd = self.run(self.allocator.round(self.round_id))
        assert self.run(self.allocator.lottery.freeze(rnd)) == "frozen"
        frozen = self.run(self.allocator.draw_record(self.round_id))
        entries_csv, stock_csv = self.model_files()
        assert self.run(self.allocator.draw_file(self.round_id, "entries.csv")) == entries_csv
        assert self.run(self.allocator.draw_file(self.round_id, "stock.csv")) == stock_csv
        assert frozen["entries"] == entries_csv.count(b"\n") - 1
        assert frozen["entries_digest"] == sha(entries_csv)
        assert frozen["stock_digest"] == sha(stock_csv)
        secret = frozen["secret"]
        assert sha(bytes.fromhex(secret)) == frozen["commitment"]

        record = self.run(self.allocator.draw(self.round_id, randomness))
        record = self.drawn_record(record)
        seed = sha(
            f"allot-draw-1\n{self.round_id}\n{secret}\n{randomness}\n{sha(entries_csv)}\n"
            f"{sha(stock_csv)}\n".encode()
        )
        assert record["seed"] == seed
        self.ranked = self.model_rank(bytes.fromhex(seed))
        self.left = self.model_stock()
        placed = self.model_pass(self.ranked)
        results = "rank,receipt,site_id\n" + "".join(
            f"{i},{receipt_of(self.round_id, eid)},{placed.get(eid, '')}\n"
            for i, eid in enumerate(self.ranked, 1)
        )
        assert self.run(self.allocator.draw_file(self.round_id, "results.csv")) == (
            results.encode()
        )
        self.drawn = True
        # again with the same value: the same record; another value: draw-conflict
        assert self.run(self.allocator.draw(self.round_id, randomness)) == record
        _, problem = self.attempt(self.allocator.draw(self.round_id, randomness + "!"))
        assert problem is not None
        assert problem.code == "draw-conflict", problem
        self.check_awards(placed)

    def drawn_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record once ``drawn`` (awards of a few winners take one award.lua call)."""
        for _ in range(100):
            if record["status"] == "drawn":
                return record
            self.run(asyncio.sleep(0.05))
            record = self.run(self.allocator.draw_record(self.round_id))
        raise AssertionError(f"still {record['status']}")

    def check_awards(self, placed: dict[str, str]) -> None:
        """Every placed entry won, with a confirmed reservation at its site; the others are
        registered (shown not-drawn)."""
        for eid, site_id in placed.items():
            e = self.model[eid]
            got = self.run(self.allocator.entry(eid))
            assert got.status == "won"
            assert got.reservation_id is not None
            res = self.run(self.allocator.reservation(got.reservation_id))
            assert (res.site_id, res.status, res.quantity) == (
                site_id,
                "confirmed",
                self.per_person,
            )
            assert res.citizen_id_masked == mask_citizen_id(citizen_id(e.citizen))
            e.status, e.reservation_id, e.won_site = "won", got.reservation_id, site_id
            self.given[site_id] = self.given.get(site_id, 0) + self.per_person

    @precondition(lambda self: self.drawn)
    @rule(target=wins, pick=st.integers(0, 10))
    def a_win(self, pick: int) -> Any:
        """A winner's reservation, to cancel."""
        won = sorted(e.entry_id for e in self.model.values() if e.status == "won")
        if not won:
            return multiple()
        rid = self.model[won[pick % len(won)]].reservation_id
        assert rid is not None
        return rid

    @rule(rid=wins)
    def cancel_win(self, rid: str) -> None:
        """A winner cancels: the units come back for the next pass."""
        [e] = [e for e in self.model.values() if e.reservation_id == rid]
        got, problem = self.attempt(self.allocator.cancel(rid))
        assert problem is None, problem
        assert got is not None
        assert got.status == "cancelled"
        if e.won_site is not None:  # the first cancel only
            self.cancelled[e.won_site] = self.cancelled.get(e.won_site, 0) + self.per_person
            e.won_site = None

    @precondition(lambda self: self.drawn)
    @rule()
    def next_pass(self) -> None:
        """draw/next: what came back since the last pass goes to the not-drawn in rank order."""
        self.run(self._check_ledger())  # a pass counts the cancellations the ledger has
        released = {
            s: self.loaded.get(s, 0) + self.cancelled.get(s, 0) - self.given.get(s, 0)
            for s in self.model_stock()
        }
        released = {s: u - self.left.get(s, 0) for s, u in released.items()}
        record = self.drawn_record(self.run(self.allocator.draw_next(self.round_id)))
        self.passes += 1
        assert len(record["passes"]) == self.passes
        latest = record["passes"][-1]
        assert latest["pass"] == self.passes
        assert latest["released"] == [
            {"site_id": s, "units": u} for s, u in sorted(released.items()) if u
        ]
        for s, u in released.items():
            self.left[s] = self.left.get(s, 0) + u
        waiting = [eid for eid in self.ranked if self.model[eid].status != "won"]
        placed = self.model_pass(waiting)
        rank = {eid: i for i, eid in enumerate(self.ranked, 1)}
        listed = "rank,receipt,site_id\n" + "".join(
            f"{rank[eid]},{receipt_of(self.round_id, eid)},{placed[eid]}\n"
            for eid in waiting
            if eid in placed
        )
        name = f"pass-{self.passes}.csv"
        assert self.run(self.allocator.draw_file(self.round_id, name)) == listed.encode()
        assert latest["digest"] == sha(listed.encode())
        self.check_awards(placed)

    # -- the model's draw, from API.md ("The draw, step by step") --------------------------------

    def frozen_entries(self) -> list[ModelEntry]:
        return [e for e in self.model.values() if e.status == "registered"]

    def model_stock(self) -> dict[str, int]:
        """Units at the freeze: every site loaded or chosen (no wins yet in a lottery round)."""
        chosen = {e.site_id for e in self.frozen_entries()}
        return {s: self.loaded.get(s, 0) for s in sorted(set(self.loaded) | chosen)}

    def model_files(self) -> tuple[bytes, bytes]:
        lines = sorted(
            f"{receipt_of(self.round_id, e.entry_id)},{e.site_id},{DISTRICT[e.site_id]},"
            f"{int(e.accept)},1\n"
            for e in self.frozen_entries()
        )
        entries_csv = "receipt,site_id,district,accept_district,weight\n" + "".join(lines)
        stock_csv = "site_id,district,units\n" + "".join(
            f"{s},{DISTRICT[s]},{u}\n" for s, u in self.model_stock().items()
        )
        return entries_csv.encode(), stock_csv.encode()

    def model_rank(self, seed: bytes) -> list[str]:
        """Weight 1 for all: key = hash(seed || receipt || 0x00); by (key, receipt)."""

        def key(e: ModelEntry) -> tuple[bytes, str]:
            receipt = receipt_of(self.round_id, e.entry_id)
            return hashlib.sha256(seed + bytes.fromhex(receipt) + b"\x00").digest(), receipt

        return [e.entry_id for e in sorted(self.frozen_entries(), key=key)]

    def model_pass(self, ranked: list[str]) -> dict[str, str]:
        """Rule 5 over ``ranked`` with ``self.left``: entry_id -> site it takes."""
        placed: dict[str, str] = {}
        for eid in ranked:
            e = self.model[eid]
            if self.left.get(e.site_id, 0) >= self.per_person:
                site: str | None = e.site_id
            elif e.accept:
                near = [
                    s
                    for s, u in self.left.items()
                    if DISTRICT[s] == DISTRICT[e.site_id] and u >= self.per_person
                ]
                site = min(near, key=lambda s: (-self.left[s], s)) if near else None
            else:
                site = None
            if site is not None:
                self.left[site] -= self.per_person
                placed[eid] = site
        return placed

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def redis_agrees_with_model(self) -> None:
        self.steps += 1
        if self.ready:
            self.run(self._check_redis())

    async def _check_redis(self) -> None:
        rk = self.keys.round(self.round_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(rk.entries)
            pipe.hgetall(rk.entrants)
            pipe.hgetall(rk.tally)
            records_raw, entrants_raw, tally_raw = await pipe.execute()
        records = {k.decode(): orjson.loads(v) for k, v in records_raw.items()}
        assert {
            eid: (r["site"], bool(int(r["acc"])), r["status"], r["cit"], r.get("res"))
            for eid, r in records.items()
        } == {
            eid: (
                e.site_id,
                e.accept,
                e.status,
                self.hasher.citizen(citizen_id(e.citizen)),
                e.reservation_id,
            )
            for eid, e in self.model.items()
        }
        assert {k.decode(): v.decode() for k, v in entrants_raw.items()} == {
            self.hasher.citizen(citizen_id(n)): eid for n, eid in self.entrants.items()
        }
        tally = {k.decode(): int(v) for k, v in tally_raw.items() if k != b"lost"}
        assert b"lost" not in tally_raw
        live: dict[str, int] = {}
        for e in self.model.values():
            if e.status != "withdrawn":
                live[e.site_id] = live.get(e.site_id, 0) + 1
        assert {k[8:]: v for k, v in tally.items() if k.startswith("entries:") and v} == live
        if not self.drawn:  # the awards' changes are award.lua's own business
            assert tally.get("seq", 0) == self.changes, "every change, and only one, bumps seq"

    async def _check_ledger(self) -> None:
        writer = LedgerWriter(
            self.redis, self.pool, self.keys, LedgerSettings(), consumer="stateful", block_ms=1
        )
        if await writer.backlog():
            async with asyncio.timeout(10):
                await writer.drain()
        async with self.pool.acquire() as con:
            rows = await con.fetch(
                "SELECT entry_id, site_id, accept_district, status, citizen_hash, reservation_id"
                " FROM entries_shown WHERE round_id = $1",
                self.round_id,
            )
            shown = {"registered": "not-drawn"} if self.drawn else {}
            assert {
                r["entry_id"]: (
                    r["site_id"],
                    r["accept_district"],
                    r["status"],
                    r["citizen_hash"],
                    r["reservation_id"],
                )
                for r in rows
            } == {
                eid: (
                    e.site_id,
                    e.accept,
                    shown.get(e.status, e.status),
                    self.hasher.citizen(citizen_id(e.citizen)),
                    e.reservation_id,
                )
                for eid, e in self.model.items()
            }
            ledger_seq = await con.fetchval(
                "SELECT ledger_seq FROM rounds WHERE round_id = $1", self.round_id
            )
            report = await reconcile(
                self.redis, cast(asyncpg.Connection, con), self.keys, [self.round_id], wait=0
            )
        seq = int(await self.redis.hget(self.keys.round(self.round_id).tally, "seq") or 0)  # type: ignore[misc]
        assert ledger_seq == seq, "the drained ledger's mark is Redis's seq"
        if not self.drawn:
            assert seq == self.changes
        assert report["ok"], report
        assert report["rounds"][0]["entries"]["entries"]["ledger"] == len(self.model)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A private Redis: the script_flush rule empties the server's script cache."""
    with PrivateRedis(tmp_path / "redis") as server:
        yield server.url


@pytest.mark.timeout(600)
def test_lottery_entries_agree_with_a_plain_model_under_any_sequence_of_operations(
    database_url: str, own_redis: str
) -> None:
    """Entries, re-entries, withdrawals, look-ups, loads, restarts and script flushes, then
    perhaps the close, the freeze, the draw and passes after cancelled wins: the allocator,
    the drained ledger and reconcile agree with the model, and the draw with the contract."""

    def machine() -> LotteryMachine:
        return LotteryMachine(database_url, own_redis)

    run_state_machine_as_test(
        machine,  # type: ignore[arg-type]  # typed as a class; its docs take any factory
        settings=settings(
            # ~25 s here; LOTTERY_EXAMPLES=500 for a longer hunt
            max_examples=int(os.environ.get("LOTTERY_EXAMPLES", "60")),
            stateful_step_count=50,
            report_multiple_bugs=False,
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        ),
    )
