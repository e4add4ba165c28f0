"""What /metrics scrapes cost the citizens: reservation latency with and without scrapers, and
the CPU each scrape costs the workers (whose event loops serve the citizens).

Starts `allot serve --workers N` on a fresh database and Redis prefix, seeds a round with
ample stock and open gates, then runs three phases of --duration seconds each:

  quiet    wrk reserving (new citizen every request), nobody scraping
  scraped  the same wrk run while --scrapers clients scrape /metrics, each back to back
           (--interval 0) or once per --interval seconds
  cost     scrapers alone, no wrk; CPU time of each process (utime + stime from /proc) over
           the phase, minus an idle phase of the same length, per scrape

--scrape ops    scrapes the operations listener (this tree: the supervisor serves it)
--scrape public scrapes /metrics on the citizens' port (the design before the operations
                listener; run it with --tree pointing at an older checkout, e.g.
                `git archive 490045f | tar -x -C /tmp/allot-before`)

Nothing here asserts anything: it prints figures for docs/performance.md and the report.
usage: python bench/scrapes.py [--scrape ops|public] [--tree DIR] [--workers 2]
       [--duration 8] [--scrapers 50] [--interval 0] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asyncpg
from redis.asyncio import Redis
from run import (  # bench/ is not a package: run.py is the benchmark's toolbox
    BIN,
    TOKEN,
    WIDE_OPEN,
    Processes,
    Run,
    free_port,
    seed,
    wait_up,
    wrk,
)

from allocator.db import with_database


async def cleanup(redis_url: str, prefix: str, base_db: str, db_name: str) -> None:
    """Delete this run's keys (its own prefix) and drop its database."""
    redis = Redis.from_url(redis_url)
    try:
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            await redis.delete(key)
    finally:
        await redis.aclose()
    con = await asyncpg.connect(with_database(base_db, "postgres"))
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    finally:
        await con.close()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    out = []
    for child in path.read_text().split():
        if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
            out.append(int(child))
    return out


async def scrapers(url: str, n: int, interval: float, stop: asyncio.Event) -> tuple[int, int]:
    """n clients scraping url until stop; (answered 200, anything else)."""
    ok = bad = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> None:
            nonlocal ok, bad
            while not stop.is_set():
                started = time.monotonic()
                try:
                    async with s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                        await r.read()
                        if r.status == 200:
                            ok += 1
                        else:
                            bad += 1
                except (aiohttp.ClientError, TimeoutError):
                    bad += 1
                if interval:
                    await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

        await asyncio.gather(*(one() for _ in range(n)))
    return ok, bad


async def while_scraped(url: str, args: argparse.Namespace, work: asyncio.Future[Any]) -> int:
    stop = asyncio.Event()
    task = asyncio.create_task(scrapers(url, args.scrapers, args.interval, stop))
    await work
    stop.set()
    ok, bad = await task
    if bad:
        print(f"  scrapes not answered 200: {bad}", flush=True)
    return ok


async def main(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d%H%M%S")
    prefix, db_name = f"allot-scrapes-{stamp}", f"allot_scrapes_{stamp}"
    base_db = os.environ.get("ALLOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/allot")
    redis_url = os.environ.get("ALLOT_REDIS_URL", "redis://127.0.0.1:6379/0")
    tmp = Path(tempfile.mkdtemp(prefix="allot-scrapes-"))
    (tmp / "bench.toml").write_text(WIDE_OPEN)
    port, ops_port = free_port(), free_port()
    env = {
        **os.environ,
        "ALLOT_REDIS_URL": redis_url,
        "ALLOT_DATABASE_URL": with_database(base_db, db_name),
        "ALLOT_REDIS_PREFIX": prefix,
        "ALLOT_ADMIN_TOKEN": TOKEN,
        "ALLOT_ID_PEPPER": "bench-pepper",
        "ALLOT_CONFIG": str(tmp / "bench.toml"),
        "ALLOT_OPS_PORT": str(ops_port),
    }
    if args.tree:
        env["PYTHONPATH"] = str(Path(args.tree).resolve())
    procs = Processes(tmp)
    url = f"http://127.0.0.1:{port}"
    scrape_url = (
        f"http://127.0.0.1:{ops_port}/metrics" if args.scrape == "ops" else f"{url}/metrics"
    )
    try:
        subprocess.run([str(BIN / "allot"), "migrate"], env=env, check=True, capture_output=True)
        server = procs.start(
            "allot", [str(BIN / "allot"), "serve", "--port", str(port),
                      "--workers", str(args.workers)], env,
        )  # fmt: skip
        await wait_up(url, "/readyz")
        await seed(url)
        await asyncio.sleep(1)
        workers = children(server.pid) if args.workers > 1 else [server.pid]
        supervisor = server.pid if args.workers > 1 else None
        offset = 0

        def reserve() -> asyncio.Task[Run]:
            nonlocal offset
            offset += 1_000_000
            return asyncio.create_task(
                asyncio.to_thread(wrk, url, "s1", offset, args.duration, args.connections)
            )

        await reserve()  # warm-up
        quiet = await reserve()
        work = reserve()
        scrapes = await while_scraped(scrape_url, args, work)
        scraped = work.result()
        async with aiohttp.ClientSession() as session, session.get(scrape_url) as r:
            size = len(await r.read())

        def cpu() -> dict[str, float]:
            out = {f"worker {pid}": cpu_seconds(pid) for pid in workers}
            if supervisor is not None:
                out["supervisor"] = cpu_seconds(supervisor)
            return out

        before = cpu()
        await asyncio.sleep(args.duration)
        idle = {k: v - before[k] for k, v in cpu().items()}
        before = cpu()
        n = await while_scraped(
            scrape_url, args, asyncio.ensure_future(asyncio.sleep(args.duration))
        )
        busy = {k: v - before[k] for k, v in cpu().items()}
    finally:
        procs.stop_all()
        await cleanup(redis_url, prefix, base_db, db_name)

    print(f"\n/metrics scraped on the {args.scrape} port, {args.workers} workers,"
          f" {args.scrapers} scrapers, interval {args.interval:g} s,"
          f" wrk -c{args.connections} {args.duration:g} s per phase"
          f"{', tree ' + args.tree if args.tree else ''}")  # fmt: skip
    for name, run in (("quiet", quiet), ("scraped", scraped)):
        print(f"  reservations {name:8} {run.rps:8.0f} req/s  p50 {run.p50_ms:7.2f} ms"
              f"  p99 {run.p99_ms:7.2f} ms  non-2xx {run.non2xx}"
              f"  socket errors {run.socket_errors}")  # fmt: skip
    print(f"  scrapes answered during the scraped phase: {scrapes}; one is {size:,} bytes")
    print(f"  cost phase: {n} scrapes in {args.duration:g} s; extra CPU over an idle phase:")
    groups = {"workers (citizens' loops)": [k for k in busy if k.startswith("worker")]}
    if supervisor is not None:
        groups["supervisor"] = ["supervisor"]
    for name, keys in groups.items():
        extra = sum(busy[k] - idle[k] for k in keys)
        per = extra / n * 1000 if n else float("nan")
        print(f"    {name:26} {extra:6.2f} s = {per:7.3f} ms per scrape")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--scrape", choices=["ops", "public"], default="ops")
    parser.add_argument("--tree", help="run allot serve from this source tree (PYTHONPATH)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--connections", type=int, default=16)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
