"""The spread claim protocol (bench/spread: one round over several primaries) on the session's
private Redis Cluster (loadtest/cluster.py, 3 primaries + 3 replicas), its shards' hash tags
chosen so that they land on different primaries.

* a Hypothesis state machine drives claims of random citizens at random sites (batched), a
  worker dying or stalling after any stage (and a stalled one resuming later, slower than the
  reaper), cancels (also dying halfway, and retried), loads, the clock advancing and the
  reaper, and compares every answer with a plain Python model; after every step the
  invariants are checked on what Redis holds;
* many workers claiming at once for overlapping citizens, some dying, then the reaper: the
  same invariants.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import pytest
from hypothesis import Phase, currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from allocator.redistyping import awaited
from bench.spread.protocol import (
    DAY_MS,
    HOLD_MS,
    Claim,
    Layout,
    Run,
    Snapshot,
    Spread,
    Stage,
    snapshot,
    spread_tags,
)
from loadtest.cluster import PrivateCluster

T = TypeVar("T")

T0 = 1_700_000_000_000
COOLDOWN = 7 * DAY_MS
SITES = ("s1", "s2")
CITIZENS = [hashlib.sha256(f"citizen {i}".encode()).hexdigest() for i in range(8)]


async def cluster_client(cluster: PrivateCluster) -> RedisCluster:
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in cluster.nodes],
        require_full_coverage=False,
    )
    _ = await client.initialize()
    return client


def layout_on(client: RedisCluster, prefix: str, n: int, m: int) -> Layout:
    """N citizen shards and M stock shards, each spread round the primaries."""
    primaries = sorted(node.name for node in client.get_primaries())

    def node_of_slot(slot: int) -> str:
        node = client.nodes_manager.get_node_from_slot(slot)
        assert node is not None
        return str(node.name)

    return Layout(
        prefix,
        "p1",
        "r1",
        spread_tags("c", "p1", n, node_of_slot, primaries),
        spread_tags("s", "r1", m, node_of_slot, primaries),
    )


async def delete_prefix(client: RedisCluster, prefix: str) -> None:
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)


def test_the_shards_land_on_different_primaries(redis_cluster: PrivateCluster) -> None:
    async def check() -> None:
        client = await cluster_client(redis_cluster)
        try:
            lay = layout_on(client, "t", 3, 3)
            for tags in (lay.citizen_tags, lay.stock_tags):
                # as the cluster itself says (CLUSTER NODES), not the client's slot map
                nodes = {redis_cluster.primary_of_slot(key_slot(t.encode())).port for t in tags}
                assert len(nodes) == 3
        finally:
            await client.aclose()

    asyncio.run(check())


# -- the invariants, on what Redis holds ------------------------------------------------------


def check_invariants(
    snap: Snapshot, loaded: dict[tuple[str, int], int], answered_ok: dict[str, str], m: int
) -> None:
    """``answered_ok``: reservation_id -> citizen hash of every claim answered ok and not
    cancelled since; ``m``: the number of sub-pools."""
    live = {rid: (j, r) for rid, (j, r) in snap.records.items() if r["status"] != "cancelled"}
    # units taken + left == loaded, per sub-pool: never oversold, never lost
    taken = Counter((r["site"], j) for j, r in live.values())
    for pool, units in loaded.items():
        assert taken[pool] + snap.left.get(pool, 0) == units, pool
        assert snap.left.get(pool, 0) >= 0
    assert set(snap.left) <= set(loaded)
    # at most one live-or-pending share per citizen
    shares: dict[str, set[str]] = {}
    for rid, (_, r) in live.items():
        shares.setdefault(r["cit"], set()).add(rid)
    for cit, h in snap.holders.items():
        if h.state == "P":
            shares.setdefault(cit, set()).add(h.reservation_id)
    for cit, rids in shares.items():
        assert len(rids) <= 1, (cit, rids)
    # every live share is its citizen's holder entry (pending or confirmed)
    for rid, (_, r) in live.items():
        assert snap.holders[r["cit"]].reservation_id == rid
    # a confirmed share always has its cooldown bar
    for cit, h in snap.holders.items():
        if h.state == "C" and h.reservation_id in live:
            assert snap.bars.get(cit) == (h.at_ms + COOLDOWN, h.reservation_id), cit
    # the pending index is exactly the pending entries
    assert snap.pending == {c: h.at_ms for c, h in snap.holders.items() if h.state == "P"}
    # every answered ok is confirmed in Redis
    for rid, cit in answered_ok.items():
        assert rid in live, rid
        h = snap.holders[cit]
        assert (h.state, h.reservation_id) == ("C", rid)
    # an id fenced on every sub-pool (the reaper released it) was taken nowhere
    for rid in live:
        assert len(snap.void.get(rid, ())) < m, rid


# -- the state machine ----------------------------------------------------------------------


@dataclass
class Pending:
    rid: str
    site: str
    expires: int
    taken: tuple[int, int] | None = None  # (sub-pool, created_ms) once take.lua ran


@dataclass
class Confirmed:
    rid: str
    site: str
    created: int
    stock: int  # the sub-pool holding it


def seen(what: str) -> None:
    """Hypothesis's event, also when a plain test drives the machine's steps."""
    if currently_in_test_context():
        event(what)


def claims_of(batch: list[tuple[int, str]]) -> list[Claim]:
    return [Claim(CITIZENS[c], site) for c, site in batch]


class SpreadMachine(RuleBasedStateMachine):
    """The protocol against a model of citizens' entries, bars and stock per site."""

    def __init__(self, cluster: PrivateCluster) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = f"allot-test-spread-{uuid.uuid4().hex[:10]}"
        self.client = self.run(cluster_client(cluster))
        # N = 3 citizen shards, M = 2 sub-pools: uneven splits, and a second take wave
        self.layout = layout_on(self.client, self.prefix, 3, 2)
        self.now = T0
        self.spread = Spread(
            cast(Redis, self.client), self.layout, clock_ms=lambda: self.now, cooldown_ms=COOLDOWN
        )
        self.holders: dict[str, Pending | Confirmed] = {}
        self.bars: dict[str, tuple[int, str]] = {}
        self.left = dict.fromkeys(SITES, 0)
        self.loaded: dict[tuple[str, int], int] = {}
        self.ok: dict[str, tuple[str, int]] = {}  # answered ok, not cancelled: rid -> cit, pool
        self.half_cancelled: dict[str, tuple[str, int]] = {}
        self.fenced: set[str] = set()
        self.stalled: list[Run] = []
        self.reaped_at: int | None = None

    def run(self, step: Awaitable[T]) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(step, 30)

        return self.loop.run_until_complete(bounded())

    def teardown(self) -> None:
        try:
            self.run(delete_prefix(self.client, self.prefix))
            self.run(self.client.aclose())
        finally:
            self.loop.close()

    @initialize(
        until=st.lists(st.sampled_from([0, 2000, 4000, 20000]), min_size=2, max_size=2),
        units=st.lists(st.integers(0, 3), min_size=2, max_size=2),
    )
    def seed(self, until: list[int], units: list[int]) -> None:
        """Citizens 6 and 7 hold a bar from another round of the programme (until T0 + x);
        some stock at each site."""
        for c, x in zip((6, 7), until, strict=True):
            if x:
                cit = CITIZENS[c]
                bar = (T0 + x, "other.r0")
                k = self.layout.citizen_shard(cit)
                self.run(awaited(self.client.hset(self.layout.bars(k), cit, f"{bar[0]} {bar[1]}")))
                self.bars[cit] = bar
        for site, n in zip(SITES, units, strict=True):
            self.load(site, n)

    @rule(site=st.sampled_from(SITES), units=st.integers(1, 3))
    def load(self, site: str, units: int) -> None:
        parts = self.run(self.spread.load(site, units))
        assert sum(parts) == units
        for j, part in enumerate(parts):
            self.loaded[(site, j)] = self.loaded.get((site, j), 0) + part
        self.left[site] += units

    # -- claims --------------------------------------------------------------------------------

    @rule(
        batch=st.lists(
            st.tuples(st.integers(0, len(CITIZENS) - 1), st.sampled_from(SITES)),
            min_size=1,
            max_size=6,
        ),
        die=st.sampled_from([None, None, "entitle", "take"]),
    )
    def claim(self, batch: list[tuple[int, str]], die: Stage | None) -> None:
        self.reaped_at = None
        claims = claims_of(batch)
        run = self.run(self.spread.claim_many(claims, die_after=die))
        # stage 1, citizen by citizen in order
        expected: dict[int, tuple[str, str | None]] = {}
        entitled = set()
        for i, c in enumerate(claims):
            h = self.holders.get(c.cit)
            bar = self.bars.get(c.cit)
            if isinstance(h, Pending):
                expected[i] = ("pending", h.rid)
            elif isinstance(h, Confirmed):
                expected[i] = (
                    ("existing", h.rid) if h.site == c.site else ("already-reserved", None)
                )
            elif bar and bar[0] > self.now and not bar[1].endswith(".r1"):
                expected[i] = ("in-cooldown", None)
            else:
                entitled.add(i)
                self.holders[c.cit] = Pending(run.ids[i], c.site, self.now + HOLD_MS)
        assert set(run.entitled) == entitled
        assert all(e == self.now + HOLD_MS for e in run.entitled.values())
        assert {i: (o.status, o.reservation_id) for i, o in run.answered.items()} == expected
        for i, (status, rid) in expected.items():
            # the citizen now knows a share the reaper confirmed, and may cancel it (a stalled
            # worker's confirm then finds it gone); not one whose cancel is half done
            if status == "existing" and rid not in self.half_cancelled:
                h = self.holders[claims[i].cit]
                assert isinstance(h, Confirmed)
                assert rid is not None
                self.ok.setdefault(rid, (claims[i].cit, h.stock))
        self.follow(run)

    def follow(self, run: Run, before: str = "entitle") -> None:
        """The model after the stages ``run`` did since ``before``."""
        if before == "entitle" and run.done in ("take", "finish"):
            self.after_take(run)
        if run.done == "finish":
            self.after_finish(run)
        else:
            self.stalled.append(run)

    def after_take(self, run: Run) -> None:
        claims = run.claims
        by_site: dict[str, list[int]] = {}
        for i in run.entitled:
            if run.ids[i] in self.fenced:
                assert run.refused.get(i) == "void", i
            else:
                by_site.setdefault(claims[i].site, []).append(i)
        for site, idx in by_site.items():
            got = [i for i in idx if i in run.taken]
            # a claim is refused only when every sub-pool of its site is short
            assert len(got) == min(len(idx), self.left[site]), (site, idx, run)
            assert all(run.refused[i] == "sold-out" for i in idx if i not in run.taken)
            self.left[site] -= len(got)
            for i in got:
                h = self.holders[claims[i].cit]
                assert isinstance(h, Pending)
                assert h.rid == run.ids[i]
                t = run.taken[i]
                assert t.created_ms == self.now
                h.taken = (t.stock, t.created_ms)

    def after_finish(self, run: Run) -> None:
        assert run.outcomes is not None
        claims = run.claims
        for i, o in enumerate(run.outcomes):
            cit, rid = claims[i].cit, run.ids[i]
            if i in run.answered:
                assert o == run.answered[i]
            elif i in run.taken:
                h = self.holders.get(cit)
                t = run.taken[i]
                if h is not None and h.rid == rid and rid in self.half_cancelled:
                    # confirmed by the reaper, shown as existing, and cancelled on its stock
                    # shard by a cancel that died before the citizen half: not ok
                    assert isinstance(h, Confirmed)
                    assert (o.status, o.detail) == ("void", "cancelled")
                    seen("a stalled worker's confirm found its share half cancelled")
                elif h is not None and h.rid == rid:
                    assert (o.status, o.reservation_id, o.stock) == ("ok", rid, t.stock)
                    self.holders[cit] = Confirmed(rid, claims[i].site, t.created_ms, t.stock)
                    self.bars[cit] = (t.created_ms + COOLDOWN, rid)
                    self.ok[rid] = (cit, t.stock)
                else:  # confirmed by the reaper and cancelled since
                    assert (o.status, o.detail) == ("void", "gone")
                    seen("a stalled worker's confirm found its share cancelled")
            else:
                assert o.status == run.refused[i]
                h = self.holders.get(cit)
                if h is not None and h.rid == rid:
                    assert isinstance(h, Pending)
                    del self.holders[cit]

    @precondition(lambda self: self.stalled)
    @rule(data=st.data(), die=st.sampled_from([None, "take"]))
    def resume_stalled(self, data: st.DataObject, die: Stage | None) -> None:
        """A worker that stalled (not died) carries on, maybe after the reaper dealt with its
        entries."""
        self.resume_at(data.draw(st.integers(0, len(self.stalled) - 1)), die)

    def resume_at(self, at: int, die: Stage | None) -> None:
        self.reaped_at = None
        run = self.stalled.pop(at)
        before = run.done
        self.run(self.spread.resume(run, die_after=die))
        self.follow(run, before)

    # -- cancels -------------------------------------------------------------------------------

    @precondition(lambda self: self.ok)
    @rule(data=st.data(), die_between=st.booleans())
    def cancel(self, data: st.DataObject, die_between: bool) -> None:
        self.cancel_of(data.draw(st.sampled_from(list(self.ok))), die_between)

    def cancel_of(self, rid: str, die_between: bool) -> None:
        self.reaped_at = None
        cit, stock = self.ok.pop(rid)
        h = self.holders[cit]
        assert isinstance(h, Confirmed)
        status = self.run(self.spread.cancel(rid, cit, stock, die_between=die_between))
        assert status == "cancelled"
        self.left[h.site] += 1
        if die_between:
            self.half_cancelled[rid] = (cit, stock)
        else:
            self.drop(cit, rid)

    @precondition(lambda self: self.half_cancelled)
    @rule(data=st.data())
    def retry_cancel(self, data: st.DataObject) -> None:
        self.reaped_at = None
        rid = data.draw(st.sampled_from(list(self.half_cancelled)))
        cit, stock = self.half_cancelled.pop(rid)
        assert self.run(self.spread.cancel(rid, cit, stock)) == "cancelled"
        self.drop(cit, rid)

    def drop(self, cit: str, rid: str) -> None:
        h = self.holders.get(cit)
        if h is not None and h.rid == rid:
            del self.holders[cit]
        if self.bars.get(cit, (0, ""))[1] == rid:
            del self.bars[cit]

    # -- time and the reaper ---------------------------------------------------------------------

    @rule(ms=st.sampled_from([500, 2000, 5001, 20000]))
    def advance(self, ms: int) -> None:
        self.reaped_at = None
        self.now += ms

    @rule()
    def reap(self) -> None:
        reaped = self.run(self.spread.reap())
        confirmed, released = set(), set()
        for cit, h in list(self.holders.items()):
            if isinstance(h, Pending) and h.expires < self.now:
                if h.taken:
                    confirmed.add((cit, h.rid))
                    self.holders[cit] = Confirmed(h.rid, h.site, h.taken[1], h.taken[0])
                    self.bars[cit] = (h.taken[1] + COOLDOWN, h.rid)
                else:
                    released.add((cit, h.rid))
                    self.fenced.add(h.rid)
                    del self.holders[cit]
        assert set(reaped.confirmed) == confirmed
        assert set(reaped.released) == released
        assert len(reaped.confirmed) + len(reaped.released) == len(confirmed | released)
        self.reaped_at = self.now

    # -- after every step ------------------------------------------------------------------------

    @invariant()
    def redis_holds_what_the_model_says(self) -> None:
        snap = self.run(snapshot(cast(Redis, self.client), self.layout))
        check_invariants(
            snap, self.loaded, {rid: cit for rid, (cit, _) in self.ok.items()}, self.layout.m
        )
        assert {c: (h.state, h.reservation_id) for c, h in snap.holders.items()} == {
            c: ("P" if isinstance(h, Pending) else "C", h.rid) for c, h in self.holders.items()
        }
        assert snap.bars == self.bars
        for site in SITES:
            assert sum(v for (s, _), v in snap.left.items() if s == site) == self.left[site]
        assert all(snap.void.get(rid) == set(range(self.layout.m)) for rid in self.fenced)
        if self.reaped_at is not None:
            # after the reaper, nothing pending past its expiry remains
            assert all(h.at_ms >= self.reaped_at for h in snap.holders.values() if h.state == "P")


# a passing run takes 10-20 s on the shared 2-core machine
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_spread_protocol_agrees_with_a_plain_model(redis_cluster: PrivateCluster) -> None:
    """Claims, deaths and stalls between any two stages, cancels, loads, time and the reaper:
    every answer as the model says, and the invariants hold after every step."""

    def machine() -> SpreadMachine:
        return SpreadMachine(redis_cluster)

    run_state_machine_as_test(
        machine,  # type: ignore[arg-type]  # typed as a class; its docs take any factory
        settings=settings(
            max_examples=100,
            stateful_step_count=50,
            report_multiple_bugs=False,
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        ),
    )


def test_a_stalled_confirm_after_a_cancel_that_died_halfway(redis_cluster: PrivateCluster) -> None:
    """The state machine's shortest failing case once (kept here, not only in an example
    database): a worker stalls after entitle, the clock passes the expiry, it takes and stalls
    again, the reaper confirms the share, the citizen's next claim is shown it (existing) and
    cancels it, dying between the stock and citizen halves; the worker's confirm then finds the
    entry confirmed (by the reaper) and must not answer ok for a cancelled record: void (503),
    with the invariants after every step as the machine checks them."""
    m = SpreadMachine(redis_cluster)
    try:
        steps: list[Callable[[], None]] = [
            lambda: m.seed(until=[0, 0], units=[0, 1]),
            lambda: m.claim(batch=[(0, "s2")], die="entitle"),
            lambda: m.advance(ms=HOLD_MS + 1),
            lambda: m.resume_at(0, die="take"),
            lambda: m.reap(),
            lambda: m.claim(batch=[(0, "s2")], die=None),
            lambda: m.cancel_of(next(iter(m.ok)), die_between=True),
        ]
        for step in steps:
            step()
            m.redis_holds_what_the_model_says()
        [late] = m.stalled
        assert late.done == "take"
        m.resume_at(0, die=None)
        m.redis_holds_what_the_model_says()
        assert late.outcomes is not None
        assert [(o.status, o.detail) for o in late.outcomes] == [("void", "cancelled")]
        assert not m.ok
    finally:
        m.teardown()


# -- many workers at once -------------------------------------------------------------------------


@pytest.fixture
async def spread_cluster(redis_cluster: PrivateCluster) -> AsyncIterator[tuple[RedisCluster, str]]:
    client = await cluster_client(redis_cluster)
    prefix = f"allot-test-spread-{uuid.uuid4().hex[:10]}"
    yield client, prefix
    await delete_prefix(client, prefix)
    await client.aclose()


@pytest.mark.slow
async def test_many_workers_claiming_for_overlapping_citizens_at_once(
    spread_cluster: tuple[RedisCluster, str],
) -> None:
    """60 workers, 300 citizens, 1,800 claims in batches of 1-40 at 3 sites with 150 units in
    all, some workers dying after a stage; then the clock past every expiry and the reaper.
    No unit oversold or lost, one share per citizen, every ok confirmed, nothing pending."""
    client, prefix = spread_cluster
    lay = layout_on(client, prefix, 3, 3)
    clock = [T0]
    spread = Spread(cast(Redis, client), lay, clock_ms=lambda: clock[0], cooldown_ms=COOLDOWN)
    sites = ("a", "b", "c")
    loaded: dict[tuple[str, int], int] = {}
    for site, units in zip(sites, (100, 40, 10), strict=True):
        for j, part in enumerate(await spread.load(site, units)):
            loaded[(site, j)] = part
    citizens = [hashlib.sha256(f"crowd {i}".encode()).hexdigest() for i in range(300)]
    rng = random.Random(7)
    answered: dict[str, str] = {}
    statuses: Counter[str] = Counter()
    died = Counter[str]()

    async def worker(w: int) -> None:
        own = random.Random(w)
        for _ in range(3):
            batch = [
                Claim(own.choice(citizens), own.choice(sites)) for _ in range(own.randint(1, 40))
            ]
            die: Stage | None = own.choice([None, None, None, None, "entitle", "take"])
            run = await spread.claim_many(batch, die_after=die)
            if run.outcomes is None:
                died[die or ""] += len(batch)
                continue
            for c, o in zip(batch, run.outcomes, strict=True):
                statuses[o.status] += 1
                if o.status == "ok":
                    assert o.reservation_id is not None
                    answered[o.reservation_id] = c.cit
            await asyncio.sleep(rng.random() / 100)

    await asyncio.gather(*(worker(w) for w in range(60)))
    snap = await snapshot(cast(Redis, client), lay)
    check_invariants(snap, loaded, answered, lay.m)
    assert statuses["ok"] == len(answered) > 0
    assert statuses["sold-out"] > 0
    assert died["entitle"] > 0
    assert died["take"] > 0

    clock[0] += HOLD_MS + 1
    reaped = await spread.reap()
    assert reaped.confirmed
    assert reaped.released
    snap = await snapshot(cast(Redis, client), lay)
    check_invariants(snap, loaded, answered, lay.m)
    assert not snap.pending
    assert all(h.state == "C" for h in snap.holders.values())
    live = {rid for rid, (_, r) in snap.records.items() if r["status"] != "cancelled"}
    assert len(live) == len(answered) + len(reaped.confirmed)
    print(
        f"\n{len(answered)} answered ok, {len(reaped.confirmed)} confirmed and"
        f" {len(reaped.released)} released by the reaper, answers {dict(statuses)},"
        f" claims of dead workers {dict(died)}, units left"
        f" {sum(snap.left.values())} of {sum(loaded.values())}"
    )


@pytest.mark.slow
async def test_the_reaper_racing_stalled_workers_and_cancels(
    spread_cluster: tuple[RedisCluster, str],
) -> None:
    """40 workers claim for 200 citizens at 2 sites (120 units); a batch may stall after entitle
    or take and carry on a moment later, while a reaper moves the clock 2 s and reaps, over and
    over, and workers cancel some of their ok answers at once. A stalled take the reaper got to
    first is fenced (void); every other claim ends ok or refused. Then the invariants, and after
    a last reap nothing pending."""
    client, prefix = spread_cluster
    lay = layout_on(client, prefix, 3, 3)
    clock = [T0]
    spread = Spread(cast(Redis, client), lay, clock_ms=lambda: clock[0], cooldown_ms=COOLDOWN)
    loaded: dict[tuple[str, int], int] = {}
    for site, units in (("a", 90), ("b", 30)):
        for j, part in enumerate(await spread.load(site, units)):
            loaded[(site, j)] = part
    citizens = [hashlib.sha256(f"racer {i}".encode()).hexdigest() for i in range(200)]
    answered: dict[str, str] = {}
    statuses: Counter[str] = Counter()
    done = asyncio.Event()

    async def worker(w: int) -> None:
        own = random.Random(1000 + w)
        for _ in range(4):
            batch = [
                Claim(own.choice(citizens), own.choice(("a", "b")))
                for _ in range(own.randint(1, 20))
            ]
            stall: Stage | None = own.choice([None, None, "entitle", "take"])
            run = await spread.claim_many(batch, die_after=stall)
            if stall:
                await asyncio.sleep(own.random() / 50)  # the reaper may get there first
                run = await spread.resume(run)
            assert run.outcomes is not None
            mine = []
            for c, o in zip(batch, run.outcomes, strict=True):
                statuses[o.status] += 1
                if o.status == "ok":
                    assert o.reservation_id is not None
                    answered[o.reservation_id] = c.cit
                    mine.append((o.reservation_id, c.cit, o.stock))
            for rid, cit, stock in mine:
                if own.random() < 0.2:
                    assert stock is not None
                    assert await spread.cancel(rid, cit, stock) == "cancelled"
                    del answered[rid]
                    statuses["cancelled"] += 1

    async def reaper() -> int:
        passes = 0
        while not done.is_set():
            clock[0] += 2000
            _ = await spread.reap()
            passes += 1
            await asyncio.sleep(0.005)
        return passes

    reaping = asyncio.create_task(reaper())
    await asyncio.gather(*(worker(w) for w in range(40)))
    done.set()
    passes = await reaping
    snap = await snapshot(cast(Redis, client), lay)
    check_invariants(snap, loaded, answered, lay.m)
    clock[0] += HOLD_MS + 1
    _ = await spread.reap()
    snap = await snapshot(cast(Redis, client), lay)
    check_invariants(snap, loaded, answered, lay.m)
    assert not snap.pending
    assert statuses["ok"] > 0
    assert statuses["sold-out"] > 0
    print(f"\nreaper passes {passes}, answers {dict(statuses)}, fenced ids {len(snap.void)}")


async def test_a_stalled_confirm_after_the_reaper_confirmed_and_the_citizen_cancelled(
    spread_cluster: tuple[RedisCluster, str],
) -> None:
    """A worker stalls after take; the reaper confirms the share; the citizen, claiming again,
    is shown it (existing) and cancels it; the worker's confirm then finds it gone and answers
    void (503), not ok. The unit is back, nothing is held."""
    client, prefix = spread_cluster
    lay = layout_on(client, prefix, 3, 3)
    clock = [T0]
    spread = Spread(cast(Redis, client), lay, clock_ms=lambda: clock[0], cooldown_ms=COOLDOWN)
    loaded = {("a", j): part for j, part in enumerate(await spread.load("a", 3))}
    cit = CITIZENS[0]
    stalled = await spread.claim_many([Claim(cit, "a")], die_after="take")
    [taken] = stalled.taken.values()
    clock[0] += HOLD_MS + 1
    reaped = await spread.reap()
    assert reaped.confirmed == [(cit, stalled.ids[0])]
    again = await spread.claim_many([Claim(cit, "a")])
    assert again.outcomes is not None
    assert [(o.status, o.reservation_id) for o in again.outcomes] == [("existing", stalled.ids[0])]
    assert await spread.cancel(stalled.ids[0], cit, taken.stock) == "cancelled"
    late = await spread.resume(stalled)
    assert late.outcomes is not None
    assert [(o.status, o.detail) for o in late.outcomes] == [("void", "gone")]
    snap = await snapshot(cast(Redis, client), lay)
    check_invariants(snap, loaded, {}, lay.m)
    assert not snap.holders
    assert not snap.bars
    assert sum(snap.left.values()) == 3
