"""The lean claim.lua against the one it replaced (tests/fixtures/claim_v1.lua): same decisions.

Both scripts are fed the same random mixed sequences of batches, each on its own key prefix
with identically seeded rounds, and must come to the same thing item by item (created with the
same code, existing, already-reserved, in-cooldown, sold-out with the same units left,
not-open, no-round, wrong-mode, gated by the same bucket, no-code, lost) and leave the same
state behind: stock, holders, records, tally, pickup codes, site holders, the fairness report's
askers, the programme's cooldowns and the ledger stream. Times (Redis TIME) differ between the
two calls of a pair, so they are left out of the comparison; the token buckets are set to
refill so slowly that those few milliseconds can never decide.
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

OLD = (Path(__file__).parent / "fixtures" / "claim_v1.lua").read_text(encoding="utf-8")
# global, client and citizen: rate (tokens a second), burst. A refill of 1e-4 tokens a second
# never lifts a bucket over a whole token within a test; the bursts are small enough to refuse.
# The rates differ so that an empty bucket's wait (about 1000 / rate ms) tells them apart by far
# more than the refill of the milliseconds between the two scripts' calls: when two buckets are
# empty, both scripts name the same one.
GATE = ["0.0001", "60", "0.0002", "4", "0.0003", "3"]
SITES = {"s1": "d1", "s2": "d1", "s3": "d2"}
STOCK = {"s1": 9, "s2": 4, "s3": 30}
# few candidate codes, so that they collide: taken ones are skipped, and no-code happens too
CODES = [c * 4 + d * 4 for c, d in zip("23456789ABCD", "EFGHJKLMNPQR", strict=True)]
ROUNDS = ("p1", "p2", "solo", "shut", "lot", "ghost")  # "ghost" is in no hash: no-round


@dataclass(frozen=True)
class Ask:
    round_id: str
    site_id: str
    citizen: int
    phone: int
    client: int
    channel: str
    age: str
    reservation_id: str
    codes: tuple[str, str, str]

    def citizen_hash(self) -> str:
        return hashlib.sha256(f"citizen:{self.citizen}".encode()).hexdigest()

    def phone_hash(self) -> str:
        return hashlib.sha256(f"phone:{self.phone}".encode()).hexdigest()

    def client_hash(self) -> str:
        return hashlib.sha256(f"client:{self.client}".encode()).hexdigest()[:32]

    def masked(self) -> str:
        return f"110101********{self.citizen % 1000:03d}X"


def asks(rng: random.Random, count: int) -> list[Ask]:
    """One batch: few citizens, phones, clients and codes, so that every outcome comes up."""
    round_id = rng.choice(("p1", "p1", "p1", "p2", "p2", "solo", "solo", "shut", "lot", "ghost"))
    out = []
    for _ in range(count):
        citizen = rng.randrange(40)
        out.append(
            Ask(
                round_id=round_id,
                site_id=rng.choice(("s1", "s1", "s2", "s3", "s3", "nowhere")),
                citizen=citizen,
                phone=citizen if rng.random() < 0.8 else rng.randrange(1000),
                client=rng.randrange(25),
                channel=rng.choice(("web", "api", "mini-program", "desk")),
                age=rng.choice(("0-17", "18-39", "40-64", "65+")),
                reservation_id=f"{rng.getrandbits(128):032x}"[:22] + f".{round_id}",
                codes=(rng.choice(CODES), rng.choice(CODES), rng.choice(CODES)),
            )
        )
    return out


def fixed_keys(rk: RoundKeys, *, lean: bool) -> list[str]:
    gate = [*rk.gate_generations] if lean else [rk.gate_global]
    return [rk.round, rk.stock, rk.holders, rk.reservations, rk.tally, rk.ledger, *gate,
            rk.entitled]  # fmt: skip


def old_call(rk: RoundKeys, batch: list[Ask], floor: int) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of claim_v1.lua, packed as allocator/claims.py packed them for it."""
    refs = ScriptKeys(fixed_keys(rk, lean=False))
    args = [str(len(batch)), *GATE, str(floor)]
    for a in batch:
        district = SITES.get(a.site_id)
        fields = (
            refs.ref(rk.codes(a.site_id)),
            refs.ref(rk.site_holders(a.site_id)),
            "0" if a.channel == "desk" else refs.ref(rk.gate_client(a.client_hash())),
            refs.ref(rk.gate_citizen(a.citizen_hash())),
            refs.ref(rk.fair_asked("district", district)) if district else "0",
            refs.ref(rk.fair_asked("age_band", a.age)),
            refs.ref(rk.fair_asked("channel", a.channel)),
            a.site_id, a.citizen_hash(), a.phone_hash(), a.masked(), a.reservation_id,
            a.channel, a.age, "110101", *a.codes,
        )  # fmt: skip
        args.append(" ".join(fields))
    return refs.keys, args


def new_call(rk: RoundKeys, batch: list[Ask], floor: int) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of lua/claim.lua (the layout its header gives)."""
    refs = ScriptKeys(fixed_keys(rk, lean=True))
    args = [str(len(batch)), *GATE, str(floor)]
    for a in batch:
        district = SITES.get(a.site_id)
        head = (
            a.citizen_hash()
            + a.phone_hash()
            + ("-" * 32 if a.channel == "desk" else a.client_hash())
        )
        fields = (
            refs.ref(rk.codes(a.site_id)),
            refs.ref(rk.site_holders(a.site_id)),
            refs.ref(rk.fair_asked("district", district)) if district else "0",
            refs.ref(rk.fair_asked("age_band", a.age)),
            refs.ref(rk.fair_asked("channel", a.channel)),
            a.site_id, a.masked(), a.reservation_id, a.channel, a.age, "110101", *a.codes,
        )  # fmt: skip
        args.append(head + " " + " ".join(fields))
    return refs.keys, args


def without_times(record: bytes | str) -> dict[str, Any]:
    r: dict[str, Any] = orjson.loads(record)
    assert r.pop("created") == r.pop("updated")
    return r


def decision(reply: list[Any], batch_item: Ask, *, lean: bool) -> tuple[Any, ...]:
    """One reply as a comparable value: what was decided, not when."""
    status = reply[0].decode()
    if status == "created":
        if lean:  # the short reply: the record is the item's own fields, the code and qty
            return (status, reply[1].decode(), int(reply[3]))
        r = without_times(reply[1])
        assert (r["id"], r["site"], r["cit"], r["ph"]) == (
            batch_item.reservation_id, batch_item.site_id,
            batch_item.citizen_hash(), batch_item.phone_hash(),
        )  # fmt: skip
        return (status, r["code"], r["qty"])
    if status == "existing":
        return (status, without_times(reply[1]))
    if status == "lost":
        mark = orjson.loads(reply[1])
        return (status, mark["redis"], mark["ledger"])
    if status == "gated":
        return (status, reply[2].decode())  # the wait depends on the clock; the bucket not
    if status == "in-cooldown":
        return (status,)  # until = created + cooldown: a time
    return (status, *(x.decode() for x in reply[1:]))


async def state(redis: Redis, al: Allocator) -> dict[str, Any]:
    """Everything claim.lua writes, times left out."""
    out: dict[str, Any] = {}
    for round_id in ROUNDS:
        rk = await al.catalogue.round_keys(round_id)
        records = await awaited(redis.hgetall(rk.reservations))
        entitled = await awaited(redis.hgetall(rk.entitled))
        ledger = await redis.xrange(rk.ledger)
        tally = await awaited(redis.hgetall(rk.tally))
        if b"lost" in tally:  # the mark's `at` is a time
            mark = orjson.loads(tally[b"lost"])
            tally[b"lost"] = orjson.dumps([mark["redis"], mark["ledger"]])
        out[round_id] = {
            "stock": await awaited(redis.hgetall(rk.stock)),
            "holders": await awaited(redis.hgetall(rk.holders)),
            "records": {k: without_times(v) for k, v in records.items()},
            "tally": tally,
            "codes": {s: await awaited(redis.hgetall(rk.codes(s))) for s in [*SITES, "nowhere"]},
            "site_holders": {
                s: await awaited(redis.smembers(rk.site_holders(s))) for s in [*SITES, "nowhere"]
            },
            "asked": {
                (d, g): await awaited(redis.smembers(rk.fair_asked(d, g)))
                for d, groups in (
                    ("district", ("d1", "d2")),
                    ("age_band", ("0-17", "18-39", "40-64", "65+")),
                    ("channel", ("web", "api", "mini-program", "desk")),
                )
                for g in groups
            },
            "entitled": {k: v.split(b" ")[1] for k, v in entitled.items()},
            "ledger": [
                {**f, b"record": without_times(f[b"record"])}
                if f[b"kind"] == b"reservation"
                else {k: v for k, v in f.items() if k != b"at"}  # a batch: `at` is when it came
                for _, f in ledger
            ],
        }
    return out


async def seeded(redis: Redis, keys: Keys, now: dt.datetime) -> Allocator:
    """Both scripts' rounds from one ``now``: a second boundary between the two seedings would
    otherwise show up as different windows in their not-open answers."""
    al = Allocator(redis, None, keys, Hasher(b"pepper"))
    await al.mirror_sites([Site(s, s, "Road 1", d) for s, d in SITES.items()])

    def rnd(round_id: str, **kw: Any) -> Round:
        fields: dict[str, Any] = {
            "round_id": round_id, "title": round_id, "per_person": 1,
            "opens_at": now - dt.timedelta(hours=1), "closes_at": now + dt.timedelta(hours=1),
            "pickup_start": now, "pickup_end": now + dt.timedelta(hours=2),
        } | kw  # fmt: skip
        return Round(**fields)

    for r in (
        rnd("p1", programme="prog", cooldown_days=30),
        rnd("p2", programme="prog", cooldown_days=30, per_person=2),
        rnd("solo", per_person=3),
        rnd("shut", closes_at=now - dt.timedelta(minutes=1)),
        rnd("lot", mode="lottery"),
    ):
        await al.mirror_round(r)
        if r.round_id != "lot":
            await al.load_batch(r.round_id, "b1", list(STOCK.items()))
    return al


@pytest.mark.parametrize("seed", range(6))
async def test_the_lean_claim_script_decides_exactly_as_the_old_one(
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
        floor = -1
        if step == 59 or rng.random() < 0.02:  # now and then a Redis behind the ledger
            floor = 10**6
        old_rk = await old_al.catalogue.round_keys(round_id)
        new_rk = await new_al.catalogue.round_keys(round_id)
        keys, args = old_call(old_rk, batch, floor)
        old_replies = await old_script(keys=keys, args=args)
        keys, args = new_call(new_rk, batch, floor)
        new_replies = await new_al.scripts.claim(keys=keys, args=args)
        old_decisions = [
            decision(r, a, lean=False) for r, a in zip(old_replies, batch, strict=True)
        ]
        new_decisions = [decision(r, a, lean=True) for r, a in zip(new_replies, batch, strict=True)]
        assert new_decisions == old_decisions, (step, batch)
        for d in old_decisions:
            seen[d[0]] = seen.get(d[0], 0) + 1
    assert await state(redis, new_al) == await state(redis, old_al)
    # the sequence did exercise the outcomes (over all seeds every one comes up: see below)
    assert {"created", "already-reserved", "sold-out", "not-open", "gated"} <= set(seen), seen


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
        "created", "existing", "already-reserved", "in-cooldown", "sold-out", "not-open",
        "no-round", "wrong-mode", "gated", "no-code", "lost",
    }  # fmt: skip
