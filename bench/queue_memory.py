"""What a request waiting in a worker's admission queue holds: tracemalloc over 10,000 of them.

`make bench` reports the RSS of one worker holding a full queue (target < 200 MB). This finds
where that memory goes. It runs one allot worker (the code `allot serve` runs in each worker
process, service.cli.run_worker) in a process of its own under tracemalloc, on a private
database and a private redis-server, seeds a round with open gates, takes a snapshot, pauses
Redis (SIGSTOP), sends --requests reservations (one connection each, as a crowd does), waits
until they are all in the queue (it counts the queue's tickets), takes a second snapshot, and
prints the difference per request: by file, by line, and the largest tracebacks.

tracemalloc's own bookkeeping inflates the RSS, so the RSS here is not the figure of
`make bench`; the per-request bytes are what matter. Memory outside Python's allocator (libuv's
and the kernel's buffers, the allocator's fragmentation) is RSS minus the traced growth.

usage: python bench/queue_memory.py [--requests 10000] [--frames 12] [--top 25]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # bench/ is not a package
    BIN,
    FULL_QUEUE,
    TOKEN,
    WIDE_OPEN,
    Processes,
    citizen,
    free_port,
    rss_kib,
    seed,
    wait_up,
)

from allocator.db import with_database
from loadtest.servers import PrivateRedis


def worker(port: int, control: Path, frames: int) -> None:
    """The probe worker: tracemalloc, a thread that snapshots on request, then run_worker.
    (What this script imported itself before, aiohttp and the stores' clients, is not traced.)"""
    tracemalloc.start(frames)
    from allocator import admission
    from allocator.config import load_settings
    from service.cli import run_worker

    def snapshots() -> None:
        taken: list[tracemalloc.Snapshot] = []
        while len(taken) < 2:
            ask = control / f"take-{len(taken)}"
            if not ask.exists():
                time.sleep(0.2)
                continue
            gc.collect()
            tickets = sum(isinstance(o, admission._Ticket) for o in gc.get_objects())
            taken.append(tracemalloc.take_snapshot())
            (control / f"tickets-{len(taken) - 1}").write_text(str(tickets))
        report(taken[0], taken[1], control)

    threading.Thread(target=snapshots, daemon=True).start()
    run_worker(load_settings(), "127.0.0.1", port, 0, False)


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, control: Path) -> None:
    tickets = int((control / "tickets-1").read_text()) or 1
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(ignore), after.filter_traces(ignore)
    lines = []
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    lines.append(f"traced growth {total / 2**20:.1f} MiB for {tickets:,} queued tickets:"
                 f" {total / tickets:,.0f} B per request")  # fmt: skip
    idle = before.statistics("filename")
    lines.append(f"\nidle (first snapshot): {sum(x.size for x in idle) / 2**20:.1f} MiB traced;"
                 " largest files:")  # fmt: skip
    for x in idle[:8]:
        lines.append(f"  {x.size / 2**20:6.1f} MiB  {x.traceback[0].filename}")
    lines.append("\nby file (B per request, allocations per request):")
    for s in after.compare_to(before, "filename")[:15]:
        lines.append(f"  {s.size_diff / tickets:8,.0f} B {s.count_diff / tickets:6.1f}"
                     f"  {s.traceback[0].filename}")  # fmt: skip
    lines.append("\nby line:")
    for s in after.compare_to(before, "lineno")[:25]:
        f = s.traceback[0]
        lines.append(f"  {s.size_diff / tickets:8,.0f} B {s.count_diff / tickets:6.1f}"
                     f"  {f.filename}:{f.lineno}")  # fmt: skip
    lines.append("\nlargest tracebacks:")
    for s in after.compare_to(before, "traceback")[:8]:
        lines.append(f"  {s.size_diff / tickets:8,.0f} B {s.count_diff / tickets:6.1f}")
        for text in s.traceback.format()[-12:]:
            lines.append(f"      {text}")
    (control / "report.txt").write_text("\n".join(lines) + "\n")


async def until(path: Path) -> None:
    """Until the worker's snapshot thread has written ``path``."""
    while True:
        if path.exists():
            return
        await asyncio.sleep(0.2)


async def probe(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="allot-queue-memory-"))
    control = tmp / "control"
    control.mkdir()
    base_db = os.environ.get("ALLOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/allot")
    db_name = f"allot_queue_memory_{time.strftime('%Y%m%d%H%M%S')}"
    redis = PrivateRedis(tmp / "redis")
    await asyncio.to_thread(redis.start)
    config = tmp / "q.toml"
    config.write_text(WIDE_OPEN + FULL_QUEUE)
    env = {**os.environ, "ALLOT_REDIS_URL": redis.url,
           "ALLOT_DATABASE_URL": with_database(base_db, db_name),
           "ALLOT_REDIS_PREFIX": "allot-queue-memory", "ALLOT_ADMIN_TOKEN": TOKEN,
           "ALLOT_ID_PEPPER": "bench-pepper", "ALLOT_CONFIG": str(config)}  # fmt: skip
    procs = Processes(tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        subprocess.run([str(BIN / "allot"), "migrate"], env=env, check=True, capture_output=True)
        me = [sys.executable, str(Path(__file__).resolve())]
        proc = procs.start("worker", [*me, "--worker", str(port), "--control", str(control),
                                      "--frames", str(args.frames)], env)  # fmt: skip
        await wait_up(url, "/readyz")
        await seed(url, sold_out_site=False)
        idle = rss_kib(proc.pid)[0]
        (control / "take-0").touch()
        await until(control / "tickets-0")
        assert redis.pid is not None
        os.kill(redis.pid, signal.SIGSTOP)
        n = args.requests
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

            async def one(i: int) -> int:
                body = {"citizen_id": citizen(i), "phone": f"139{i:08d}", "site_id": "s1"}
                async with s.post(url + "/api/v1/rounds/bench/reservations", json=body) as r:
                    return r.status

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            last, steady = 0, 0
            while steady < 4:  # RSS unchanged for 2 s: every request is in
                await asyncio.sleep(0.5)
                now = rss_kib(proc.pid)[0]
                steady = steady + 1 if now == last else 0
                last = now
            held = rss_kib(proc.pid)[0]
            (control / "take-1").touch()
            async with asyncio.timeout(600):
                await until(control / "report.txt")
            os.kill(redis.pid, signal.SIGCONT)
            answers = await asyncio.gather(*tasks, return_exceptions=True)
        statuses = [a if isinstance(a, int) else type(a).__name__ for a in answers]
        print(f"worker under tracemalloc({args.frames}): RSS {idle / 1024:.1f} MiB idle,"
              f" {held / 1024:.1f} MiB holding; tickets in line at the second snapshot:"
              f" {(control / 'tickets-1').read_text()}; answers"
              f" {({str(k): statuses.count(k) for k in set(statuses)})}")  # fmt: skip
        print((control / "report.txt").read_text())
    finally:
        if redis.pid is not None:
            os.kill(redis.pid, signal.SIGCONT)
        procs.stop_all()
        await asyncio.to_thread(redis.close)
        con = await asyncpg.connect(with_database(base_db, "postgres"))
        await con.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--control", type=Path, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.worker is not None:
        worker(parsed.worker, parsed.control, parsed.frames)
        raise SystemExit(0)
    raise SystemExit(asyncio.run(probe(parsed)))
