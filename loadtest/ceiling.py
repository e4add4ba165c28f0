"""The per-round ceiling on Redis Cluster, measured: how many claims a second one primary can
decide for one round (one round = one hash tag = one slot = one primary), from the Redis CPU
each claim costs there, with ``wait_replicas`` 0 and 1, one round (one primary) against three
rounds on three primaries, side by side and alternating.

    python -m loadtest.ceiling [--duration 8] [--rounds 3] [--batch 256]

Starts its own cluster (loadtest/cluster.py) and a scratch PostgreSQL database on
ALLOT_DATABASE_URL's server (dropped afterwards), creates rounds on three different primaries,
and sends ``claim_many`` batches of new citizens straight to the allocator (no HTTP: the figure
is Redis's, the one part that cannot be spread over more allot nodes). ``make bench`` runs the
same driver (:class:`DirectDriver`, :class:`ClusterMeter`) next to ``allot serve`` in cluster
mode under wrk (bench/run.py, "cluster part"); docs/performance.md and docs/scaling.md quote it.

Redis's cost per claim is read on every node before and after each run: the time its script
calls took (``INFO commandstats``, EVALSHA and EVAL) and the process's CPU (utime + stime from
/proc/<pid>/stat: the scripts plus networking, replication to its replica and the cluster
bus), each divided by the claims that node decided.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import asyncpg
from redis.asyncio import Redis
from redis.crc import key_slot
from stdnum.cn import ric

from allocator import db, topology
from allocator.config import GateSettings, RedisSettings, load_settings
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.model import Round, Site
from loadtest.cluster import PrivateCluster
from loadtest.servers import cpu_seconds

# every claim comes from one address here: the gate's buckets wide open (they are still spent)
OPEN_GATE = GateSettings(
    global_rate=1e9, global_burst=10**9, client_rate=1e9, client_burst=10**9,
    citizen_rate=1e9, citizen_burst=10**9,
)  # fmt: skip
# how many rounds each layout spreads its claims over (each round on a primary of its own)
LAYOUTS = {"one": 1, "three": 3}
WAITS = (0, 1)
STOCK = 10**7  # per round: never the limit
# the drivers, in the table's order: this module's, and bench/run.py's allot serve under wrk
DRIVERS = ("claim_many", "allot serve")
# the table both print (bench/run.py into docs/performance.md)
TABLE_COLUMNS = (
    "driver", "wait_replicas", "rounds on primaries", "claims/s", "vs one round",
    "Redis CPU µs/claim", "script µs/claim", "ceiling per primary core",
    "EVALSHA per 1,000 claims", "replicas' CPU µs/claim", "client CPU µs/claim", "refused",
)  # fmt: skip
TABLE_HEADER = (
    f"| {' | '.join(TABLE_COLUMNS)} |\n|---|---:|---|{'---:|' * (len(TABLE_COLUMNS) - 3)}"
)


def citizen(n: int) -> str:
    """Citizen n, as bench/reserve.lua makes them for wrk: region 110101, born 1971-01-01 +
    n // 1000 days, sequence n % 1000, and the check character (python-stdnum's)."""
    born = dt.date(1971, 1, 1) + dt.timedelta(days=n // 1000)
    body = f"110101{born:%Y%m%d}{n % 1000:03d}"
    return body + ric.calc_check_digit(body + "0")  # stdnum ignores the last character


def script_stats(stats: Mapping[str, Any]) -> tuple[int, int]:
    """(calls, usec) of EVALSHA and EVAL (the NOSCRIPT fallback) in a parsed ``INFO
    commandstats``. bench/run.py reads a single Redis through it too."""
    calls = usec = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        found = stats.get(name) or {}
        calls += int(found.get("calls", 0))
        usec += int(found.get("usec", 0))
    return calls, usec


def rounds_on_primaries(cluster: PrivateCluster, n: int = 3, stem: str = "cl") -> list[str]:
    """``n`` round ids (``{stem}-<i>``) whose keys' slot (``{r:<id>}``: the prefix is not in
    the hash tag) is on ``n`` different primaries."""
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < n:
        round_id = f"{stem}-{i}"
        i += 1
        chosen.setdefault(primary_port(cluster, round_id), round_id)
    return list(chosen.values())


def primary_port(cluster: PrivateCluster, round_id: str) -> int:
    """The port of the primary serving a round in no programme."""
    return cluster.primary_of_slot(key_slot(Keys("x").round(round_id).round.encode())).port


@dataclass(frozen=True, slots=True)
class NodeReading:
    calls: int
    usec: int
    cpu_s: float


@dataclass(slots=True)
class NodeCost:
    """What one node spent over a run, and the claims it decided."""

    role: str  # "primary" or "replica"
    claims: int = 0
    calls: int = 0
    script_us: int = 0
    cpu_s: float = 0.0

    def cpu_us_per_claim(self) -> float | None:
        return self.cpu_s * 1e6 / self.claims if self.claims else None

    def script_us_per_claim(self) -> float | None:
        return self.script_us / self.claims if self.claims else None


class ClusterMeter:
    """Every node's script time (``INFO commandstats``) and process CPU, before and after a run.
    The roles are read once: a bench run has no failover."""

    def __init__(self, cluster: PrivateCluster) -> None:
        self.roles = {n.port: "primary" for n in cluster.primaries()}
        self.roles.update({n.port: "replica" for n in cluster.replicas()})
        self.pids: dict[int, int] = {}
        for node in cluster.nodes:
            assert node.pid is not None, f"{node.address} is not running"
            self.pids[node.port] = node.pid
        self.clients = {port: Redis(host="127.0.0.1", port=port) for port in self.roles}

    async def read(self) -> dict[int, NodeReading]:
        found = {}
        for port, client in self.clients.items():
            calls, usec = script_stats(await client.info("commandstats"))
            found[port] = NodeReading(calls, usec, cpu_seconds(self.pids[port]))
        return found

    def spent(
        self,
        before: Mapping[int, NodeReading],
        after: Mapping[int, NodeReading],
        claims_by_port: Mapping[int, int],
    ) -> dict[int, NodeCost]:
        return {
            port: NodeCost(
                self.roles[port],
                claims=claims_by_port.get(port, 0),
                calls=after[port].calls - before[port].calls,
                script_us=after[port].usec - before[port].usec,
                cpu_s=after[port].cpu_s - before[port].cpu_s,
            )
            for port in self.roles
        }

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


@dataclass(slots=True)
class ClusterRun:
    """One run of one driver: ``wait_replicas``, a layout, the claims decided per round."""

    driver: str  # "claim_many" or "allot serve"
    wait: int
    layout: str  # a key of LAYOUTS
    seconds: float
    claims: dict[str, int]  # round -> claims created
    nodes: dict[int, NodeCost]  # port -> what that node spent
    refused: int = 0  # answers other than a new reservation (non-2xx, not created)
    client_cpu_us: float | None = None  # the client's CPU per claim (allot's workers)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.claims.values())

    @property
    def rate(self) -> float:
        return self.total / self.seconds if self.seconds else 0.0

    def loaded(self) -> dict[int, NodeCost]:
        """The primaries that decided claims, by port."""
        return {p: c for p, c in self.nodes.items() if c.role == "primary" and c.claims}

    def idle(self) -> dict[int, NodeCost]:
        return {p: c for p, c in self.nodes.items() if c.role == "primary" and not c.claims}

    def replica_cpu_us_per_claim(self) -> float | None:
        spent = sum(c.cpu_s for c in self.nodes.values() if c.role == "replica")
        return spent * 1e6 / self.total if self.total else None


# a driver's one run: (seconds, claims created per round, refused)
Drive = Callable[[], Awaitable[tuple[float, dict[str, int], int]]]


async def measured_run(
    meter: ClusterMeter, ports: Mapping[str, int], drive: Drive
) -> tuple[float, dict[str, int], int, dict[int, NodeCost]]:
    """``drive()`` between two readings of every node; ``ports``: round -> its primary."""
    before = await meter.read()
    seconds, claims, refused = await drive()
    after = await meter.read()
    by_port: dict[int, int] = {}
    for round_id, n in claims.items():
        by_port[ports[round_id]] = by_port.get(ports[round_id], 0) + n
    return seconds, claims, refused, meter.spent(before, after, by_port)


class DirectDriver:
    """``claim_many`` batches of new citizens straight to the allocator, one Allocator per
    ``wait_replicas`` setting, on rounds of its own (``rounds``) in a scratch database."""

    name = "claim_many"

    def __init__(
        self,
        redis: Any,
        pool: asyncpg.Pool,
        allocators: dict[int, Allocator],
        rounds: list[str],
        batch: int,
        dbname: str,
        base_url: str,
    ) -> None:
        self.redis, self.pool, self.allocators = redis, pool, allocators
        self.rounds, self.batch = rounds, batch
        self.dbname, self.base_url = dbname, base_url
        self.n = 0  # the last citizen used: every claim is a new citizen's
        self.ledgers = [allocators[0].keys.round(r).ledger for r in rounds]

    @classmethod
    async def open(
        cls, cluster: PrivateCluster, base_database_url: str, rounds: list[str], batch: int
    ) -> Self:
        dbname = f"allot_ceiling_{uuid.uuid4().hex[:8]}"
        database_url = db.with_database(base_database_url, dbname)
        await db.migrate(database_url)
        settings = replace(
            load_settings(environ={"ALLOT_DATABASE_URL": base_database_url}),
            redis_url=cluster.url,
            database_url=database_url,
            redis=RedisSettings(mode="cluster"),
        )
        redis = topology.redis_client(settings)
        pool = await db.create_pool(database_url)
        keys = Keys(f"ceiling-{uuid.uuid4().hex[:6]}")
        allocators = {}
        for wait in WAITS:
            allocators[wait] = Allocator(
                redis, pool, keys, Hasher(b"ceiling"), timeout=5, wait_replicas=wait,
                wait_timeout_ms=1000, gate=OPEN_GATE,
            )  # fmt: skip
        driver = cls(redis, pool, allocators, rounds, batch, dbname, base_database_url)
        alloc = allocators[0]
        await alloc.upsert_sites([Site("s1", "Site 1", "Road 1", "d1")])
        now = dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).replace(microsecond=0)
        for round_id in rounds:
            await alloc.upsert_round(
                Round(
                    round_id=round_id,
                    title="ceiling",
                    opens_at=now - dt.timedelta(minutes=1),
                    closes_at=now + dt.timedelta(hours=2),
                    per_person=1,
                    pickup_start=now,
                    pickup_end=now + dt.timedelta(hours=3),
                )
            )
            await alloc.load_batch(round_id, "b", [("s1", STOCK)])
        return driver

    def drive(self, wait: int, layout: str, seconds: float, streams: int = 3) -> Drive:
        """A run of ``seconds``: ``streams`` batch loops at once (the same number in every
        layout, so that only the spread over primaries differs), over the layout's rounds."""
        alloc = self.allocators[wait]
        rounds = self.rounds[: LAYOUTS[layout]]

        async def run() -> tuple[float, dict[str, int], int]:
            claims = dict.fromkeys(rounds, 0)
            refused = 0
            started = time.perf_counter()
            deadline = started + seconds

            async def loop(round_id: str) -> None:
                nonlocal refused
                while time.perf_counter() < deadline:
                    items = []
                    for _ in range(self.batch):
                        self.n += 1
                        items.append(
                            alloc.claim_request(round_id, "s1", citizen(self.n), f"139{self.n:08d}")
                        )
                    outcomes = await alloc.claim_many(round_id, items)
                    created = sum(1 for o in outcomes if o.created)
                    claims[round_id] += created
                    refused += len(outcomes) - created

            await asyncio.gather(*(loop(rounds[i % len(rounds)]) for i in range(streams)))
            return time.perf_counter() - started, claims, refused

        return run

    async def discard_ledger(self) -> None:
        """Empty the rounds' ledger streams, which no writer drains here (between runs, outside
        the measurement): a few million claims' entries would hold gigabytes on each node."""
        for ledger in self.ledgers:
            await self.redis.xtrim(ledger, maxlen=0)

    async def aclose(self) -> None:
        for alloc in self.allocators.values():
            alloc.lottery.close()
        await topology.close_client(self.redis)
        await self.pool.close()
        con = await asyncpg.connect(db.with_database(self.base_url, "postgres"))
        try:
            await con.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        finally:
            await con.close()


async def direct_runs(
    cluster: PrivateCluster,
    meter: ClusterMeter,
    driver: DirectDriver,
    wait: int,
    layout: str,
    seconds: float,
) -> ClusterRun:
    """One measured run of the direct driver."""
    ports = {r: primary_port(cluster, r) for r in driver.rounds}
    started = time.process_time()  # the client: this process
    took, claims, refused, nodes = await measured_run(
        meter, ports, driver.drive(wait, layout, seconds)
    )
    client = time.process_time() - started
    await driver.discard_ledger()
    total = sum(claims.values())
    return ClusterRun(
        driver.name, wait, layout, took, claims, nodes, refused,
        client_cpu_us=client * 1e6 / total if total else None,
    )  # fmt: skip


def median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(statistics.median(found)) if found else None


def run_line(run: ClusterRun) -> str:
    loaded = " / ".join(f"{c.cpu_us_per_claim() or 0:.1f}" for _, c in sorted(run.loaded().items()))
    return (
        f"{run.driver:11} wait_replicas={run.wait} {run.layout:5} {run.rate:9,.0f} claims/s"
        f"  Redis CPU µs/claim per loaded primary {loaded}  refused {run.refused}"
    )


def table_rows(runs: Sequence[ClusterRun]) -> tuple[str, dict[tuple[str, int, str], float]]:
    """The table's rows, and the median claims/s per (driver, wait, layout)."""

    def us(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    rates: dict[tuple[str, int, str], float] = {}
    rows = []
    for driver in DRIVERS:
        for wait in WAITS:
            for layout in LAYOUTS:
                chosen = [r for r in runs if (r.driver, r.wait, r.layout) == (driver, wait, layout)]
                if not chosen:
                    continue
                rate = rates[driver, wait, layout] = statistics.median(r.rate for r in chosen)
                primaries = sorted({p for r in chosen for p in r.loaded()})
                cpu = [median([r.nodes[p].cpu_us_per_claim() for r in chosen]) for p in primaries]
                script = [
                    median([r.nodes[p].script_us_per_claim() for r in chosen]) for p in primaries
                ]
                ceilings = [f"{1e6 / v:,.0f}" for v in cpu if v]
                calls = median([sum(c.calls for c in r.loaded().values()) / max(r.total, 1)
                                for r in chosen])  # fmt: skip
                one = rates.get((driver, wait, "one"))
                versus = f"{rate / one:.2f}" if layout != "one" and one else "–"
                rows.append(
                    f"| {driver} | {wait} | {LAYOUTS[layout]} on {len(primaries)} | {rate:,.0f}"
                    f" | {versus} | {' / '.join(us(v) for v in cpu)}"
                    f" | {' / '.join(us(v) for v in script)} | {' / '.join(ceilings)}"
                    f" | {us(calls and calls * 1000)}"
                    f" | {us(median([r.replica_cpu_us_per_claim() for r in chosen]))}"
                    f" | {us(median([r.client_cpu_us for r in chosen]))}"
                    f" | {sum(r.refused for r in chosen)} |"
                )
    return "\n".join(rows), rates


async def measure(duration: float, rounds: int, batch: int) -> list[ClusterRun]:
    base = load_settings(environ={k: v for k, v in os.environ.items() if k == "ALLOT_DATABASE_URL"})
    found: list[ClusterRun] = []
    with (
        tempfile.TemporaryDirectory(prefix="allot-ceiling-") as tmp,
        PrivateCluster(Path(tmp)) as cluster,
    ):
        meter = ClusterMeter(cluster)
        driver = await DirectDriver.open(
            cluster, base.database_url, rounds_on_primaries(cluster), batch
        )
        try:
            for wait in WAITS:  # warm-up
                _ = await driver.drive(wait, "three", 1)()
                await driver.discard_ledger()
            for _ in range(rounds):
                for wait in WAITS:
                    for layout in LAYOUTS:
                        found.append(
                            await direct_runs(cluster, meter, driver, wait, layout, duration)
                        )
        finally:
            await driver.aclose()
            await meter.aclose()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ceiling", description=__doc__)
    parser.add_argument("--duration", type=float, default=8, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating runs")
    parser.add_argument("--batch", type=int, default=256, help="claims per claim_many call")
    args = parser.parse_args(argv)
    runs = asyncio.run(measure(args.duration, args.rounds, args.batch))
    rows, _ = table_rows(runs)
    print(f"{TABLE_HEADER}\n{rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
