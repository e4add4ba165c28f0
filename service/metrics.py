"""Prometheus metrics, one registry per application (no module-level singletons).

``allot serve`` sets PROMETHEUS_MULTIPROC_DIR before its workers and its ledger writer start;
the supervisor's operations listener (service/ops.py) then aggregates every process's values
with the client's multiprocess collector. No worker ever renders /metrics.

The ledger's gauge belongs to the process that runs the writer (:class:`LedgerMetrics`), not to
the workers: while no writer runs, ``allot_ledger_lag`` is absent, never a reassuring 0.
"""

from __future__ import annotations

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
        self._durations: dict[tuple[str, int], Any] = {}
        self._depth_total: tuple[float, float] = (float("-inf"), 0.0)  # (read at, value)

    def count_reservation(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.reservations.labels(outcome)
        child.inc()

    def count_ask(self, channel: str, *, granted: bool) -> None:
        """One ask on ``channel`` (a new reservation, or refused sold-out)."""
        child = self._asks.get(channel)
        if child is None:
            child = self._asks[channel] = (self.asks.labels(channel), self.grants.labels(channel))
        child[0].inc()
        if granted:
            child[1].inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        child = self._durations.get((route, status))
        if child is None:
            child = self._durations[(route, status)] = self.request_duration.labels(
                route, str(status)
            )
        child.observe(seconds)

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
