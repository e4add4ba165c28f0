"""Every script refuses malformed ARGV with an error reply, before it writes anything.

Scripts do not roll back: a script that failed inside arithmetic on item k would leave items
< k committed, or a round's lost mark set. Each case below calls a script with one malformed
argument list against a round holding real state, and checks the error reply and that no key
under the test's prefix changed (DUMP of every key, before and after).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys, RoundKeys
from allocator.model import Round, Site
from allocator.redistyping import awaited
from tests.helpers import citizen_id, claim_once, phone

GATE = ["1000", "1000", "1000", "1000", "1000", "1000"]
CODES = "AAAAAAAA BBBBBBBB CCCCCCCC"
# an entry item as lua/enter.lua lays it out (ARGV[9..])
ENTRY = "c" * 64 + "p" * 64 + "k" * 32 + " s1 110101********0011 e.r1 0 api 18-39"


def claim_keys(rk: RoundKeys) -> list[str]:
    return [
        rk.round,
        rk.stock,
        rk.holders,
        rk.reservations,
        rk.tally,
        rk.ledger,
        *rk.gate_generations,
        rk.entitled,
        rk.codes("s1"),
        rk.site_holders("s1"),
    ]


def item(
    *,
    indexes: str = "10 11 0 0 0",
    n: int = 1,
    hashes: str = "c" * 64 + "p" * 64 + "e" * 32,
    channel: str = "web",
    site: str = "s1",
) -> str:
    return (
        f"{hashes} {indexes} {site} 110101********{n:03d}X rid{n}.r1 {channel} 18-39 110101 {CODES}"
    )


GOOD_ITEM = item()
BAD_CLAIMS: dict[str, list[str]] = {
    "n not a number": ["x", *GATE, "-1", GOOD_ITEM],
    "n zero": ["0", *GATE, "-1"],
    "n not whole": ["1.5", *GATE, "-1", GOOD_ITEM],
    "n over the most items a call takes": ["2001", *GATE, "-1", *[GOOD_ITEM] * 2001],
    "n does not match the items": ["2", *GATE, "-1", GOOD_ITEM],
    "a rate not a number": ["1", "abc", *GATE[1:], "-1", GOOD_ITEM],
    "a rate NaN": ["1", "nan", *GATE[1:], "-1", GOOD_ITEM],
    "a burst infinite": ["1", GATE[0], "inf", *GATE[2:], "-1", GOOD_ITEM],
    "a rate zero": ["1", *GATE[:2], "0", *GATE[3:], "-1", GOOD_ITEM],
    "a burst negative": ["1", *GATE[:5], "-1", "-1", GOOD_ITEM],
    "floor not a number": ["1", *GATE, "x", GOOD_ITEM],
    "second item short": ["2", *GATE, "-1", GOOD_ITEM, GOOD_ITEM[:200]],
    "second item key index outside KEYS": [
        *("2", *GATE, "-1", GOOD_ITEM),
        item(indexes="10 11 0 99 0"),
    ],
    "item key index into the fixed keys": ["1", *GATE, "-1", item(indexes="2 11 0 0 0")],
    "item key index at the entitlement hash": ["1", *GATE, "-1", item(indexes="9 11 0 0 0")],
    "item key index not a number": ["1", *GATE, "-1", item(indexes="10 x 0 0 0")],
    "item codes key index 0 (only the askers may be 0)": [
        *("1", *GATE, "-1"),
        item(indexes="0 11 0 0 0"),
    ],
    "item site-holders key index 0": ["1", *GATE, "-1", item(indexes="10 0 0 0 0")],
    "item askers key index outside KEYS": ["1", *GATE, "-1", item(indexes="10 11 0 12 0")],
    # the record is built by hand: nothing JSON would escape may reach it
    "a quote in the citizen hash": [
        *("1", *GATE, "-1"),
        item(hashes="c" * 63 + '"' + "p" * 64 + "e" * 32),
    ],
    "a newline leading the phone hash": [
        *("1", *GATE, "-1"),
        item(hashes="c" * 64 + "\n" + "p" * 63 + "e" * 32),
    ],
    "a space ending the client hash": [
        *("1", *GATE, "-1"),
        item(hashes="c" * 64 + "p" * 64 + "e" * 31 + " "),
    ],
    "a phone hash one character short": ["1", *GATE, "-1", item(hashes="c" * 64 + "p" * 63)],
    "a channel not one of the four": ["1", *GATE, "-1", item(channel="fax")],
    "a backslash in the site": ["1", *GATE, "-1", item(site="s\\1")],
    "a non-ASCII site": ["1", *GATE, "-1", item(site="s\u00e91")],
    # a floor above the round's seq would set the lost mark: not before the items are checked
    "bad item with a floor that marks lost": ["2", *GATE, "99", GOOD_ITEM, "9 10 11"],
}


async def snapshot(redis: Redis, prefix: str) -> dict[bytes, bytes | None]:
    return {k: await redis.dump(k) async for k in redis.scan_iter(match=f"{prefix}*", count=500)}


async def seeded(redis: Redis, keys: Keys) -> tuple[Allocator, str]:
    """A round r1 with stock at s1 and one reservation; returns the allocator and its code."""
    allocator = Allocator(redis, None, keys, Hasher(b"p"))
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    await allocator.mirror_sites([Site("s1", "One", "Road 1", "d1")])
    await allocator.mirror_round(
        Round(
            round_id="r1",
            title="r1",
            opens_at=now - dt.timedelta(hours=1),
            closes_at=now + dt.timedelta(hours=1),
            per_person=1,
            pickup_start=now - dt.timedelta(hours=1),
            pickup_end=now + dt.timedelta(hours=2),
        )
    )
    await allocator.load_batch("r1", "b1", [("s1", 10)])
    made, _ = await claim_once(allocator, "r1", "s1", citizen_id(1), phone(1))
    return allocator, made.pickup_code


async def refused(
    redis: Redis, prefix: str, script: Any, name: str, keys: list[str], args: list[str]
) -> None:
    before = await snapshot(redis, prefix)
    with pytest.raises(ResponseError, match=rf"{name}: "):
        await script(keys=keys, args=args)
    assert await snapshot(redis, prefix) == before, args


@pytest.mark.parametrize("case", sorted(BAD_CLAIMS))
async def test_claim_refuses_malformed_argv_and_writes_nothing(
    case: str, redis: Redis, keys: Keys, redis_prefix: str
) -> None:
    allocator, _ = await seeded(redis, keys)
    rk = keys.round("r1")
    await refused(
        redis, redis_prefix, allocator.scripts.claim, "claim", claim_keys(rk), BAD_CLAIMS[case]
    )


async def test_the_checks_can_fail_a_good_claim_changes_keys(
    redis: Redis, keys: Keys, redis_prefix: str
) -> None:
    """The snapshot does see a change: the same call with good ARGV writes a reservation."""
    allocator, _ = await seeded(redis, keys)
    before = await snapshot(redis, redis_prefix)
    replies = await allocator.scripts.claim(
        keys=claim_keys(keys.round("r1")), args=["1", *GATE, "-1", GOOD_ITEM]
    )
    assert replies[0][0] == b"created"
    assert await snapshot(redis, redis_prefix) != before


BAD_OTHERS: dict[str, tuple[str, list[str]]] = {
    "cancel: no ARGV": ("cancel", []),
    "cancel: empty reservation_id": ("cancel", ["", "-1"]),
    "cancel: floor not a number": ("cancel", ["{rid}", "x"]),
    "cancel: floor NaN": ("cancel", ["{rid}", "nan"]),
    "cancel: floor missing": ("cancel", ["{rid}"]),
    "cancel: one argument too many": ("cancel", ["{rid}", "-1", "more"]),
    "pickup: empty code": ("pickup", ["", "", "-1"]),
    "pickup: floor not a number": ("pickup", ["{code}", "", "x"]),
    "pickup: floor not whole": ("pickup", ["{code}", "", "1.5"]),
    "pickup: floor missing": ("pickup", ["{code}", ""]),
    "load_batch: no pair": ("load_batch", ["b2", "d", "[]", "-1"]),
    "load_batch: half a pair": ("load_batch", ["b2", "d", "[]", "-1", "s1"]),
    "load_batch: units zero": ("load_batch", ["b2", "d", "[]", "-1", "s1", "0"]),
    "load_batch: units not whole": ("load_batch", ["b2", "d", "[]", "-1", "s1", "1.5"]),
    "load_batch: units infinite": ("load_batch", ["b2", "d", "[]", "-1", "s1", "inf"]),
    "load_batch: empty site": ("load_batch", ["b2", "d", "[]", "-1", "", "1"]),
    "load_batch: empty batch_id": ("load_batch", ["", "d", "[]", "-1", "s1", "1"]),
    "load_batch: floor not a number": ("load_batch", ["b2", "d", "[]", "x", "s1", "1"]),
    "load_batch: second pair bad, floor marks lost": (
        "load_batch",
        ["b2", "d", "[]", "99", "s1", "1", "s1", "nan"],
    ),
    # a floor of 99 is above the round's seq: a script that wrote before checking its ARGV
    # would set the round's lost mark, which the snapshot sees
    "expire: no ARGV": ("expire", []),
    "expire: cursor not digits": ("expire", ["0x10", "10", "me", "1000", "99"]),
    "expire: cursor negative": ("expire", ["-1", "10", "me", "1000", "99"]),
    "expire: count zero": ("expire", ["0", "0", "me", "1000", "99"]),
    "expire: count over 1000": ("expire", ["0", "1001", "me", "1000", "99"]),
    "expire: count not whole": ("expire", ["0", "1.5", "me", "1000", "99"]),
    "expire: lock time zero": ("expire", ["0", "10", "me", "0", "99"]),
    "expire: floor not a number": ("expire", ["0", "10", "me", "1000", "x"]),
    "expire: one argument too many": ("expire", ["0", "10", "me", "1000", "99", "more"]),
    "expire: bad count, floor marks lost": ("expire", ["0", "nan", "me", "1000", "99"]),
    "carry: no ARGV": ("carry", []),
    "carry: empty to_round": ("carry", ["", "b9", "99"]),
    "carry: empty batch_id": ("carry", ["r2", "", "99"]),
    "carry: floor not a number": ("carry", ["r2", "b9", "x"]),
    "carry: floor missing": ("carry", ["r2", "b9"]),
    "carry: one argument too many": ("carry", ["r2", "b9", "99", "more"]),
    "integrity: no ARGV": ("integrity", []),
    "integrity: floor not a number": ("integrity", ["x"]),
    "integrity: floor infinite": ("integrity", ["inf"]),
    "integrity: two floors": ("integrity", ["99", "1"]),
    "retire: no ARGV": ("retire", []),
    "retire: floor not a number": ("retire", ["x"]),
    "retire: floor NaN": ("retire", ["nan"]),
    "retire: two floors": ("retire", ["-1", "-1"]),
    "restore_cooldowns: no ARGV": ("restore_cooldowns", []),
    "restore_cooldowns: empty round_id": ("restore_cooldowns", ["", "c", "1", "{rid}"]),
    "restore_cooldowns: half a triple": ("restore_cooldowns", ["r1", "c", "1"]),
    "restore_cooldowns: until not whole": ("restore_cooldowns", ["r1", "c", "1.5", "{rid}"]),
    "restore_cooldowns: until infinite": ("restore_cooldowns", ["r1", "c", "inf", "{rid}"]),
    "restore_cooldowns: empty citizen": ("restore_cooldowns", ["r1", "", "1", "{rid}"]),
    "restore_cooldowns: second triple bad": (
        "restore_cooldowns",
        ["r1", "c", "99999999999999", "{rid}", "d", "x", "{rid}"],
    ),
    "enter: n zero": ("enter", ["0", *GATE, "-1"]),
    "enter: n does not match": ("enter", ["2", *GATE, "-1", ENTRY]),
    "enter: n above 2000": ("enter", ["2001", *GATE, "-1", *[ENTRY] * 2001]),
    "enter: a rate zero": ("enter", ["1", "0", *GATE[1:], "-1", ENTRY]),
    "enter: item short": ("enter", ["1", *GATE, "-1", ENTRY.removesuffix(" 18-39")]),
    "enter: citizen hash short": ("enter", ["1", *GATE, "-1", ENTRY[1:]]),
    "enter: a hash not alphanumeric": ("enter", ["1", *GATE, "-1", " " + ENTRY[1:]]),
    "enter: client hash not alphanumeric": (
        "enter",
        ["1", *GATE, "-1", ENTRY[:128] + "-" * 31 + "k" + ENTRY[160:]],
    ),
    "enter: a quote in the site": ("enter", ["1", *GATE, "-1", ENTRY.replace(" s1 ", ' s"1 ')]),
    "enter: masked id not digits and stars": (
        "enter",
        ["1", *GATE, "-1", ENTRY.replace("0011", "00a1")],
    ),
    "enter: entry_id without its round": ("enter", ["1", *GATE, "-1", ENTRY.replace("e.r1", "e")]),
    "enter: accept not 0/1": ("enter", ["1", *GATE, "-1", ENTRY.replace(" 0 api", " 2 api")]),
    "enter: unknown channel": ("enter", ["1", *GATE, "-1", ENTRY.replace("api", "fax")]),
    "enter: unknown age band": ("enter", ["1", *GATE, "-1", ENTRY.replace("18-39", "18-40")]),
    "enter: bad second item, floor marks lost": (
        "enter",
        ["2", *GATE, "99", ENTRY, ENTRY[:160] + " s1"],
    ),
    "withdraw: no ARGV": ("withdraw", []),
    "withdraw: empty entry_id": ("withdraw", ["", "-1"]),
    "withdraw: floor not a number": ("withdraw", ["e.r1", "x"]),
    "award: n zero": ("award", ["0", "-1"]),
    "award: n does not match": ("award", ["2", "-1", f"9 10 e.r1 s1 rid.r1 {CODES}"]),
    "award: item short": ("award", ["1", "-1", "9 10 e.r1 s1 rid.r1"]),
    "award: key index into the fixed keys": ("award", ["1", "-1", f"3 10 e.r1 s1 rid.r1 {CODES}"]),
    "award: floor not a number": ("award", ["1", "x", f"9 10 e.r1 s1 rid.r1 {CODES}"]),
    "settle: no ARGV": ("settle", []),
    "settle: half a pair": ("settle", ["e.r1"]),
    "settle: empty entry_id": ("settle", ["", "2"]),
    "settle: weight out of range": ("settle", ["e.r1", "5"]),
    "settle: second pair bad": ("settle", ["e.r1", "x", "e2.r1", "2.5"]),
}


@pytest.mark.parametrize("case", sorted(BAD_OTHERS))
async def test_every_other_script_refuses_malformed_argv_and_writes_nothing(
    case: str, redis: Redis, keys: Keys, redis_prefix: str
) -> None:
    allocator, code = await seeded(redis, keys)
    name, template = BAD_OTHERS[case]
    rid = (await awaited(redis.hkeys(keys.round("r1").reservations)))[0].decode()
    args = [a.format(rid=rid, code=code) for a in template]
    rk = keys.round("r1")
    script_keys = {
        "cancel": [
            rk.round, rk.stock, rk.holders, rk.reservations, rk.tally, rk.ledger, rk.entitled,
        ],
        "pickup": [rk.round, rk.reservations, rk.codes("s1"), rk.tally, rk.ledger],
        "load_batch": [rk.round, rk.stock, rk.loaded, rk.batches, rk.ledger, rk.tally],
        "integrity": [rk.round, rk.tally],
        "expire": [rk.round, rk.reservations, rk.tally, rk.ledger, rk.sweep],
        "carry": [rk.round, rk.stock, rk.tally, rk.ledger, rk.carries],
        "enter": [
            rk.round, rk.entries, rk.entrants, rk.tally, rk.ledger, rk.entitled,
            *rk.gate_generations,
        ],
        "withdraw": [rk.round, rk.entries, rk.entrants, rk.tally, rk.ledger],
        "award": [
            rk.round, rk.stock, rk.holders, rk.reservations, rk.tally, rk.ledger, rk.entries,
            rk.entitled, rk.codes("s1"), rk.site_holders("s1"),
        ],
        "retire": [
            rk.round, rk.stock, rk.loaded, rk.batches, rk.tally, rk.reservations, rk.holders,
            rk.ledger,
        ],
        "restore_cooldowns": [rk.entitled],
        "settle": [rk.round, rk.entries],
    }[name]  # fmt: skip
    await refused(redis, redis_prefix, getattr(allocator.scripts, name), name, script_keys, args)
