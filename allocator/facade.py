"""The Allocator: the parts of allocator/ wired together, and the one object handlers call.

It does no work of its own. Each call it offers is a part's method, bound once here (no extra
frame on the hot path):

  store.py         the guarded Redis and PostgreSQL access (timeouts, breaker)
  losswatch.py     Redis compared with the ledger's marks; lost rounds refused; readiness
  tags.py          which hash tag each round's keys use (its programme's, or its own)
  catalogue.py     rounds, sites and stock from short-lived snapshots; alternatives
  gate.py          the token buckets' settings, keys and refusals (spent inside claim.lua)
  claims.py        claims packed into one claim.lua call and decoded; cancel; pickup
  entries.py       lottery entries packed into one enter.lua call; withdrawal; look-up
  stock_events.py  returned units announced to every worker (sold-out marks cleared)
  operators.py     sites, rounds and batches written by operators
  stats.py         a round's figures
  fairness.py      who asked and who got a share, by district, age band and channel
  expiry.py        the sweep that records expiry after pickup_end (run by every worker)
  carryover.py     a batch carried over from an earlier round's leftovers
  lottery.py       lottery rounds: freeze, draw, passes, winners' reservations, the record

Every method returns a domain value or raises a refusal from allocator/errors.py; store
failures become ``Unavailable`` within the configured timeout, never a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg
from redis.asyncio import Redis

from allocator.carryover import CarryOver
from allocator.catalogue import Catalogue
from allocator.claims import Claims
from allocator.config import GateSettings
from allocator.drawkeys import DrawKeys
from allocator.entries import Entries
from allocator.expiry import Expiry
from allocator.fairness import Asks, Fairness
from allocator.gate import Gate
from allocator.identity import Hasher
from allocator.integrity import Floors
from allocator.keys import Keys
from allocator.losswatch import LossWatch
from allocator.lottery import Lottery
from allocator.operators import Operators
from allocator.scripts import Scripts
from allocator.soldout import SoldOutBoard
from allocator.stats import Stats
from allocator.stock_events import StockEvents
from allocator.store import Store
from allocator.tags import RoundTags
from allocator.topology import ReplicaWait


class Allocator:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool | None,
        keys: Keys,
        hasher: Hasher,
        *,
        timeout: float = 0.8,
        gate: GateSettings | None = None,
        breaker: float = 0.5,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        draw_key: str | None = None,
        database_url: str | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.hasher = hasher
        # loss seen: the ledger's marks; any Redis failure makes them suspect (reloaded first)
        self.floors = Floors()
        self.store = Store(
            redis,
            pool,
            timeout=timeout,
            breaker=breaker,
            monotonic=monotonic,
            on_redis_failure=self.floors.redis_failed,
            replica_wait=wait_timeout_ms / 1000 if wait_replicas > 0 else 0.0,
        )
        self.loop_lag = self.store.loop_lag  # its run() is started by the app
        # [redis] wait_replicas: one ReplicaWait for every part whose script answers someone
        # (a citizen, desk staff, an operator): the answer goes out only once replicas have it
        self.replicas = ReplicaWait(redis, wait_replicas, wait_timeout_ms)
        self.scripts = Scripts.register(redis)
        self.sold_out = SoldOutBoard(clock=monotonic)
        self.tags = RoundTags(self.store, keys, monotonic=monotonic)
        self.watch = LossWatch(
            self.store, keys, self.scripts, self.floors, self.tags, forget=self._forget
        )
        self.catalogue = Catalogue(self.store, keys, self.watch, self.tags, monotonic=monotonic)
        self.stock_events = StockEvents(self.store, keys, self.catalogue, self.sold_out)
        self.claims = Claims(
            self.store,
            keys,
            hasher,
            self.scripts,
            Gate.from_settings(gate),
            self.catalogue,
            self.watch,
            self.sold_out,
            self.stock_events,
            clock=clock,
            replicas=self.replicas,
        )
        self.entries = Entries(
            self.store,
            keys,
            hasher,
            self.scripts,
            self.claims.gate,
            self.catalogue,
            self.watch,
            now_ms=self.claims.now_ms,
            replicas=self.replicas,
        )
        self.draw_keys = DrawKeys(self.store, draw_key)
        self.lottery = Lottery(
            self.store,
            keys,
            self.scripts,
            self.catalogue,
            self.watch,
            database_url,
            replicas=self.replicas,
        )
        self.operators = Operators(
            self.store,
            keys,
            self.scripts,
            self.catalogue,
            self.watch,
            self.stock_events,
            self.tags,
            clock=clock,
            replicas=self.replicas,
        )
        self.figures = Stats(self.store, keys, self.catalogue, self.watch)
        self.asks = Asks(self.store, keys, self.catalogue)  # its run() is started by the app
        self.fairness = Fairness(self.store, keys, self.catalogue, self.asks)
        self.expiry = Expiry(
            self.store, keys, self.scripts, self.catalogue, self.watch, clock=clock
        )
        self.carryover = CarryOver(
            self.store,
            keys,
            self.scripts,
            self.catalogue,
            self.watch,
            self.operators,
            self.expiry,
            replicas=self.replicas,
        )

        # -- the calls handlers, the queue and the CLI make -------------------------------------
        self.now_ms = self.claims.now_ms
        self.now = self.claims.now
        self.find_round = self.catalogue.find_round
        self.round = self.catalogue.round
        self.round_before_claim = self.catalogue.round_before_claim
        self.rounds = self.catalogue.rounds
        self.round_ids = self.catalogue.round_ids
        self.sites = self.catalogue.sites
        self.stock = self.catalogue.stock
        self.remaining = self.catalogue.remaining
        self.site_list = self.catalogue.site_list
        self.alternatives = self.catalogue.alternatives
        self.check_eligibility = self.claims.check_eligibility
        self.claim_request = self.claims.claim_request
        self.claim_many = self.claims.claim_many
        self.reservation = self.claims.reservation
        self.cancel = self.claims.cancel
        self.pickup = self.claims.pickup
        self.entry_request = self.entries.entry_request
        self.enter_many = self.entries.enter_many
        self.entry = self.entries.entry
        self.withdraw = self.entries.withdraw
        self.draw_key = self.draw_keys.get
        self.draw_record = self.lottery.record
        self.draw_file = self.lottery.file
        self.draw = self.lottery.draw
        self.draw_next = self.lottery.next_pass
        self.watch_lottery = self.lottery.watch_rounds
        self.upsert_sites = self.operators.upsert_sites
        self.mirror_sites = self.operators.mirror_sites
        self.upsert_round = self.operators.upsert_round
        self.mirror_round = self.operators.mirror_round
        self.load_batch = self.operators.load_batch
        self.carry_batch = self.carryover.carry
        self.sweep_expiry = self.expiry.sweep
        self.run_expiry = self.expiry.run
        self.stats = self.figures.round_stats
        self.fairness_report = self.fairness.report
        self.units_returned = self.stock_events.units_returned
        self.follow_stock_events = self.stock_events.follow
        self.ping = self.watch.ping
        self.check = self.watch.check
        self.verify = self.watch.verify
        self.watch_integrity = self.watch.watch
        self.lost_rounds = self.watch.lost_rounds

    def _forget(self, round_id: str) -> None:
        """A round found lost, or whole again: no snapshot or sold-out mark of it survives."""
        self.catalogue.forget_round(round_id)
        self.sold_out.clear(round_id)
