"""The ledger writer's commits alone: PostgreSQL CPU and writer CPU per reservation entry.

Fills a round's stream (in a private redis-server) with reservation entries shaped as
claim.lua writes them, then lets one LedgerWriter drain them through a pool of exactly one
connection, and reads the CPU time (utime + stime from /proc/<pid>/stat) of that connection's
backend (pg_backend_pid()) and of this process, before and after. Nothing else runs against
the database, so the backend's figure is what the commits cost PostgreSQL; the WAL writer and
the checkpointer, shared with everyone on the server, are not counted.

usage: python bench/ledger_pg.py [--entries 20000] [--batch 500] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import asyncpg
import orjson
from redis.asyncio import Redis

from allocator import db
from allocator.config import LedgerSettings
from allocator.keys import Keys
from allocator.ledger import LedgerWriter
from loadtest.servers import PrivateRedis

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def fill(redis: Redis, stream: str, count: int, start: int) -> None:
    now = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(start, start + count):
            record = {
                "id": uuid.uuid4().hex,
                "site": "s1",
                "qty": 1,
                "status": "confirmed",
                "code": f"{n:08d}",
                "cit": f"{n:064x}",
                "ph": f"{n + 1:064x}",
                "mask": "110101********1234",
                "created": now,
                "updated": now,
            }
            pipe.xadd(stream, {"kind": "reservation", "record": orjson.dumps(record), "seq": n})
        await pipe.execute()


async def main(args: argparse.Namespace) -> int:
    base = os.environ.get("ALLOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/allot")
    name = f"allot_bench_ledger_{uuid.uuid4().hex[:8]}"
    url = db.with_database(base, name)
    tmp = Path(tempfile.mkdtemp(prefix="allot-ledger-pg-"))
    server = PrivateRedis(tmp)
    await asyncio.to_thread(server.start)
    redis = Redis.from_url(server.url)
    keys = Keys("bench")
    stream = keys.round("bench").ledger
    try:
        await db.migrate(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        assert pool is not None
        await pool.execute(
            "INSERT INTO rounds (round_id, title, opens_at, closes_at, per_person, pickup_start,"
            " pickup_end, spec) VALUES ('bench', 'bench', now(), now() + interval '1 hour', 1,"
            " now(), now() + interval '2 hours', '{}')"
        )
        await redis.sadd(keys.rounds, "bench")  # type: ignore[misc]
        backend = await pool.fetchval("SELECT pg_backend_pid()")
        settings = replace(LedgerSettings(), batch_size=args.batch)
        pg_us, writer_us = [], []
        for rep in range(args.repeat):
            await fill(redis, stream, args.entries, rep * args.entries)
            writer = LedgerWriter(redis, pool, keys, settings, consumer="bench", block_ms=10)
            pg0, me0 = cpu_seconds(backend), time.process_time()
            await writer.drain()
            pg1, me1 = cpu_seconds(backend), time.process_time()
            assert await pool.fetchval("SELECT pg_backend_pid()") == backend
            pg_us.append((pg1 - pg0) * 1e6 / args.entries)
            writer_us.append((me1 - me0) * 1e6 / args.entries)
            print(
                f"run {rep + 1}: {args.entries} entries, batches of {args.batch}:"
                f" PostgreSQL {pg_us[-1]:.1f} µs, writer {writer_us[-1]:.1f} µs per entry",
                flush=True,
            )
        rows = await pool.fetchval("SELECT count(*) FROM reservations")
        assert rows == args.entries * args.repeat, rows
        print(
            f"median: PostgreSQL {statistics.median(pg_us):.1f} µs, writer"
            f" {statistics.median(writer_us):.1f} µs per reservation ({args.repeat} runs)"
        )
        await pool.close()
    finally:
        await redis.aclose()
        await asyncio.to_thread(server.close)
        con = await asyncpg.connect(db.with_database(base, "postgres"))
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await con.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    sys.exit(asyncio.run(main(parser.parse_args())))
