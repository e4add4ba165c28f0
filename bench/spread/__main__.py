"""Redis CPU per claim of one round spread over 3 primaries (bench/spread) against the same
round on 1 primary with today's lua/claim.lua, side by side on one private Redis Cluster.

    python -m bench.spread [--claims 20000] [--batches 192,64,16] [--rounds 3] [--workers 4]
                           [--sites 4]      (make bench-spread; BENCH_SPREAD_ARGS=...)

Starts a private 3+3 cluster (loadtest/cluster.py). Today's round is seeded through the
allocator (its keys under one hash tag: one slot, one primary) and claimed through
``Allocator.claim_many``; the spread round has N = 3 citizen shards and M = 3 stock shards,
one of each on every primary, claimed through bench.spread's driver. Both get the same crowd:
every claim a new citizen from a new client address, ample stock at ``--sites`` sites, the
same token-bucket settings (the round's bucket wide open; the spread round's split over its
citizen shards), ``--workers`` batches in flight at once. For each batch size and round, old
and new alternate; per primary, per claim: EVALSHA time (INFO commandstats ``usec``: time
inside the scripts), all commands' time, and the redis-server's CPU (used_cpu_sys +
used_cpu_user; includes reading and writing the sockets, and feeding the replica). A last
pass per batch size runs the spread round stage by stage (every batch's entitle, then every
batch's take, then every batch's confirm: stalled runs resumed), the CPU read between stages:
the redis-server CPU of each script on each shard. EVALSHA time is wall time inside Redis, so
it is inflated whenever the client takes the CPU from a node; the CPU figures are the ones to
quote.

The implied ceiling of a round is 1e6 / the CPU µs per claim of its busiest primary. The
client (Python, on the same 2 cores) is the limit of this machine: claims/s are not reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from allocator.facade import Allocator
from bench.claim_cpu import requests, seeded
from bench.spread.protocol import Claim, Layout, Run, Spread, spread_tags
from loadtest.cluster import PrivateCluster

Batch = Callable[[int, int], Awaitable[int]]  # (first claim number, count) -> stages


async def node_cpu(node: Redis) -> float:
    info = await node.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def node_stats(node: Redis) -> tuple[float, float, int]:
    """EVALSHA and EVAL usec, all commands' usec, script calls (since CONFIG RESETSTAT)."""
    stats = await node.info("commandstats")
    scripts = [v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")]
    return (
        sum(float(v["usec"]) for v in scripts),
        sum(float(v["usec"]) for v in stats.values()),
        sum(int(v["calls"]) for v in scripts),
    )


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: PrivateCluster) -> None:
        self.args = args
        self.cluster = cluster
        self.client = RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in cluster.nodes],
            require_full_coverage=False,
        )
        self.primaries = {n.port: Redis(port=n.port) for n in cluster.primaries()}
        self.next = 0  # claim number: every claim a new citizen and client address

    async def setup(self) -> None:
        _ = await self.client.initialize()
        redis = cast(Redis, self.client)
        self.al: Allocator = await seeded(redis, "today", self.args.sites)
        rk = await self.al.catalogue.round_keys("r1")
        self.today_port = self.cluster.primary_of_slot(key_slot(rk.round.encode())).port
        names = sorted(n.name for n in self.client.get_primaries())

        def node_of_slot(slot: int) -> str:
            node = self.client.nodes_manager.get_node_from_slot(slot)
            assert node is not None
            return str(node.name)

        self.layout = Layout(
            "spread",
            "p1",
            "r1",
            spread_tags("c", "p1", 3, node_of_slot, names),
            spread_tags("s", "r1", 3, node_of_slot, names),
        )
        g = self.al.claims.gate.args  # the six bucket settings claim.lua gets
        n = self.layout.n
        gate = (float(g[0]) / n, max(1.0, float(g[1]) / n), *(float(x) for x in g[2:]))
        self.spread = Spread(
            redis, self.layout, clock_ms=lambda: int(time.time() * 1000), gate=gate
        )
        for i in range(self.args.sites):
            await self.spread.load(f"s{i}", 10**8)
        sites = await self.al.catalogue.sites()
        self.district = {s: sites[s].district for s in sites}

    # -- one batch of each kind ------------------------------------------------------------------

    async def today(self, start: int, count: int) -> int:
        outcomes = await self.al.claim_many("r1", requests(self.al, start, count, self.args.sites))
        assert all(o.created for o in outcomes), outcomes[:1]
        return 1

    async def spread_batch(self, start: int, count: int) -> int:
        claims = self.spread_claims(start, count)
        run = await self.spread.claim_many(claims)
        assert run.outcomes is not None
        assert all(o.status == "ok" for o in run.outcomes), run.outcomes[:1]
        return run.stages

    async def crowd(self, batch: Batch, claims: int, size: int) -> list[int]:
        """``claims`` claims in batches of ``size``, ``--workers`` batches in flight."""
        starts = list(range(self.next, self.next + claims, size))
        self.next += len(starts) * size
        stages: list[int] = []

        async def worker(mine: Sequence[int]) -> None:
            for s in mine:
                stages.append(await batch(s, size))

        w = self.args.workers
        await asyncio.gather(*(worker(starts[i::w]) for i in range(w)))
        return stages

    async def measure(self, batch: Batch, size: int) -> dict[str, Any]:
        await self.crowd(batch, 1000, size)  # warm, not measured
        nodes = self.primaries
        await asyncio.gather(*(n.config_resetstat() for n in nodes.values()))
        before = {p: await node_cpu(n) for p, n in nodes.items()}
        claims = -(-self.args.claims // size) * size
        stages = await self.crowd(batch, claims, size)
        await asyncio.sleep(self.args.tail)
        cpu = {p: (await node_cpu(n) - before[p]) * 1e6 / claims for p, n in nodes.items()}
        stats = {p: await node_stats(n) for p, n in nodes.items()}
        return {
            "script": {p: s[0] / claims for p, s in stats.items()},
            "all": {p: s[1] / claims for p, s in stats.items()},
            "calls": sum(s[2] for s in stats.values()) / claims,
            "cpu": cpu,
            "stages": statistics.mean(stages),
        }

    def spread_claims(self, start: int, count: int) -> list[Claim]:
        hasher = self.al.hasher
        return [
            Claim(
                r.citizen_hash,
                r.site_id,
                hasher.client(r.client),
                hasher.phone(r.phone),
                r.masked_id,
                r.channel,
                r.age_band,
                r.region,
                self.district[r.site_id],
            )
            for r in requests(self.al, start, count, self.args.sites)
        ]

    async def staged(self, size: int) -> dict[str, dict[int, float]]:
        """The spread round's redis-server CPU µs per claim, by stage (script) and primary:
        every batch's stage 1 first, then every batch's stage 2, then stage 3 (the driver's
        stalled runs resumed), the CPU read between the stages."""
        nodes = self.primaries
        claims = -(-self.args.claims // size) * size
        starts = list(range(self.next, self.next + claims, size))
        self.next += claims
        runs: dict[int, Run] = {}

        async def entitle(at: int) -> None:
            runs[at] = await self.spread.claim_many(
                self.spread_claims(starts[at], size), die_after="entitle"
            )

        async def take(at: int) -> None:
            _ = await self.spread.resume(runs[at], die_after="take")

        async def confirm(at: int) -> None:
            run = await self.spread.resume(runs[at])
            assert run.outcomes is not None
            assert all(o.status == "ok" for o in run.outcomes)

        stage_of = {"entitle": entitle, "take": take, "confirm": confirm}
        found: dict[str, dict[int, float]] = {}
        w = self.args.workers
        for name, step in stage_of.items():
            before = {p: await node_cpu(n) for p, n in nodes.items()}

            async def worker(mine: range, step: Callable[[int], Awaitable[None]] = step) -> None:
                for at in mine:
                    await step(at)

            await asyncio.gather(*(worker(range(i, len(starts), w)) for i in range(w)))
            await asyncio.sleep(self.args.tail)
            found[name] = {
                p: (await node_cpu(n) - before[p]) * 1e6 / claims for p, n in nodes.items()
            }
        return found

    async def close(self) -> None:
        await self.client.aclose()
        for n in self.primaries.values():
            await n.aclose()


def median_of(runs: list[dict[str, Any]], kind: str, port: int) -> float:
    return float(statistics.median(r[kind][port] for r in runs))


async def main(args: argparse.Namespace, cluster: PrivateCluster) -> None:
    b = Bench(args, cluster)
    await b.setup()
    ports = sorted(b.primaries)
    label = {p: f"primary {i + 1}" + (" (today's round)" if p == b.today_port else "")
             for i, p in enumerate(ports)}  # fmt: skip
    lay = b.layout
    print("spread round: citizen shards", lay.citizen_tags, "stock shards", lay.stock_tags)
    idle = {p: await node_cpu(n) for p, n in b.primaries.items()}
    await asyncio.sleep(2)
    idle = {p: (await node_cpu(n) - idle[p]) * 1e6 / 2 for p, n in b.primaries.items()}
    print("idle redis-server CPU, µs per second: " + ", ".join(f"{idle[p]:.0f}" for p in ports))
    try:
        for size in args.batches:
            runs: dict[str, list[dict[str, Any]]] = {"today": [], "spread": []}
            for r in range(args.rounds):
                for name, batch in (("today", b.today), ("spread", b.spread_batch)):
                    got = await b.measure(batch, size)
                    runs[name].append(got)
                    print(
                        f"batch {size} round {r + 1} {name}: CPU µs/claim by primary "
                        + ", ".join(f"{got['cpu'][p]:.1f}" for p in ports)
                        + "; EVALSHA µs/claim "
                        + ", ".join(f"{got['script'][p]:.1f}" for p in ports),
                        flush=True,
                    )
            staged = await b.staged(size)
            print()
            print(f"### batch {size} (claims per claim_many call; medians of {args.rounds} rounds)")
            print()
            print("| | primary | EVALSHA µs/claim (wall) | all commands µs/claim (wall) |"
                  " redis-server CPU µs/claim |")  # fmt: skip
            print("|---|---|---:|---:|---:|")
            for name in ("today", "spread"):
                for p in ports:
                    print(
                        f"| {name} | {label[p]} | {median_of(runs[name], 'script', p):.1f}"
                        f" | {median_of(runs[name], 'all', p):.1f}"
                        f" | {median_of(runs[name], 'cpu', p):.1f} |"
                    )
            print()
            print("| spread, stage by stage: redis-server CPU µs/claim | "
                  + " | ".join(label[p] for p in ports) + " | sum |")  # fmt: skip
            print("|---|" + "---:|" * (len(ports) + 1))
            for stage, by_port in staged.items():
                row = [by_port[p] for p in ports]
                script = "confirm.lua (+ release.lua)" if stage == "confirm" else f"{stage}.lua"
                print(f"| {script} | " + " | ".join(f"{x:.1f}" for x in row)
                      + f" | {sum(row):.1f} |")  # fmt: skip
            print()
            today_busiest = median_of(runs["today"], "cpu", b.today_port)
            spread_busiest = max(median_of(runs["spread"], "cpu", p) for p in ports)
            spread_total = sum(median_of(runs["spread"], "cpu", p) for p in ports)
            t_script = median_of(runs["today"], "script", b.today_port)
            s_script = max(median_of(runs["spread"], "script", p) for p in ports)
            calls = {n: statistics.median(r["calls"] for r in runs[n]) for n in runs}
            stages = {n: statistics.median(r["stages"] for r in runs[n]) for n in runs}
            print(
                f"today, 1 primary: {today_busiest:.1f} CPU µs/claim -> ceiling"
                f" {1e6 / today_busiest:,.0f} claims/s ({1e6 / t_script:,.0f} by EVALSHA time);"
                f" {stages['today']:.0f} round trip and {calls['today']:.3f} script calls per"
                " claim"
            )
            print(
                f"spread, 3 primaries: busiest {spread_busiest:.1f} CPU µs/claim -> ceiling"
                f" {1e6 / spread_busiest:,.0f} claims/s ({1e6 / s_script:,.0f} by EVALSHA"
                f" time), {spread_busiest and today_busiest / spread_busiest:.2f}x today's;"
                f" {spread_total:.1f} CPU µs/claim over all primaries"
                f" ({spread_total / today_busiest:.2f}x today's); {stages['spread']:.1f}"
                f" sequential round trips per batch and {calls['spread']:.3f} script calls"
                " per claim"
            )
            print()
    finally:
        await b.close()


def cli() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--claims", type=int, default=20000, help="claims per kind, batch size, round")
    p.add_argument(
        "--batches", type=lambda s: [int(x) for x in s.split(",")], default=[192, 64, 16]
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=4, help="batches in flight at once")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--tail", type=float, default=0.2, help="seconds before the CPU is read")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PrivateCluster(Path(tmp) / "cluster") as cluster:
        asyncio.run(main(args, cluster))


if __name__ == "__main__":
    cli()
