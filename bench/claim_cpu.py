"""Redis CPU per claim of lua/claim.lua against the script it replaced, side by side.

    python bench/claim_cpu.py [--claims 20000] [--batches 1,16,64] [--rounds 3] [--sites 1]
                              [--callgrind]

Starts a private redis-server (no persistence, as `make bench`'s), seeds one open round per
script on its own key prefix (ample stock at ``--sites`` sites), and sends each script the same
kind of load, alternating old and new, ``--rounds`` times per batch size: every claim a new
citizen from a new client address (a crowd), each call one batch as the admission queue sends
it. Per claim it reports the EVALSHA time from INFO commandstats (usec / claims; wall time inside
Redis, so inflated when the machine is busy) and the redis-server's CPU (used_cpu_sys +
used_cpu_user before and after, the after taken ``--tail`` seconds later so that expiring the old
layout's bucket keys is counted too), and the medians over the rounds. The old script is
tests/fixtures/claim_v1.lua, packed as allocator/claims.py packed it; the new one is fed
exactly what allocator/claims.py packs now (Allocator.claim_many). With ``--callgrind`` the
redis-server runs under valgrind and the instructions it executed per claim (everything in the
process over the same window) are counted too: a figure the machine's other load cannot move.

With ``--enter`` the same for lua/enter.lua and lottery entries (a lottery round registering
now): the old script is tests/fixtures/enter_v1.lua, packed as allocator/entries.py packed it,
the new one fed by Allocator.enter_many.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from allocator.claims import ClaimRequest, fresh_identifiers
from allocator.config import GateSettings
from allocator.entries import EntryRequest, fresh_entry_ids
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys, ScriptKeys
from allocator.model import Round, Site

ROOT = Path(__file__).resolve().parent.parent
OLD = (ROOT / "tests" / "fixtures" / "claim_v1.lua").read_text(encoding="utf-8")
OLD_ENTER = (ROOT / "tests" / "fixtures" / "enter_v1.lua").read_text(encoding="utf-8")


def citizen(n: int) -> str:
    return f"{110000 + n // 1000:06d}19900101{n % 1000:03d}X"


def requests(al: Allocator, start: int, count: int, sites: int) -> list[ClaimRequest]:
    return [
        al.claim_request(
            "r1", f"s{n % sites}", citizen(n), f"139{n:08d}", address(n), channel="web"
        )
        for n in range(start, start + count)
    ]


def entry_requests(al: Allocator, start: int, count: int, sites: int) -> list[EntryRequest]:
    opens_on = dt.date.today()
    return [
        al.entry_request(
            "l1", f"s{n % sites}", citizen(n), f"139{n:08d}", n % 2 == 0, address(n),
            channel="web", opens_on=opens_on,
        )
        for n in range(start, start + count)
    ]  # fmt: skip


async def old_enter(al: Allocator, script: Any, items: list[EntryRequest]) -> list[Any]:
    """One enter_v1.lua call, packed as allocator/entries.py packed it before the lean script."""
    rk = await al.catalogue.round_keys("l1")
    refs = ScriptKeys(
        [rk.round, rk.entries, rk.entrants, rk.tally, rk.ledger, rk.gate_global, rk.entitled]
    )
    args: list[Any] = [len(items), *al.claims.gate.args, -1]
    for item, entry_id in zip(items, fresh_entry_ids("l1", len(items)), strict=True):
        fields = (
            refs.ref(rk.gate_client(al.hasher.client(item.client))),
            refs.ref(rk.gate_citizen(item.citizen_hash)),
            item.site_id, item.citizen_hash, al.hasher.phone(item.phone), item.masked_id,
            entry_id, "1" if item.accept_district else "0", item.channel, item.age_band,
        )  # fmt: skip
        args.append(" ".join(fields))
    replies: list[Any] = await script(keys=refs.keys, args=args)
    return replies


def address(n: int) -> str:
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


async def old_claim(al: Allocator, script: Any, items: list[ClaimRequest]) -> list[Any]:
    """One claim_v1.lua call, packed as allocator/claims.py packed it before the lean script."""
    rk = await al.catalogue.round_keys("r1")
    refs = ScriptKeys(
        [rk.round, rk.stock, rk.holders, rk.reservations, rk.tally, rk.ledger, rk.gate_global,
         rk.entitled]
    )  # fmt: skip
    args: list[Any] = [len(items), *al.claims.gate.args, -1]
    sites = await al.catalogue.sites()
    for item, (reservation_id, codes) in zip(
        items, fresh_identifiers("r1", len(items)), strict=True
    ):
        site = sites.get(item.site_id)
        fields = (
            refs.ref(rk.codes(item.site_id)),
            refs.ref(rk.site_holders(item.site_id)),
            refs.ref(rk.gate_client(al.hasher.client(item.client))),
            refs.ref(rk.gate_citizen(item.citizen_hash)),
            refs.ref(rk.fair_asked("district", site.district)) if site else "0",
            refs.ref(rk.fair_asked("age_band", item.age_band)),
            refs.ref(rk.fair_asked("channel", item.channel)),
            item.site_id, item.citizen_hash, al.hasher.phone(item.phone), item.masked_id,
            reservation_id, item.channel, item.age_band, item.region, *codes,
        )  # fmt: skip
        args.append(" ".join(fields))
    replies: list[Any] = await script(keys=refs.keys, args=args)
    return replies


async def seeded(redis: Redis, prefix: str, sites: int) -> Allocator:
    # the default per-address and per-citizen buckets (every claim a new one of each); the
    # round's own bucket wide open, so that no run is refused for going fast
    gate = GateSettings(global_rate=1e6, global_burst=10**6)
    al = Allocator(redis, None, Keys(prefix), Hasher(b"bench"), gate=gate)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    await al.mirror_sites([Site(f"s{i}", f"S{i}", "Road", f"d{i % 5}") for i in range(sites)])
    await al.mirror_round(
        Round(
            round_id="r1", title="r1", per_person=1,
            opens_at=now - dt.timedelta(hours=1), closes_at=now + dt.timedelta(hours=5),
            pickup_start=now, pickup_end=now + dt.timedelta(hours=6),
        )
    )  # fmt: skip
    await al.load_batch("r1", "b1", [(f"s{i}", 10**8) for i in range(sites)])
    await al.mirror_round(
        Round(
            round_id="l1", title="l1", per_person=1, mode="lottery",
            opens_at=now - dt.timedelta(hours=1), closes_at=now + dt.timedelta(hours=5),
            pickup_start=now, pickup_end=now + dt.timedelta(hours=6),
        )
    )  # fmt: skip
    return al


async def cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


class Callgrind:
    """Instructions the redis-server executed (valgrind --tool=callgrind): the same on every run,
    whatever else the machine is doing, where CPU time on a shared machine is not."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.pid)], capture_output=True, check=True)

    def instructions(self) -> int:
        """Since the last zero, from the dump this makes (``totals:`` of the newest file)."""
        before = set(self.out.parent.glob(self.out.name + "*"))
        subprocess.run(["callgrind_control", "-d", str(self.pid)], capture_output=True, check=True)
        for _ in range(100):
            new = set(self.out.parent.glob(self.out.name + "*")) - before
            if new:
                time.sleep(0.5)  # written whole
                for line in max(new, key=lambda f: f.stat().st_mtime).read_text().splitlines():
                    if line.startswith(("totals:", "summary:")):
                        return int(line.split()[1])
            time.sleep(0.1)
        raise RuntimeError("callgrind wrote no dump")


async def measure(args: argparse.Namespace, port: int, grind: Callgrind | None) -> None:
    redis = Redis(port=port)
    old_al = await seeded(redis, "v1", args.sites)
    new_al = await seeded(redis, "lean", args.sites)
    old_script = redis.register_script(OLD_ENTER if args.enter else OLD)
    made = entry_requests if args.enter else requests
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    counted: dict[tuple[int, str], list[float]] = {}
    base = 0
    for batch in args.batches:
        for _ in range(args.rounds):
            for name in ("old", "new"):
                al = old_al if name == "old" else new_al

                async def call(items: list[Any], al: Allocator = al, name: str = name) -> None:
                    if args.enter and name == "old":
                        replies = await old_enter(al, old_script, items)
                        assert all(r[0] == b"created" for r in replies), replies[:1]
                    elif args.enter:
                        entered = await al.enter_many("l1", items)
                        assert all(o.created for o in entered), entered[:1]
                    elif name == "old":
                        replies = await old_claim(al, old_script, items)
                        assert all(r[0] == b"created" for r in replies), replies[:1]
                    else:
                        outcomes = await al.claim_many("r1", items)
                        assert all(o.created for o in outcomes), outcomes[:1]

                warm = -(-1000 // batch) * batch  # about 1000 claims first, not measured
                for start in range(base, base + warm, batch):
                    await call(made(al, start, batch, args.sites))
                base += warm
                await redis.config_resetstat()
                if grind:
                    grind.zero()
                before = await cpu(redis)
                count = 0
                while count < args.claims:
                    await call(made(al, base + count, batch, args.sites))
                    count += batch
                base += count
                await asyncio.sleep(args.tail)
                used = (await cpu(redis) - before) * 1e6 / count
                usec = (await redis.info("commandstats"))["cmdstat_evalsha"]["usec"] / count
                results.setdefault((batch, name), []).append((usec, used))
                line = (
                    f"batch {batch:3d} {name}: EVALSHA {usec:5.1f} µs/claim,"
                    f" redis-server CPU {used:5.1f} µs/claim"
                )
                if grind:
                    per = grind.instructions() / count
                    counted.setdefault((batch, name), []).append(per)
                    line += f", {per:,.0f} instructions/claim"
                print(line, flush=True)
    print()
    print(
        "| batch | EVALSHA µs/claim, old | new | redis-server CPU µs/claim, old | new | new/old |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        o, n = results[(batch, "old")], results[(batch, "new")]
        ou, nu = statistics.median(u for u, _ in o), statistics.median(u for u, _ in n)
        oc, nc = statistics.median(c for _, c in o), statistics.median(c for _, c in n)
        print(f"| {batch} | {ou:.1f} | {nu:.1f} | {oc:.1f} | {nc:.1f} | {nc / oc:.2f} |")
    if grind:
        print()
        print("| batch | instructions/claim, old | new | new/old |")
        print("|---:|---:|---:|---:|")
        for batch in args.batches:
            oi = statistics.median(counted[(batch, "old")])
            ni = statistics.median(counted[(batch, "new")])
            print(f"| {batch} | {oi:,.0f} | {ni:,.0f} | {ni / oi:.2f} |")
    await redis.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--claims", type=int, default=20000, help="claims per script, batch size and round"
    )
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sites", type=int, default=1)
    p.add_argument("--tail", type=float, default=5.0)
    p.add_argument("--port", type=int, default=6398)
    p.add_argument("--enter", action="store_true", help="lua/enter.lua and lottery entries")
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="run redis-server under valgrind and count its instructions per claim too (slow)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        server = subprocess.Popen(
            [*(grind if args.callgrind else []), "redis-server", "--port", str(args.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(600):  # valgrind takes seconds to start
                time.sleep(0.1)
                ping = subprocess.run(
                    ["redis-cli", "-p", str(args.port), "ping"], capture_output=True, text=True
                )
                if ping.stdout.strip() == "PONG":
                    break
            counter = Callgrind(server.pid, out) if args.callgrind else None
            asyncio.run(measure(args, args.port, counter))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
