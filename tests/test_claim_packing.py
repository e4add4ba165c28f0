"""claim_many's packing: exactly claim.lua's KEYS and ARGV as one-item-at-a-time packing makes.

``claim_many`` packs a batch with shortcuts (the key references of a (site, age band, channel)
group made once per call, every identifier of the batch from one random read and one base64
encoding); the reference below is the plain packing it replaced, item by item through
``ScriptKeys.ref``. Both are compared on the same batch, the random fields taken from what was
sent.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from allocator.claims import DESK, NO_CLIENT, ClaimRequest, fresh_batch
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys, ScriptKeys
from allocator.model import PICKUP_ALPHABET, RESERVATION_ID, Round, Site, ms_to_rfc3339
from tests.helpers import citizen_id, phone


@given(st.integers(min_value=0, max_value=300))
def test_a_batch_of_identifiers_is_canonical_and_fresh(count: int) -> None:
    ids, letters = fresh_batch("r-1", count)
    assert len(ids) == count == len(set(ids))
    assert len(letters) == 24 * count
    assert set(letters) <= set(PICKUP_ALPHABET)
    for reservation_id in ids:
        match = RESERVATION_ID.fullmatch(reservation_id)
        assert match is not None
        assert match.group(2) == "r-1"
        token = match.group(1)
        # 16 bytes' encoding exactly: decodes to 16 bytes that encode back to the same text
        raw = base64.urlsafe_b64decode(token + "==")
        assert len(raw) == 16
        assert base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == token


def reference(
    al: Allocator,
    rk: Any,
    sites: dict[str, Site],
    items: Sequence[ClaimRequest],
    sent_items: Sequence[str],
) -> tuple[list[str], list[str]]:
    """The item-by-item packing, with each item's reservation_id and codes read from what
    claim_many sent (they are random), and the fixed keys and the first nine ARGV left out."""
    refs = ScriptKeys(["fixed"] * 9)  # claim.lua's nine fixed keys first
    out = []
    for item, sent in zip(items, sent_items, strict=True):
        fields = sent.split(" ")
        reservation_id, codes = fields[8], fields[12:15]
        site = sites.get(item.site_id)
        client = NO_CLIENT if item.channel == DESK else al.hasher.client(item.client)
        out.append(
            item.citizen_hash
            + al.hasher.phone(item.phone)
            + client
            + " "
            + " ".join(
                (
                    refs.ref(rk.codes(item.site_id)),
                    refs.ref(rk.site_holders(item.site_id)),
                    refs.ref(rk.fair_asked("district", site.district)) if site else "0",
                    refs.ref(rk.fair_asked("age_band", item.age_band)),
                    refs.ref(rk.fair_asked("channel", item.channel)),
                    item.site_id,
                    item.masked_id,
                    reservation_id,
                    item.channel,
                    item.age_band,
                    item.region,
                    *codes,
                )
            )
        )
    return refs.keys[9:], out


@pytest.mark.parametrize("seed", range(4))
async def test_claim_many_packs_as_the_item_by_item_reference(
    seed: int, redis: Redis, redis_prefix: str
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    al = Allocator(redis, None, Keys(redis_prefix), Hasher(b"pepper"))
    await al.mirror_sites([Site(s, s, "Road 1", f"d{s[-1]}") for s in ("s1", "s2", "s3")])
    await al.mirror_round(
        Round(
            round_id="r1", title="r1", per_person=1,
            opens_at=now - dt.timedelta(hours=1), closes_at=now + dt.timedelta(hours=1),
            pickup_start=now, pickup_end=now + dt.timedelta(hours=2),
        )
    )  # fmt: skip
    await al.load_batch("r1", "b1", [("s1", 50), ("s2", 1)])
    sent: list[tuple[list[str], list[Any]]] = []
    run = al.claims.replicas.run

    async def spy(script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        sent.append((list(keys), list(args)))
        return await run(script, keys, args)

    al.claims.replicas.run = spy  # type: ignore[method-assign]
    channels = ("web", "desk", "api", "mini-program")
    items = [
        al.claim_request(
            "r1",
            ("s1", "s2", "s3", "nowhere")[(n * 7 + seed) % 4],
            citizen_id(n % 23 + 100 * seed),  # some citizens twice: duplicates in one call
            phone(n),
            f"10.0.{seed}.{n % 5}",
            channel=channels[(n + seed) % 4],
            opens_on=dt.date(1990 + n % 60, 1, 1),  # every age band
        )
        for n in range(40)
    ]
    outcomes = await al.claim_many("r1", items)
    assert any(o.created for o in outcomes)
    assert any(o.refusal for o in outcomes)
    [(keys, args)] = sent
    rk = await al.catalogue.round_keys("r1")
    want_keys, want_items = reference(al, rk, await al.catalogue.sites(), items, args[8:])
    assert keys[9:] == want_keys
    assert args[8:] == want_items
    assert args[0] == len(items)
    for item, outcome, packed in zip(items, outcomes, args[8:], strict=True):
        if outcome.created:
            assert outcome.reservation is not None
            assert outcome.reservation.reservation_id == packed.split(" ")[8]
            assert outcome.reservation.phone_hash == al.hasher.phone(item.phone)
            assert outcome.reservation.pickup_code in packed.split(" ")[12:15]


@given(st.integers(min_value=-(10**12), max_value=7_258_118_399_999))
def test_times_are_shown_as_the_datetime_isoformat(ms: int) -> None:
    """ms_to_rfc3339 with the second's text cached: the same text as datetime's own from
    ``ms / 1000`` (1938 to 2199; beyond 2242 the float's rounding moves that one by a ms,
    where the integer split stays exact)."""
    want = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
    assert ms_to_rfc3339(ms) == want
