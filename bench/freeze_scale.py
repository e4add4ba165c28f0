"""A lottery of 1,000,000 entries over 500 sites through the service's own code path: the ledger,
the freeze, the draw, the winners' reservations, the published files and `allot verify-draw`.

bench/draw_scale.py measures allocator/draw.py alone, on entries it makes in memory. This one
runs what the service runs (issue 10, "Scale"), on a private PostgreSQL database and a private
redis-server:

  setup   `allot serve --workers 1` (with its ledger writer) on them; 500 sites in 11 districts,
          a lottery round (per_person 5) registering now, one batch of 150-545 units per site,
          all through the operators' API; then the service is stopped (so no worker freezes the
          round before the entries are in).
  load    the entries as the service would hold them once registration is over: in PostgreSQL's
          ``entries`` table (one COPY, the rows the ledger writer writes from the round's
          stream) and in Redis's entries and entrants hashes and tally (what lua/enter.lua
          writes), each with a fresh entry_id (allocator.entries.fresh_entry_ids), its receipt
          (allocator.draw.entry_receipt), the citizen's and phone's keyed hashes
          (allocator.identity.Hasher) and masked ID, of a new valid citizen; site popularity
          skewed, half accepting the district. Not timed as part of the freeze: registration is.
  freeze  ``allocator.drawjob.freeze`` in a process of its own, as a worker runs it in its
          process pool once the round has closed and the ledger has caught up: the entry list
          read from PostgreSQL, the stock from the ledger's batches, entries.csv and stock.csv
          built and stored, every entry's weight written.
  draw    ``allocator.drawjob.draw_round`` in a process of its own, as ``POST …/draw`` runs it:
          the files read back and checked byte for byte, seed, keys, ranking, rule 5,
          results.csv, the ``draw_awards`` work list (COPY) and every loser marked not-drawn.
  award   `allot serve` started again: its lottery watch finds the round ``drawing`` and makes
          every winner's reservation in Redis with lua/award.lua (256 a call), then marks the
          draw ``drawn``; the ledger writer then writes those reservations and won entries to
          PostgreSQL. Timed from the service answering /readyz to ``drawn``, and to the ledger
          drained.
  publish the record and files fetched from the public API (GET …/draw, …/entries.csv, …).
  verify  `allot verify-draw --dir` on those files, a process that knows only them.

Each of freeze, draw and verify is a child process measured on its own (wall time, and peak RSS
from wait4's rusage); the award is measured in the worker (VmHWM, /proc). PostgreSQL's and
Redis's own memory and CPU are not in these figures (they are shared servers' processes).

Nothing here asserts time. ``allocator.drawjob.freeze`` is called as the service calls it, so
whatever the freeze gains (cooldown exclusion, loss weights) is measured with it.

usage: python bench/freeze_scale.py [--entries 1000000] [--sites 500] [--scaling 250000 ...]
                                    [--update-doc docs/performance.md] [--keep DIR]
       make bench-freeze   (the same, 1,000,000 entries, into docs/performance.md)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draw_scale import DISTRICTS, measured  # bench/ is not a package
from run import BIN, TOKEN, WIDE_OPEN, Processes, citizen, free_port, wait_up, worker_pid

from allocator.db import with_database
from allocator.draw import entry_receipt
from allocator.entries import fresh_entry_ids
from allocator.identity import Hasher, mask_citizen_id
from allocator.keys import Keys
from allocator.redistyping import awaited
from loadtest.servers import PrivateRedis

HEADING = "## Lottery through the service"
ROUND = "gz-freeze-scale"
PER_PERSON = 5
PEPPER = "bench-pepper"
PREFIX = "allot-freeze-scale"
RANDOMNESS = "drand quicknet round 9123456: 5e1b4c0d2f3a"
CHUNK = 50_000  # entries generated, copied and written to Redis at a time
AGE_BANDS = ("18-39", "40-64", "65+", "0-17")


@dataclass
class Step:
    wall_s: float
    peak_mib: float
    note: str = ""
    sql: dict[str, float] = field(default_factory=dict)  # statement -> seconds waited on it


@dataclass
class Result:
    entries: int
    sites: int
    load_s: float = 0.0
    steps: dict[str, Step] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


def _site_plan(sites_n: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """(site_id, district, units) for each site, districts by their share of the city's sites."""
    weights = [share for _name, share in DISTRICTS]
    return [
        (f"gz-{i:04d}", rng.choices(DISTRICTS, weights)[0][0], rng.randrange(150, 550, 5))
        for i in range(sites_n)
    ]


async def _admin(url: str, sites: list[tuple[str, str, int]]) -> None:
    """The sites, the lottery round (registering now, closing in 20 s) and its stock."""
    now = dt.datetime.now(dt.UTC)
    rnd = {
        "title": "freeze at scale",
        "mode": "lottery",
        "public_randomness_source": "drand quicknet, the first round after closing",
        "opens_at": (now - dt.timedelta(minutes=1)).isoformat(),
        "closes_at": (now + dt.timedelta(seconds=20)).isoformat(),
        "per_person": PER_PERSON,
        "pickup_start": now.isoformat(),
        "pickup_end": (now + dt.timedelta(days=3)).isoformat(),
    }
    site_rows = [
        {"site_id": s, "name": s, "address": "bench", "district": dist} for s, dist, _ in sites
    ]
    # in parts of 100: a request body is at most 16 KB
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("PUT", "/api/v1/admin/sites", {"sites": site_rows[i : i + 100]})
        for i in range(0, len(site_rows), 100)
    ]
    calls.append(("PUT", f"/api/v1/admin/rounds/{ROUND}", rnd))
    calls += [
        ("POST", f"/api/v1/admin/rounds/{ROUND}/batches",
         {"batch_id": f"b{i}", "items": [{"site_id": s, "quantity": u}
                                         for s, _, u in sites[i : i + 100]]})
        for i in range(0, len(sites), 100)
    ]  # fmt: skip
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        for method, path, body in calls:
            async with s.request(method, url + path, json=body) as r:
                if r.status not in (200, 201):
                    raise RuntimeError(f"{method} {path}: {r.status} {await r.text()}")


async def _ledger_caught_up(redis: Redis, pg: asyncpg.Connection, within: float = 600) -> None:
    """Until the round's stream is empty and PostgreSQL's ledger_seq has Redis's seq (what the
    service's freeze waits for)."""
    rk = Keys(PREFIX).round(ROUND, Keys.tag_for(ROUND, None))
    async with asyncio.timeout(within):
        while True:
            backlog = await redis.xlen(rk.ledger)
            seq = int(await awaited(redis.hget(rk.tally, "seq")) or 0)
            ledger = await pg.fetchval("SELECT ledger_seq FROM rounds WHERE round_id = $1", ROUND)
            if not backlog and ledger is not None and int(ledger) >= seq:
                return
            await asyncio.sleep(0.2)


async def _load(
    n: int, sites: list[tuple[str, str, int]], rng: random.Random, redis: Redis, db_url: str
) -> None:
    """n entries into PostgreSQL (COPY) and Redis (the hashes enter.lua writes), CHUNK at a time."""
    hasher = Hasher(PEPPER.encode())
    rk = Keys(PREFIX).round(ROUND, Keys.tag_for(ROUND, None))
    site_ids = [s for s, _, _ in sites]
    rng.shuffle(site_ids)
    popularity = [1 / (rank + 10) for rank in range(len(site_ids))]  # a few sites much in demand
    per_site: dict[str, int] = {}
    con = await asyncpg.connect(db_url)
    columns = ["entry_id", "round_id", "receipt", "site_id", "accept_district", "status",
               "citizen_hash", "phone_hash", "citizen_id_masked", "seq", "created_at",
               "updated_at", "channel", "age_band"]  # fmt: skip
    try:
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            ids = fresh_entry_ids(ROUND, count)
            chosen = rng.choices(site_ids, popularity, k=count)
            rows, records, entrants = [], {}, {}
            now_ms = int(time.time() * 1000)
            at = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
            for i in range(count):
                number = citizen(start + i)
                phone = f"139{(start + i) % 100_000_000:08d}"
                cit, ph, mask = hasher.citizen(number), hasher.phone(phone), mask_citizen_id(number)
                entry_id, site = ids[i], chosen[i]
                accept = rng.random() < 0.5
                age = AGE_BANDS[i % 4]
                rows.append((entry_id, ROUND, entry_receipt(ROUND, entry_id), site, accept,
                             "registered", cit, ph, mask, 0, at, at, "api", age))  # fmt: skip
                records[entry_id] = orjson.dumps(
                    {"id": entry_id, "site": site, "acc": int(accept), "status": "registered",
                     "cit": cit, "ph": ph, "mask": mask, "created": now_ms, "updated": now_ms,
                     "ch": "api", "age": age}
                )  # fmt: skip
                entrants[cit] = entry_id
                per_site[site] = per_site.get(site, 0) + 1
            await con.copy_records_to_table("entries", records=rows, columns=columns)
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset(rk.entries, mapping=records)
                pipe.hset(rk.entrants, mapping=entrants)
                await pipe.execute()
            print(f"  loaded {start + count:,} entries", end="\r", flush=True)
        tally: dict[str | bytes, int] = {f"entries:{s}": c for s, c in per_site.items()}
        await awaited(redis.hset(rk.tally, mapping=tally))
        print()
    finally:
        await con.close()


def _hwm_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


async def _fetch(url: str, out: Path) -> dict[str, Any]:
    """The published record and files, as anyone would fetch them, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        async with s.get(f"{url}/api/v1/rounds/{ROUND}/draw") as r:
            record: dict[str, Any] = await r.json()
            (out / "draw.json").write_bytes(orjson.dumps(record))
        async with s.get(f"{url}/api/v1/rounds/{ROUND}") as r:
            (out / "round.json").write_bytes(await r.read())
        names = ["entries.csv", "stock.csv", "results.csv"]
        names += [f"pass-{p['pass']}.csv" for p in record.get("passes") or []]
        for name in names:
            async with s.get(f"{url}/api/v1/rounds/{ROUND}/draw/{name}") as r:
                if r.status != 200:
                    raise RuntimeError(f"GET …/draw/{name}: {r.status}")
                (out / name).write_bytes(await r.read())
    return record


def _child(argv: list[str], env: dict[str, str]) -> tuple[Step, str]:
    wall, rss, done = measured(argv, env)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return Step(wall, rss), done.stdout.strip()


def _job(argv: list[str], env: dict[str, str], want: str) -> Step:
    """A draw job child: its answer must be ``want``; its SQL waits go into the step."""
    step, out = _child(argv, env)
    found, _, sql = out.partition("\n")
    if found != want:
        raise RuntimeError(f"{argv[-1]}: the job answered {found!r}, not {want!r}")
    step.sql = json.loads(sql)
    return step


async def run_size(n: int, sites_n: int, seed: int, keep: Path | None) -> Result:
    result = Result(n, sites_n)
    rng = random.Random(seed)  # noqa: S311 - a benchmark's workload, not a secret
    stamp = time.strftime("%Y%m%d%H%M%S")
    base_db = os.environ.get("ALLOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/allot")
    db_name = f"allot_freeze_scale_{stamp}_{n}"
    db_url = with_database(base_db, db_name)
    tmp = Path(tempfile.mkdtemp(prefix="allot-freeze-scale-"))
    files = keep or tmp / "files"
    redis_server = PrivateRedis(tmp / "redis")
    await asyncio.to_thread(redis_server.start)
    config = tmp / "bench.toml"
    config.write_text(WIDE_OPEN)
    env = {
        **os.environ,
        "ALLOT_REDIS_URL": redis_server.url,
        "ALLOT_DATABASE_URL": db_url,
        "ALLOT_REDIS_PREFIX": PREFIX,
        "ALLOT_ADMIN_TOKEN": TOKEN,
        "ALLOT_ID_PEPPER": PEPPER,
        "ALLOT_CONFIG": str(config),
    }
    procs = Processes(tmp)
    redis = Redis.from_url(redis_server.url)
    admin = await asyncpg.connect(with_database(base_db, "postgres"))
    await admin.execute(f'CREATE DATABASE "{db_name}"')
    pg = await asyncpg.connect(db_url)
    sites = _site_plan(sites_n, rng)
    rk = Keys(PREFIX).round(ROUND, Keys.tag_for(ROUND, None))

    def serve() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = procs.start(
            f"allot-{len(procs.procs)}",
            [str(BIN / "allot"), "serve", "--port", str(port), "--workers", "1"],
            {**env, "ALLOT_OPS_PORT": str(free_port())},
        )
        return proc, f"http://127.0.0.1:{port}"

    def stop(proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    try:
        subprocess.run([str(BIN / "allot"), "migrate"], env=env, check=True, capture_output=True)
        proc, url = serve()
        await wait_up(url, "/readyz")
        await _admin(url, sites)
        await _ledger_caught_up(redis, pg)
        await asyncio.to_thread(stop, proc)  # before the round closes: no worker freezes it

        started = time.perf_counter()
        await _load(n, sites, rng, redis, db_url)
        result.load_s = time.perf_counter() - started
        closes = await pg.fetchval("SELECT closes_at FROM rounds WHERE round_id = $1", ROUND)
        if closes is not None:
            await asyncio.sleep(max(0.0, (closes - dt.datetime.now(dt.UTC)).total_seconds()))
        await pg.execute("VACUUM ANALYZE entries")  # as autovacuum would have, long since
        seq = int(await awaited(redis.hget(rk.tally, "seq")) or 0)

        me = [sys.executable, str(Path(__file__).resolve())]
        result.steps["freeze"] = await asyncio.to_thread(
            _job, [*me, "--child", "freeze", "--database", db_url, "--seq", str(seq)], env,
            "frozen",
        )  # fmt: skip
        result.steps["draw"] = await asyncio.to_thread(
            _job, [*me, "--child", "draw", "--database", db_url], env, "drawing"
        )

        proc, url = serve()
        await wait_up(url, "/readyz")
        worker = worker_pid(proc)
        started = time.perf_counter()
        async with asyncio.timeout(600):
            while True:  # the worker's lottery watch awards, then marks the draw drawn
                status = await pg.fetchval("SELECT status FROM draws WHERE round_id = $1", ROUND)
                if status == "drawn":
                    break
                await asyncio.sleep(0.1)
        awarded = time.perf_counter() - started
        await _ledger_caught_up(redis, pg)
        written = time.perf_counter() - started
        winners = await pg.fetchval("SELECT count(*) FROM reservations WHERE round_id = $1", ROUND)
        won = await pg.fetchval(
            "SELECT count(*) FROM entries WHERE round_id = $1 AND status = 'won'", ROUND
        )
        result.steps["award"] = Step(awarded, _hwm_mib(worker), f"ledger written {written:.1f} s")
        result.facts.update(
            winners=winners,
            won_entries=won,
            entries_table_mib=await pg.fetchval("SELECT pg_total_relation_size('entries')") / 2**20,
            shared_buffers=await pg.fetchval("SHOW shared_buffers"),
        )

        started = time.perf_counter()
        record = await _fetch(url, files)
        result.facts["fetch_s"] = time.perf_counter() - started
        result.facts["entries_csv_mib"] = (files / "entries.csv").stat().st_size / 2**20
        result.facts["results_csv_mib"] = (files / "results.csv").stat().st_size / 2**20
        result.facts["frozen_entries"] = record["entries"]
        result.facts["winners_drawn"] = sum(s["winners"] for s in record["sites"])
        await asyncio.to_thread(stop, proc)

        step, out = await asyncio.to_thread(
            _child, [str(BIN / "allot"), "verify-draw", "--dir", str(files)], env
        )
        step.note = f"exit 0: {out.splitlines()[-1].strip()}" if out else "exit 0"
        result.steps["verify"] = step
    finally:
        procs.stop_all()
        await redis.aclose()
        await asyncio.to_thread(redis_server.close)
        await pg.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def child(step: str, database: str, seq: int) -> str:
    """One of the service's draw jobs, as a worker's process pool runs it; its answer, then on a
    second line the seconds spent waiting on each SQL statement (JSON), which is PostgreSQL's
    share of the step (the rest is Python: reading rows, the draw, building the files)."""
    from allocator import drawjob

    waited = _time_sql()
    if step == "freeze":
        found = drawjob.freeze(database, ROUND, {ROUND: seq})  # no programme: no other rounds
    else:
        found = drawjob.draw_round(database, ROUND, RANDOMNESS)
    return found + "\n" + json.dumps({k: round(v, 2) for k, v in waited.items()})


def _time_sql() -> dict[str, float]:
    """Time every statement asyncpg's connections run (wrapping the methods drawjob calls);
    keyed by the statement's first words."""
    waited: dict[str, float] = {}
    cls = asyncpg.connection.Connection

    def timed(name: str) -> None:
        inner = getattr(cls, name)

        async def wrapper(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await inner(self, query, *args, **kwargs)
            finally:
                label = f"{name}: " + " ".join(query.split())[:48]
                waited[label] = waited.get(label, 0.0) + time.perf_counter() - started

        setattr(cls, name, wrapper)

    for name in ("fetch", "fetchrow", "fetchval", "execute", "copy_records_to_table"):
        timed(name)
    return waited


def _sql_lines(steps: dict[str, Step]) -> str:
    """Where the freeze's and the draw's time went: waiting on each SQL statement (PostgreSQL's
    work, and the rows' transfer and decoding), the rest being Python in the job's process."""
    out = []
    for name in ("freeze", "draw"):
        st = steps[name]
        waited = sum(st.sql.values())
        top = sorted(st.sql.items(), key=lambda kv: -kv[1])[:4]
        parts = "; ".join(f"`{q}…` {t:.1f} s" for q, t in top)
        out.append(
            f"- {name}: {waited:.1f} s of {st.wall_s:.1f} s waiting on SQL ({parts}), the rest"
            " in the job's own process (Python: rows to entry lines, files, the draw itself)."
        )
    return "\n".join(out)


def render(results: list[Result], command: str) -> str:
    one = results[0]
    f, s = one.facts, one.steps
    rows = []
    for name, label, target in (
        ("freeze", "freeze (`allocator.drawjob.freeze`, own process)", "< 60 s, < 2 GB"),
        ("draw", "draw (`allocator.drawjob.draw_round`, own process)", "< 60 s, < 2 GB"),
        ("award", "winners' reservations (award.lua, in the worker)", ""),
        ("verify", "`allot verify-draw --dir` (own process)", "< 60 s"),
    ):
        st = s[name]
        rows.append(f"| {label} | {st.wall_s:.1f} s | {st.peak_mib:,.0f} MiB | {target} |")
    both = s["freeze"].wall_s + s["draw"].wall_s
    text = f"""{HEADING}

Measured by `{command}` on {time.strftime("%Y-%m-%d")}, on this project's machine
({os.cpu_count()} cores shared with other engineers' work, CPython {platform.python_version()},
PostgreSQL and a private redis-server local): {one.entries:,} entries over {one.sites} sites in
{len(DISTRICTS)} districts (site popularity skewed, half the entrants accept the district),
per_person {PER_PERSON}, 150-545 units per site, each entry of a new valid citizen with a fresh
entry_id, receipt and keyed hashes, in PostgreSQL's `entries` table and Redis's entries hash as
registration leaves them (loaded in {one.load_s:.0f} s by COPY and pipelined HSETs). Then the
service's own steps: the freeze and the draw are the functions a worker runs in its process
pool, each here in a process of its own; the awards are made by `allot serve`'s worker
(lua/award.lua), the files fetched from the public API, and verified by `allot verify-draw`.

| step | wall time | peak RSS | target |
|---|---:|---:|---|
{chr(10).join(rows)}

{_sql_lines(s)}

Freeze + draw: {both:.1f} s (target < 60 s); the larger peak RSS
{max(s["freeze"].peak_mib, s["draw"].peak_mib):,.0f} MiB (target < 2 GB).
{f["frozen_entries"]:,} entries frozen (entries.csv {f["entries_csv_mib"]:.0f} MiB, results.csv
{f["results_csv_mib"]:.0f} MiB); {f["winners_drawn"]:,} winners, each with a reservation made in
Redis and written by the ledger writer ({f["winners"]:,} reservations and {f["won_entries"]:,}
won entries in PostgreSQL; {s["award"].note} after the service was up); the record and files
fetched in {f["fetch_s"]:.1f} s; verify-draw: "{s["verify"].note}". The award's peak RSS is the
worker's VmHWM (start-up included). PostgreSQL's and Redis's own memory is not in these figures.
"""
    if len(results) < 2:
        return text
    table = "\n".join(
        f"| {r.entries:,} | {r.steps['freeze'].wall_s:.1f} s | {r.steps['freeze'].peak_mib:,.0f}"
        f" MiB | {r.steps['draw'].wall_s:.1f} s | {r.steps['draw'].peak_mib:,.0f} MiB"
        f" | {r.steps['verify'].wall_s:.1f} s | {r.steps['verify'].peak_mib:,.0f} MiB |"
        for r in sorted(results, key=lambda r: r.entries)
    )
    a, b = min(results, key=lambda r: r.entries), max(results, key=lambda r: r.entries)
    ten = 10_000_000
    scale = ten / b.entries

    def linear(step: str, value: Callable[[Step], float]) -> float:
        lo, hi = value(a.steps[step]), value(b.steps[step])
        return hi + (hi - lo) / (b.entries - a.entries) * (ten - b.entries)

    def rows_sql(st: Step) -> float:  # the statements that rewrite every entry's row
        return sum(t for q, t in st.sql.items() if q.startswith("execute: UPDATE entries"))

    lines = []
    for step in ("freeze", "draw"):
        big, small = b.steps[step], a.steps[step]
        growth = rows_sql(big) / max(rows_sql(small), 1e-9)
        power = math.log(growth) / math.log(b.entries / a.entries)
        rest = linear(step, lambda st: st.wall_s - rows_sql(st))
        mem = linear(step, lambda st: st.peak_mib) / 1024
        lines.append(
            f"| {step} | {rest:,.0f} s | {rows_sql(big) * scale:,.0f} s (n^{power:.2f}:"
            f" {rows_sql(big) * scale**power:,.0f} s) | {mem:,.1f} GiB |"
        )
    verify = linear("verify", lambda st: st.wall_s)
    vmem = linear("verify", lambda st: st.peak_mib) / 1024
    lines.append(f"| verify | {verify:,.0f} s | – | {vmem:,.1f} GiB |")
    ua, ub = rows_sql(a.steps["freeze"]), rows_sql(b.steps["freeze"])
    da, db = rows_sql(a.steps["draw"]), rows_sql(b.steps["draw"])
    table_mib = b.facts.get("entries_table_mib")
    size = (
        f"of {table_mib:,.0f} MiB with its indexes, {table_mib / 128:.0f} times "
        if table_mib
        else "several times "
    )
    buffers = b.facts.get("shared_buffers", "128MB")
    draw_gib = linear("draw", lambda st: st.peak_mib) / 1024
    without = sum(b.steps[k].wall_s - rows_sql(b.steps[k]) for k in ("freeze", "draw"))
    return (
        text
        + f"""
| entries | freeze | freeze peak | draw | draw peak | verify | verify peak |
|---:|---:|---:|---:|---:|---:|---:|
{table}

**10 million entries (projection).** Each step's time is two parts that grow differently. The
job's own work (reading the rows, building and checking the files, the draw's hashing, two
sorts) and every other statement grow about linearly, as in bench/draw_scale.py: projected on a
straight line through the two sizes above. The two statements that rewrite one row per entry
(the freeze's `weight = 1`, the draw's `status = 'not-drawn'` for every loser) are most of each
step's time: the freeze's took {ua:.1f} s and {ub:.1f} s, the draw's {da:.1f} s and {db:.1f} s
for {b.entries // a.entries}× the entries. Each row they rewrite has no room left on its
freshly COPYed page, so it is a new row version elsewhere and a new entry in each of the table's
three indexes (no HOT update; `status` is indexed anyway), in one transaction, over a table
{size}PostgreSQL's `shared_buffers` ({buffers} here); their growth on this shared machine is
noisy (between runs the same statement at one million varied by 1.5×). They are projected at
least linearly (×{scale:g}) and at the growth measured between the two sizes (n^power):

| step | job's own work and other SQL | whole-table UPDATE | peak RSS |
|---|---:|---:|---:|
{chr(10).join(lines)}

So at 10 million the two whole-table UPDATEs alone would take from several minutes to over an
hour, and the draw process needs about {draw_gib:,.0f} GiB
(the entries.csv bytes, one Python object per entry line and per result, and the draw's
`receipt -> entry_id` map of every entry): beyond both targets, and beyond what is useful on a
machine of this size. Without the two whole-table rewrites, one million would take {without:.0f} s
to freeze and draw here (target < 60 s).

What would bring it there (allocator/drawjob.py; not changed by this benchmark): write a
weight only where it is not 1, or COPY the weights into a table of their own, rather than
rewriting every entry's row in the freeze; leave the losers' rows as they are and take
`not-drawn` from the draw (a registered entry of a drawn round without an award: the answers
already work it out so, service/shapes.py, and the loss streaks can read it the same way); and
look up only the winners' entry_ids for `draw_awards` (`receipt = ANY(…)`), not a map of every
entry, which is also a good part of the draw's memory.
"""
    )


def update_doc(path: Path, section: str) -> None:
    """Replace this section of the file (up to the next '## ' heading), or append it."""
    text = path.read_text("utf-8") if path.exists() else "# Performance\n"
    start = text.find(HEADING + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    path.write_text(text, "utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=500)
    parser.add_argument("--seed", type=int, default=20200215)
    parser.add_argument("--keep", type=Path, help="keep the published files here")
    parser.add_argument("--update-doc", type=Path, help=f"replace the '{HEADING[3:]}' section")
    parser.add_argument(
        "--scaling", type=int, nargs="*", default=[], help="also these sizes, for the projection"
    )
    parser.add_argument("--save", type=Path, help="also write the measurements here (JSON)")
    parser.add_argument(
        "--render", type=Path, help="measure nothing: render the section from a --save file"
    )
    parser.add_argument("--child", choices=("freeze", "draw"), help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(child(args.child, args.database, args.seq))
        return 0

    results = []
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        results = [
            Result(r["entries"], r["sites"], r["load_s"],
                   {k: Step(**v) for k, v in r["steps"].items()}, r["facts"])
            for r in saved["results"]
        ]  # fmt: skip
        args.entries, args.scaling = results[0].entries, [r.entries for r in results[1:]]
    for n in [args.entries, *args.scaling] if args.render is None else []:
        print(f"{n:,} entries over {args.sites} sites", flush=True)
        result = asyncio.run(run_size(n, args.sites, args.seed, args.keep))
        for name, st in result.steps.items():
            print(f"  {name:7} {st.wall_s:7.1f} s  peak RSS {st.peak_mib:7,.0f} MiB  {st.note}")
            for statement, seconds in sorted(st.sql.items(), key=lambda kv: -kv[1]):
                print(f"          {seconds:6.1f} s  {statement}")
        print(f"  {result.facts}", flush=True)
        results.append(result)
    command = "python bench/freeze_scale.py" + "".join(f" --scaling {n}" for n in args.scaling)
    if args.entries != 1_000_000:
        command += f" --entries {args.entries}"
    if args.save is not None:
        args.save.write_text(json.dumps({"results": [dataclasses.asdict(r) for r in results]}))
    section = render(results, command)
    print(section)
    if args.update_doc is not None:
        update_doc(args.update_doc, section)
        print(f"written to {args.update_doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
