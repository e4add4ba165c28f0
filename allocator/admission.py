"""The admission queue: each worker's bounded line in front of the Redis claim.

Requests wait here at most ``max_wait_ms``; a dispatcher takes whatever is waiting (up to
MAX_BATCH) and decides it in one EVALSHA per round and kind: claim.lua for reservations,
enter.lua for lottery entries, gate checks included, one result per item. There is no timer:
the next batch leaves as soon as the previous one returns, so a lone
request is not delayed, and under a crowd each Redis round trip carries many claims.

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


class _Ticket:
    __slots__ = ("abandoned", "deadline", "future", "request", "taken")

    def __init__(self, request: Request, future: asyncio.Future[Outcome], deadline: float) -> None:
        self.request = request
        self.future = future
        self.deadline = deadline  # loop time after which, still in line, it is turned away
        self.taken = False  # handed to Redis: its answer will be the truth
        self.abandoned = False  # left the line before it was taken (wait over, or client gone)


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
        self._line: deque[_Ticket] = deque()
        self._depth = 0  # tickets waiting: neither taken nor abandoned
        self._wake = asyncio.Event()  # something is in line for the dispatcher
        self._reaper_wake = asyncio.Event()  # something is in line for the reaper
        self._rate = 0.0  # decided items per second, smoothed; for retry_after

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
        self._set_depth(self._depth + 1)
        self._wake.set()
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
            while self._line and self._line[0].abandoned:
                self._line.popleft()
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
        """The dispatcher and the reaper, until cancelled."""
        await asyncio.gather(self._dispatch(), self._reap())

    async def _dispatch(self) -> None:
        """One batch at a time, each as soon as the previous has returned."""
        while True:
            await self._wake.wait()
            batch: list[_Ticket] = []
            while self._line and len(batch) < self.max_batch:
                ticket = self._line.popleft()
                if ticket.abandoned:
                    continue
                ticket.taken = True
                batch.append(ticket)
            if not self._line:
                self._wake.clear()
            if not batch:
                continue
            self._set_depth(self._depth - len(batch))
            started = time.perf_counter()
            by_round: dict[tuple[bool, str], list[_Ticket]] = {}
            for ticket in batch:
                entry = isinstance(ticket.request, EntryRequest)
                by_round.setdefault((entry, ticket.request.round_id), []).append(ticket)
            await asyncio.gather(*(self._decide(k[1], ts) for k, ts in by_round.items()))
            elapsed = max(time.perf_counter() - started, 1e-4)
            self._rate = (
                0.8 * self._rate + 0.2 * (len(batch) / elapsed)
                if self._rate
                else (len(batch) / elapsed)
            )

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
