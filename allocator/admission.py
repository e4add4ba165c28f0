"""The admission queue: each worker's bounded line in front of the Redis claim.

Requests wait here at most ``max_wait_ms``, each in its lane: one per round and kind (claims,
or lottery entries). A lane's batch takes whatever is waiting in it (up to MAX_BATCH) and is
decided in one EVALSHA: claim.lua for reservations, enter.lua for lottery entries, gate checks
included, one result per item. There is no timer: a lane's next batch leaves as soon as its
previous one returns, so a lone request is not delayed, and under a crowd each Redis round trip
carries many claims.

The lanes do not wait for each other. With one batch at a time for the whole worker, a claim
on a healthy shard waited behind a batch on a hung one (Redis Cluster, a primary whose socket
is open and nothing answers: the Redis timeout), and a claim on a hung shard waited for the
batch in flight on another hung shard, then out its own timeout: 1.6 s for a 503 with the
default 800 ms (tests/test_cluster.py, a hung cluster). Per lane, a request waits for at most
the one batch in flight on its own round; when that batch failed on its node, the node's
breaker (allocator/store.py) is open and the next batch is answered from it at once.

A request that is already in Redis when its wait runs out is answered with its true outcome
(bounded by the Redis timeout): a claim that ran is never reported as refused. Only requests
still waiting are turned away, ``overloaded``, with an honest ``retry_after``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TypeAlias

from allocator.claims import ClaimOutcome, ClaimRequest
from allocator.config import QueueSettings
from allocator.entries import EntryOutcome, EntryRequest
from allocator.errors import Overloaded, Problem, SoldOut, Unavailable
from allocator.facade import Allocator
from allocator.model import Entry, Reservation

Request: TypeAlias = ClaimRequest | EntryRequest
Outcome: TypeAlias = ClaimOutcome | EntryOutcome

log = logging.getLogger("allot.admission")

MAX_BATCH = 256  # items in one script call: about 5 ms of Redis time at most
PACE_EVERY = 0.05  # busy seconds between samples of the pace (for retry_after)


LaneKey: TypeAlias = tuple[bool, str]  # (an entry, not a claim; the round)


class _Ticket:
    __slots__ = ("abandoned", "deadline", "future", "request", "taken")

    def __init__(self, request: Request, future: asyncio.Future[Outcome], deadline: float) -> None:
        self.request = request
        self.future = future
        self.deadline = deadline  # loop time after which, still in line, it is turned away
        self.taken = False  # handed to Redis: its answer will be the truth
        self.abandoned = False  # left the line before it was taken (wait over, or client gone)


class _Lane:
    """One round's claims, or its entries: its tickets in line, and whether a batch is out."""

    __slots__ = ("busy", "line")

    def __init__(self) -> None:
        self.line: deque[_Ticket] = deque()
        self.busy = False  # a batch of this lane is being decided


class AdmissionQueue:
    def __init__(
        self,
        allocator: Allocator,
        settings: QueueSettings,
        *,
        on_depth: Callable[[int], None] | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.allocator = allocator
        self.max_depth = settings.max_depth
        self.max_wait = settings.max_wait_ms / 1000
        self.max_batch = max_batch
        self._on_depth = on_depth
        # every ticket in arrival order, for the reaper (every wait is the same max_wait, so
        # the head has the earliest deadline); a taken one leaves it when it reaches the head
        self._line: deque[_Ticket] = deque()
        self._lanes: dict[LaneKey, _Lane] = {}  # lanes with a ticket in line or a batch out
        self._ready: dict[LaneKey, None] = {}  # lanes with tickets in line and no batch out
        self._batches: set[asyncio.Task[None]] = set()  # the batches being decided
        self._depth = 0  # tickets waiting: neither taken nor abandoned
        self._wake = asyncio.Event()  # a lane is ready for the dispatcher
        self._reaper_wake = asyncio.Event()  # something is in line for the reaper
        self._rate = 0.0  # decided items per second while batches are out, smoothed
        self._out = 0  # batches out now
        self._busy = 0.0  # seconds with a batch out, before the current stretch
        self._busy_from = 0.0  # when the current stretch with a batch out began
        self._paced = (0, 0.0)  # items decided, busy seconds, at the last pace sample
        self._decided = 0  # items decided so far

    @property
    def depth(self) -> int:
        return self._depth

    async def reserve(self, request: ClaimRequest) -> tuple[Reservation, bool]:
        """A reservation and whether it is new, or the refusal raised as a Problem."""
        refusal = self.from_memory(request)
        if refusal is not None:
            raise refusal
        return await self.claim(request)

    def from_memory(self, request: ClaimRequest) -> SoldOut | None:
        """The sold-out board's answer to this claim, or None when Redis must decide. An
        answer from memory is still an ask, for the fairness report. (The hot route asks this
        first and answers without raising: a raise costs the sold-out herd a few µs each.)"""
        refusal = self.allocator.sold_out.check(
            request.round_id, request.site_id, request.citizen_hash
        )
        if refusal is not None:
            self.allocator.asks.note(
                request.round_id,
                request.site_id,
                request.age_band,
                request.channel,
                request.citizen_hash,
            )
        return refusal

    async def claim(self, request: ClaimRequest) -> tuple[Reservation, bool]:
        """The claim decided in Redis (no look at the sold-out board: :meth:`from_memory`)."""
        outcome = await self.submit(request)
        assert isinstance(outcome, ClaimOutcome)
        if outcome.refusal is not None:
            raise outcome.refusal
        assert outcome.reservation is not None
        return outcome.reservation, outcome.created

    async def enter(self, request: EntryRequest) -> tuple[Entry, bool]:
        """A lottery entry and whether it is new, or the refusal raised as a Problem; through
        the same line, batches and gate as reservations."""
        outcome = await self.submit(request)
        assert isinstance(outcome, EntryOutcome)
        if outcome.refusal is not None:
            raise outcome.refusal
        assert outcome.entry is not None
        return outcome.entry, outcome.created

    async def submit(self, request: Request) -> Outcome:
        if self._depth >= self.max_depth:
            raise Overloaded("The line is full right now.", retry_after=self._retry_after())
        loop = asyncio.get_running_loop()
        ticket = _Ticket(request, loop.create_future(), loop.time() + self.max_wait)
        self._line.append(ticket)
        key = (isinstance(request, EntryRequest), request.round_id)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.line.append(ticket)
        if not lane.busy:
            self._ready[key] = None
            self._wake.set()
        self._set_depth(self._depth + 1)
        self._reaper_wake.set()
        try:
            # Whoever settles the future (dispatcher or reaper) does so while this waiter awaits
            # it, so no exception is ever left unretrieved; a cancelled waiter cancels the future.
            return await ticket.future
        except asyncio.CancelledError:
            self._abandon(ticket)  # the client went away
            raise

    async def _reap(self) -> None:
        """Turn away tickets whose wait ran out while still in line.

        Every ticket waits the same ``max_wait`` and the line is first in, first out, so the
        head always has the earliest deadline: one sleeping task instead of a timer per request.
        """
        loop = asyncio.get_running_loop()
        while True:
            self._prune()
            if not self._line:
                self._reaper_wake.clear()
                await self._reaper_wake.wait()
                continue
            head = self._line[0]
            delay = head.deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            self._line.popleft()
            if self._abandon(head):
                head.future.set_exception(
                    Overloaded(
                        "We could not get to your request in time.",
                        retry_after=self._retry_after(),
                    )
                )

    def _prune(self) -> None:
        """Drop the taken and abandoned tickets at the head of the reaper's line."""
        line = self._line
        while line and (line[0].taken or line[0].abandoned):
            line.popleft()

    def _abandon(self, ticket: _Ticket) -> bool:
        """Take the ticket out of the line unless Redis has it; True when it was taken out."""
        if ticket.taken or ticket.abandoned:
            return False
        ticket.abandoned = True
        self._set_depth(self._depth - 1)
        return True

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._on_depth is not None:
            self._on_depth(depth)

    def _retry_after(self) -> float:
        """Seconds until the current line has been served, at the recent pace."""
        if self._rate <= 0:
            return 1.0
        return min(30.0, max(1.0, math.ceil(self._depth / self._rate)))

    async def run(self) -> None:
        """The dispatcher and the reaper, until cancelled (with the batches being decided)."""
        try:
            await asyncio.gather(self._dispatch(), self._reap())
        finally:
            for task in list(self._batches):
                task.cancel()

    async def _dispatch(self) -> None:
        """Each ready lane's batch, as soon as the lane's previous batch has returned."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            ready, self._ready = self._ready, {}
            for key in ready:
                lane = self._lanes[key]
                if lane.busy:
                    continue
                batch: list[_Ticket] = []
                while lane.line and len(batch) < self.max_batch:
                    ticket = lane.line.popleft()
                    if ticket.abandoned:
                        continue
                    ticket.taken = True
                    batch.append(ticket)
                if not batch:
                    del self._lanes[key]  # nothing in line, nothing out
                    continue
                lane.busy = True
                self._set_depth(self._depth - len(batch))
                if self._out == 0:
                    self._busy_from = time.perf_counter()
                self._out += 1
                task = asyncio.create_task(self._batch(key, lane, batch))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)
            self._prune()

    async def _batch(self, key: LaneKey, lane: _Lane, batch: list[_Ticket]) -> None:
        """One lane's batch decided; then the lane is ready again, or gone when empty."""
        try:
            await self._decide(key[1], batch)
        finally:
            lane.busy = False
            if lane.line:
                self._ready[key] = None
                self._wake.set()
            else:
                del self._lanes[key]
            self._pace(len(batch))

    def _pace(self, items: int) -> None:
        """The worker's pace: items decided per second with a batch out (lanes side by side
        count together), sampled every PACE_EVERY busy seconds and smoothed."""
        now = time.perf_counter()
        self._out -= 1
        self._decided += items
        busy = self._busy + (now - self._busy_from)
        if self._out == 0:
            self._busy, self._busy_from = busy, now
        decided, was_busy = self._paced
        if self._rate and busy - was_busy < PACE_EVERY:
            return
        sample = (self._decided - decided) / max(busy - was_busy, 1e-4)
        self._rate = 0.8 * self._rate + 0.2 * sample if self._rate else sample
        self._paced = (self._decided, busy)

    async def _decide(self, round_id: str, tickets: list[_Ticket]) -> None:
        """One script call for these tickets (all claims, or all entries, of one round)."""
        try:
            outcomes: list[Outcome] = []
            claims = [t.request for t in tickets if isinstance(t.request, ClaimRequest)]
            if claims:
                outcomes.extend(await self.allocator.claim_many(round_id, claims))
            else:
                entries = [t.request for t in tickets if isinstance(t.request, EntryRequest)]
                outcomes.extend(await self.allocator.enter_many(round_id, entries))
        except Problem as problem:
            for t in tickets:
                _settle(t, exception=copy.copy(problem))
            return
        except Exception:
            log.exception("claim batch of %d for round %s failed", len(tickets), round_id)
            for t in tickets:
                _settle(t, exception=Unavailable("Something went wrong; please try again."))
            return
        for t, outcome in zip(tickets, outcomes, strict=True):
            _settle(t, result=outcome)


def _settle(
    ticket: _Ticket, result: Outcome | None = None, exception: BaseException | None = None
) -> None:
    if ticket.future.done():
        return
    if exception is not None:
        ticket.future.set_exception(exception)
    else:
        assert result is not None
        ticket.future.set_result(result)
