"""``allot loadtest``: run the flash crowd, then check that nothing was oversold, lost or given
twice; exit 0 only when every check holds.

Self-hosted (no ``--target``): a fresh PostgreSQL database ``allot_loadtest_<stamp>`` on the
server of ``ALLOT_DATABASE_URL`` (or on a private PostgreSQL with ``--fault restart-postgres``),
a fresh Redis key prefix ``allot-loadtest-<stamp>`` on ``ALLOT_REDIS_URL``, a generated admin
token and pepper, ``allot serve --workers N`` on a free loopback port. Both are removed
afterwards unless ``--keep``. With ``--target`` the gate creates its round on that deployment
through the operator API and reads its ledger only if given ``--database-url``.

The timeline: sites, the round (opening a few seconds ahead, once every device has arrived) and
one batch are loaded; locust starts; every device waits on the round's page and presses at the
opening second; ``--duration`` seconds later locust stops. Meanwhile the round's stats are
sampled every 0.5 s (the stock line of the plot) and the fault, if any, is injected. Afterwards
the gate waits (at most 30 s) for the ledger, runs ``allot reconcile``, and checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from redis.asyncio import Redis
from redis.crc import key_slot

from allocator.config import Settings, load_settings
from allocator.db import with_database
from allocator.keys import Keys
from loadtest import crowd
from loadtest.checks import (
    LIVE,
    Check,
    Facts,
    FaultFacts,
    LedgerFacts,
    Records,
    answered_latencies,
    created_ids,
    demand_units,
    passed,
    read_records,
    run_checks,
)
from loadtest.cluster import PrivateCluster
from loadtest.fairness import report_rows
from loadtest.lottery import LotteryFacts, fcfs_fairness, lottery_fairness, parse_csv
from loadtest.servers import PrivatePostgres, free_port

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SAMPLE_EVERY = 0.5
# After --duration no new citizen arrives; those under way finish (no more 429 retries). Locust
# stops --grace seconds later, cutting only requests still running then: locust's workers report
# their last figures within the half second its master waits on quitting, so a crowd that has
# wound down by then is counted identically by locust and by the gate's own records.
READY_TIMEOUT = 60.0
FREEZE_DEADLINE = 90.0  # seconds after closes_at the gate waits for the freeze (contract: 60)
DRAW_DEADLINE = 120.0  # seconds the gate waits for a draw answered 202 drawing
RANDOMNESS_SOURCE = (
    "allot loadtest: 16 random bytes (hex) the gate draws after the round has frozen"
)
LOCUST_STARTUP = 3.0  # seconds from launching locust to its first user (measured: ~1.5-2.5)
# Every worker lists a new round at most allocator.catalogue.SNAPSHOT_TTL (1 s) after it was
# created (each keeps the list of rounds that long): the crowd starts after that, so readers
# never see a list without it (a lottery round's workers look at their rounds every 2 s, so
# their list is always warm).
LISTED_WITHIN = 1.2
TZ = dt.timezone(dt.timedelta(hours=8))
DISTRICTS = ("徐汇区", "静安区", "浦东新区")


class SetupError(Exception):
    """The gate could not even run the crowd: the service is not ready, or refused the setup."""


@dataclass
class Plan:
    round_id: str
    users: int
    spawn_rate: float
    duration: float
    processes: int
    stock: int
    sites: int
    per_person: int
    bots: int
    timeout: float
    batches: int = 1
    fresh_connections: bool = False
    mode: str = "fcfs"  # or "lottery": a registration window, then freeze, draw and verify
    grace: float = 8.0
    opens_at: float = 0.0
    closes_at: float = 0.0
    run_time: int = 0

    def site_ids(self) -> list[str]:
        return [f"loadtest-{i + 1:02d}" for i in range(self.sites)]

    def batch_units(self) -> list[int]:
        """Units of each batch: the stock in ``batches`` deliveries, the larger ones first."""
        base, extra = divmod(self.stock, self.batches)
        return [base + (1 if i < extra else 0) for i in range(self.batches)]

    def batch_at(self, index: int) -> float:
        """Delivery time of batch ``index``: the first before the opening, the rest spread
        evenly over the duration (0, D/N, 2D/N, ...)."""
        return self.opens_at + index * self.duration / self.batches

    def fault_at(self) -> float:
        """Default fault time, after the opening: just after the delivery nearest the middle of
        the run, when claims are in flight (0.3 s after the opening with one batch)."""
        return self.batch_at(self.batches // 2) - self.opens_at + 0.3

    def batch_items(self, index: int) -> list[dict[str, Any]]:
        base, extra = divmod(self.batch_units()[index], self.sites)
        return [
            {"site_id": s, "quantity": base + (1 if i < extra else 0)}
            for i, s in enumerate(self.site_ids())
            if base + (1 if i < extra else 0) > 0
        ]


@dataclass
class Target:
    url: str
    admin_token: str
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str | None = None
    service: ServiceProcess | None = None
    pg: PrivatePostgres | None = None
    notes: list[str] = field(default_factory=list)
    cluster: PrivateCluster | None = None  # --fault kill-redis-primary: the service's Redis

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


# -- the self-hosted service ------------------------------------------------------------------


class ServiceProcess:
    """``allot serve`` in its own process group, its output in ``service.log``."""

    def __init__(self, env: dict[str, str], port: int, workers: int, log: Path) -> None:
        self.env, self.port, self.workers_wanted, self.log = env, port, workers, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(self.workers_wanted)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter, a fixed argv
                cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def workers(self) -> list[int]:
        """Worker pids: the supervisor's children named allot-w<N> (not its ledger writer,
        allot-ledger, nor multiprocessing's resource tracker)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        pids = []
        for child in children:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().startswith("allot-w"):
                    pids.append(int(child))
        return pids

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # any worker the supervisor left behind


async def _create_database(server_url: str, name: str) -> None:
    con = await asyncpg.connect(with_database(server_url, "postgres"), timeout=10)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()


async def _drop_database(server_url: str, name: str) -> None:
    con = await asyncpg.connect(with_database(server_url, "postgres"), timeout=10)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


async def _delete_keys(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@contextlib.asynccontextmanager
async def self_hosted(
    opts: argparse.Namespace, settings: Settings, out: Path, stamp: str
) -> AsyncIterator[Target]:
    async with contextlib.AsyncExitStack() as stack:
        pg: PrivatePostgres | None = None
        if opts.fault == "restart-postgres":
            pg = PrivatePostgres(out / "postgres")
            stack.callback(pg.close)
            await asyncio.to_thread(pg.start)
            server_url = pg.url_for("postgres")
        else:
            server_url = settings.database_url
        cluster: PrivateCluster | None = None
        redis_url = settings.redis_url
        if opts.fault == "kill-redis-primary":
            cluster = PrivateCluster(out / "redis-cluster")
            stack.callback(cluster.close)
            await asyncio.to_thread(cluster.start)
            redis_url = cluster.url
        name = f"allot_loadtest_{stamp}"
        prefix = f"allot-loadtest-{stamp}"
        try:
            await _create_database(server_url, name)
        except (OSError, asyncpg.PostgresError) as exc:
            raise SetupError(f"cannot create database {name}: {exc}") from exc
        notes = []
        if opts.keep:
            notes.append(f"kept: database {name}, Redis keys {prefix}:* at {settings.redis_url}")
        else:
            stack.push_async_callback(_drop_database, server_url, name)
            if cluster is None:  # a private cluster goes with its keys
                stack.push_async_callback(_delete_keys, settings.redis_url, prefix)
        token = secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "ALLOT_REDIS_URL": redis_url,
            "ALLOT_REDIS_PREFIX": prefix,
            "ALLOT_DATABASE_URL": with_database(server_url, name),
            "ALLOT_ADMIN_TOKEN": token,
            "ALLOT_ID_PEPPER": secrets.token_urlsafe(32),
            "ALLOT_OPS_PORT": str(free_port()),  # its own: another allot may hold 9180
        }
        env.pop("ALLOT_DEV", None)
        if cluster is not None:
            env.update({"ALLOT_REDIS_MODE": "cluster", "ALLOT_REDIS_WAIT_REPLICAS": "1"})
        if opts.config:
            env["ALLOT_CONFIG"] = opts.config  # made absolute by main()
        service = ServiceProcess(env, free_port(), opts.workers, out / "service.log")
        service.start()
        stack.callback(service.stop)
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + READY_TIMEOUT
            while not await _ready(session, service.url):
                if not service.alive() or time.monotonic() > deadline:
                    raise SetupError(
                        f"the service on {service.url} never answered /readyz 200;"
                        f" last lines of {service.log}:\n{_tail(service.log)}"
                    )
                await asyncio.sleep(0.2)
        yield Target(
            url=service.url,
            admin_token=token,
            database_url=env["ALLOT_DATABASE_URL"],
            redis_url=redis_url,
            redis_prefix=prefix,
            service=service,
            pg=pg,
            notes=notes,
            cluster=cluster,
        )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- seeding, sampling, faults ----------------------------------------------------------------


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, TZ).isoformat(timespec="milliseconds")


async def _admin(
    session: aiohttp.ClientSession, target: Target, method: str, path: str, body: Any
) -> tuple[int, Any]:
    async with session.request(method, f"{target.url}{path}", json=body, headers=target.admin) as r:
        text = await r.text()
        try:
            return r.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return r.status, text


async def seed(session: aiohttp.ClientSession, target: Target, plan: Plan, stamp: str) -> None:
    """Sites, a round opening once every device has arrived, and the first batch."""
    sites = [
        {
            "site_id": site_id,
            "name": f"Load-test pharmacy {i + 1}",
            "address": f"{i + 1} Test Road",
            "district": DISTRICTS[i % len(DISTRICTS)],
        }
        for i, site_id in enumerate(plan.site_ids())
    ]
    status, body = await _admin(session, target, "PUT", "/api/v1/admin/sites", {"sites": sites})
    if status != 200:
        raise SetupError(f"PUT /api/v1/admin/sites answered {status}: {body}")
    spawn = plan.users / plan.spawn_rate
    plan.opens_at = math.ceil(
        time.time() + LISTED_WITHIN + LOCUST_STARTUP + plan.processes * 0.3 + spawn + 1
    )
    plan.closes_at = plan.opens_at + plan.duration + 3600
    if plan.mode == "lottery":  # registration closes when locust stops: then freeze and draw
        plan.closes_at = plan.opens_at + math.ceil(plan.duration + plan.grace)
    spec: dict[str, Any] = {
        "title": f"Load test {stamp}",
        "opens_at": _iso(plan.opens_at),
        "closes_at": _iso(plan.closes_at),
        "per_person": plan.per_person,
        "pickup_start": _iso(plan.opens_at),
        "pickup_end": _iso(plan.closes_at + 86400),
    }
    if plan.mode == "lottery":
        spec["mode"] = "lottery"
        spec["public_randomness_source"] = RANDOMNESS_SOURCE
    status, body = await _admin(
        session, target, "PUT", f"/api/v1/admin/rounds/{plan.round_id}", spec
    )
    if status != 201:
        raise SetupError(
            f"PUT round {plan.round_id} answered {status} (201 expected: the round must be new):"
            f" {body}"
        )
    status, body = await load_batch(session, target, plan, stamp, 0)
    if status != 201:
        raise SetupError(f"POST batch answered {status}: {body}")


async def load_batch(
    session: aiohttp.ClientSession, target: Target, plan: Plan, stamp: str, index: int
) -> tuple[int, Any]:
    batch = {"batch_id": f"loadtest-{stamp}-{index + 1}", "items": plan.batch_items(index)}
    path = f"/api/v1/admin/rounds/{plan.round_id}/batches"
    try:
        return await _admin(session, target, "POST", path, batch)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


async def restock(
    session: aiohttp.ClientSession,
    target: Target,
    plan: Plan,
    stamp: str,
    deliveries: list[dict[str, Any]],
) -> None:
    """Later batches, each at its time; an operator retries a refused load for 10 s."""
    for index in range(1, plan.batches):
        await asyncio.sleep(max(0.0, plan.batch_at(index) - time.time()))
        deadline = time.monotonic() + 10
        while True:
            status, body = await load_batch(session, target, plan, stamp, index)
            if status in (200, 201) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        deliveries.append(
            {"t": time.time(), "batch": index + 1, "units": plan.batch_units()[index],
             "status": status, "answer": body if status not in (200, 201) else None}
        )  # fmt: skip


async def stats(session: aiohttp.ClientSession, target: Target, round_id: str) -> dict[str, Any]:
    async with session.get(
        f"{target.url}/api/v1/admin/rounds/{round_id}/stats",
        headers=target.admin,
        timeout=aiohttp.ClientTimeout(total=3),
    ) as r:
        if r.status != 200:
            raise RuntimeError(f"stats answered {r.status}")
        body: dict[str, Any] = orjson.loads(await r.read())
        return body


async def sample(
    session: aiohttp.ClientSession,
    target: Target,
    round_id: str,
    samples: list[dict[str, Any]],
    stop: asyncio.Event,
) -> None:
    """The round's stats every 0.5 s: remaining stock and ledger lag over time."""
    while not stop.is_set():
        t = time.time()
        try:
            s = await stats(session, target, round_id)
            ledger = s.get("ledger") or {}
            samples.append(
                {
                    "t": t,
                    "remaining": s.get("remaining"),
                    "reserved": s.get("reserved"),
                    "reservations": s.get("reservations"),
                    "recorded": ledger.get("recorded"),
                    "lag": ledger.get("lag"),
                }
            )
        except (aiohttp.ClientError, TimeoutError, RuntimeError, orjson.JSONDecodeError) as exc:
            samples.append({"t": t, "error": f"{type(exc).__name__}: {exc}"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)


async def inject(
    kind: str,
    at: float,
    outage: float,
    target: Target,
    session: aiohttp.ClientSession,
    round_id: str = "",
) -> FaultFacts:
    await asyncio.sleep(max(0.0, at - time.time()))
    if kind == "kill-redis-primary":
        return await _kill_redis_primary(target, session, round_id)
    if kind == "kill-worker":
        service = target.service
        assert service is not None
        before = service.workers()
        if not before:
            return FaultFacts(kind, time.time(), None, False, "no worker process found to kill")
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        started = time.time()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = service.workers()
            if len(now) >= len(before) and victim not in now and await _ready(session, target.url):
                new = sorted(set(now) - set(before))
                return FaultFacts(
                    kind,
                    started,
                    time.time(),
                    True,
                    f"worker {victim} killed (-9), replaced by {', '.join(map(str, new))}, ready",
                )
            await asyncio.sleep(0.1)
        return FaultFacts(kind, started, None, False, f"worker {victim} not replaced in 30 s")
    pg = target.pg
    assert pg is not None
    started = time.time()
    await asyncio.to_thread(pg.stop)
    await asyncio.sleep(outage)
    await asyncio.to_thread(pg.start)
    return FaultFacts(kind, started, time.time(), True, "PostgreSQL stopped and started again")


async def _kill_redis_primary(
    target: Target, session: aiohttp.ClientSession, round_id: str
) -> FaultFacts:
    """kill -9 of the primary serving the round's slot; once its replica took over, the killed
    node is started again (it rejoins empty, as the new primary's replica: with
    wait_replicas = 1 the round is served again only then)."""
    cluster = target.cluster
    assert cluster is not None
    slot = key_slot(Keys(target.redis_prefix or "allot").round(round_id).round.encode())
    victim = await asyncio.to_thread(cluster.primary_of_slot, slot)
    heir = await asyncio.to_thread(cluster.replica_of, victim)
    started = time.time()
    await asyncio.to_thread(cluster.kill, victim)
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(cluster.role, heir) != "master":
        if time.monotonic() > deadline:
            return FaultFacts("kill-redis-primary", started, None, False, "no failover in 30 s")
        await asyncio.sleep(0.1)
    promoted = time.time() - started
    await asyncio.to_thread(cluster.revive, victim)
    while not await _ready(session, target.url):
        if time.monotonic() > deadline:
            return FaultFacts(
                "kill-redis-primary", started, None, False, "not ready 30 s after the kill"
            )
        await asyncio.sleep(0.1)
    ended = time.time()
    return FaultFacts(
        "kill-redis-primary",
        started,
        ended,
        True,
        f"primary {victim.address} killed (-9); replica {heir.address} promoted after"
        f" {promoted:.1f} s; ready after {ended - started:.1f} s",
    )


# -- locust -----------------------------------------------------------------------------------


async def run_locust(plan: Plan, target: Target, out: Path, p99_budget_ms: float) -> int:
    cmd = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "--host", target.url,
        "--users", str(plan.users),
        "--spawn-rate", str(plan.spawn_rate),
        "--run-time", f"{plan.run_time}s",
        "--stop-timeout", "0",
        "--csv", str(out / "locust"),
        "--csv-full-history",
        "--html", str(out / "report.html"),
        "--only-summary",
        "--loglevel", "WARNING",
    ]  # fmt: skip
    if plan.processes > 1:  # one process: locust's local runner, no master to feed
        # a free port for master and workers: the default 5557 may be held by another crowd
        master = str(free_port())
        cmd += ["--processes", str(plan.processes)]
        cmd += ["--master-bind-port", master, "--master-port", master]
    env = {
        **os.environ,
        crowd.ENV_ROUND: plan.round_id,
        crowd.ENV_OUT: str(out / "raw"),
        crowd.ENV_PER_PERSON: str(plan.per_person),
        crowd.ENV_OPENS_AT: str(plan.opens_at),
        crowd.ENV_CLOSES_AT: str(plan.closes_at),
        crowd.ENV_ENDS_AT: str(plan.opens_at + plan.duration),
        crowd.ENV_BOTS: str(plan.bots),
        crowd.ENV_TIMEOUT: str(plan.timeout),
        crowd.ENV_P99_MS: str(p99_budget_ms),
        crowd.ENV_FRESH_CONNECTIONS: "1" if plan.fresh_connections else "",
        crowd.ENV_MODE: plan.mode,
    }
    with (out / "locust.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        try:
            return await asyncio.wait_for(proc.wait(), plan.run_time + 60)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return -9
        except BaseException:  # interrupted (Ctrl-C): the crowd must not outlive the gate
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise


def read_locust_csv(out: Path) -> tuple[list[dict[str, str]], int]:
    """Rows of locust_stats.csv (the last is "Aggregated") and the count of crowd errors."""
    stats_path = out / "locust_stats.csv"
    rows: list[dict[str, str]] = []
    if stats_path.exists():
        with stats_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    exceptions = 0
    exc_path = out / "locust_exceptions.csv"
    if exc_path.exists():
        with exc_path.open(newline="") as f:
            exceptions = sum(int(r.get("Count") or 0) for r in csv.DictReader(f))
    return rows, exceptions


# -- after the run ----------------------------------------------------------------------------


async def read_ledger(
    database_url: str,
    round_id: str,
    want: set[str],
    session: aiohttp.ClientSession,
    target: Target,
    deadline: float,
) -> LedgerFacts:
    """Wait (at most ``deadline`` s) until every 201 is in the ledger and no entry waits."""
    started = time.monotonic()
    con: asyncpg.Connection | None = None
    rows: list[asyncpg.Record] = []
    while True:
        try:
            if con is None:
                con = await asyncpg.connect(database_url, timeout=5)
            rows = await con.fetch(
                "SELECT reservation_id, status, quantity, citizen_hash,"
                " extract(epoch FROM created_at)::float8 AS created,"
                " extract(epoch FROM recorded_at)::float8 AS recorded"
                " FROM reservations WHERE round_id = $1",
                round_id,
            )
            ids = {r["reservation_id"] for r in rows}
            lag = None
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, RuntimeError):
                lag = ((await stats(session, target, round_id)).get("ledger") or {}).get("lag")
            if want <= ids and lag in (0, None):
                break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if con is not None:
                with contextlib.suppress(Exception):
                    await con.close()
            con = None
        if time.monotonic() - started > deadline:
            break
        await asyncio.sleep(0.5)
    if con is not None:
        await con.close()
    live = [r for r in rows if r["status"] in LIVE]
    per_citizen = Counter(r["citizen_hash"] for r in live)
    return LedgerFacts(
        rows={r["reservation_id"]: (r["created"], r["recorded"]) for r in rows},
        live_units=sum(int(r["quantity"]) for r in live),
        live_reservations=len(live),
        doubles=sum(1 for n in per_citizen.values() if n > 1),
        waited=round(time.monotonic() - started, 1),
    )


async def reconcile(target: Target, round_id: str, out: Path) -> tuple[int | None, str]:
    if not (target.database_url and target.redis_url):
        return None, "not applicable: needs the target's --redis-url and --database-url"
    env = {
        **os.environ,
        "ALLOT_REDIS_URL": target.redis_url,
        "ALLOT_REDIS_PREFIX": target.redis_prefix or "allot",
        "ALLOT_DATABASE_URL": target.database_url,
        **({"ALLOT_REDIS_MODE": "cluster"} if target.cluster is not None else {}),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "reconcile", "--round", round_id, "--wait", "30",
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await proc.communicate()
    (out / "reconcile.json").write_bytes(stdout)
    rc = proc.returncode if proc.returncode is not None else -1
    note = ""
    if rc != 0:
        try:
            report = orjson.loads(stdout)
            problems = [p for r in report["rounds"] for p in r["problems"]]
            problems += [p for r in report["rounds"] for s in r["sites"] for p in s["problems"]]
            note = "; ".join(problems[:3]) or "see reconcile.json"
        except (orjson.JSONDecodeError, KeyError, TypeError):
            lines = stderr.decode(errors="replace").strip().splitlines()
            note = lines[-1] if lines else "see reconcile.json"
    return rc, note


# -- the lottery: freeze, draw, files, verify-draw --------------------------------------------


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, await r.read()


async def _draw_record(
    session: aiohttp.ClientSession, target: Target, round_id: str
) -> dict[str, Any] | None:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        status, data = await _get(session, f"{target.url}/api/v1/rounds/{round_id}/draw")
        if status == 200:
            record = orjson.loads(data)
            if isinstance(record, dict):
                return record
    return None


def _epoch(text: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


async def run_draw(
    session: aiohttp.ClientSession, target: Target, plan: Plan, out: Path
) -> LotteryFacts:
    """Wait for the freeze, draw with a fresh public value, fetch the files, run verify-draw."""
    facts = LotteryFacts(round_id=plan.round_id, per_person=plan.per_person)
    record: dict[str, Any] | None = None
    deadline = plan.closes_at + FREEZE_DEADLINE
    while time.time() < deadline:
        record = await _draw_record(session, target, plan.round_id)
        if record is not None and record.get("status") in ("frozen", "drawing", "drawn"):
            break
        await asyncio.sleep(0.25)
    else:
        status = record.get("status") if record else "unreadable"
        facts.problem = (
            f"not frozen {FREEZE_DEADLINE:.0f} s after closes_at (draw record status {status})"
        )
        return facts
    assert record is not None
    frozen_at = _epoch(record.get("frozen_at"))
    facts.freeze_after_close = None if frozen_at is None else frozen_at - plan.closes_at
    value = secrets.token_hex(16)  # the public randomness: unknown to anyone before the freeze
    asked = time.monotonic()
    try:
        status, body = await _admin(
            session,
            target,
            "POST",
            f"/api/v1/admin/rounds/{plan.round_id}/draw",
            {"public_randomness": value},
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        facts.problem = f"POST draw failed: {type(exc).__name__}: {exc}"
        return facts
    if status not in (200, 202) or not isinstance(body, dict):
        facts.problem = f"POST draw answered {status}: {str(body)[:200]}"
        return facts
    record = body
    while record.get("status") != "drawn" and time.monotonic() - asked < DRAW_DEADLINE:
        await asyncio.sleep(0.25)
        record = await _draw_record(session, target, plan.round_id) or record
    facts.draw_took = time.monotonic() - asked
    facts.record = record
    if record.get("status") != "drawn":
        facts.problem = f"not drawn {DRAW_DEADLINE:.0f} s after the draw was asked for"
        return facts
    root = f"{target.url}/api/v1/rounds/{plan.round_id}/draw"
    (out / "draw").mkdir(exist_ok=True)
    for name in ("entries.csv", "stock.csv", "results.csv"):
        try:
            status, data = await _get(session, f"{root}/{name}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, data = 0, str(exc).encode()
        if status != 200:
            facts.problem = f"GET draw/{name} answered {status}"
            return facts
        (out / "draw" / name).write_bytes(data)
        rows = parse_csv(data)
        if name == "entries.csv":
            facts.entries = rows
        elif name == "stock.csv":
            facts.stock = rows
        else:
            facts.results = rows
    _write_json(out / "draw" / "draw.json", record)
    facts.verify_rc, facts.verify_note = await verify_draw(target, plan.round_id, out)
    return facts


async def verify_draw(target: Target, round_id: str, out: Path) -> tuple[int | None, str]:
    """``allot verify-draw --url``, as a journalist would run it (its output: verify-draw.txt)."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "verify-draw",
        "--url", target.url, "--round", round_id, "--save", str(out / "draw" / "verified"),
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, "allot verify-draw did not finish within 120 s"
    (out / "verify-draw.txt").write_bytes(stdout)
    lines = stdout.decode(errors="replace").strip().splitlines()
    rc = proc.returncode if proc.returncode is not None else -1
    return rc, "" if rc == 0 else (lines[-1] if lines else "no output")


async def ledger_entry_doubles(database_url: str, round_id: str) -> int | None:
    """Citizen hashes with more than one entry row in the round (None: not readable)."""
    try:
        con = await asyncpg.connect(database_url, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return None
    try:
        value = await con.fetchval(
            "SELECT count(*) FROM (SELECT citizen_hash FROM entries WHERE round_id = $1"
            " GROUP BY citizen_hash HAVING count(*) > 1) AS d",
            round_id,
        )
        return int(value)
    except asyncpg.PostgresError:
        return None
    finally:
        await con.close()


async def fairness_report(
    session: aiohttp.ClientSession, target: Target, round_id: str
) -> dict[str, Any]:
    """The service's own fairness report of the round, with rates and the 4/5 marks."""
    try:
        status, body = await _admin(
            session, target, "GET", f"/api/v1/admin/rounds/{round_id}/fairness", None
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "rows": []}
    if status != 200 or not isinstance(body, dict):
        return {"error": f"GET fairness answered {status}", "rows": []}
    return {"error": None, "rows": report_rows(body)}


# -- the whole run ----------------------------------------------------------------------------


def _stamp() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%d_%H%M%S}_{secrets.token_hex(2)}"


def make_plan(opts: argparse.Namespace, stamp: str) -> Plan:
    processes = opts.processes or max(1, min(os.cpu_count() or 1, math.ceil(opts.users / 1000)))
    return Plan(
        round_id=opts.round or f"loadtest-{stamp.replace('_', '-')}",
        users=opts.users,
        spawn_rate=opts.spawn_rate,
        duration=opts.duration,
        processes=processes,
        stock=opts.stock,
        sites=opts.sites,
        per_person=opts.per_person,
        bots=opts.bots,
        timeout=opts.timeout,
        batches=opts.batches,
        fresh_connections=opts.fresh_connections,
        mode=opts.mode,
        grace=opts.grace,
    )


async def run(opts: argparse.Namespace, settings: Settings) -> int:
    stamp = _stamp()
    out = Path(opts.out) if opts.out else Path("loadtest/reports") / stamp
    out.mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(exist_ok=True)
    plan = make_plan(opts, stamp)
    started = time.time()
    if opts.fault and opts.target:
        print("allot loadtest: --fault needs the self-hosted mode (no --target)", file=sys.stderr)
        return 2
    if opts.fault == "kill-worker" and opts.workers < 2:
        print("allot loadtest: --fault kill-worker needs --workers 2 or more", file=sys.stderr)
        return 2
    print(
        f"allot loadtest: {plan.users} devices, {plan.duration:.0f} s after the opening second,"
        f" {plan.stock} units at {plan.sites} sites, {plan.processes} locust process(es);"
        f" report in {out}/",
        file=sys.stderr,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            if opts.target:
                token = opts.admin_token or os.environ.get("ALLOT_ADMIN_TOKEN")
                if not token:
                    raise SetupError("--target needs --admin-token (or $ALLOT_ADMIN_TOKEN)")
                target = Target(
                    url=opts.target.rstrip("/"),
                    admin_token=token,
                    database_url=opts.database_url,
                    redis_url=opts.redis_url if opts.database_url else None,
                    redis_prefix=opts.redis_prefix,
                )
            else:
                target = await stack.enter_async_context(self_hosted(opts, settings, out, stamp))
            session = await stack.enter_async_context(aiohttp.ClientSession())
            summary = await _measure(opts, settings, plan, target, session, out, stamp, started)
    except SetupError as exc:
        print(f"allot loadtest: FAILED before the crowd could run: {exc}", file=sys.stderr)
        _write_json(
            out / "summary.json",
            {"passed": False, "error": str(exc), "checks": [], "started_at": _iso(started)},
        )
        print("FAILED: setup (the service is not ready or refused the round)")
        print("loadtest: 0 passed, 1 failed, 0 skipped")
        return 1
    from loadtest.report import print_table

    for note in target.notes:
        print(note)
    print_table(summary, out)
    return 0 if summary["passed"] else 1


async def _measure(
    opts: argparse.Namespace,
    settings: Settings,
    plan: Plan,
    target: Target,
    session: aiohttp.ClientSession,
    out: Path,
    stamp: str,
    started: float,
) -> dict[str, Any]:
    if not await _ready(session, target.url):
        raise SetupError(f"{target.url}/readyz does not answer 200: the service is not ready")
    await seed(session, target, plan, stamp)
    await asyncio.sleep(LISTED_WITHIN)
    plan.run_time = math.ceil(plan.opens_at - time.time() + plan.duration + opts.grace)
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(session, target, plan.round_id, samples, stop))
    deliveries: list[dict[str, Any]] = [
        {"t": plan.opens_at, "batch": 1, "units": plan.batch_units()[0], "status": 201}
    ]
    restocker = asyncio.create_task(restock(session, target, plan, stamp, deliveries))
    fault_task: asyncio.Task[FaultFacts] | None = None
    if opts.fault:
        at = plan.opens_at + (opts.fault_at if opts.fault_at is not None else plan.fault_at())
        fault_task = asyncio.create_task(
            inject(opts.fault, at, opts.outage, target, session, plan.round_id)
        )
    locust_rc = await run_locust(plan, target, out, opts.p99_budget * 1000)
    ended = time.time()
    if not restocker.done():
        restocker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await restocker
    fault: FaultFacts | None = None
    if fault_task is not None:
        if not fault_task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fault_task), 40)
        if fault_task.done():
            fault = fault_task.result()
        else:
            fault_task.cancel()
            fault = FaultFacts(opts.fault, ended, None, False, "the run ended before the fault")

    records = read_records(out / "raw")
    rows, locust_exceptions = read_locust_csv(out)
    lottery: LotteryFacts | None = None
    if plan.mode == "lottery":
        lottery = await run_draw(session, target, plan, out)
        if target.database_url:
            lottery.ledger_entry_doubles = await ledger_entry_doubles(
                target.database_url, plan.round_id
            )
    ledger: LedgerFacts | None = None
    if target.database_url:
        ledger = await read_ledger(
            target.database_url,
            plan.round_id,
            created_ids(records),
            session,
            target,
            opts.ledger_deadline,
        )
    else:
        await _wait_for_stats_ledger(
            session, target, plan.round_id, len(created_ids(records)), opts.ledger_deadline
        )
    final_stats: dict[str, Any] | None = None
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, RuntimeError):
        final_stats = await stats(session, target, plan.round_id)
    stop.set()
    await sampler
    reconcile_rc, reconcile_note = await reconcile(target, plan.round_id, out)
    report = await fairness_report(session, target, plan.round_id)

    aggregated = rows[-1] if rows and rows[-1].get("Name") == "Aggregated" else {}
    # the bot is held to the per-address bucket of the service's config (the local one for
    # --target: the contract's defaults unless ALLOT_CONFIG says otherwise)
    gate = load_settings(Path(opts.config)).gate if opts.config else settings.gate
    facts = Facts(
        stock=int(final_stats["loaded"]) if final_stats else plan.stock,
        planned_stock=plan.stock,
        batches=len([d for d in deliveries if d["status"] in (200, 201)]),
        planned_batches=plan.batches,
        per_person=plan.per_person,
        final_stats=final_stats,
        ledger=ledger,
        reconcile_rc=reconcile_rc,
        reconcile_note=reconcile_note,
        fault=fault,
        p99_budget_ms=opts.p99_budget * 1000,
        client_rate=gate.client_rate,
        client_burst=gate.client_burst,
        locust_requests=int(aggregated.get("Request Count") or 0),
        locust_exceptions=locust_exceptions,
        locust_processes=plan.processes,
        ledger_deadline=opts.ledger_deadline,
        lottery=lottery,
    )
    checks = run_checks(facts, records)
    summary = build_summary(
        opts, plan, target, facts, records, checks, rows, started, ended, locust_rc
    )
    summary["deliveries"] = deliveries
    # fairness by behaviour, for both modes under the same keys: a check in a lottery round,
    # information in an FCFS one (speed decides there, and the table shows whom it favours)
    summary["fairness"] = {
        "fcfs": fcfs_fairness(records).as_dict() if lottery is None else None,
        "lottery": lottery_fairness(lottery, records).as_dict() if lottery else None,
        "enforced": lottery is not None,
    }
    summary["fairness_report"] = report
    if lottery is not None:
        summary["draw"] = {
            "record": lottery.record,
            "entries": len(lottery.entries),
            "winners": sum(1 for r in lottery.results if r["site_id"]),
            "freeze_after_close_s": lottery.freeze_after_close,
            "draw_s": lottery.draw_took,
            "verify_draw_exit": lottery.verify_rc,
            "problem": lottery.problem or None,
        }
    _write_json(out / "summary.json", summary)
    _write_json(out / "samples.json", samples)
    from loadtest.report import plot

    try:
        plot(out / "plot.png", records, samples, deliveries, plan, fault, opts.p99_budget * 1000)
    except Exception as exc:  # a broken plot must not hide the verdict
        print(f"allot loadtest: the plot failed: {exc}", file=sys.stderr)
    return summary


async def _wait_for_stats_ledger(
    session: aiohttp.ClientSession, target: Target, round_id: str, created: int, wait: float
) -> None:
    """Without the target's database: wait until the service reports the ledger caught up."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, RuntimeError):
            ledger = (await stats(session, target, round_id)).get("ledger") or {}
            recorded = ledger.get("recorded")
            if ledger.get("lag") == 0 and isinstance(recorded, int) and recorded >= created:
                return
        await asyncio.sleep(0.5)


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def build_summary(
    opts: argparse.Namespace,
    plan: Plan,
    target: Target,
    facts: Facts,
    records: Records,
    checks: list[Check],
    rows: list[dict[str, str]],
    started: float,
    ended: float,
    locust_rc: int,
) -> dict[str, Any]:
    aggregated = rows[-1] if rows and rows[-1].get("Name") == "Aggregated" else {}
    percentiles = ("50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "100%")
    latency = {f"p{p.rstrip('%')}": _num(aggregated.get(p)) for p in percentiles}
    latency |= {
        "avg": _num(aggregated.get("Average Response Time")),
        "min": _num(aggregated.get("Min Response Time")),
        "max": _num(aggregated.get("Max Response Time")),
    }
    answered = answered_latencies(records)
    from loadtest.crowd import percentile

    by_status = Counter(str(a["st"]) for a in records.answers)
    by_code = Counter(a["code"] or "-" for a in records.answers)
    by_name = {
        r["Name"]: {
            "requests": int(r["Request Count"]),
            "failures": int(r["Failure Count"]),
            "p99_ms": _num(r.get("99%")),
        }
        for r in rows
        if r.get("Name") != "Aggregated"
    }
    check_value = {c.name: c.value for c in checks}
    stranded = check_value.get("nothing-stranded", {})
    final = facts.final_stats or {}
    return {
        "passed": passed(checks),
        "mode": "target" if opts.target else "self-hosted",
        "round_mode": plan.mode,
        "target": target.url,
        "round_id": plan.round_id,
        "started_at": _iso(started),
        "opens_at": _iso(plan.opens_at),
        "finished_at": _iso(ended),
        "config": {
            "users": plan.users,
            "spawn_rate": plan.spawn_rate,
            "duration_s": plan.duration,
            "run_time_s": plan.run_time,
            "processes": plan.processes,
            "workers": opts.workers if not opts.target else None,
            "stock": plan.stock,
            "batches": plan.batches,
            "sites": plan.sites,
            "per_person": plan.per_person,
            "bots": plan.bots,
            "fresh_connections": plan.fresh_connections,
            "p99_budget_ms": opts.p99_budget * 1000,
            "fault": opts.fault,
            "mode": plan.mode,
        },
        "requests": int(aggregated.get("Request Count") or 0),
        "failures": int(aggregated.get("Failure Count") or 0),
        "rps": _num(aggregated.get("Requests/s")),
        "latency_ms": latency,
        "answered_latency_ms": {
            f"p{q}": round(percentile(answered, q), 1) for q in (50, 90, 95, 99, 99.9)
        }
        | {"max": round(answered[-1], 1) if answered else None, "count": len(answered)},
        "answers_by_status": dict(sorted(by_status.items())),
        "answers_by_code": dict(sorted(by_code.items())),
        "requests_by_name": by_name,
        "granted": check_value.get("no-oversell", {}).get("granted"),
        "granted_by_source": check_value.get("no-oversell", {}).get("sources"),
        "stock": facts.stock,
        "remaining": final.get("remaining"),
        "demand": demand_units(records),
        "citizens": dict(Counter(c["end"] for c in records.citizens)),
        "ledger": {
            "rows": len(facts.ledger.rows) if facts.ledger else None,
            "waited_s": facts.ledger.waited if facts.ledger else None,
            "service": final.get("ledger"),
        },
        "unknown_reservations": stranded.get("unknown_reservations"),
        "fault": (
            {
                "kind": facts.fault.kind,
                "at": _iso(facts.fault.started),
                "recovered_at": _iso(facts.fault.ended) if facts.fault.ended else None,
                "detail": facts.fault.detail,
            }
            if facts.fault
            else None
        ),
        "locust_exit_code": locust_rc,
        "checks": [
            {"name": c.name, "result": c.verdict, "ok": c.ok, "figure": c.figure, "value": c.value}
            for c in checks
        ],
        "files": {
            "html": "report.html",
            "plot": "plot.png",
            "locust_csv": "locust_stats.csv",
            "history_csv": "locust_stats_history.csv",
            "samples": "samples.json",
            "raw": "raw/",
        },
    }


def _write_json(path: Path, value: Any) -> None:
    path.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.config:
        args.config = os.path.abspath(args.config)
    return asyncio.run(run(args, settings))
