"""Prometheus metrics, one registry per application (no module-level singletons).

``allot serve`` sets PROMETHEUS_MULTIPROC_DIR before its workers and its ledger writer start;
the supervisor's operations listener (service/ops.py) then aggregates every process's values
with the client's multiprocess collector. No worker ever renders /metrics.

The ledger's gauge belongs to the process that runs the writer (:class:`LedgerMetrics`), not to
the workers: while no writer runs, ``allot_ledger_lag`` is absent, never a reassuring 0.
"""

from __future__ import annotations

import asyncio
import bisect
import glob
import os
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reservations = Counter(
            "allot_reservations_total",
            "Reservation requests by outcome (created, existing, or the problem code)",
            ["outcome"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "allot_request_duration_seconds",
            "Time from request to answer, by route and status",
            ["route", "status"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "allot_queue_depth",
            "Requests waiting in this worker's admission queue",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

        self.asks = Counter(
            "allot_asks_total",
            "Reservation requests that asked for a share by channel: answered with a new "
            "reservation or refused sold-out (not distinct citizens: see the fairness report)",
            ["channel"],
            registry=self.registry,
        )
        self.grants = Counter(
            "allot_grants_total",
            "New reservations by channel",
            ["channel"],
            registry=self.registry,
        )

        # label children resolved once: labels() takes a lock and builds a key on every call
        self._outcomes: dict[str, Any] = {}
        self._asks: dict[str, tuple[Any, Any]] = {}
        self._durations: dict[tuple[str, int], _Tally] = {}
        self._depth_total: tuple[float, float] = (float("-inf"), 0.0)  # (read at, value)
        # What the requests of this turn of the event loop counted, written out at its end.
        self._counted: dict[Any, int] = {}
        self._tallies: list[_Tally] = []
        self._depth: int | None = None  # the queue's depth to write, if it changed
        self._flush_soon = False

    # Every value a worker's series hold is a locked write to a memory-mapped file under
    # PROMETHEUS_MULTIPROC_DIR (about 1 µs each, four or five a request). A request's counts are
    # added up in plain dicts instead and written once at the end of the event loop's turn (one
    # call_soon), so a crowd's requests answered in one turn cost one write per series between
    # them. A scrape sees them a turn later: before the next request is even read.

    def count_reservation(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.reservations.labels(outcome)
        self._count(child)

    def count_ask(self, channel: str, *, granted: bool) -> None:
        """One ask on ``channel`` (a new reservation, or refused sold-out)."""
        child = self._asks.get(channel)
        if child is None:
            child = self._asks[channel] = (self.asks.labels(channel), self.grants.labels(channel))
        self._count(child[0])
        if granted:
            self._count(child[1])

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        tally = self._durations.get((route, status))
        if tally is None:
            tally = self._durations[(route, status)] = _Tally(
                self.request_duration.labels(route, str(status))
            )
        if tally.waiting:
            tally.add(seconds)
            return
        tally.add(seconds)
        self._tallies.append(tally)
        self._later()

    def set_queue_depth(self, depth: int) -> None:
        """The admission queue's depth (it changes twice a request: in, then taken)."""
        self._depth = depth
        self._later()

    def _count(self, child: Any) -> None:
        counted = self._counted
        n = counted.get(child)
        counted[child] = 1 if n is None else n + 1
        if n is None:
            self._later()

    def _later(self) -> None:
        if self._flush_soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script): at once
            self.flush()
            return
        self._flush_soon = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write out what was counted since the last flush."""
        self._flush_soon = False
        counted, self._counted = self._counted, {}
        for child, n in counted.items():
            child.inc(n)
        tallies, self._tallies = self._tallies, []
        for tally in tallies:
            tally.flush()
        if self._depth is not None:
            self.queue_depth.set(self._depth)
            self._depth = None

    def render(self) -> bytes:
        """This process's metrics, or every worker's under PROMETHEUS_MULTIPROC_DIR. Costly
        with several workers (~47 ms for 60 KB): called only by the operations listener."""
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            return render_multiprocess(path)
        return generate_latest(self.registry)

    def queue_depth_total(self, max_age: float = 1.0) -> float:
        """Requests waiting in the admission queues of all workers, read at most once per
        ``max_age`` seconds. Only the live-sum gauge files are read (this one series), so it
        costs a worker's loop well under a millisecond, unlike a full render."""
        read_at, value = self._depth_total
        now = time.monotonic()
        if now - read_at < max_age:
            return value
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            files = glob.glob(os.path.join(path, "gauge_livesum_*.db"))
            merged = multiprocess.MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
            value = sum(s.value for m in merged if m.name == "allot_queue_depth" for s in m.samples)
        else:
            value = sum(s.value for m in self.queue_depth.collect() for s in m.samples)
        self._depth_total = (now, value)
        return value


class _Tally:
    """A histogram child's observations since the last flush: their sum and a count per
    bucket, written with one increment each. The child's own ``observe`` does the same per
    observation (``_sum``, then the first bucket whose bound holds it; prometheus_client keeps
    bucket counts non-cumulative and adds them up when collected); tests/test_metrics_batch.py
    checks both give the same series."""

    __slots__ = ("_bounds", "_buckets", "_child", "_counts", "_sum", "sum", "waiting")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._buckets: list[Any] = child._buckets
        self._sum: Any = child._sum
        self._counts = [0] * len(self._bounds)
        self.sum = 0.0
        self.waiting = False

    def add(self, seconds: float) -> None:
        self.waiting = True
        self.sum += seconds
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1  # first bound >= seconds

    def flush(self) -> None:
        self.waiting = False
        self._sum.inc(self.sum)
        self.sum = 0.0
        counts = self._counts
        for i, n in enumerate(counts):
            if n:
                self._buckets[i].inc(n)
                counts[i] = 0


class LedgerMetrics:
    """The ledger writer's metrics, in a registry of their own or added to a worker's."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        # "live": the series of a writer that died leaves with it (the supervisor marks the
        # process dead), and its replacement reports at once. "max": two writers (serve's and
        # a standby `allot ledger` sharing the directory) each read the same total backlog.
        self.ledger_lag = Gauge(
            "allot_ledger_lag",
            "Ledger entries in Redis not yet committed to PostgreSQL",
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def render(self) -> bytes:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            return render_multiprocess(path)
        return generate_latest(self.registry)


def render_multiprocess(path: str) -> bytes:
    """Every process's metrics from the files in ``path`` (the multiprocess collector)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
