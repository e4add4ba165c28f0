"""Worker CPU per request, side by side: the bare aiohttp handler and allot from several trees.

What docs/performance.md ("A lean worker") quotes. One private Redis; the bare handler of
bench/apps.py and one `allot serve --workers 1` per tree (each its own database and key
prefix; PYTHONPATH picks the tree's code); then wrk (bench/reserve.lua: a new valid citizen a
request) against each in turn, alternating the order every round: (a) the bare handler, (c)
reservations at a site with ample stock, (d) the sold-out herd, and with --entries (e) lottery
entries (bench/run.py's round ``bench-lottery``, registering now) on the same server. For
each run: requests/s and the worker process's utime + stime (/proc/<pid>/stat) per request.
Nothing here asserts time.

usage: python scripts/worker_ab.py before=/path/to/main/tree,after=. [--duration 5]
       [--rounds 4] [--connections 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from allocator.db import with_database  # noqa: E402
from bench import run as bench  # noqa: E402
from loadtest.servers import PrivateRedis  # noqa: E402


async def main(args: argparse.Namespace, trees: dict[str, str]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    stamp = time.strftime("%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="worker-ab-"))
    private = PrivateRedis(tmp / "redis")
    await asyncio.to_thread(private.start)
    config = tmp / "bench.toml"
    config.write_text(bench.WIDE_OPEN)
    base_db = os.environ.get("ALLOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/allot")
    pg = await asyncpg.connect(with_database(base_db, "postgres"))
    procs = bench.Processes(tmp)
    databases: list[str] = []
    env = {
        **os.environ,
        "ALLOT_REDIS_URL": private.url,
        "ALLOT_ADMIN_TOKEN": bench.TOKEN,
        "ALLOT_ID_PEPPER": "bench-pepper",
        "ALLOT_CONFIG": str(config),
    }
    try:
        port = bench.free_port()
        py = str(bench.BIN / "python")
        bare = procs.start("bare", [py, str(ROOT / "bench/apps.py"), "bare", str(port)], env)
        targets = {"a": (f"http://127.0.0.1:{port}", bench.Service(bare))}
        for name, tree in trees.items():
            db = f"worker_ab_{stamp}_{name}"
            databases.append(db)
            tree_env = {
                **env,
                "ALLOT_DATABASE_URL": with_database(base_db, db),
                "ALLOT_REDIS_PREFIX": f"worker-ab-{stamp}-{name}",
                "PYTHONPATH": tree,
                "ALLOT_OPS_PORT": str(bench.free_port()),
            }
            allot = str(bench.BIN / "allot")
            await asyncio.to_thread(
                subprocess.run,
                [allot, "migrate"],
                env=tree_env,
                check=True,
                capture_output=True,
            )
            p = bench.free_port()
            proc = procs.start(name, [allot, "serve", "--port", str(p), "--workers", "1"], tree_env)
            targets[name] = (f"http://127.0.0.1:{p}", bench.Service(proc, db))
        for url, _ in targets.values():
            await bench.wait_up(url)
        for name in trees:
            await bench.wait_up(targets[name][0], "/readyz")
            await bench.seed(targets[name][0], lottery=args.entries)
        runs = [("a", "s1")] + [(n, "s1") for n in trees] + [(n, "s0") for n in trees]
        if args.entries:
            runs += [(n, "e") for n in trees]
        offset = 0

        def wrk(key: str, site: str, offset: int, duration: float) -> bench.Run:
            if site == "e":  # (e): entries at s1 of the lottery round
                return bench.wrk(
                    targets[key][0], "s1", offset, duration, args.connections,
                    round_id=bench.LOTTERY, kind="entries",
                )  # fmt: skip
            return bench.wrk(targets[key][0], site, offset, duration, args.connections)

        for key, site in runs:  # warm-up
            wrk(key, site, offset, 2)
            offset += 300_000
        results: dict[str, list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            for key, site in runs if r % 2 == 0 else runs[::-1]:
                url, service = targets[key]
                pids = service.pids()["workers"]
                before = {p: bench.cpu_seconds(p) for p in pids}
                run = await asyncio.to_thread(wrk, key, site, offset, args.duration)
                offset += 300_000
                spent = sum(bench.cpu_seconds(p) - before[p] for p in pids)
                us = spent * 1e6 / max(run.requests, 1)
                kind = {"s1": "c", "s0": "d", "e": "e"}[site]
                label = "a" if key == "a" else f"{key}/{kind}"
                results.setdefault(label, []).append((run.rps, us))
                print(
                    f"round {r + 1} {label:10} {run.rps:8.0f} req/s  worker {us:6.1f} µs/req"
                    f"  non-2xx {run.non2xx}",
                    flush=True,
                )
        a_rps = statistics.median(x[0] for x in results["a"])
        a_us = statistics.median(x[1] for x in results["a"])
        print()
        for label, values in results.items():
            rps = statistics.median(x[0] for x in values)
            us = statistics.median(x[1] for x in values)
            rounds = " / ".join(f"{x[1]:.0f}" for x in values)
            print(
                f"{label:10} {rps:8.0f} req/s ({rps / a_rps:.2f} of a)"
                f"  worker {us:6.1f} µs/req ({us / a_us:.2f}x a)  per round: {rounds}"
            )
    finally:
        procs.stop_all()
        await asyncio.to_thread(private.close)
        for db in databases:
            await pg.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await pg.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", help="name=path,... (each a checkout of allot)")
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--entries", action="store_true", help="(e) lottery entries too")
    parsed = parser.parse_args()
    named = (t.split("=", 1) for t in parsed.trees.split(","))
    asyncio.run(main(parsed, {name: str(Path(tree).resolve()) for name, tree in named}))
