"""Prometheus metrics, one registry per application (no module-level singletons).

With several worker processes, ``allot serve`` sets PROMETHEUS_MULTIPROC_DIR before the workers
start; /metrics then aggregates every worker's values with the client's multiprocess collector.
"""

from __future__ import annotations

import os
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
        self.ledger_lag = Gauge(
            "allot_ledger_lag",
            "Ledger entries in Redis not yet committed to PostgreSQL",
            registry=self.registry,
            multiprocess_mode="livemax",
        )

        # label children resolved once: labels() takes a lock and builds a key on every call
        self._outcomes: dict[str, Any] = {}
        self._durations: dict[tuple[str, int], Any] = {}

    def count_reservation(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.reservations.labels(outcome)
        child.inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        child = self._durations.get((route, status))
        if child is None:
            child = self._durations[(route, status)] = self.request_duration.labels(
                route, str(status)
            )
        child.observe(seconds)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
