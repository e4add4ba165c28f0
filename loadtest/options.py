"""The ``allot loadtest`` command line and its start check (argparse and importlib only: the
service never imports this; ``allot loadtest`` does, before anything heavy)."""

from __future__ import annotations

import argparse
import importlib.util

# kill-redis-primary: the service runs on a private 3+3 Redis Cluster (wait_replicas = 1) and
# the primary of the round's slot is killed -9 (loadtest/cluster.py)
FAULTS = ("kill-worker", "restart-postgres", "kill-redis-primary")
MODES = ("fcfs", "lottery")
EXTRAS = ("locust", "matplotlib")  # the `loadtest` extra of pyproject.toml


def missing_extras() -> list[str]:
    """The load test's own dependencies that are not installed (none in the production image).

    Looked up, not imported: importing locust monkey-patches the whole process for gevent."""
    return [name for name in EXTRAS if importlib.util.find_spec(name) is None]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _seconds(text: str) -> float:
    """``30``, ``30s``, ``2m``: seconds."""
    scale = 60.0 if text.endswith("m") else 1.0
    value = float(text.rstrip("sm")) * scale
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive duration")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where")
    where.add_argument(
        "--target",
        metavar="URL",
        help="an existing deployment (loopback only); without it the gate starts its own service"
        " on a fresh database and Redis prefix",
    )
    where.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="operator token of --target (default $ALLOT_ADMIN_TOKEN); the gate creates its"
        " round, sites and batch through the operator API",
    )
    where.add_argument(
        "--database-url",
        metavar="URL",
        help="with --target: the target's PostgreSQL, so the ledger is checked row by row"
        " (without it, by the count the service reports)",
    )
    where.add_argument(
        "--redis-url",
        metavar="URL",
        help="with --target and --database-url: the target's Redis, so `allot reconcile` runs",
    )
    where.add_argument(
        "--redis-prefix", metavar="PREFIX", default="allot", help="the target's Redis key prefix"
    )
    where.add_argument(
        "--round", metavar="ID", help="round to create (default loadtest-<timestamp>; must be new)"
    )
    where.add_argument(
        "--workers", type=_positive_int, default=2, help="service workers when self-hosted (2)"
    )
    where.add_argument("--config", metavar="TOML", help="ALLOT_CONFIG for the self-hosted service")

    where.add_argument(
        "--mode",
        choices=MODES,
        default="fcfs",
        help="fcfs: the crowd races for reservations (default); lottery: it registers entries in"
        " a lottery round, then the gate waits for the freeze, draws, runs allot verify-draw and"
        " checks the draw and its fairness",
    )

    crowd = parser.add_argument_group("the crowd")
    crowd.add_argument("--users", type=_positive_int, default=600, help="simulated devices (600)")
    crowd.add_argument(
        "--spawn-rate",
        type=float,
        default=300,
        help="devices arriving per second before the opening (300)",
    )
    crowd.add_argument(
        "--duration",
        type=_seconds,
        default=30.0,
        help="seconds of load after the opening second (30; '2m' works)",
    )
    crowd.add_argument(
        "--processes",
        type=int,
        default=0,
        help="locust worker processes (default: one per 1000 devices, at most the cores)",
    )
    crowd.add_argument("--bots", type=int, default=2, help="scalper bots on one address (2)")
    crowd.add_argument(
        "--stock", type=_positive_int, default=200, help="units loaded for the round (200)"
    )
    crowd.add_argument(
        "--batches",
        type=_positive_int,
        default=3,
        help="deliveries the stock comes in: the first before the opening, the others spread"
        " over the duration, each a flash crowd of its own (3)",
    )
    crowd.add_argument("--sites", type=_positive_int, default=6, help="pickup sites (6)")
    crowd.add_argument("--per-person", type=_positive_int, default=1, help="units per share (1)")
    crowd.add_argument(
        "--fresh-connections",
        action="store_true",
        help="a new TCP connection per citizen, as phones dialling the service directly (default:"
        " kept-alive connections, as the trusted reverse proxy whose X-Forwarded-For the crowd"
        " sends would keep them)",
    )
    crowd.add_argument(
        "--timeout", type=float, default=10.0, help="seconds before a request times out (10)"
    )

    gate = parser.add_argument_group("the gate")
    gate.add_argument(
        "--p99-budget",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="p99 latency of answered requests must stay within this (1.0)",
    )
    gate.add_argument(
        "--ledger-deadline",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="every reservation answered 201 must be in the ledger within this (30)",
    )
    gate.add_argument(
        "--grace",
        type=_seconds,
        default=8.0,
        metavar="SECONDS",
        help="after --duration, time for citizens under way to finish before locust stops (8)",
    )
    gate.add_argument("--fault", choices=FAULTS, help="inject this fault mid-run")
    gate.add_argument(
        "--fault-at",
        type=_seconds,
        metavar="SECONDS",
        help="when, after the opening second (default: 0.3 s after the delivery nearest the"
        " middle of the run, while claims are in flight)",
    )
    gate.add_argument(
        "--outage",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long PostgreSQL stays down with --fault restart-postgres (5)",
    )
    gate.add_argument(
        "--out", metavar="DIR", help="report folder (default loadtest/reports/<timestamp>/)"
    )
    gate.add_argument(
        "--keep",
        action="store_true",
        help="keep the self-hosted database and Redis keys afterwards (printed)",
    )
