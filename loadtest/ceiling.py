"""The per-round ceiling on Redis Cluster, measured: how many claims a second one primary can
decide for one round (one round = one hash tag = one slot = one primary), from the Redis CPU
each batched ``claim.lua`` call costs there (``INFO commandstats``), and with ``WAIT 1``.

    python -m loadtest.ceiling [--batches 40] [--batch 256]

Starts its own cluster (loadtest/cluster.py) and a scratch PostgreSQL database on
ALLOT_DATABASE_URL's server (dropped afterwards), creates rounds on three different primaries,
and sends ``claim_many`` batches of new citizens straight to the allocator (no HTTP: the figure
is Redis's, the one part that cannot be spread over more allot nodes). docs/scaling.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import asyncpg
from redis.crc import key_slot

from allocator import db, topology
from allocator.config import GateSettings, RedisSettings, load_settings
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.model import Round, Site
from loadtest.cluster import PrivateCluster, command

# every claim comes from one address here: the gate's buckets wide open (they are still spent)
OPEN_GATE = GateSettings(
    global_rate=1e9, global_burst=10**9, client_rate=1e9, client_burst=10**9,
    citizen_rate=1e9, citizen_burst=10**9,
)  # fmt: skip


def citizen(n: int) -> str:
    from tests.helpers import citizen_id  # a valid ID number for each n

    return citizen_id(n)


def evalsha_usec(port: int) -> tuple[int, int]:
    """calls, usec of EVALSHA + EVAL on one node so far."""
    calls = usec = 0
    for line in command(port, "info", "commandstats").splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            fields = dict(part.split("=") for part in line.split(":", 1)[1].split(","))
            calls += int(fields["calls"])
            usec += int(fields["usec"])
    return calls, usec


async def measure(batches: int, batch: int) -> list[str]:
    base = load_settings(environ={k: v for k, v in os.environ.items() if k == "ALLOT_DATABASE_URL"})
    dbname = f"allot_ceiling_{uuid.uuid4().hex[:8]}"
    database_url = db.with_database(base.database_url, dbname)
    lines = []
    with PrivateCluster(Path(tempfile.mkdtemp(prefix="allot-ceiling-"))) as cluster:
        await db.migrate(database_url)
        settings = replace(
            base,
            redis_url=cluster.url,
            database_url=database_url,
            redis=RedisSettings(mode="cluster"),
        )
        redis = topology.redis_client(settings)
        pool = await db.create_pool(database_url)
        keys = Keys("ceiling")
        try:
            for wait in (0, 1):
                alloc = Allocator(
                    redis, pool, keys, Hasher(b"ceiling"), timeout=5, wait_replicas=wait,
                    wait_timeout_ms=1000, gate=OPEN_GATE,
                )  # fmt: skip
                lines += await _one(alloc, cluster, keys, wait, batches, batch)
                alloc.lottery.close()
        finally:
            await topology.close_client(redis)
            await pool.close()
            con = await asyncpg.connect(base.database_url)
            await con.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            await con.close()
    return lines


async def _one(
    alloc: Allocator, cluster: PrivateCluster, keys: Keys, wait: int, batches: int, batch: int
) -> list[str]:
    await alloc.upsert_sites([Site("s1", "Site 1", "Road 1", "d1")])
    tz = dt.timezone(dt.timedelta(hours=8))
    now = dt.datetime.now(tz).replace(microsecond=0)
    rounds: list[str] = []
    ports: set[int] = set()
    i = 0
    while len(rounds) < 3:
        round_id = f"w{wait}-{i}"
        i += 1
        port = cluster.primary_of_slot(key_slot(keys.round(round_id).round.encode())).port
        if port in ports:
            continue
        ports.add(port)
        rounds.append(round_id)
        await alloc.upsert_round(
            Round(
                round_id=round_id,
                title="ceiling",
                opens_at=now - dt.timedelta(minutes=1),
                closes_at=now + dt.timedelta(hours=1),
                per_person=1,
                pickup_start=now,
                pickup_end=now + dt.timedelta(hours=2),
            )
        )
        await alloc.load_batch(round_id, "b", [("s1", 2 * batches * batch + 10)])
    n = 0

    async def run(round_id: str) -> None:
        nonlocal n
        for _ in range(batches):
            items = []
            for _ in range(batch):
                n += 1
                items.append(alloc.claim_request(round_id, "s1", citizen(n), f"139{n:08d}"))
            outcomes = await alloc.claim_many(round_id, items)
            bad = [o for o in outcomes if not o.created]
            assert not bad, (len(bad), bad[:2], n)

    out = []
    # one round alone on its primary: Redis µs per claim there
    port = cluster.primary_of_slot(key_slot(keys.round(rounds[0]).round.encode())).port
    c0, u0 = evalsha_usec(port)
    started = time.perf_counter()
    await run(rounds[0])
    elapsed = time.perf_counter() - started
    c1, u1 = evalsha_usec(port)
    per_claim = (u1 - u0) / (batches * batch)
    out.append(
        f"wait_replicas={wait}: one round, {batches} batches of {batch}: Redis {per_claim:.1f} µs"
        f" per claim in claim.lua ({(u1 - u0) / max(1, c1 - c0):.0f} µs per call) -> ceiling"
        f" {1e6 / per_claim:,.0f} claims/s per primary core; seen by this client"
        f" {batches * batch / elapsed:,.0f} claims/s"
    )
    started = time.perf_counter()
    await asyncio.gather(*(run(r) for r in rounds))
    elapsed = time.perf_counter() - started
    out.append(
        f"wait_replicas={wait}: three rounds on three primaries at once: this client"
        f" {3 * batches * batch / elapsed:,.0f} claims/s (the client, one Python process on a"
        " shared 2-core VM, is the limit here, not Redis)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ceiling", description=__doc__)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    for line in asyncio.run(measure(args.batches, args.batch)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
