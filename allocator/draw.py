"""The lottery draw, ``allot-draw-1``: the published files, the seed, the ranking, the allocation.

Pure and self-contained (hashlib, no Redis, no PostgreSQL), so a draw of a million entries can run
in a process of its own and the same inputs always give the same bytes. The contract is API.md,
"The draw, step by step (allot-draw-1)"; the steps are numbered as there:

1. ``entries.csv`` (``freeze``): ``receipt,site_id,district,accept_district,weight``, one line per
   registered entry, sorted by receipt.
2. ``stock.csv`` (``freeze``): ``site_id,district,units``, one line per site, sorted by site_id.
3. ``seed`` = SHA-256 of ``"allot-draw-1\\n{round_id}\\n{hex(secret)}\\n{public_randomness}\\n"
   "{entries_digest}\\n{stock_digest}\\n"``. The key of step 4 hashes the seed's 32 raw bytes.
4. key = min over j < weight of SHA-256(seed ‖ bytes.fromhex(receipt) ‖ bytes([j])); rank by
   (key, receipt).
5. In rank order: ``per_person`` units at the entry's own site, else (accept_district) at the
   site of its district with the most units left, ties to the smallest site_id, else not drawn.
6. ``results.csv``: ``rank,receipt,site_id`` for every entry, site_id empty when not drawn.
7. A pass (``next_pass``): the units left after the previous pass plus ``released``, the
   not-yet-drawn entries in rank order by rule 5; ``pass-{n}.csv`` lists those it drew.

The independent check of all this is allocator/verify_draw.py, written from the contract and
sharing no code with this module.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import operator
import re
import secrets
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

ALGORITHM = "allot-draw-1"
MAX_WEIGHT = 4  # the contract's loss_weighting: 1 + at most 3 lost rounds
MAX_RANDOMNESS = 256  # public_randomness: 1-256 printable characters

ENTRIES_HEADER = "receipt,site_id,district,accept_district,weight"
STOCK_HEADER = "site_id,district,units"
RESULTS_HEADER = "rank,receipt,site_id"

_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class DrawInputError(ValueError):
    """The draw's inputs break the contract; the message names what and is safe to show."""


@dataclass(frozen=True, slots=True)
class EntryLine:
    """One registered entry as it appears in entries.csv (no personal data)."""

    receipt: str
    site_id: str
    district: str
    accept_district: bool
    weight: int


@dataclass(frozen=True, slots=True)
class StockLine:
    """One site of the round and the units left for the draw at the freeze."""

    site_id: str
    district: str
    units: int


@dataclass(frozen=True, slots=True)
class Placed:
    """An entry the draw or a pass drew: its rank, its receipt and the site it was given."""

    rank: int
    receipt: str
    site_id: str


@dataclass(frozen=True, slots=True)
class SiteSummary:
    """A line of the draw record's ``sites``: stock at the freeze, entries choosing the site,
    and winners the draw placed there (results.csv; passes are described by their own files)."""

    site_id: str
    district: str
    stock: int
    entries: int
    winners: int


@dataclass(frozen=True, slots=True)
class FrozenList:
    """The entry list and the stock fixed at the freeze, and their published files."""

    entries: tuple[EntryLine, ...]  # sorted by receipt
    stock: tuple[StockLine, ...]  # sorted by site_id
    entries_csv: bytes
    stock_csv: bytes
    entries_digest: str
    stock_digest: str


@dataclass(frozen=True, slots=True)
class Draw:
    """The outcome of the draw (steps 3-6). Lists are indexed like ``frozen.entries``/``stock``."""

    round_id: str
    per_person: int
    secret: str  # hex
    commitment: str
    public_randomness: str  # NFC
    frozen: FrozenList
    seed: str  # hex
    order: tuple[int, ...]  # entry indices, rank 1 first
    placed_at: tuple[int, ...]  # per entry: stock index it won at, or -1
    left: tuple[int, ...]  # per site: units left after the draw
    results_csv: bytes
    results_digest: str

    def winners(self) -> Iterator[Placed]:
        """Every entry the draw placed, in rank order."""
        return _placed(self.frozen, self.order, self.placed_at, None)

    def sites(self) -> tuple[SiteSummary, ...]:
        entries = [0] * len(self.frozen.stock)
        winners = [0] * len(self.frozen.stock)
        index = {s.site_id: i for i, s in enumerate(self.frozen.stock)}
        for e, at in zip(self.frozen.entries, self.placed_at, strict=True):
            entries[index[e.site_id]] += 1
            if at >= 0:
                winners[at] += 1
        return tuple(
            SiteSummary(s.site_id, s.district, s.units, entries[i], winners[i])
            for i, s in enumerate(self.frozen.stock)
        )


@dataclass(frozen=True, slots=True)
class Pass:
    """One pass after the draw (step 7)."""

    number: int  # 1, 2, ...
    released: tuple[tuple[str, int], ...]  # (site_id, units), sorted by site_id, units > 0
    drawn: tuple[Placed, ...]  # in rank order
    placed_at: tuple[int, ...]  # per entry, cumulative: the draw and passes 1..number
    left: tuple[int, ...]  # per site, after this pass
    csv: bytes
    digest: str


# -- small pieces of the contract ------------------------------------------------------------


def entry_receipt(round_id: str, entry_id: str) -> str:
    """An entry's public name: hex SHA-256 of ``allot-receipt-1\\n{round_id}\\n{entry_id}``."""
    return hashlib.sha256(f"allot-receipt-1\n{round_id}\n{entry_id}".encode()).hexdigest()


def new_secret() -> bytes:
    """The round's 32-byte secret, drawn at creation and kept until the freeze."""
    return secrets.token_bytes(32)


def commitment(secret: bytes) -> str:
    """``draw.commitment``: hex SHA-256 of the secret, published from the round's creation."""
    return hashlib.sha256(secret).hexdigest()


def check_public_randomness(value: str) -> str:
    """The value in NFC, or DrawInputError: 1-256 printable characters (``str.isprintable``:
    no control, format or separator characters other than the ASCII space)."""
    text = unicodedata.normalize("NFC", value)
    if not 1 <= len(text) <= MAX_RANDOMNESS:
        raise DrawInputError(f"public_randomness must be 1-{MAX_RANDOMNESS} characters")
    if not text.isprintable():
        raise DrawInputError("public_randomness must be printable characters only")
    return text


def csv_field(text: str) -> str:
    """RFC 4180, quoted only when it contains a comma, a double quote or a line break."""
    if "," in text or '"' in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def seed_text(
    round_id: str, secret_hex: str, public_randomness: str, entries_digest: str, stock_digest: str
) -> bytes:
    return (
        f"{ALGORITHM}\n{round_id}\n{secret_hex}\n{public_randomness}\n"
        f"{entries_digest}\n{stock_digest}\n"
    ).encode()


def _csv(header: str, lines: Iterable[str]) -> bytes:
    """The file's bytes, encoded in chunks: a million lines never exist as strings all at once."""
    chunks = [f"{header}\n".encode()]
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == 16384:
            chunks.append("".join(batch).encode())
            batch.clear()
    chunks.append("".join(batch).encode())
    return b"".join(chunks)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- step 1-2: the freeze's files ------------------------------------------------------------


def freeze(entries: Iterable[EntryLine], stock: Iterable[StockLine]) -> FrozenList:
    """Check, normalise (NFC) and sort the entries and the stock; write both files."""
    sites = sorted(
        (StockLine(s.site_id, unicodedata.normalize("NFC", s.district), s.units) for s in stock),
        key=lambda s: s.site_id,
    )
    district_of: dict[str, str] = {}
    for s in sites:
        if not _NAME.fullmatch(s.site_id):
            raise DrawInputError(f"site_id {s.site_id!r} is not 1-64 of [a-z0-9_-]")
        if s.site_id in district_of:
            raise DrawInputError(f"site {s.site_id} appears twice in the stock")
        if type(s.units) is not int or s.units < 0:
            raise DrawInputError(f"site {s.site_id}: units must be a whole number >= 0")
        district_of[s.site_id] = s.district
    lines: list[EntryLine] = []
    nfc: dict[str, str] = {}  # a round has few districts: normalise each text once
    weights = range(1, MAX_WEIGHT + 1)
    for e in entries:
        district = district_of.get(e.site_id)
        if district is None:
            raise DrawInputError(f"entry {e.receipt}: site {e.site_id!r} is not in the stock")
        given = nfc.get(e.district)
        if given is None:
            given = nfc[e.district] = unicodedata.normalize("NFC", e.district)
        if given != district:
            raise DrawInputError(f"entry {e.receipt}: district is not that of site {e.site_id}")
        if not _HEX64.fullmatch(e.receipt):
            raise DrawInputError(f"receipt {e.receipt!r} is not 64 lowercase hex digits")
        if type(e.weight) is not int or e.weight not in weights:
            raise DrawInputError(f"entry {e.receipt}: weight must be 1-{MAX_WEIGHT}")
        if e.district == district and type(e.accept_district) is bool:
            lines.append(e)  # already as published: keep the object, not a copy
        else:
            accept = bool(e.accept_district)
            lines.append(EntryLine(e.receipt, e.site_id, district, accept, e.weight))
    lines.sort(key=operator.attrgetter("receipt"))
    for a, b in itertools.pairwise(lines):
        if a.receipt == b.receipt:
            raise DrawInputError(f"receipt {a.receipt} appears twice")

    quoted = {d: csv_field(d) for d in district_of.values()}
    entries_csv = _csv(
        ENTRIES_HEADER,
        (
            f"{e.receipt},{e.site_id},{quoted[e.district]},{int(e.accept_district)},{e.weight}\n"
            for e in lines
        ),
    )
    stock_csv = _csv(STOCK_HEADER, (f"{s.site_id},{quoted[s.district]},{s.units}\n" for s in sites))
    return FrozenList(
        entries=tuple(lines),
        stock=tuple(sites),
        entries_csv=entries_csv,
        stock_csv=stock_csv,
        entries_digest=_sha(entries_csv),
        stock_digest=_sha(stock_csv),
    )


# -- steps 3-6: the draw ---------------------------------------------------------------------


def draw(
    round_id: str, per_person: int, secret: bytes, public_randomness: str, frozen: FrozenList
) -> Draw:
    """The draw: seed, keys, ranking, allocation and results.csv."""
    if not _NAME.fullmatch(round_id):
        raise DrawInputError(f"round_id {round_id!r} is not 1-64 of [a-z0-9_-]")
    if type(per_person) is not int or per_person < 1:
        raise DrawInputError("per_person must be a whole number >= 1")
    if len(secret) != 32:
        raise DrawInputError("the secret must be 32 bytes")
    randomness = check_public_randomness(public_randomness)
    seed = hashlib.sha256(
        seed_text(round_id, secret.hex(), randomness, frozen.entries_digest, frozen.stock_digest)
    ).digest()
    order = _rank(seed, frozen.entries)
    placed_at = [-1] * len(frozen.entries)
    left = [s.units for s in frozen.stock]
    _allocate(frozen, order, placed_at, left, per_person)

    site_ids = [s.site_id for s in frozen.stock]
    receipts = [e.receipt for e in frozen.entries]
    results_csv = _csv(
        RESULTS_HEADER,
        (
            f"{rank},{receipts[i]},{site_ids[placed_at[i]] if placed_at[i] >= 0 else ''}\n"
            for rank, i in enumerate(order, 1)
        ),
    )
    return Draw(
        round_id=round_id,
        per_person=per_person,
        secret=secret.hex(),
        commitment=commitment(secret),
        public_randomness=randomness,
        frozen=frozen,
        seed=seed.hex(),
        order=tuple(order),
        placed_at=tuple(placed_at),
        left=tuple(left),
        results_csv=results_csv,
        results_digest=_sha(results_csv),
    )


def _rank(seed: bytes, entries: Sequence[EntryLine]) -> list[int]:
    """Entry indices by (key, receipt). The receipt's bytes sort like its lowercase hex, so one
    bytes object key ‖ receipt sorts exactly as the pair does."""
    sha256 = hashlib.sha256
    suffixes = [bytes([j]) for j in range(MAX_WEIGHT)]
    first = suffixes[0]
    sort_keys: list[bytes] = []
    append = sort_keys.append
    for e in entries:
        rb = bytes.fromhex(e.receipt)
        base = seed + rb
        if e.weight == 1:
            key = sha256(base + first).digest()
        else:
            key = min(sha256(base + j).digest() for j in suffixes[: e.weight])
        append(key + rb)
    return sorted(range(len(sort_keys)), key=sort_keys.__getitem__)


def _allocate(
    frozen: FrozenList, order: Sequence[int], placed_at: list[int], left: list[int], per_person: int
) -> list[int]:
    """Rule 5 over the entries not yet placed, in rank order; returns those it placed.

    ``placed_at`` and ``left`` are updated in place. The district fallback keeps one max-heap per
    district of (-units left, stock index) (stock index order is site_id order, so ties go to the
    smallest site_id). Within one walk units only go down, so a heap entry is never below the
    truth: a top whose stored units are stale is refreshed and sifted down, and a top that is
    current is the district's best site.
    """
    site_index = {s.site_id: i for i, s in enumerate(frozen.stock)}
    districts: dict[str, list[tuple[int, int]]] = {}
    for i, site in enumerate(frozen.stock):
        districts.setdefault(site.district, []).append((-left[i], i))
    for heap in districts.values():
        heapq.heapify(heap)
    heap_of = [districts[site.district] for site in frozen.stock]
    entry_site = [site_index[e.site_id] for e in frozen.entries]
    heapreplace = heapq.heapreplace
    placed: list[int] = []
    for i in order:
        if placed_at[i] >= 0:
            continue
        s = entry_site[i]
        if left[s] >= per_person:
            left[s] -= per_person
            placed_at[i] = s
            placed.append(i)
            continue
        if not frozen.entries[i].accept_district:
            continue
        heap = heap_of[s]
        while True:
            stored, best = heap[0]
            if -stored == left[best]:
                break
            heapreplace(heap, (-left[best], best))
        if left[best] >= per_person:
            left[best] -= per_person
            placed_at[i] = best
            placed.append(i)
    return placed


def _placed(
    frozen: FrozenList, order: Sequence[int], placed_at: Sequence[int], only: set[int] | None
) -> Iterator[Placed]:
    for rank, i in enumerate(order, 1):
        at = placed_at[i]
        if at >= 0 and (only is None or i in only):
            yield Placed(rank, frozen.entries[i].receipt, frozen.stock[at].site_id)


# -- step 7: passes --------------------------------------------------------------------------


def next_pass(draw: Draw, previous: Sequence[Pass], released: Mapping[str, int]) -> Pass:
    """Pass ``len(previous) + 1``: the units left after the last pass (or the draw) plus
    ``released`` (site_id → units that came back), to the not-yet-drawn entries in rank order."""
    for n, p in enumerate(previous, 1):
        if p.number != n:
            raise DrawInputError(f"passes must be numbered 1, 2, ...; got {p.number} at {n}")
    stock_index = {s.site_id: i for i, s in enumerate(draw.frozen.stock)}
    left = list(previous[-1].left if previous else draw.left)
    placed_at = list(previous[-1].placed_at if previous else draw.placed_at)
    given: list[tuple[str, int]] = []
    for site_id, units in sorted(released.items()):
        if site_id not in stock_index:
            raise DrawInputError(f"released units at {site_id!r}, which is not a site of the round")
        if type(units) is not int or units < 0:
            raise DrawInputError(f"released units at {site_id} must be a whole number >= 0")
        if units:
            left[stock_index[site_id]] += units
            given.append((site_id, units))
    placed = _allocate(draw.frozen, draw.order, placed_at, left, draw.per_person)
    drawn = tuple(_placed(draw.frozen, draw.order, placed_at, set(placed)))
    csv = _csv(RESULTS_HEADER, (f"{p.rank},{p.receipt},{p.site_id}\n" for p in drawn))
    return Pass(
        number=len(previous) + 1,
        released=tuple(given),
        drawn=drawn,
        placed_at=tuple(placed_at),
        left=tuple(left),
        csv=csv,
        digest=_sha(csv),
    )


# -- the record ------------------------------------------------------------------------------


def record(
    draw: Draw,
    passes: Sequence[Pass] = (),
    *,
    public_randomness_source: str,
    frozen_at: str,
    drawn_at: str,
    pass_times: Sequence[str] = (),
) -> dict[str, object]:
    """The draw record of ``GET /api/v1/rounds/{round_id}/draw`` once drawn (times RFC 3339)."""
    if len(pass_times) != len(passes):
        raise DrawInputError("one time per pass")
    return {
        "round_id": draw.round_id,
        "algorithm": ALGORITHM,
        "status": "drawn",
        "commitment": draw.commitment,
        "public_randomness_source": public_randomness_source,
        "frozen_at": frozen_at,
        "entries": len(draw.frozen.entries),
        "entries_digest": draw.frozen.entries_digest,
        "stock_digest": draw.frozen.stock_digest,
        "public_randomness": draw.public_randomness,
        "secret": draw.secret,
        "seed": draw.seed,
        "drawn_at": drawn_at,
        "results_digest": draw.results_digest,
        "passes": [
            {
                "pass": p.number,
                "at": at,
                "released": [{"site_id": s, "units": u} for s, u in p.released],
                "digest": p.digest,
            }
            for p, at in zip(passes, pass_times, strict=True)
        ],
        "sites": [
            {
                "site_id": s.site_id,
                "district": s.district,
                "stock": s.stock,
                "entries": s.entries,
                "winners": s.winners,
            }
            for s in draw.sites()
        ],
    }


def files(draw: Draw, passes: Sequence[Pass] = ()) -> dict[str, bytes]:
    """The published files by name: entries.csv, stock.csv, results.csv, pass-{n}.csv."""
    out = {
        "entries.csv": draw.frozen.entries_csv,
        "stock.csv": draw.frozen.stock_csv,
        "results.csv": draw.results_csv,
    }
    for p in passes:
        out[f"pass-{p.number}.csv"] = p.csv
    return out
