"""The lean enter.lua against the one it replaced (tests/fixtures/enter_v1.lua): same decisions.

Both scripts are fed the same random mixed sequences of batches, each on its own key prefix
with identically seeded rounds and cooldowns, and must come to the same thing item by item
(created, existing with the same record, already-entered, in-cooldown, not-open, no-round,
wrong-mode, gated by the same bucket, lost) and leave the same state behind: entries, entrants,
tally and the ledger stream. The token buckets are laid out differently (one key per bucket
before, claim.lua's two-generation hashes now), so they are compared through the decisions;
times (Redis TIME) differ between the two calls of a pair and are left out; the buckets refill
so slowly that those few milliseconds can never decide.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys, RoundKeys, ScriptKeys
from allocator.model import Round, Site
from allocator.redistyping import awaited

OLD = (Path(__file__).parent / "fixtures" / "enter_v1.lua").read_text(encoding="utf-8")
# as tests/test_claim_differential.py: refills too slow to matter, rates far apart
GATE = ["0.0001", "60", "0.0002", "4", "0.0003", "3"]
SITES = {"s1": "d1", "s2": "d1", "s3": "d2"}
ROUNDS = ("lp", "lot", "shut", "fc", "ghost")  # "ghost" is in no hash: no-round
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Ask:
    round_id: str
    site_id: str
    citizen: int
    phone: int
    client: int
    channel: str
    age: str
    accept: bool
    entry_id: str

    def citizen_hash(self) -> str:
        return hashlib.sha256(f"citizen:{self.citizen}".encode()).hexdigest()

    def phone_hash(self) -> str:
        return hashlib.sha256(f"phone:{self.phone}".encode()).hexdigest()

    def client_hash(self) -> str:
        return hashlib.sha256(f"client:{self.client}".encode()).hexdigest()[:32]

    def masked(self) -> str:
        return f"110101********{self.citizen % 1000:03d}X"


def citizen_hash(n: int) -> str:
    return hashlib.sha256(f"citizen:{n}".encode()).hexdigest()


def asks(rng: random.Random, count: int) -> list[Ask]:
    """One batch: few citizens, phones and clients, so that every outcome comes up."""
    round_id = rng.choice(("lp", "lp", "lp", "lot", "lot", "shut", "fc", "ghost"))
    out = []
    for _ in range(count):
        citizen = rng.randrange(40)
        out.append(
            Ask(
                round_id=round_id,
                site_id=rng.choice(("s1", "s1", "s2", "s3")),
                citizen=citizen,
                phone=citizen if rng.random() < 0.85 else rng.randrange(1000),
                client=rng.randrange(25),
                channel=rng.choice(("web", "api", "mini-program", "desk")),
                age=rng.choice(("0-17", "18-39", "40-64", "65+")),
                accept=rng.random() < 0.5,
                entry_id=f"{rng.getrandbits(128):032x}"[:22] + f".{round_id}",
            )
        )
    return out


def old_call(rk: RoundKeys, batch: list[Ask], floor: int) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of enter_v1.lua, packed as allocator/entries.py packed them for it."""
    refs = ScriptKeys([rk.round, rk.entries, rk.entrants, rk.tally, rk.ledger, rk.gate_global,
                       rk.entitled])  # fmt: skip
    args = [str(len(batch)), *GATE, str(floor)]
    for a in batch:
        fields = (
            "0" if a.channel == "desk" else refs.ref(rk.gate_client(a.client_hash())),
            refs.ref(rk.gate_citizen(a.citizen_hash())),
            a.site_id, a.citizen_hash(), a.phone_hash(), a.masked(), a.entry_id,
            "1" if a.accept else "0", a.channel, a.age,
        )  # fmt: skip
        args.append(" ".join(fields))
    return refs.keys, args


def new_call(rk: RoundKeys, batch: list[Ask], floor: int) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of lua/enter.lua (the layout its header gives)."""
    keys = [rk.round, rk.entries, rk.entrants, rk.tally, rk.ledger, rk.entitled,
            *rk.gate_generations]  # fmt: skip
    args = [str(len(batch)), *GATE, str(floor)]
    for a in batch:
        head = (
            a.citizen_hash()
            + a.phone_hash()
            + ("-" * 32 if a.channel == "desk" else a.client_hash())
        )
        args.append(
            f"{head} {a.site_id} {a.masked()} {a.entry_id} {'1' if a.accept else '0'}"
            f" {a.channel} {a.age}"
        )
    return keys, args


def without_times(record: bytes | str) -> dict[str, Any]:
    r: dict[str, Any] = orjson.loads(record)
    assert r.pop("created") <= r.pop("updated")
    return r


def decision(reply: list[Any], a: Ask, *, lean: bool) -> tuple[Any, ...]:
    """One reply as a comparable value: what was decided, not when."""
    status = reply[0].decode()
    if status == "created":
        if lean:  # the short reply: the record is the item's own fields and this time
            assert int(reply[1]) > 0
            return (status,)
        r = without_times(reply[1])
        assert r == {
            "id": a.entry_id, "site": a.site_id, "acc": int(a.accept), "status": "registered",
            "cit": a.citizen_hash(), "ph": a.phone_hash(), "mask": a.masked(), "ch": a.channel,
            "age": a.age,
        }  # fmt: skip
        return (status,)
    if status == "existing":
        return (status, without_times(reply[1]))
    if status == "lost":
        mark = orjson.loads(reply[1])
        return (status, mark["redis"], mark["ledger"])
    if status == "gated":
        return (status, reply[2].decode())  # the wait depends on the clock; the bucket not
    return (status, *(x.decode() for x in reply[1:]))


async def state(redis: Redis, al: Allocator) -> dict[str, Any]:
    """Everything enter.lua writes but the buckets, times left out."""
    out: dict[str, Any] = {}
    for round_id in ROUNDS:
        rk = await al.catalogue.round_keys(round_id)
        tally = await awaited(redis.hgetall(rk.tally))
        if b"lost" in tally:  # the mark's `at` is a time
            mark = orjson.loads(tally[b"lost"])
            tally[b"lost"] = orjson.dumps([mark["redis"], mark["ledger"]])
        out[round_id] = {
            "entries": {
                k: without_times(v) for k, v in (await awaited(redis.hgetall(rk.entries))).items()
            },
            "entrants": await awaited(redis.hgetall(rk.entrants)),
            "tally": tally,
            "ledger": [
                {**f, b"record": without_times(f[b"record"])}
                if f[b"kind"] == b"entry"
                else {k: v for k, v in f.items() if k != b"at"}
                for _, f in await redis.xrange(rk.ledger)
            ],
        }
    return out


async def seeded(redis: Redis, keys: Keys, now: dt.datetime) -> Allocator:
    """Both scripts' rounds from one ``now``, and the same cooldowns in the programme."""
    al = Allocator(redis, None, keys, Hasher(b"pepper"))
    await al.mirror_sites([Site(s, s, "Road 1", d) for s, d in SITES.items()])

    def rnd(round_id: str, **kw: Any) -> Round:
        fields: dict[str, Any] = {
            "round_id": round_id, "title": round_id, "per_person": 1, "mode": "lottery",
            "opens_at": now - dt.timedelta(hours=1), "closes_at": now + dt.timedelta(hours=1),
            "pickup_start": now, "pickup_end": now + dt.timedelta(hours=2),
        } | kw  # fmt: skip
        return Round(**fields)

    for r in (
        rnd("lp", programme="prog", cooldown_days=30),
        rnd("lot"),
        rnd("shut", closes_at=now - dt.timedelta(minutes=1)),
        rnd("fc", mode="fcfs"),
    ):
        await al.mirror_round(r)
    # the programme's cooldowns: a live bar from another round (citizens 0-5), one that has
    # ended (6, 7) and one set by this very round (8: not a bar on entering it)
    rk = await al.catalogue.round_keys("lp")
    now_ms = int(now.timestamp() * 1000)
    bars = {citizen_hash(c): f"{now_ms + DAY_MS} {'x' * 22}.other" for c in range(6)}
    bars |= {citizen_hash(c): f"{now_ms - DAY_MS} {'x' * 22}.other" for c in (6, 7)}
    bars[citizen_hash(8)] = f"{now_ms + DAY_MS} {'x' * 22}.lp"
    await awaited(redis.hset(rk.entitled, mapping=bars))
    return al


@pytest.mark.parametrize("seed", range(6))
async def test_the_lean_entry_script_decides_exactly_as_the_old_one(
    seed: int, redis: Redis, redis_prefix: str
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    old_al = await seeded(redis, Keys(f"{redis_prefix}:v1"), now)
    new_al = await seeded(redis, Keys(f"{redis_prefix}:lean"), now)
    old_script = redis.register_script(OLD)
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    for step in range(60):
        batch = asks(rng, rng.choice((1, 1, 2, 3, 5, 8, 13)))
        round_id = batch[0].round_id
        floor = 10**6 if step == 59 or rng.random() < 0.02 else -1
        old_rk = await old_al.catalogue.round_keys(round_id)
        new_rk = await new_al.catalogue.round_keys(round_id)
        keys, args = old_call(old_rk, batch, floor)
        old_replies = await old_script(keys=keys, args=args)
        keys, args = new_call(new_rk, batch, floor)
        new_replies = await new_al.scripts.enter(keys=keys, args=args)
        old_decisions = [
            decision(r, a, lean=False) for r, a in zip(old_replies, batch, strict=True)
        ]
        new_decisions = [decision(r, a, lean=True) for r, a in zip(new_replies, batch, strict=True)]
        assert new_decisions == old_decisions, (step, batch)
        for d in old_decisions:
            seen[d[0]] = seen.get(d[0], 0) + 1
    assert await state(redis, new_al) == await state(redis, old_al)
    assert {"created", "existing", "not-open", "gated"} <= set(seen), seen


async def test_the_sequences_reach_every_outcome(redis: Redis, redis_prefix: str) -> None:
    """The differential test's inputs are worth comparing: the old script, fed the seeds'
    sequences, answers with every outcome it has."""
    seen: set[str] = set()
    for seed in range(6):
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        al = await seeded(redis, Keys(f"{redis_prefix}:o{seed}"), now)
        script = redis.register_script(OLD)
        rng = random.Random(seed)
        for step in range(60):
            batch = asks(rng, rng.choice((1, 1, 2, 3, 5, 8, 13)))
            floor = 10**6 if step == 59 or rng.random() < 0.02 else -1
            rk = await al.catalogue.round_keys(batch[0].round_id)
            keys, args = old_call(rk, batch, floor)
            seen |= {r[0].decode() for r in await script(keys=keys, args=args)}
    assert seen == {
        "created", "existing", "already-entered", "in-cooldown", "not-open", "no-round",
        "wrong-mode", "gated", "lost",
    }  # fmt: skip
