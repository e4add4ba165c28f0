"""`make bench`: allot's reserve path against a bare aiohttp handler and the naive design.

Everything runs on this machine, side by side and alternating, under the same load generator
(wrk, one thread, keep-alive connections), so the ratios mean something on a shared, noisy box:

  (a) bare    a bare aiohttp handler on uvloop: the ceiling of any aiohttp handler
  (b) naive   one redis-py EVALSHA of claim.lua per request, straight from the handler
  (c) allot   `allot serve --workers 1`: gate, admission queue, batched claims
  (e) entries allot's (c) server registering lottery entries (POST …/rounds/bench-lottery/entries,
              a lottery round registering now), right after (c) in every round: e/c is issue
              10's "registration within 10 % of reservations"
  (d) herd    allot, every request at a sold-out site (answered from memory)
  (c2)        `allot serve --workers 2`, to see how throughput grows with a second worker

Every request carries a new valid citizen and, in X-Forwarded-For, a new client address (a real
crowd; `--one-client` leaves the header out, as runs before 2026-12-01 did). (b), (c), (e) and
(c2) have ample stock and open gates, so every answer should be 201. Then the peak RSS of one
worker holding a full admission queue of 10,000 requests (Redis paused on purpose; the depth is
read from `allot_queue_depth` on the operations port, and the report says when the queue was
not full when the RSS was read).

A scenario is one more ``Scenario`` in the list ``main`` builds (its server, round, route and
stream); ``render`` finds scenarios by ``key``.
Results go to stdout and docs/performance.md; nothing here is a test, and nothing asserts time.

Every run also records the CPU time each process spent (utime + stime from /proc/<pid>/stat
before and after, per request): the server's workers, its ledger writer, Redis (a private
redis-server of the bench's own, so nobody else's work is in it), the PostgreSQL backends
connected to the scenario's database, and wrk (its rusage); and the ledger backlog: the
entries left in the round's stream the moment wrk stops (XLEN, what ``allot_ledger_lag``
counts) and how long the writer then takes to drain them. The "after" reading is taken once the
backlog is drained, so the writer's catching up is counted in the run that caused it. (c2) has
a database and key prefix of its own; (b) writes into (c)'s stream, which (c)'s writer drains.

docs/performance.md is shared: the full run rewrites only the part between its markers
(``<!-- bench: main -->``), the persistence run only its own; other sections are kept.

The cluster part (after the rest; ``--no-cluster`` skips it, ``--cluster-only`` runs it alone)
starts a private Redis Cluster of 3 primaries and 3 replicas and measures claims of new
citizens to one round (one primary) against three rounds on three primaries, with
``wait_replicas`` 0 and 1, through ``claim_many`` straight from this process
(loadtest/ceiling.py, which ``python -m loadtest.ceiling`` runs alone) and through ``allot
serve`` in cluster mode under wrk; every node's CPU and script time per claim it decided. It
rewrites its own section of docs/performance.md (``<!-- bench: cluster -->``).

``--redis-persistence`` measures instead what durability costs: the same claim load as (c)
against three private Redis servers, side by side and alternating, with ``appendfsync always``
(the default everywhere allot configures Redis), ``appendfsync everysec`` and no persistence,
each behind its own ``allot serve --workers 1`` and ledger database. It rewrites only that
section of docs/performance.md (a full run keeps it, and every other section).

usage: python bench/run.py [--duration 8] [--rounds 3] [--connections 256] [--sweep 64,1000]
                           [--one-client] [--programme] [--no-cluster] [--out FILE]
       python bench/run.py --redis-persistence [--persistence-connections 64,512] [--rounds 3] ...
       python bench/run.py --cluster-only [--cluster-batch 256] [--cluster-workers 1] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from allocator.db import with_database
from allocator.keys import Keys
from loadtest.ceiling import (
    DRIVERS,
    LAYOUTS,
    TABLE_HEADER,
    WAITS,
    ClusterMeter,
    ClusterRun,
    DirectDriver,
    citizen,
    direct_runs,
    measured_run,
    median,
    primary_port,
    rounds_on_primaries,
    run_line,
    script_stats,
    table_rows,
)
from loadtest.cluster import PrivateCluster
from loadtest.servers import PrivateRedis, cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "bench-admin-token"
WIDE_OPEN = """
[gate]
global_rate = 1e9
global_burst = 1000000000
client_rate = 1e9
client_burst = 1000000000
citizen_rate = 1e9
citizen_burst = 1000000000
"""
# The bench's one client opens 10,000 connections from one process: on a busy machine some
# wait seconds between their first byte and their body, which the default 10 s limits would cut
FULL_QUEUE = """
[service]
redis_timeout_ms = 60000
header_timeout_ms = 60000
body_timeout_ms = 60000
[queue]
max_depth = 10000
max_wait_ms = 60000
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    requests: int
    cpu_us: dict[str, float] = field(default_factory=dict)  # role -> CPU µs per request
    busy: float = 0.0  # the machine's busy share (all cores) during the run, 0..1
    backlog: int | None = None  # ledger entries in the stream when wrk stopped
    drain_s: float | None = None  # seconds from then until the stream was empty
    # Redis time in claim scripts per 2xx answer (INFO commandstats, EVALSHA usec before and
    # after the run), and EVALSHA calls per 2xx answer (how well claims are batched)
    redis_us_per_claim: float | None = None
    evalsha_per_claim: float | None = None


@dataclass
class Scenario:
    """One load: wrk POSTs to ``{url}/api/v1/rounds/{round_id}/{kind}`` at ``site``.

    A new scenario is one more entry in the list ``main`` builds (and, for a figure of its own
    in the report, a row or ratio in ``render``): ``key`` names it there."""

    name: str
    url: str
    site: str
    expect_2xx: bool
    service: Service | None = None  # whose processes, database and stream it loads
    runs: list[Run] = field(default_factory=list)
    key: str = ""
    round_id: str = "bench"
    kind: str = "reservations"  # or "entries" (a lottery round's registrations)
    stream: str | None = None  # the ledger stream it writes, when not its service's round's

    @property
    def ledger_stream(self) -> str | None:
        if self.stream is not None:
            return self.stream
        return self.service.stream if self.service is not None else None

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))

    def median_cpu(self, role: str) -> float | None:
        values = [r.cpu_us[role] for r in self.runs if role in r.cpu_us]
        return statistics.median(values) if values else None


ROLES = ("workers", "writer", "redis", "postgres", "wrk")


@dataclass
class Service:
    """One server under test: its processes (``pids`` -> role -> pids), database and stream."""

    proc: subprocess.Popen[bytes]
    database: str | None = None  # PostgreSQL database name, for its backends
    stream: str | None = None  # the bench round's ledger stream
    writer_of: Service | None = None  # (b): whose writer drains its entries

    def pids(self) -> dict[str, list[int]]:
        named = children(self.proc.pid)
        workers = [p for p, name in named.items() if name.startswith("allot-w")]
        if not named:  # bare, naive: one process, no supervisor
            workers = [self.proc.pid]
        roles = {"workers": workers}
        writers = [p for p, name in named.items() if name == "allot-ledger"]
        if self.writer_of is not None:
            writers = self.writer_of.pids().get("writer", [])
        if writers:
            roles["writer"] = writers
        return roles


def children(pid: int) -> dict[int, str]:
    """pid -> process name of each child (the supervisor names allot-w<N> and allot-ledger)."""
    found = {}
    try:
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return {}
    for child in listed:
        try:
            found[int(child)] = Path(f"/proc/{child}/comm").read_text().strip()
        except OSError:
            continue
    return found


def worker_pid(proc: subprocess.Popen[bytes], within: float = 30) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for pid, name in children(proc.pid).items():
            if name == "allot-w0":
                return pid
        time.sleep(0.1)
    raise RuntimeError("no worker process found")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


class Meter:
    """CPU seconds per role, read before a run and after it."""

    def __init__(
        self, service: Service | None, redis_pid: int | None, pg: asyncpg.Connection
    ) -> None:
        self.service, self.redis_pid, self.pg = service, redis_pid, pg

    async def read(self) -> tuple[dict[str, dict[int, float]], tuple[int, int]]:
        found: dict[str, dict[int, float]] = {}
        if self.service is not None:
            for role, pids in self.service.pids().items():
                found[role] = {p: cpu_seconds(p) for p in pids}
            if self.service.database is not None:
                rows = await self.pg.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.service.database
                )
                found["postgres"] = {r["pid"]: cpu_seconds(r["pid"]) for r in rows}
        if self.redis_pid is not None:  # None: the cluster part reads its nodes itself
            found["redis"] = {self.redis_pid: cpu_seconds(self.redis_pid)}
        return found, machine_ticks()

    @staticmethod
    def spent(
        before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
    ) -> dict[str, float]:
        """role -> CPU seconds between the readings (a process started meanwhile counts in
        full; one that ended meanwhile is lost: none should, in a run)."""
        return {
            role: sum(t - before.get(role, {}).get(pid, 0.0) for pid, t in pids.items())
            for role, pids in after.items()
        }


def _ms(text: str) -> float:
    """wrk's latency units: us, ms, s, m (minutes), h."""
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if found is None:
        raise ValueError(f"unexpected latency {text!r} in wrk's output")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


# X-Forwarded-For: a new client address per request (a real crowd), unless --one-client
FRESH_CLIENTS = {"on": True}


# reserve.lua's citizen n is born 1971-01-01 + n // 1000 days: past this n the birth date is in
# the future and every request an invalid ID (422). Each run takes 300,000 citizens.
CITIZENS = 1000 * (dt.date.today() - dt.date(1971, 1, 1)).days


def load(sc: Scenario, offset: int, duration: float, connections: int) -> Run:
    """One wrk run of a scenario (its server, round, route and site)."""
    return wrk(sc.url, sc.site, offset, duration, connections, round_id=sc.round_id, kind=sc.kind)


def wrk(
    url: str,
    site: str,
    offset: int,
    duration: float,
    connections: int,
    *,
    round_id: str = "bench",
    kind: str = "reservations",
) -> Run:
    """One wrk run POSTing to ``{url}/api/v1/rounds/{round_id}/{kind}`` at ``site``, citizens
    from ``offset``; its own CPU time (rusage of the waited-for child) is ``cpu_us["wrk"]``.
    (scripts/worker_ab.py calls it too.)"""
    if offset + 300_000 > CITIZENS:
        raise ValueError(f"citizens {offset:,}+ would be born in the future: fewer runs")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    xff = "1" if FRESH_CLIENTS["on"] else "0"
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency", "--timeout", "5s",
         "-s", str(ROOT / "bench" / "reserve.lua"), url,
         "--", round_id, site, str(offset), kind, xff],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        run = _parse_wrk(out)
    except (AttributeError, ValueError) as exc:
        raise RuntimeError(f"could not read wrk's output ({exc}):\n{out}") from exc
    spent = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    run.cpu_us["wrk"] = spent * 1e6 / max(run.requests, 1)
    return run


async def measured(
    scenario: Scenario, meter: Meter, redis: Redis, offset: int, args: argparse.Namespace
) -> Run:
    """wrk against the scenario, with every process's CPU, the machine's busy share and the
    ledger backlog (read the moment wrk stops, then drained before the "after" reading)."""
    before, ticks = await meter.read()
    calls0, usec0 = await evalsha_usec(redis)
    run = await asyncio.to_thread(load, scenario, offset, args.duration, args.connections)
    calls1, usec1 = await evalsha_usec(redis)
    if scenario.expect_2xx and calls1 > calls0:  # the claim (or entry) script ran
        answered = max(1, run.requests - run.non2xx)
        run.redis_us_per_claim = (usec1 - usec0) / answered
        run.evalsha_per_claim = (calls1 - calls0) / answered
    stream = scenario.ledger_stream
    if stream is not None:
        stopped = time.monotonic()
        run.backlog = int(await redis.xlen(stream))
        async with asyncio.timeout(120):
            while await redis.xlen(stream):  # noqa: ASYNC110 - polling another process's work
                await asyncio.sleep(0.02)
        run.drain_s = time.monotonic() - stopped if run.backlog else 0.0
    after, ticks_after = await meter.read()
    for role, seconds in Meter.spent(before, after).items():
        run.cpu_us[role] = seconds * 1e6 / max(run.requests, 1)
    busy, total = (a - b for a, b in zip(ticks_after, ticks, strict=True))
    run.busy = busy / max(total, 1)
    return run


def _parse_wrk(out: str) -> Run:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # anchored: "90.99%" on the Latency line must not read as the 99th percentile
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Run(
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        requests=requests,
    )


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # the child keeps its own descriptor of the log; ours is closed at once
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=ROOT)  # fmt: skip
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


async def wait_up(url: str, path: str = "/healthz", within: float = 60) -> None:
    async with aiohttp.ClientSession() as s, asyncio.timeout(within):
        while True:
            try:
                async with s.get(url + path) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


# --programme: the bench round belongs to a programme with a cooldown, so every claim also
# reads and writes the programme's entitlement hash (in the same script call)
PROGRAMME: dict[str, Any] = {}
PROGRAMME_NOTE = (
    " The bench round is in a programme with `cooldown_days = 7` (`--programme`): every claim"
    " also checks and writes the programme's entitlement hash."
)


async def evalsha_usec(redis: Redis) -> tuple[int, int]:
    """(calls, usec) of EVALSHA (and EVAL) so far on this Redis (INFO commandstats)."""
    return script_stats(await redis.info("commandstats"))


LOTTERY = "bench-lottery"  # the entries scenario's round, open now (API.md "Lottery rounds")


async def seed(
    url: str,
    *,
    sold_out_site: bool = True,
    lottery: bool = False,
    rounds: Sequence[str] = ("bench",),
) -> None:
    """Sites s1 and s0, the FCFS round ``bench`` (or each of ``rounds``) with ample stock at s1
    (and, with ``sold_out_site``, none left at s0 in ``bench``); with ``lottery``, the lottery
    round ``bench-lottery`` too, registering now (it is never frozen: it closes in two hours)."""
    admin = {"Authorization": f"Bearer {TOKEN}"}
    now = dt.datetime.now(dt.UTC)
    rnd = {
        **PROGRAMME,
        "title": "bench",
        "opens_at": (now - dt.timedelta(minutes=1)).isoformat(),
        "closes_at": (now + dt.timedelta(hours=2)).isoformat(),
        "per_person": 1,
        "pickup_start": now.isoformat(),
        "pickup_end": (now + dt.timedelta(hours=3)).isoformat(),
    }
    sites = [{"site_id": s, "name": s, "address": "bench", "district": "d"} for s in ("s1", "s0")]
    async with aiohttp.ClientSession(headers=admin) as s:
        stock = {"batch_id": "b", "items": [{"site_id": "s1", "quantity": 10**7},
                                            {"site_id": "s0", "quantity": 1}]}  # fmt: skip
        steps: list[tuple[str, str, dict[str, Any]]] = [
            ("PUT", "/api/v1/admin/sites", {"sites": sites})
        ]
        for round_id in rounds:
            steps.append(("PUT", f"/api/v1/admin/rounds/{round_id}", rnd))
            steps.append(("POST", f"/api/v1/admin/rounds/{round_id}/batches", stock))
        for method, path, body in steps:
            async with s.request(method, url + path, json=body) as r:
                assert r.status in (200, 201), await r.text()
        if lottery:
            body = {
                **rnd,
                "title": "bench lottery",
                "mode": "lottery",
                "public_randomness_source": "drand quicknet, the first round after closing",
            }
            body.pop("programme", None)
            body.pop("cooldown_days", None)
            async with s.put(url + f"/api/v1/admin/rounds/{LOTTERY}", json=body) as r:
                assert r.status in (200, 201), await r.text()
        if sold_out_site:  # the one unit at s0 goes, so s0 is the sold-out herd's site
            body = {"citizen_id": "11010519491231002X", "phone": "13900000000", "site_id": "s0"}
            async with s.post(url + "/api/v1/rounds/bench/reservations", json=body) as r:
                assert r.status in (200, 201), await r.text()


def rss_parts_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a process: its own heap and stacks, and the pages of files it maps
    (the interpreter's and the extension modules' code, shared with every other worker)."""
    status = Path(f"/proc/{pid}/status").read_text()
    anon = int(re.search(r"RssAnon:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    files = int(re.search(r"RssFile:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return anon, files


def rss_kib(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss, hwm


async def full_queue_rss(env: dict[str, str], procs: Processes, tmp: Path) -> dict[str, Any]:
    """Peak RSS of one worker while 10,000 reservations wait in its queue (Redis paused).
    ``env`` names a database of its own: one whose rounds this new Redis lacks would make the
    service refuse them (Redis behind the ledger)."""
    redis_port = free_port()
    redis = procs.start(
        "redis-paused",
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        env,
    )  # fmt: skip
    config = tmp / "full-queue.toml"
    config.write_text(WIDE_OPEN + FULL_QUEUE)
    port, ops_port = free_port(), free_port()
    worker_env = {**env, "ALLOT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                  "ALLOT_CONFIG": str(config), "ALLOT_OPS_PORT": str(ops_port)}  # fmt: skip
    server = procs.start(
        "allot-full-queue",
        [str(BIN / "allot"), "serve", "--port", str(port), "--workers", "1"],
        worker_env,
    )
    url = f"http://127.0.0.1:{port}"
    await wait_up(url, "/readyz")
    await seed(url, sold_out_site=False)
    worker = worker_pid(server)  # the supervisor's one worker
    idle = rss_kib(worker)[0]
    idle_anon, idle_file = rss_parts_kib(worker)
    os.kill(redis.pid, signal.SIGSTOP)
    n = 10_000
    depth = 0.0
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:

            async def one(i: int) -> int:
                body = {"citizen_id": citizen(i), "phone": f"139{i:08d}", "site_id": "s1"}
                async with s.post(url + "/api/v1/rounds/bench/reservations", json=body) as r:
                    return r.status

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            # at most 90 s; short of 99 % the RSS is read anyway, and "queued" says how many
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(90):
                    while depth < n * 0.99:
                        await asyncio.sleep(0.5)
                        async with s.get(f"http://127.0.0.1:{ops_port}/metrics") as r:
                            depth = queue_depth(await r.text())
            held_rss, peak = rss_kib(worker)
            held_anon, held_file = rss_parts_kib(worker)
            os.kill(redis.pid, signal.SIGCONT)
            answers = await asyncio.gather(*tasks, return_exceptions=True)
            statuses = [a if isinstance(a, int) else type(a).__name__ for a in answers]
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    return {
        "sent": n,
        "queued": int(depth),
        "idle_rss_mib": round(idle / 1024, 1),
        "held_rss_mib": round(held_rss / 1024, 1),
        "idle_anon_mib": round(idle_anon / 1024, 1),
        "idle_file_mib": round(idle_file / 1024, 1),
        "held_anon_mib": round(held_anon / 1024, 1),
        "held_file_mib": round(held_file / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "answers": {str(k): statuses.count(k) for k in sorted(set(statuses), key=str)},
    }


def queue_depth(text: str) -> float:
    """``allot_queue_depth`` (summed over its series) from the Prometheus text of /metrics, read
    with prometheus_client's own parser rather than a pattern of our own."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "allot_queue_depth"
        for sample in family.samples
    )


async def main(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    stamp = time.strftime("%Y%m%d%H%M%S")
    prefixes = {k: f"allot-bench-{stamp}-{k}" for k in ("allot", "allot2")}
    base_db = os.environ.get("ALLOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/allot")
    databases = {k: f"allot_bench_{stamp}_{k}" for k in ("allot", "allot2", "full")}
    tmp = Path(tempfile.mkdtemp(prefix="allot-bench-"))
    # The bench's own Redis, without persistence like the system one here (the cost of
    # appendfsync always is its own section): its CPU is then the bench's alone.
    private = PrivateRedis(tmp / "redis")
    await asyncio.to_thread(private.start)
    redis_url = private.url
    config = tmp / "bench.toml"
    config.write_text(WIDE_OPEN)
    env = {
        **os.environ,
        "ALLOT_REDIS_URL": redis_url,
        "ALLOT_DATABASE_URL": with_database(base_db, databases["allot"]),
        "ALLOT_REDIS_PREFIX": prefixes["allot"],
        "ALLOT_ADMIN_TOKEN": TOKEN,
        "ALLOT_ID_PEPPER": "bench-pepper",
        "ALLOT_CONFIG": str(config),
    }
    env2 = {
        **env,
        "ALLOT_DATABASE_URL": with_database(base_db, databases["allot2"]),
        "ALLOT_REDIS_PREFIX": prefixes["allot2"],
    }
    procs = Processes(tmp)
    ports = {k: free_port() for k in ("bare", "naive", "allot", "allot2")}
    redis = Redis.from_url(redis_url)
    pg = await asyncpg.connect(with_database(base_db, "postgres"))
    try:
        full = {**env, "ALLOT_DATABASE_URL": with_database(base_db, databases["full"])}
        for e in (env, env2):
            subprocess.run([str(BIN / "allot"), "migrate"], env=e, check=True, capture_output=True)
        py = str(BIN / "python")
        bare = procs.start("bare", [py, "bench/apps.py", "bare", str(ports["bare"])], env)
        naive = procs.start("naive", [py, "bench/apps.py", "naive", str(ports["naive"])], env)
        allot = [str(BIN / "allot"), "serve", "--port"]
        one = procs.start("allot", [*allot, str(ports["allot"]), "--workers", "1"],
                          {**env, "ALLOT_OPS_PORT": str(free_port())})  # fmt: skip
        two = procs.start("allot2", [*allot, str(ports["allot2"]), "--workers", "2"],
                          {**env2, "ALLOT_OPS_PORT": str(free_port())})  # fmt: skip
        urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
        for url in urls.values():
            await wait_up(url)
        for k in ("allot", "allot2"):
            await wait_up(urls[k], "/readyz")
            await seed(urls[k], lottery=k == "allot")
        # the round's keys are under its programme's tag with --programme (allocator/keys.py)
        tag = Keys.tag_for("bench", PROGRAMME.get("programme"))
        stream = {k: Keys(p).round("bench", tag).ledger for k, p in prefixes.items()}
        lottery_stream = Keys(prefixes["allot"]).round(LOTTERY, Keys.tag_for(LOTTERY, None)).ledger
        c = Service(one, databases["allot"], stream["allot"])
        services = {
            "bare": Service(bare),
            "naive": Service(naive, databases["allot"], stream["allot"], writer_of=c),
            "allot": c,
            "allot2": Service(two, databases["allot2"], stream["allot2"]),
        }

        # (e) right after (c): the same server, the same gate, queue and batching, entries
        # instead of reservations, so e/c is measured side by side, round after round
        scenarios = [
            Scenario("(a) bare aiohttp", urls["bare"], "s1", True, services["bare"], key="a"),
            Scenario("(b) naive EVALSHA", urls["naive"], "s1", True, services["naive"], key="b"),
            Scenario("(c) allot, 1 worker", urls["allot"], "s1", True, services["allot"], key="c"),
            Scenario("(e) allot entries", urls["allot"], "s1", True, services["allot"], key="e",
                     round_id=LOTTERY, kind="entries", stream=lottery_stream),
            Scenario("(d) sold-out herd", urls["allot"], "s0", False, services["allot"], key="d"),
            Scenario("(c2) allot, 2 workers", urls["allot2"], "s1", True, services["allot2"],
                     key="c2"),
        ]  # fmt: skip
        offset = 0
        for sc in scenarios:  # warm-up: imports, connections, JIT-free but caches and pools
            load(sc, offset, 2, args.connections)
            offset += 300_000
        assert private.pid is not None
        for r in range(args.rounds):
            for sc in scenarios:
                meter = Meter(sc.service, private.pid, pg)
                run = await measured(sc, meter, redis, offset, args)
                offset += 300_000
                sc.runs.append(run)
                cpu = "  ".join(f"{k} {v:.0f}" for k, v in run.cpu_us.items())
                backlog = (
                    ""
                    if run.backlog is None
                    else (f"  backlog {run.backlog} drained in {run.drain_s:.2f} s")
                )
                redis_part = (
                    f"  Redis {run.redis_us_per_claim:.1f} µs/2xx in EVALSHA"
                    f" ({run.evalsha_per_claim:.3f} EVALSHA/2xx)"
                    if run.redis_us_per_claim is not None and run.evalsha_per_claim is not None
                    else ""
                )
                print(f"round {r + 1} {sc.name:24} {run.rps:9.0f} req/s  p50 {run.p50_ms:6.2f} ms"
                      f"  p99 {run.p99_ms:6.2f} ms  non-2xx {run.non2xx}"
                      f"  socket errors {run.socket_errors}  CPU µs/req: {cpu}"
                      f"  busy {run.busy:.0%}{backlog}{redis_part}", flush=True)  # fmt: skip
        sweep = await connection_sweep(scenarios, private.pid, pg, redis, offset, args)
        memory = await full_queue_rss(full, procs, tmp)
    finally:
        procs.stop_all()
        await redis.aclose()
        await asyncio.to_thread(private.close)
        for name in databases.values():
            await pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await pg.close()
        shutil.rmtree(tmp, ignore_errors=True)

    report = render(scenarios, memory, args, sweep)
    print(report)
    write_section(Path(args.out), MAIN, report)
    return 0


SWEPT = ("a", "c", "e")  # the scenarios measured again at the other connection counts


async def connection_sweep(
    scenarios: list[Scenario],
    redis_pid: int,
    pg: asyncpg.Connection,
    redis: Redis,
    offset: int,
    args: argparse.Namespace,
) -> dict[int, dict[str, list[Run]]]:
    """(a), (c) and (e) again at each of ``--sweep``'s connection counts, alternating, the same
    rounds and duration: connections -> scenario key -> runs."""
    counts = [int(x) for x in args.sweep.split(",") if x.strip()]
    chosen = [sc for sc in scenarios if sc.key in SWEPT]
    found: dict[int, dict[str, list[Run]]] = {}
    for connections in counts:
        if connections == args.connections:
            continue
        at = argparse.Namespace(**{**vars(args), "connections": connections})
        found[connections] = {sc.key: [] for sc in chosen}
        for sc in chosen:  # warm-up at this count
            load(sc, offset, 2, connections)
            offset += 300_000
        for r in range(args.rounds):
            for sc in chosen:
                run = await measured(sc, Meter(sc.service, redis_pid, pg), redis, offset, at)
                offset += 300_000
                found[connections][sc.key].append(run)
                print(f"{connections} connections, round {r + 1} {sc.name:24} {run.rps:9.0f}"
                      f" req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms"
                      f"  non-2xx {run.non2xx}  socket errors {run.socket_errors}",
                      flush=True)  # fmt: skip
    return found


def _sweep_table(
    scenarios: list[Scenario], sweep: dict[int, dict[str, list[Run]]], connections: int
) -> str:
    """One row per connection count: req/s of (a), (c), (e), c/a, e/c and (c)'s p99."""
    table = {connections: {sc.key: sc.runs for sc in scenarios if sc.key in SWEPT}, **sweep}

    def med(runs: list[Run], attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in runs))

    rows = []
    for count in sorted(table):
        runs = table[count]
        a, c, e = (med(runs[k], "rps") for k in SWEPT)
        errors = sum(r.non2xx + r.socket_errors for k in ("c", "e") for r in runs[k])
        rows.append(
            f"| {count:,}{' (main)' if count == connections else ''} | {a:,.0f} | {c:,.0f}"
            f" | {e:,.0f} | {c / a:.2f} | {e / c:.2f} | {med(runs['c'], 'p99_ms'):.1f}"
            f" | {med(runs['e'], 'p99_ms'):.1f} | {errors} |"
        )
    return "\n".join(rows)


def _cpu_and_backlog(scenarios: list[Scenario]) -> tuple[str, str, float]:
    """The per-process CPU table's rows, the backlog table's rows, and the worst backlog in
    seconds of traffic."""

    def us(value: float | None) -> str:
        return "–" if value is None else f"{value:.0f}"

    cpu_rows = []
    for sc in scenarios:
        values = [sc.median_cpu(role) for role in ROLES]
        total = statistics.median(sum(r.cpu_us.values()) for r in sc.runs)
        cpu_rows.append(
            f"| {sc.name} | {' | '.join(us(v) for v in values)} | {total:.0f}"
            f" | {sc.median('busy'):.0%} |"
        )
    backlog_rows, worst = [], 0.0
    for sc in scenarios:
        runs = [r for r in sc.runs if r.backlog is not None]
        if not runs:
            continue
        backlogs = [r.backlog or 0 for r in runs]
        seconds = [(r.backlog or 0) / max(r.rps, 1) for r in runs]
        drains = [r.drain_s or 0.0 for r in runs]
        worst = max(worst, *seconds)
        backlog_rows.append(
            f"| {sc.name} | {statistics.median(backlogs):,.0f} (max {max(backlogs):,})"
            f" | {statistics.median(seconds):.2f} (max {max(seconds):.2f})"
            f" | {statistics.median(drains):.2f} (max {max(drains):.2f}) |"
        )
    return "\n".join(cpu_rows), "\n".join(backlog_rows), worst


def render(
    scenarios: list[Scenario],
    memory: dict[str, Any],
    args: argparse.Namespace,
    sweep: dict[int, dict[str, list[Run]]],
) -> str:
    by = {s.key: s for s in scenarios}
    a, b, c, d, c2, e = (by[k] for k in ("a", "b", "c", "d", "c2", "e"))
    rps = {s.name: s.median("rps") for s in scenarios}
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def redis_us(s: Scenario) -> str:
        values = [r.redis_us_per_claim for r in s.runs if r.redis_us_per_claim is not None]
        return f"{statistics.median(values):.1f}" if values else ""

    rows = "\n".join(
        f"| {s.name} | {s.median('rps'):,.0f} | {s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f}"
        f" | {redis_us(s)} | {sum(r.non2xx for r in s.runs)}"
        f" | {sum(r.socket_errors for r in s.runs)}"
        f" | {' / '.join(f'{r.rps:,.0f}' for r in s.runs)} |"
        for s in scenarios
    )

    def ratio(x: Scenario, y: Scenario) -> float:
        return rps[x.name] / rps[y.name]

    peak_mb = memory["peak_rss_mib"] * 1.048576
    full = memory["queued"] >= 0.99 * memory["sent"]
    confirmed = (
        "the depth read from `allot_queue_depth` on the operations port"
        if full
        else f"NOT a full queue: only {memory['queued']:,} were in the admission queue\n"
        "(`allot_queue_depth` on the operations port) when the RSS was read, so this is not the\n"
        "figure the target is about"
    )
    memory_verdict = (
        ("met" if peak_mb < 200 else "NOT met") if full else "not measured: the queue was not full"
    )
    targets = [
        ("c/a", ratio(c, a), 0.6),
        ("c/b", ratio(c, b), 2.5),
        ("d/a", ratio(d, a), 0.8),
        ("e/c", ratio(e, c), 0.9),
    ]
    # e/c round by round: (c) and (e) ran one after the other in every round
    per_round = " / ".join(
        f"{re_.rps / rc.rps:.2f}" for rc, re_ in zip(c.runs, e.runs, strict=True) if rc.rps
    )
    verdicts = "\n".join(
        f"- {name} = {value:.2f}: target ≥ {goal}, {'met' if value >= goal else 'NOT met'}."
        for name, value, goal in targets
    )
    cpu_rows, backlog_rows, worst = _cpu_and_backlog(scenarios)
    e_us, c_us = e.median_cpu("workers") or 0.0, c.median_cpu("workers") or 0.0
    worker_bound = c_us / e_us if e_us else 0.0
    backlog_verdict = (
        f"- ledger backlog when wrk stopped ≤ {worst:.2f} s of traffic: target < 1 s,"
        f" {'met' if worst < 1 else 'NOT met'}."
    )
    command = (
        f"python bench/run.py --duration {args.duration:g} --rounds {args.rounds}"
        f" --connections {args.connections} --sweep {args.sweep or chr(39) * 2}"
        + (" --one-client" if not FRESH_CLIENTS["on"] else "")
        + (" --programme" if PROGRAMME else "")
    )
    clients = (
        "each from a new client address (`X-Forwarded-For`)"
        if FRESH_CLIENTS["on"]
        else "all from one client address (`--one-client`)"
    )
    return f"""## The front door: allot against a bare handler and the naive design

Measured by `make bench`, that is

    {command}

on {dt.date.today()}, on this project's machine: {os.cpu_count()} cores ({cpu}),
{platform.python_implementation()} {platform.python_version()}, Redis and PostgreSQL local. The
load generator is wrk (1 thread, {args.connections} keep-alive connections, a new valid citizen
in every request, {clients}), sharing the 2 cores with the server and Redis. Scenarios run side
by side and alternating, {args.rounds} rounds of {args.duration} s each after a warm-up; figures
are medians over the rounds. The machine is shared and noisy: read the ratios, not the
absolute numbers.

| scenario | req/s | p50 ms | p99 ms | Redis µs/2xx | non-2xx | socket errors | req/s per round |
|---|---:|---:|---:|---:|---:|---:|---|
{rows}

"Redis µs/2xx" is the time Redis spent in EVALSHA during the run (`INFO commandstats`,
before and after) divided by the 2xx answers: the claim script's cost per reservation, gate
included.{PROGRAMME_NOTE if PROGRAMME else ""}

| ratio | measured | target |
|---|---:|---:|
| c/a (allot vs bare aiohttp) | {ratio(c, a):.2f} | ≥ 0.6 |
| c/b (allot vs naive EVALSHA per request) | {ratio(c, b):.2f} | ≥ 2.5 |
| d/a (sold-out herd vs bare aiohttp) | {ratio(d, a):.2f} | ≥ 0.8 |
| e/c (lottery entries vs reservations, same server) | {ratio(e, c):.2f} | ≥ 0.9 |
| c2/c (2 workers vs 1) | {ratio(c2, c):.2f} | |

(d) answers 409 `sold-out` by design; (a), (b), (c), (e) and (c2) should have no non-2xx answer.
(e) registers lottery entries (`POST /api/v1/rounds/bench-lottery/entries`, a new citizen per
request, a round registering now) on the same server as (c), run right after it in every round:
through the same gate, admission queue and batched script call, plus the entry's receipt and
its Ed25519 signature. e/c round by round: {per_round}. Issue 10 asks for registration within
10 % of reservations (e/c ≥ 0.9). The worker spends {e_us:.0f} µs of CPU per entry and {c_us:.0f} µs
per reservation (table below): with the worker CPU-bound, that alone puts e/c near
{worker_bound:.2f}, a steadier figure than req/s on this shared machine.

### Other connection counts

(a), (c) and (e) again at {", ".join(f"{n:,}" for n in sweep) or "no other count"} connections
(`--sweep`), alternating, {args.rounds} rounds of {args.duration} s each after a warm-up; medians.
"errors" counts non-2xx answers and socket errors of (c) and (e).

| connections | (a) req/s | (c) req/s | (e) req/s | c/a | e/c | (c) p99 ms | (e) p99 ms | errors |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{_sweep_table(scenarios, sweep, args.connections)}

### CPU per request, process by process

CPU time (utime + stime from `/proc/<pid>/stat`, before and after each run) divided by the
requests wrk made, in µs, medians over the rounds. "workers" is the one server process of (a)
and (b), the worker processes of allot; "writer" is allot's ledger writer process (in (b) the one
of (c), which drains (b)'s entries too); Redis is the bench's own redis-server; PostgreSQL is
every backend connected to the scenario's database (the shared WAL writer and checkpointer
are not counted); wrk is its own rusage. "busy" is the share of both cores in use during the
run, whoever used them. The reading after a run is taken once the ledger has drained.

| scenario | workers | writer | Redis | PostgreSQL | wrk | all | busy |
|---|---:|---:|---:|---:|---:|---:|---:|
{cpu_rows}

### The ledger backlog when the load stops

Entries still in the round's stream (not yet committed to PostgreSQL; what `allot_ledger_lag`
counts) the moment wrk stopped, that backlog in seconds of the run's own traffic, and how long
the writer then took to empty the stream; medians (and the largest) over the rounds.

| scenario | backlog (entries) | seconds of traffic | drained in (s) |
|---|---:|---:|---:|
{backlog_rows}

### Memory: one worker holding a full queue

{memory["queued"]:,} reservations waiting in one worker's admission queue (Redis paused on
purpose, `max_depth = 10000`, {memory["sent"]:,} sent; {confirmed}):
RSS {memory["idle_rss_mib"]} MiB idle, {memory["held_rss_mib"]} MiB holding the queue, peak
(VmHWM) {memory["peak_rss_mib"]} MiB = {peak_mb:.0f} MB (target < 200 MB: {memory_verdict}).
Of the RSS, the worker's own memory (RssAnon) was
{memory["idle_anon_mib"]} MiB idle and {memory["held_anon_mib"]} MiB holding the queue; the rest
({memory["idle_file_mib"]} and {memory["held_file_mib"]} MiB, RssFile) is the pages of the
interpreter and extension modules it maps, shared with every other worker. Once Redis was
resumed the answers were: {memory["answers"]}.

### Targets

{verdicts}
{backlog_verdict}
- a worker holding 10,000 queued requests: peak {peak_mb:.0f} MB, target < 200 MB,
  {memory_verdict}.

Where the time goes (cProfile of one worker in scenario (c)): about half of a request's CPU is
aiohttp's own (parsing, routing, writing), the same work the bare handler does; the rest is
allot's: reading and checking the JSON body and the citizen ID (check character, birth date),
three HMACs, queueing, building the batched script call and reading its reply, the response
body and two metrics. The ledger writer drains the stream in a process of its own (the
"writer" column above), off the worker's loop. Redis runs the gate and the claim for every
item. On 2 cores shared with wrk and Redis one worker is CPU-bound, which is also why a second
worker adds little here (c2/c).

What a waiting request holds (`python bench/queue_memory.py`: tracemalloc in one worker, the
growth from idle to 10,000 queued requests, one connection each; on this tree, with the
reservation route beneath the web layer): 13.4 KB of Python objects per request, about what the
RSS grows by, so nearly all of it is Python's. aiohttp holds 8.7 KB: web_protocol.py 7.2 KB
(the parsed request from `HttpRequestParser.feed_data`, its message, headers, URL and strings,
2.9 KB in 45 objects; per connection the parser, the keep-alive timer, the task that runs the
connection and a second task per request, two empty `deque`s of 760 B each), streams.py 1.0 KB
(the body's stream, a third 760 B `deque`), the request object and web_app 0.5 KB.
service/http.py's guarded protocol and what the event loop allocates for its transport and
tasks: 1.8 KB; service/app.py's hot route 0.9 KB; allot's ticket, future, hashes, validation and
handler: 1.3 KB (admission.py 0.5, identity.py 0.3, validation.py 0.2, views.py 0.2).
"""


# -- the cost of durability --------------------------------------------------------------------

PERSISTENCE = (
    ("always", "`appendonly yes`, `appendfsync always`", True, "always"),
    ("everysec", "`appendonly yes`, `appendfsync everysec`", True, "everysec"),
    ("none", "no persistence (`appendonly no`)", False, "always"),
)
MAIN = "main"
PERSISTENCE_SECTION = "redis-persistence"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench: {name} -->", f"<!-- /bench: {name} -->"


def write_section(out: Path, name: str, body: str) -> None:
    """Write ``body`` as the section ``name`` of the report file ``out`` (made if missing)."""
    text = out.read_text() if out.exists() else "# Performance\n"
    out.write_text(replace_section(text, name, body))
    print(f"written to {out}")


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` (between its markers) replaced by ``body``; every
    other part of the file is kept as it is. A section not there yet goes first (the main
    one, right under the title) or last."""
    start_mark, end_mark = _markers(name)
    section = f"{start_mark}\n{body.strip()}\n{end_mark}"
    start, end = text.find(start_mark), text.find(end_mark)
    if 0 <= start < end:
        return text[:start] + section + text[end + len(end_mark) :]
    if name == MAIN:
        title, _, rest = text.partition("\n")
        return f"{title}\n\n{section}\n\n{rest.lstrip()}"
    return text.rstrip("\n") + "\n\n" + section + "\n"


def _filesystem(path: Path) -> str:
    out = subprocess.run(
        ["df", "--output=source,fstype", str(path)],
        capture_output=True, text=True, check=False,
    ).stdout.split("\n")  # fmt: skip
    return " ".join(out[1].split()) if len(out) > 1 and out[1].strip() else "unknown"


async def persistence(args: argparse.Namespace) -> int:
    """The same claim load against Redis with appendfsync always, everysec and none."""
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    counts = [int(c) for c in args.persistence_connections.split(",")]
    stamp = time.strftime("%Y%m%d%H%M%S")
    base_db = os.environ.get("ALLOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/allot")
    tmp = Path(tempfile.mkdtemp(prefix="allot-bench-"))
    config = tmp / "bench.toml"
    config.write_text(WIDE_OPEN)
    procs = Processes(tmp)
    servers: dict[str, PrivateRedis] = {}
    databases = {kind: f"allot_bench_{stamp}_{kind}" for kind, *_ in PERSISTENCE}
    urls: dict[str, str] = {}
    tables: dict[int, list[Scenario]] = {}
    try:
        for kind, _, appendonly, fsync in PERSISTENCE:
            server = PrivateRedis(tmp / f"redis-{kind}", appendonly=appendonly, appendfsync=fsync)
            await asyncio.to_thread(server.start)
            servers[kind] = server
            env = {
                **os.environ,
                "ALLOT_REDIS_URL": server.url,
                "ALLOT_DATABASE_URL": with_database(base_db, databases[kind]),
                "ALLOT_REDIS_PREFIX": "allot-bench",
                "ALLOT_ADMIN_TOKEN": TOKEN,
                "ALLOT_ID_PEPPER": "bench-pepper",
                "ALLOT_CONFIG": str(config),
            }
            subprocess.run([str(BIN / "allot"), "migrate"], env=env, check=True,
                           capture_output=True)  # fmt: skip
            port = free_port()
            procs.start(f"allot-{kind}",
                        [str(BIN / "allot"), "serve", "--port", str(port), "--workers", "1"],
                        env)  # fmt: skip
            urls[kind] = f"http://127.0.0.1:{port}"
            await wait_up(urls[kind], "/readyz")
            await seed(urls[kind], sold_out_site=False)
        where = _filesystem(tmp)
        fsyncs: list[float] = []
        offset = 0
        for connections in counts:
            table = tables[connections] = [Scenario(k, urls[k], "s1", True) for k in urls]
            for sc in table:  # warm-up
                load(sc, offset, 2, connections)
                offset += 300_000
            for r in range(args.rounds):
                fsyncs.append(_fsync_ms(tmp))  # the disk's own pace, which others share
                for sc in table:
                    run = load(sc, offset, args.duration, connections)
                    offset += 300_000
                    sc.runs.append(run)
                    print(f"{connections} connections, round {r + 1} {sc.name:9}"
                          f" {run.rps:9.0f} req/s  p50 {run.p50_ms:6.2f} ms"
                          f"  p99 {run.p99_ms:6.2f} ms  non-2xx {run.non2xx}",
                          flush=True)  # fmt: skip
    finally:
        procs.stop_all()
        for server in servers.values():
            await asyncio.to_thread(server.close)
        con = await asyncpg.connect(with_database(base_db, "postgres"))
        for name in databases.values():
            await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await con.close()
        shutil.rmtree(tmp, ignore_errors=True)

    section = render_persistence(tables, where, fsyncs, args)
    print(section)
    write_section(Path(args.out), PERSISTENCE_SECTION, section)
    return 0


def _fsync_ms(directory: Path) -> float:
    """The median time of one small write + fdatasync in ``directory`` (what Redis waits for
    before answering with appendfsync always), over 100 tries."""
    path = directory / "fsync-probe"
    times = []
    with path.open("wb") as f:
        for _ in range(100):
            started = time.perf_counter()
            f.write(b"x" * 256)
            f.flush()
            os.fdatasync(f.fileno())
            times.append(time.perf_counter() - started)
    path.unlink()
    return statistics.median(times) * 1000


def render_persistence(
    tables: dict[int, list[Scenario]], where: str, fsyncs: list[float], args: argparse.Namespace
) -> str:
    labels = {kind: label for kind, label, *_ in PERSISTENCE}
    parts = []
    for connections, table in tables.items():
        rps = {sc.name: sc.median("rps") for sc in table}
        rows = "\n".join(
            f"| {labels[sc.name]} | {rps[sc.name]:,.0f} | {rps[sc.name] / rps['none']:.2f}"
            f" | {sc.median('p50_ms'):.2f} | {sc.median('p99_ms'):.2f}"
            f" | {sum(r.non2xx for r in sc.runs)}"
            f" | {' / '.join(f'{r.rps:,.0f}' for r in sc.runs)} |"
            for sc in table
        )
        parts.append(
            f"""{connections} connections:

| Redis | req/s | vs none | p50 ms | p99 ms | non-2xx | req/s per round |
|---|---:|---:|---:|---:|---:|---|
{rows}"""
        )
    tables_text = "\n\n".join(parts)
    return f"""## Redis persistence: what `appendfsync always` costs

Measured by `make bench BENCH_ARGS='--redis-persistence'` (`python bench/run.py
--redis-persistence --duration {args.duration:g} --rounds {args.rounds}
--persistence-connections {args.persistence_connections}`) on {dt.date.today()}: the claim load
of scenario (c) (wrk, a new citizen in every request, `allot serve --workers 1`, ample stock)
against three private Redis servers side by side, alternating, {args.rounds} rounds of
{args.duration:g} s per connection count; medians. Each service has its own ledger database.
The append-only files were on {where}, where one small write + `fdatasync` took
{statistics.median(fsyncs):.2f} ms (median of 100 before each round; from {min(fsyncs):.2f} to
{max(fsyncs):.2f} ms across the rounds).

{tables_text}

With `appendfsync always` Redis writes and fsyncs the AOF before it sends any reply, so nothing
it has answered (a 201, or an entry handed to the ledger writer) can be lost by a crash or a
power loss. allot sends every claim waiting in a worker's queue in one script call, so one fsync
covers a whole batch: the cost is one fsync per batch (and per ledger-writer step), not per
reservation. It shows most when few connections keep the batches small: each round trip then
waits for an fsync. What each setting promises on a power loss is in
[`architecture.md`](architecture.md) (failure modes). The machine is shared and noisy:
differences within the spread of the per-round figures are noise."""


# -- Redis Cluster: one primary, and three with the rounds spread ------------------------------

CLUSTER_SECTION = "cluster"
# a claim batch waits for its replica within the time it has for Redis (allocator/config.py)
CLUSTER_CONFIG = """
[service]
redis_timeout_ms = 2000
[redis]
wait_timeout_ms = 500
"""


@dataclass
class ClusterService:
    """One ``allot serve`` in cluster mode, for one ``wait_replicas`` setting."""

    wait: int
    service: Service
    url: str
    prefix: str
    database: str


async def cluster_main(args: argparse.Namespace) -> int:
    """The cluster part: measure, then rewrite its section of ``--out``."""
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    runs = await cluster_bench(args)
    section = render_cluster(runs, args)
    print(section)
    write_section(Path(args.out), CLUSTER_SECTION, section)
    return 0


async def cluster_bench(args: argparse.Namespace) -> list[ClusterRun]:
    """A private 3+3 cluster; rounds on three different primaries; claims of new citizens to
    one round (one primary) and to all three, with wait_replicas 0 and 1, through two drivers:
    ``claim_many`` straight from this process (loadtest/ceiling.py: Redis alone) and ``allot
    serve`` in cluster mode under wrk (the citizen's path). Every run reads every node's script
    time and CPU; runs alternate, ``--rounds`` times."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    stamp = time.strftime("%Y%m%d%H%M%S")
    base_db = os.environ.get("ALLOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/allot")
    tmp = Path(tempfile.mkdtemp(prefix="allot-bench-cluster-"))
    config = tmp / "cluster.toml"
    config.write_text(WIDE_OPEN + CLUSTER_CONFIG)
    cluster = PrivateCluster(tmp / "cluster")
    procs = Processes(tmp)
    pg = await asyncpg.connect(with_database(base_db, "postgres"))
    services: dict[int, ClusterService] = {}
    meter: ClusterMeter | None = None
    driver: DirectDriver | None = None
    streams: RedisCluster | None = None
    runs: list[ClusterRun] = []
    try:
        await asyncio.to_thread(cluster.start)
        meter = ClusterMeter(cluster)
        rounds = rounds_on_primaries(cluster)
        ports = {r: primary_port(cluster, r) for r in rounds}
        driver = await DirectDriver.open(cluster, base_db, rounds, args.cluster_batch)
        for wait in WAITS:
            prefix, database = f"allot-bench-{stamp}-w{wait}", f"allot_bench_{stamp}_w{wait}"
            env = {
                **os.environ,
                "ALLOT_REDIS_URL": cluster.url,
                "ALLOT_REDIS_MODE": "cluster",
                "ALLOT_REDIS_WAIT_REPLICAS": str(wait),
                "ALLOT_DATABASE_URL": with_database(base_db, database),
                "ALLOT_REDIS_PREFIX": prefix,
                "ALLOT_ADMIN_TOKEN": TOKEN,
                "ALLOT_ID_PEPPER": "bench-pepper",
                "ALLOT_CONFIG": str(config),
                "ALLOT_OPS_PORT": str(free_port()),
            }
            subprocess.run([str(BIN / "allot"), "migrate"], env=env, check=True,
                           capture_output=True)  # fmt: skip
            port = free_port()
            proc = procs.start(f"allot-cluster-w{wait}",
                               [str(BIN / "allot"), "serve", "--port", str(port),
                                "--workers", str(args.cluster_workers)], env)  # fmt: skip
            services[wait] = ClusterService(
                wait, Service(proc, database), f"http://127.0.0.1:{port}", prefix, database
            )
        for svc in services.values():
            await wait_up(svc.url, "/readyz")
            await seed(svc.url, sold_out_site=False, rounds=rounds)
        streams = RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in cluster.nodes]
        )
        offset = 0
        for wait in WAITS:  # warm-up: connections, script caches, the writer's first batches
            _ = await driver.drive(wait, "three", 2)()
            await driver.discard_ledger()
            svc = services[wait]
            load(Scenario("warm-up", svc.url, "s1", True, round_id=",".join(rounds)),
                 offset, 2, args.connections)  # fmt: skip
            offset += 300_000
        for r in range(args.rounds):
            for wait in WAITS:
                for layout in LAYOUTS:
                    run = await direct_runs(cluster, meter, driver, wait, layout, args.duration)
                    runs.append(run)
                    print(f"round {r + 1} {run_line(run)}", flush=True)
                    run = await served_run(
                        meter, services[wait], ports, layout, offset, args, streams, pg, base_db
                    )
                    offset += 300_000
                    runs.append(run)
                    print(f"round {r + 1} {run_line(run)}", flush=True)
    finally:
        procs.stop_all()
        if streams is not None:
            await streams.aclose()
        if driver is not None:
            await driver.aclose()
        if meter is not None:
            await meter.aclose()
        await asyncio.to_thread(cluster.close)
        for svc in services.values():
            await pg.execute(f'DROP DATABASE IF EXISTS "{svc.database}" WITH (FORCE)')
        await pg.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return runs


async def served_run(
    meter: ClusterMeter,
    svc: ClusterService,
    ports: dict[str, int],
    layout: str,
    offset: int,
    args: argparse.Namespace,
    streams: RedisCluster,
    pg: asyncpg.Connection,
    base_db: str,
) -> ClusterRun:
    """One wrk run against ``allot serve`` in cluster mode, every request a new citizen, to the
    layout's rounds in turn. The claims per round are the ledger's rows (counted once the
    rounds' streams are drained), so each primary is charged for the claims it decided."""
    rounds = list(ports)[: LAYOUTS[layout]]
    scenario = Scenario(f"cluster {layout}", svc.url, "s1", True, svc.service,
                        round_id=",".join(rounds))  # fmt: skip
    service_meter = Meter(svc.service, None, pg)
    ledgers = [Keys(svc.prefix).round(r).ledger for r in rounds]
    count = "SELECT round_id, count(*) AS n FROM reservations WHERE round_id = ANY($1) GROUP BY 1"
    con = await asyncpg.connect(with_database(base_db, svc.database))
    wrk_run: Run | None = None

    async def drive() -> tuple[float, dict[str, int], int]:
        nonlocal wrk_run
        before = {row["round_id"]: row["n"] for row in await con.fetch(count, rounds)}
        wrk_run = run = await asyncio.to_thread(
            load, scenario, offset, args.duration, args.connections
        )
        async with asyncio.timeout(120):
            while sum([await streams.xlen(s) for s in ledgers]):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        after = {row["round_id"]: row["n"] for row in await con.fetch(count, rounds)}
        claims = {r: after.get(r, 0) - before.get(r, 0) for r in rounds}
        seconds = run.requests / run.rps if run.rps else args.duration
        return seconds, claims, run.non2xx + run.socket_errors

    try:
        spent_before, _ = await service_meter.read()
        took, claims, refused, nodes = await measured_run(meter, ports, drive)
        spent_after, _ = await service_meter.read()
    finally:
        await con.close()
    workers = Meter.spent(spent_before, spent_after).get("workers", 0.0)
    total = sum(claims.values())
    assert wrk_run is not None
    return ClusterRun(
        "allot serve", svc.wait, layout, took, claims, nodes, refused,
        client_cpu_us=workers * 1e6 / total if total else None,
        extra={"p99_ms": wrk_run.p99_ms},
    )  # fmt: skip


def render_cluster(runs: list[ClusterRun], args: argparse.Namespace) -> str:
    rows, rates = table_rows(runs)
    # what a primary with no round of the run spent anyway (cron, cluster bus, replication pings)
    idle = [c.cpu_s / r.seconds for r in runs if r.layout == "one" for c in r.idle().values()]
    idle_ms = statistics.median(idle) * 1000 if idle else 0.0

    def cpu(driver: str, wait: int, layout: str) -> list[float]:
        """Median Redis CPU µs per claim of each loaded primary, in port order."""
        chosen = [r for r in runs if (r.driver, r.wait, r.layout) == (driver, wait, layout)]
        ports = sorted({p for r in chosen for p in r.loaded()})
        found = [median([r.nodes[p].cpu_us_per_claim() for r in chosen]) for p in ports]
        return [v for v in found if v]

    def one_round(driver: str) -> str:
        return " and ".join(
            f"{v:.1f} µs (~{1e6 / v:,.0f} claims/s) with `wait_replicas = {wait}`"
            for wait in WAITS
            for v in cpu(driver, wait, "one")
        )

    def busy_share(layout: str) -> list[float]:
        """Each loaded primary's median share of a core (`claim_many`, wait_replicas 0)."""
        chosen = [r for r in runs if (r.driver, r.wait, r.layout) == ("claim_many", 0, layout)]
        ports = sorted({p for r in chosen for p in r.loaded()})
        found = [median([r.nodes[p].cpu_s / r.seconds for r in chosen]) for p in ports]
        return [v for v in found if v is not None]

    busy = (busy_share("one") or [0.0])[0]
    shares = busy_share("three") or [0.0]
    spread_busy = f"{min(shares):.0%} to {max(shares):.0%}"
    spread = [v for wait in WAITS for v in cpu("claim_many", wait, "three")]
    three = [sum(1e6 / v for v in cpu("claim_many", wait, "three")) for wait in WAITS]
    per_round = "; ".join(
        f"`{driver}` {wait}: "
        + " / ".join(
            f"{three.rate / one.rate:.2f}"
            for one, three in zip(
                [r for r in runs if (r.driver, r.wait, r.layout) == (driver, wait, "one")],
                [r for r in runs if (r.driver, r.wait, r.layout) == (driver, wait, "three")],
                strict=True,
            )
            if one.rate
        )
        for driver in DRIVERS
        for wait in WAITS
    )
    command = (
        f"python bench/run.py --cluster-only --duration {args.duration:g} --rounds {args.rounds}"
        f" --connections {args.connections} --cluster-batch {args.cluster_batch}"
        f" --cluster-workers {args.cluster_workers}"
    )
    served = rates.get(("allot serve", 0, "one"))
    direct = rates.get(("claim_many", 0, "one"))
    return f"""## Redis Cluster: one primary, and three with the rounds spread

Measured by `make bench` (its cluster part; `--no-cluster` skips it), alone:

    {command}

on {dt.date.today()}, on the same shared 2-core machine: a private Redis Cluster of 3 primaries
and 3 replicas (loadtest/cluster.py, no persistence), three rounds whose slots are on three
different primaries, claims of new citizens (ample stock, open gates) either all to one round
(one primary) or spread over the three in turn. Two drivers, each with `wait_replicas` 0 and 1:
`claim_many` batches of {args.cluster_batch} straight from the bench's own Python process
(loadtest/ceiling.py: no HTTP, three batches in flight in both layouts, so only the spread
differs) and `allot serve --workers {args.cluster_workers}` in cluster mode under wrk
({args.connections} connections, bench/reserve.lua: the citizen's path, with its admission
queue and ledger writer). Runs alternate, {args.rounds} rounds of {args.duration:g} s each
after a warm-up; medians.

Every node is read before and after each run: the process's CPU (utime + stime from
`/proc/<pid>/stat`: scripts, networking, replication, the cluster bus) and its script time
(`INFO commandstats`, EVALSHA + EVAL), each divided by the claims that primary decided (the
claims per round: `claim_many`'s answers, or the ledger's rows once drained). A figure per
loaded primary, in port order. The ceiling is 1,000,000 / CPU µs per claim: the claims per
second one primary core could decide for one round.

{TABLE_HEADER}
{rows}

"vs one round" is the claims/s with three rounds on three primaries over one round on one,
same driver and setting; round by round (driver, `wait_replicas`): {per_round}.
"client CPU" is what the client spent per claim: the bench process for `claim_many`, allot's
worker processes for `allot serve`. "refused": claims not created (`claim_many`) or non-2xx
answers and socket errors (wrk); all should be 0.

With one round (`claim_many`, `wait_replicas = 0`) its one primary used {busy:.0%} of a core;
with three rounds each of the three used {spread_busy}. The 2 cores are shared by the client,
wrk, six Redis nodes and whatever else runs on the machine, so three primaries cannot show
three times the claims/s here, and a loaded primary's script time reads higher than its CPU
when it waits for a core mid-script. The `allot serve` rows also count, on the same primary,
the ledger writer's reads and acknowledgements of the round's stream, and one worker's queue
split over three rounds makes smaller batches (EVALSHA per 1,000 claims).

The figure that carries over to a real cluster, where each primary has a core of its own and
allot nodes are added until Redis is the limit, is the CPU per claim. One round on one
primary (the ceilings: claims per second of one primary core):

- from `claim_many` (Redis alone): {one_round("claim_many")};
- through `allot serve`: {one_round("allot serve")}.

Three rounds on three primaries: {min(spread, default=0):.1f} to {max(spread, default=0):.1f} µs
per claim on each primary (`claim_many`; three busy primaries on 2 cores also share caches
and switch more), so the cluster's ceiling is the sum of its primaries', here
~{three[0]:,.0f} (`wait_replicas = 0`) and ~{three[1]:,.0f} (1) claims/s for three rounds on
three primary cores. A primary with no round in the run spent {idle_ms:.1f} ms of CPU per
second anyway. What this machine's clients reached, one round, `wait_replicas = 0`:
{served or 0:,.0f} claims/s through one `allot serve` worker, {direct or 0:,.0f} through
`claim_many`."""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument(
        "--sweep",
        default="64,1000",
        help="(a), (c), (e) again at these connection counts, comma-separated ('' for none)",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument(
        "--redis-persistence",
        action="store_true",
        help="measure appendfsync always vs everysec vs none instead (its own section)",
    )
    parser.add_argument(
        "--persistence-connections",
        default="64,512",
        help="with --redis-persistence: wrk connection counts to compare at, comma-separated",
    )
    parser.add_argument(
        "--programme",
        action="store_true",
        help="the bench round is in a programme with cooldown_days = 7 (the cooldown check)",
    )
    parser.add_argument(
        "--one-client",
        action="store_true",
        help="no X-Forwarded-For: every request from one client address (as before 2026-12-01)",
    )
    parser.add_argument(
        "--no-cluster", action="store_true", help="skip the cluster part (a private 3+3 cluster)"
    )
    parser.add_argument(
        "--cluster-only",
        action="store_true",
        help="only the cluster part: one round on one primary vs three rounds on three",
    )
    parser.add_argument(
        "--cluster-batch", type=int, default=256, help="cluster part: claims per claim_many call"
    )
    parser.add_argument(
        "--cluster-workers", type=int, default=1, help="cluster part: allot serve --workers"
    )
    parsed = parser.parse_args()
    FRESH_CLIENTS["on"] = not parsed.one_client
    if parsed.programme:
        PROGRAMME.update(programme="bench", cooldown_days=7)
    if parsed.redis_persistence:
        raise SystemExit(asyncio.run(persistence(parsed)))
    if parsed.cluster_only:
        raise SystemExit(asyncio.run(cluster_main(parsed)))
    code = asyncio.run(main(parsed))
    if code == 0 and not parsed.no_cluster:
        code = asyncio.run(cluster_main(parsed))
    raise SystemExit(code)
