"""Client mistakes are answered 4xx problem+json and change nothing; never 503 with a traceback.

The citizen page retries a 503 forever, so a mistake answered 503 is a page that never stops.
Each case here was a 503 once: a bad or unsupported ``Content-Encoding`` (and compression used to
slip a large body past the 16 KiB limit), CSV that the csv module cannot read, round times that
overflow, control characters in texts that PostgreSQL refuses.
"""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import unicodedata
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from allocator.errors import InvalidRequest
from allocator.model import Round
from service.problems import UnsupportedMediaType
from service.validation import (
    CSV_LIMIT,
    JSON_LIMIT,
    BodyDecoder,
    parse_batch_csv,
    parse_pickup,
    parse_reservation,
    parse_round,
    parse_sites,
)
from tests.helpers import ADMIN, citizen_id, phone, round_body, seed
from tests.test_api_contract import (
    CSV,
    RESERVATIONS,
    Cases,
    created,
    fields_named,
    problem,
    refusals,
    stats,
    stock_view,
)
from tests.test_identity import canonical_ids, phones, renderings, with_a_foreign_digit

Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}
BATCHES = "/api/v1/admin/rounds/r1/batches"


def reservation_json(n: int = 1, pad: int = 0) -> bytes:
    return b'{"citizen_id": "%s", "phone": "%s", "site_id": "s1"%s}' % (
        citizen_id(n).encode(),
        phone(n).encode(),
        b" " * pad,
    )


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Any:
    """After the test: no log record at ERROR or with a traceback (a client mistake is not ours)."""
    caplog.set_level(logging.INFO)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


# -- Content-Encoding ---------------------------------------------------------------------


async def test_bad_or_unsupported_content_encoding_is_415_and_changes_nothing(
    client: Client, no_tracebacks: None
) -> None:
    """A body we cannot decode is the client's mistake (415), never a server failure."""
    await seed(client)
    plain = reservation_json()
    good_gzip = gzip.compress(plain)
    bodies = {
        "gzip-but-plain": ("gzip", plain),
        "gzip-truncated": ("gzip", good_gzip[:-8]),
        "gzip-then-garbage": ("gzip", good_gzip + b"trailing"),
        "deflate-but-plain": ("deflate", plain),
        "deflate-garbage": ("deflate", b"\x78\x9c garbage"),
        "br": ("br", plain),
        "zstd": ("zstd", plain),
        "compress": ("compress", plain),
        "unknown": ("snappy", plain),
        "two-codings": ("gzip, gzip", gzip.compress(good_gzip)),
        "not-ascii": ("gz\u00efp", plain),
    }
    cases: Cases = {
        name: ("POST", RESERVATIONS, {"data": body, "headers": {**JSON, "Content-Encoding": enc}})
        for name, (enc, body) in bodies.items()
    }
    cases["csv-gzip-but-plain"] = (
        "POST",
        BATCHES,
        {
            "params": {"batch_id": "c1"},
            "data": b"site_id,quantity\ns1,5\n",
            "headers": {**CSV, "Content-Encoding": "gzip"},
        },
    )
    await refusals(client, cases, status=415, code="unsupported-media-type")
    assert (await stats(client))["reservations"] == 0


async def test_gzip_and_deflate_bodies_within_the_limit_are_accepted_as_before(
    client: Client,
) -> None:
    """Compression itself is fine: the decoded body is what counts."""
    await seed(client, stock={"s1": 10})
    for n, (enc, body) in enumerate(
        [
            ("gzip", gzip.compress(reservation_json(1))),
            ("deflate", zlib.compress(reservation_json(2))),  # zlib-wrapped, as RFC 9110 says
            ("deflate", zlib.compress(reservation_json(3))[2:-4]),  # raw, as some clients send
            ("identity", reservation_json(4)),
            ("GZIP", gzip.compress(reservation_json(5))),
        ],
        start=1,
    ):
        r = await client.post(RESERVATIONS, data=body, headers={**JSON, "Content-Encoding": enc})
        await created(r)
        assert (await stats(client))["reservations"] == n
    csv = gzip.compress(b"site_id,quantity\ns1,5\n")
    r = await client.post(
        BATCHES,
        params={"batch_id": "c1"},
        data=csv,
        headers={**CSV, "Content-Encoding": "gzip"},
    )
    assert r.status == 201, await r.text()


async def test_json_limit_applies_to_the_decoded_body(client: Client, no_tracebacks: None) -> None:
    """A 1 KB gzip body that inflates to 900 KB is 413 like the 900 KB it is."""
    await seed(client)
    big = reservation_json(pad=900_000)
    small = gzip.compress(big)
    assert len(small) < 2_000
    before = stock_view(await stats(client))
    r = await client.post(RESERVATIONS, data=small, headers={**JSON, "Content-Encoding": "gzip"})
    await problem(r, 413, "payload-too-large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length either
        for i in range(0, len(small), 100):
            yield small[i : i + 100]

    r = await client.post(RESERVATIONS, data=chunks(), headers={**JSON, "Content-Encoding": "gzip"})
    await problem(r, 413, "payload-too-large")
    # just under the limit, decoded, is fine
    ok = gzip.compress(reservation_json(pad=16 * 1024 - len(reservation_json()) - 1))
    r = await client.post(RESERVATIONS, data=ok, headers={**JSON, "Content-Encoding": "gzip"})
    await created(r)
    assert before != stock_view(await stats(client))


async def test_csv_limit_applies_to_the_decoded_body(client: Client, no_tracebacks: None) -> None:
    """1 MiB of CSV is the limit however it was compressed: one byte more is 413, nothing
    loaded; exactly the limit loads."""
    await seed(client, stock={"s1": 0})
    before = stock_view(await stats(client))
    head = b"site_id,quantity\ns1,5\n"

    async def send(size: int) -> Any:
        body = head + b"\n" * (size - len(head))  # blank lines are skipped
        return await client.post(
            BATCHES,
            params={"batch_id": "big"},
            data=gzip.compress(body),
            headers={**CSV, "Content-Encoding": "gzip"},
        )

    await problem(await send(CSV_LIMIT + 1), 413, "payload-too-large")
    assert stock_view(await stats(client)) == before
    r = await send(CSV_LIMIT)
    assert r.status == 201, await r.text()
    assert (await stats(client))["loaded"] == 5


async def test_decoding_stops_at_the_limit(
    client: Client, monkeypatch: pytest.MonkeyPatch, no_tracebacks: None
) -> None:
    """A gzip bomb is inflated only as far as the limit, not in full and then measured: the
    inflater is asked for at most limit + 1 bytes, and the service asks it for no more."""
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces, about 64 KB compressed
    decoder = BodyDecoder.for_coding("gzip")
    assert decoder is not None
    assert len(decoder.decode(bomb, room=16 * 1024)) == 16 * 1024 + 1

    inflated: list[int] = []
    real = BodyDecoder.decode

    def counting(self: BodyDecoder, data: bytes, room: int) -> bytes:
        out = real(self, data, room)
        inflated.append(len(out))
        return out

    monkeypatch.setattr(BodyDecoder, "decode", counting)
    await seed(client)
    for path, headers, limit, inflates_to in [
        (RESERVATIONS, JSON, JSON_LIMIT, 8 * 1024 * 1024),  # about 8 KB compressed
        (BATCHES, CSV, CSV_LIMIT, 256 * 1024 * 1024),  # about 250 KB compressed
    ]:
        compressed = gzip.compress(b" " * inflates_to)
        assert len(compressed) < limit
        inflated.clear()
        r = await client.post(
            path,
            params={"batch_id": "b"},
            data=compressed,
            headers={**headers, "Content-Encoding": "gzip"},
        )
        await problem(r, 413, "payload-too-large")
        assert limit < sum(inflated) <= limit + 1, (path, sum(inflated))


# -- CSV the csv module cannot read ---------------------------------------------------------


async def test_csv_that_the_csv_module_cannot_read_is_422_naming_the_line(
    client: Client, no_tracebacks: None
) -> None:
    """Bare carriage returns (old Mac line ends) and a 128 KB value used to be a 503."""
    await seed(client, stock={"s1": 0, "s2": 0})
    cases = {
        "bare-cr": "site_id,quantity\rs1,5\rs2,7\r",
        "bare-cr-after-good-lines": "site_id,quantity\ns1,5\ns2,7\rs1,1\n",
        "field-128k": "site_id,quantity\ns1,5\ns2," + "9" * (128 * 1024 + 1) + "\n",
        "site-at-the-csv-field-limit": "site_id,quantity\n" + "s" * (128 * 1024) + ",5\n",
        "site-over-the-csv-field-limit": "site_id,quantity\n" + "s" * (128 * 1024 + 1) + ",5\n",
        "quoted-over-the-limit": 'site_id,quantity\ns1,"' + "9" * (200 * 1024) + '"\n',
        "header-over-the-limit": "site_id" + " " * (128 * 1024) + ",quantity\ns1,5\n",
    }
    got = await fields_named(
        client,
        {
            name: (
                "POST",
                BATCHES,
                {"params": {"batch_id": "c1"}, "data": csv.encode(), "headers": CSV},
            )
            for name, csv in cases.items()
        },
    )
    assert got == {
        "bare-cr": {"line 1"},
        "bare-cr-after-good-lines": {"line 3"},
        "field-128k": {"line 3"},
        "site-at-the-csv-field-limit": {"line 2.site_id"},
        "site-over-the-csv-field-limit": {"line 2"},
        "quoted-over-the-limit": {"line 2"},
        "header-over-the-limit": {"line 1"},
    }
    assert (await stats(client))["loaded"] == 0


# -- round times ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("opens_at", "0001-01-01T00:00:00+08:00"),
        ("pickup_end", "9999-12-31T23:59:59-08:00"),
        ("closes_at", "9999-12-31T23:59:59+00:00"),
        ("pickup_start", "1999-12-31T23:59:59+08:00"),
        ("pickup_end", "3000-01-01T00:00:00+08:00"),
    ],
)
async def test_round_times_outside_the_years_2000_to_2999_are_422(
    client: Client, field: str, value: str, no_tracebacks: None
) -> None:
    """Year 1 and 9999 overflowed into a 503; the message says which years are accepted."""
    await seed(client)
    before = await (await client.get("/api/v1/rounds/r1")).json()
    body = round_body()
    body[field] = value
    if field in ("closes_at", "pickup_end"):  # keep the order checks out of the way
        body["pickup_end"] = body["closes_at"] = value
    for round_id in ("r1", "r2"):
        r = await client.put(f"/api/v1/admin/rounds/{round_id}", json=body, headers=ADMIN)
        answer = await problem(r, 422, "invalid-request")
        named = {e["field"]: e["message"] for e in answer["errors"]}
        assert field in named, answer
        assert "2000" in named[field]
        assert "2999" in named[field]
    assert await (await client.get("/api/v1/rounds/r1")).json() == before
    await problem(await client.get("/api/v1/rounds/r2"), 404, "not-found")


async def test_round_times_at_the_edges_of_the_accepted_years_are_accepted(client: Client) -> None:
    """2000-01-01 and 2999-12-31 in any offset are fine (the range is not off by one)."""
    body = {
        "title": "Edges",
        "opens_at": "2000-01-01T00:00:00+14:00",
        "closes_at": "2999-12-31T23:59:59-12:00",
        "per_person": 1,
        "pickup_start": "2000-01-01T00:00:00+08:00",
        "pickup_end": "2999-12-31T23:59:59-12:00",
    }
    r = await client.put("/api/v1/admin/rounds/edges", json=body, headers=ADMIN)
    assert r.status == 201, await r.text()
    got = await (await client.get("/api/v1/rounds/edges")).json()
    assert (got["opens_at"], got["closes_at"]) == (body["opens_at"], body["closes_at"])


# -- control characters in texts ------------------------------------------------------------


CONTROLS = {"nul": "\x00", "bell": "\x07", "escape": "\x1b", "newline": "\n", "del": "\x7f"}


async def test_control_characters_in_site_texts_are_422_naming_the_field(
    client: Client, no_tracebacks: None
) -> None:
    """PostgreSQL refuses NUL in text (that was a 503); other controls garble pages and CSVs."""
    await seed(client, stock={"s1": 1})
    sites_before = (await (await client.get("/api/v1/rounds/r1/sites")).json())["sites"]
    cases = {}
    expected = {}
    for member in ("name", "address", "district"):
        for cname, char in CONTROLS.items():
            site = {"site_id": "s1", "name": "N", "address": "A", "district": "d1"}
            site[member] = f"Site{char}1"
            cases[f"{member}-{cname}"] = (
                "PUT",
                "/api/v1/admin/sites",
                {"json": {"sites": [site]}, "headers": ADMIN},
            )
            expected[f"{member}-{cname}"] = {f"sites[0].{member}"}
    assert await fields_named(client, cases) == expected
    assert (await (await client.get("/api/v1/rounds/r1/sites")).json())["sites"] == sites_before


async def test_control_characters_in_a_round_title_are_422(
    client: Client, no_tracebacks: None
) -> None:
    """The title is shown on every citizen's page; a NUL in it was a 503."""
    await seed(client)
    before = await (await client.get("/api/v1/rounds/r1")).json()
    cases = {
        f"{round_id}-{cname}": (
            "PUT",
            f"/api/v1/admin/rounds/{round_id}",
            {"json": round_body(title=f"Masks{char}"), "headers": ADMIN},
        )
        for round_id in ("r1", "r2")
        for cname, char in CONTROLS.items()
        if cname != "newline"  # a trailing newline is stripped, as before
    }
    got = await fields_named(client, cases)
    assert got == {k: {"title"} for k in cases}
    assert await (await client.get("/api/v1/rounds/r1")).json() == before


async def test_text_with_surrounding_whitespace_and_unicode_is_still_accepted(
    client: Client,
) -> None:
    """Only control characters inside a text are refused: names in any script stay welcome."""
    sites = [
        {
            "site_id": "s1",
            "name": " 朝阳区社区卫生服务中心\n",
            "address": "路 1 号",
            "district": "朝阳",
        },
        {"site_id": "s2", "name": "Café — Nº 2", "address": "Rue 2", "district": "d\u200d1"},
    ]
    r = await client.put("/api/v1/admin/sites", json={"sites": sites}, headers=ADMIN)
    assert r.status == 200, await r.text()


# -- fuzz: any body is a value or a 4xx refusal, never an exception that becomes a 503 --------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
OFFSETS = st.builds(
    dt.timezone,
    st.timedeltas(dt.timedelta(hours=-23, minutes=-59), dt.timedelta(hours=23, minutes=59)),
)
AWARE_TIMES = st.datetimes(dt.datetime(1, 1, 2), dt.datetime(9999, 12, 30), timezones=OFFSETS)
TIMES = (AWARE_TIMES | st.datetimes()).map(dt.datetime.isoformat)
TEXTS = st.text(max_size=12) | st.sampled_from(["Masks", " 口罩 ", "a\x00b", "x" * 201, "\n"])


def _assert_storable_text(value: str) -> None:
    assert value == value.strip()
    assert 0 < len(value) <= 200
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in value)
    value.encode("utf-8")  # no lone surrogates


@st.composite
def round_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Round bodies in the right order, times anywhere from year 1 to 9999 in any offset, and
    now and then one member replaced by any JSON value."""
    times = sorted(draw(st.lists(AWARE_TIMES, min_size=4, max_size=4, unique=True)))
    body: dict[str, Any] = {
        "title": draw(TEXTS),
        "opens_at": times[0].isoformat(),
        "pickup_start": times[1].isoformat(),
        "closes_at": times[2].isoformat(),
        "pickup_end": times[3].isoformat(),
        "per_person": draw(st.integers(0, 1001)),
    }
    if draw(st.booleans()):
        body[draw(st.sampled_from([*body, "mode"]))] = draw(JSON_VALUES | TIMES)
    return body


@given(round_bodies(), st.sampled_from(["r1", "R1", ""]))
def test_any_round_body_is_a_storable_round_or_a_422(body: dict[str, Any], round_id: str) -> None:
    """What parse_round accepts can be written to PostgreSQL and Redis and read back."""
    try:
        rnd = parse_round(round_id, body)
    except InvalidRequest:
        return
    _assert_storable_text(rnd.title)
    for when in (rnd.opens_at, rnd.closes_at, rnd.pickup_start, rnd.pickup_end):
        assert 2000 <= when.year <= 2999
        assert 1999 <= when.astimezone(dt.UTC).year <= 3000
    assert (
        Round.from_redis(
            rnd.round_id, {k.encode(): str(v).encode() for k, v in rnd.to_redis().items()}
        )
        == rnd
    )


SITE_ITEMS = (
    st.fixed_dictionaries(
        {
            "site_id": st.sampled_from(["s1", "s2", "s3", "S4"]),
            **{k: TEXTS for k in ("name", "address", "district")},
        }
    )
    | JSON_VALUES
)


@given(st.fixed_dictionaries({"sites": st.lists(SITE_ITEMS, min_size=1, max_size=3)}))
def test_any_sites_body_is_storable_sites_or_a_422(body: dict[str, Any]) -> None:
    """Site texts that pass are what PostgreSQL and the pages can hold."""
    try:
        sites = parse_sites(body)
    except InvalidRequest:
        return
    for site in sites:
        for text in (site.name, site.address, site.district):
            _assert_storable_text(text)


def typed(numbers: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid number as a citizen might type it: any digit forms, some other scripts' digits."""
    return numbers.flatmap(lambda n: renderings(n) | with_a_foreign_digit(n))


def sometimes_anything(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value; now and then any JSON value or text."""
    return st.one_of(values, values, values, st.text(max_size=20), JSON_VALUES)


@given(
    st.fixed_dictionaries(
        {
            "citizen_id": sometimes_anything(typed(canonical_ids())),
            "phone": sometimes_anything(typed(phones())),
            "site_id": sometimes_anything(st.sampled_from(["s1", "s2"])),
            "pickup_code": sometimes_anything(st.sampled_from(["ABCDEFGH", " abcd2345 "])),
        },
        optional={"round_id": sometimes_anything(st.sampled_from(["r1", "R1"]))},
    )
)
def test_any_reservation_or_pickup_body_is_ascii_identity_or_a_422(body: dict[str, Any]) -> None:
    """IDs and phones that pass are canonical ASCII: the only form that is hashed and masked."""
    for parse in (parse_reservation, parse_pickup):
        try:
            got = parse(body)
        except InvalidRequest:
            continue
        for value in (getattr(got, "citizen_id", None), getattr(got, "phone", None)):
            assert value is None or value.isascii()


CSV_PIECES = ["site_id,quantity", "s1", "s2", "S1", ",", "5", "-1", "\u00b2", '"', " ", "\x00"]
CSV_PIECES += ["\n", "\r\n", "\r", "\ufeff", "9" * 140_000]
CSV_BODIES = (
    st.lists(st.sampled_from(CSV_PIECES), max_size=12).map(lambda p: "".join(p).encode())
    | st.binary(max_size=100)
    | st.text(max_size=100).map(str.encode)
)


@given(CSV_BODIES)
def test_any_csv_body_is_a_batch_or_a_422(raw: bytes) -> None:
    """parse_batch_csv raises nothing but InvalidRequest, whatever bytes arrive."""
    try:
        batch = parse_batch_csv(raw, "b1", {"s1", "s2"})
    except InvalidRequest:
        return
    assert all(isinstance(q, int) and q >= 1 for _, q in batch.items)


@given(st.binary(max_size=300), st.sampled_from(["gzip", "deflate", "x-gzip"]))
def test_any_compressed_body_decodes_or_is_a_415(raw: bytes, coding: str) -> None:
    """A body that does not decode is the client's mistake (415), never a zlib.error."""
    decoder = BodyDecoder.for_coding(coding)
    assert decoder is not None
    try:
        decoder.decode(raw, 1000)
        decoder.finish()
    except UnsupportedMediaType:
        pass
