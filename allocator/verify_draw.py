"""verify-draw: replay an ``allot-draw-1`` lottery from its published files alone.

Written from the contract (API.md, "Lottery rounds" and "The draw, step by step"), not from the
service's drawing code, and sharing nothing with it: this one file needs only Python's standard
library (and the ``cryptography`` package for the optional signature check). Copy it anywhere and
run it:

    python verify_draw.py --dir DIR            # draw.json, round.json, entries.csv, stock.csv,
                                               # results.csv, pass-1.csv ... in DIR
    python verify_draw.py --url https://masks.example.gov.cn --round r2020-02-15
    python verify_draw.py --dir DIR --receipt HEX [--signature SIG --public-key KEY]

It checks, in this order, and stops at the first thing that does not match (exit 1, naming the
file and, where there is one, the line; exit 0 when everything matches):

1. draw.json is the record of a drawn ``allot-draw-1`` round; round.json is the same round.
   (A round frozen but not yet drawn is checked as far as it goes: steps 2 and 3, then exit 0
   saying "NOT drawn yet"; keep those files to compare with the draw's.)
2. ``commitment`` = SHA-256(secret).
3. stock.csv and entries.csv: header, one record per line (LF, the last line too), fields quoted
   only when they contain a comma, a double quote or a line break, UTF-8 in NFC, sorted by
   site_id / receipt with no duplicates, weights 1-4 (only 1 when the round has no
   loss_weighting), every entry at a listed site and in that site's district; their SHA-256 equal
   ``stock_digest`` / ``entries_digest``, and ``entries`` counts the lines.
4. ``seed`` = SHA-256 of the seed text.
5. results.csv equals, line by line, the ranking and allocation replayed here; its SHA-256
   equals ``results_digest``.
6. Each pass: pass-{n}.csv equals the replayed pass line by line, and its SHA-256 the pass's
   ``digest``.
7. ``sites`` in the record: each site's district, stock, entries choosing it and winners of the
   draw.

Where the contract is silent: ``per_person`` is not in the draw record, so it is read from the
Round (round.json, or ``GET /api/v1/rounds/{round_id}``); ``sites[].winners`` counts the draw's
winners at the site (results.csv), not those of later passes; base64url is read with or without
``=`` padding.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import hashlib
import itertools
import json
import re
import sys
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

ALGORITHM = "allot-draw-1"
RECORD_MEMBERS = (
    "round_id", "algorithm", "status", "commitment", "public_randomness_source", "frozen_at",
    "entries", "entries_digest", "stock_digest", "public_randomness", "secret", "seed",
    "drawn_at", "results_digest", "passes", "sites",
)  # fmt: skip
HEX64 = re.compile(r"[0-9a-f]{64}")
SITE_ID = re.compile(r"[a-z0-9_-]{1,64}")
UNITS = re.compile(r"0|[1-9][0-9]*")
WEIGHTS = {"1": 1, "2": 2, "3": 3, "4": 4}


class Mismatch(Exception):
    """The first published thing that does not match the replay."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        super().__init__(file, line, message)
        self.file, self.line, self.message = file, line, message

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


@dataclass(slots=True)
class Replay:
    """What the replay found, for the report and the citizen check (lists in entries.csv order)."""

    round_id: str
    stage: str  # "drawn", or "frozen": the list and stock checked, the draw still to come
    files: Mapping[str, bytes]
    site_ids: list[str]
    receipts: list[str]
    order: list[int]  # entry numbers, rank 1 first
    placed: list[int | None]  # the site each entry won at, after the last pass
    won_in: list[int]  # 0: the draw, n: pass n, -1: not drawn
    drawn: int
    passes: list[int]  # entries drawn by each pass


# -- reading the files -----------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def needs_quotes(value: str) -> bool:
    return any(c in value for c in ',"\n\r')


def csv_records(name: str, data: bytes, header: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every record after the header, checking the contract's format.

    Line numbers are the file's own (the header is line 1); a record with a quoted line break
    spans several and is named by its first.
    """
    lines = Lines(name, data)
    if lines[0] != header:
        raise Mismatch(name, 1, f"header is {lines[0]!r}, expected {header!r}")
    width = header.count(",") + 1
    i = 1
    while i < len(lines):
        line = lines[i]
        start = i + 1
        if '"' not in line:
            if "\r" in line:
                raise Mismatch(name, start, "a CR outside quotes (lines end with LF alone)")
            fields = line.split(",")
            i += 1
        else:
            fields, i = _quoted_record(name, lines, i)
        if len(fields) != width:
            raise Mismatch(name, start, f"{len(fields)} fields, expected {width}")
        yield start, fields


class Lines:
    """The file's lines, each decoded (UTF-8, NFC) only when read: a million short strings cost
    far less than one decoded copy of the file split up (that would be UCS-2 for Chinese text).
    LF is a starter that composes with nothing, so the file is NFC exactly when every line is."""

    def __init__(self, name: str, data: bytes) -> None:
        if not data.endswith(b"\n"):
            raise Mismatch(name, data.count(b"\n") + 1, "the last line does not end with LF")
        self.name = name
        self.raw = data.split(b"\n")
        self.raw.pop()  # after the final LF

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> str:
        try:
            text = self.raw[i].decode("utf-8")
        except UnicodeDecodeError:
            raise Mismatch(self.name, i + 1, "not valid UTF-8") from None
        if not text.isascii() and not unicodedata.is_normalized("NFC", text):
            raise Mismatch(self.name, i + 1, "text is not in Unicode NFC")
        return text


def _quoted_record(name: str, lines: Lines, i: int) -> tuple[list[str], int]:
    """Parse one record containing quotes, starting at lines[i]; returns (fields, next line)."""
    start = i + 1
    text, pos = lines[i], 0
    fields: list[str] = []
    while True:
        if text.startswith('"', pos):
            pos += 1
            parts: list[str] = []
            while True:
                q = text.find('"', pos)
                if q < 0:  # a line break inside the quotes
                    parts.append(text[pos:] + "\n")
                    i += 1
                    if i >= len(lines):
                        raise Mismatch(name, start, "a quoted field is never closed")
                    text, pos = lines[i], 0
                elif text.startswith('"', q + 1):
                    parts.append(text[pos : q + 1])
                    pos = q + 2
                else:
                    parts.append(text[pos:q])
                    pos = q + 1
                    break
            value = "".join(parts)
            if pos < len(text) and text[pos] != ",":
                raise Mismatch(name, start, "text after a closing quote")
            if not needs_quotes(value):
                raise Mismatch(name, start, f"field {value!r} is quoted but needs no quotes")
            fields.append(value)
            if pos == len(text):
                return fields, i + 1
            pos += 1
        else:
            end = text.find(",", pos)
            value = text[pos:] if end < 0 else text[pos:end]
            if '"' in value or "\r" in value:
                raise Mismatch(name, start, f"field {value!r} needs quotes (RFC 4180)")
            fields.append(value)
            if end < 0:
                return fields, i + 1
            pos = end + 1


def load_json(name: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Mismatch(name, None, f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise Mismatch(name, None, "not a JSON object")
    return value


# -- the replay ------------------------------------------------------------------------------


def verify(files: Mapping[str, bytes], round_id: str | None = None) -> Replay:
    """Replay the draw from the published files (name -> bytes); raise Mismatch at the first
    thing that does not match."""
    rec = load_json("draw.json", need(files, "draw.json"))
    rnd = load_json("round.json", need(files, "round.json"))
    for member in RECORD_MEMBERS:
        if member not in rec:
            raise Mismatch("draw.json", None, f"member {member!r} is missing")
    if rec["algorithm"] != ALGORITHM:
        raise Mismatch("draw.json", None, f"algorithm is {rec['algorithm']!r}, not {ALGORITHM}")
    status = rec["status"]
    if status not in ("frozen", "drawing", "drawn"):
        raise Mismatch("draw.json", None, f"status is {status!r}: nothing published to check yet")
    stage = "drawn" if status == "drawn" else "frozen"
    rid = rec["round_id"]
    if not isinstance(rid, str) or not SITE_ID.fullmatch(rid):
        raise Mismatch("draw.json", None, f"round_id {rid!r} is not 1-64 of [a-z0-9_-]")
    if round_id is not None and rid != round_id:
        raise Mismatch("draw.json", None, f"round_id is {rid!r}, not the round asked for")
    for member in ("commitment", "secret", "entries_digest", "stock_digest"):
        hex_member(rec, member)
    per_person, weight_one = check_round(rnd, rec)
    if sha256_hex(bytes.fromhex(rec["secret"])) != rec["commitment"]:
        raise Mismatch("draw.json", None, "SHA-256(secret) is not the commitment")

    # stock.csv
    stock_data = need(files, "stock.csv")
    site_ids: list[str] = []
    site_of: dict[str, int] = {}
    district: list[str] = []
    stock: list[int] = []
    for line, (site_id, dist, count) in csv_records(
        "stock.csv", stock_data, "site_id,district,units"
    ):
        if not SITE_ID.fullmatch(site_id):
            raise Mismatch("stock.csv", line, f"site_id {site_id!r} is not 1-64 of [a-z0-9_-]")
        if site_ids and site_id <= site_ids[-1]:
            what = "appears twice" if site_id == site_ids[-1] else "is out of site_id order"
            raise Mismatch("stock.csv", line, f"site {site_id} {what}")
        if not UNITS.fullmatch(count):
            raise Mismatch("stock.csv", line, f"units {count!r} is not a whole number")
        site_of[site_id] = len(site_ids)
        site_ids.append(site_id)
        district.append(dist)
        stock.append(int(count))
    if sha256_hex(stock_data) != rec["stock_digest"]:
        raise Mismatch("stock.csv", None, "its SHA-256 is not the record's stock_digest")

    # entries.csv
    entries_data = need(files, "entries.csv")
    receipts: list[str] = []
    wants: list[int] = []
    accepts: list[bool] = []
    weights: list[int] = []
    header = "receipt,site_id,district,accept_district,weight"
    for line, (receipt, site_id, dist, accept, weight) in csv_records(
        "entries.csv", entries_data, header
    ):
        if not HEX64.fullmatch(receipt):
            raise Mismatch("entries.csv", line, f"receipt {receipt!r} is not 64 lowercase hex")
        if receipts and receipt <= receipts[-1]:
            what = "appears twice" if receipt == receipts[-1] else "is out of receipt order"
            raise Mismatch("entries.csv", line, f"receipt {receipt} {what}")
        s = site_of.get(site_id)
        if s is None:
            raise Mismatch("entries.csv", line, f"site {site_id!r} is not in stock.csv")
        if dist != district[s]:
            raise Mismatch("entries.csv", line, f"district {dist!r} is not that of site {site_id}")
        if accept not in ("0", "1"):
            raise Mismatch("entries.csv", line, f"accept_district {accept!r} is not 0 or 1")
        w = WEIGHTS.get(weight)
        if w is None:
            raise Mismatch("entries.csv", line, f"weight {weight!r} is not 1-4")
        if weight_one and w != 1:
            raise Mismatch("entries.csv", line, "weight above 1 in a round without loss_weighting")
        receipts.append(receipt)
        wants.append(s)
        accepts.append(accept == "1")
        weights.append(w)
    if sha256_hex(entries_data) != rec["entries_digest"]:
        raise Mismatch("entries.csv", None, "its SHA-256 is not the record's entries_digest")
    if type(rec["entries"]) is not int or rec["entries"] != len(receipts):
        raise Mismatch(
            "draw.json", None, f"entries is {rec['entries']!r}; entries.csv has {len(receipts)}"
        )
    if stage == "frozen":
        return Replay(rid, stage, files, site_ids, receipts, [], [None] * len(receipts),
                      [-1] * len(receipts), 0, [])  # fmt: skip

    # the seed
    randomness = rec["public_randomness"]
    if (
        not isinstance(randomness, str)
        or not 1 <= len(randomness) <= 256
        or not randomness.isprintable()
        or not unicodedata.is_normalized("NFC", randomness)
    ):
        raise Mismatch("draw.json", None, "public_randomness is not 1-256 printable NFC characters")
    seed_text = (
        f"{ALGORITHM}\n{rid}\n{rec['secret']}\n{randomness}\n"
        f"{rec['entries_digest']}\n{rec['stock_digest']}\n"
    )
    seed = hashlib.sha256(seed_text.encode("utf-8")).digest()
    hex_member(rec, "seed")
    if seed.hex() != rec["seed"]:
        raise Mismatch("draw.json", None, f"seed is not SHA-256 of the seed text ({seed.hex()})")

    # the ranking: key = min_j SHA-256(seed || receipt bytes || j), ties by receipt
    ranked: list[tuple[bytes, str, int]] = []
    for n, receipt in enumerate(receipts):
        raw = seed + bytes.fromhex(receipt)
        key = min(hashlib.sha256(raw + bytes([j])).digest() for j in range(weights[n]))
        ranked.append((key, receipt, n))
    ranked.sort()
    order = [n for _key, _receipt, n in ranked]
    del ranked

    # the draw: rule 5, then results.csv
    sites_in: dict[str, list[int]] = {}
    for s, d in enumerate(district):
        sites_in.setdefault(d, []).append(s)  # in site_id order
    placed: list[int | None] = [None] * len(receipts)
    walk = Walk(order, wants, accepts, district, sites_in, per_person)
    left = list(stock)
    drawn = walk.run(placed, left)
    results_data = need(files, "results.csv")
    compare(
        "results.csv",
        results_data,
        (
            f"{r},{receipts[n]},{'' if (at := placed[n]) is None else site_ids[at]}\n"
            for r, n in enumerate(order, 1)
        ),
    )
    hex_member(rec, "results_digest")
    if sha256_hex(results_data) != rec["results_digest"]:
        raise Mismatch("draw.json", None, "results_digest is not the SHA-256 of results.csv")
    won_in = [-1 if at is None else 0 for at in placed]
    draw_placed = list(placed)

    # passes
    passes = rec["passes"]
    if not isinstance(passes, list):
        raise Mismatch("draw.json", None, "passes is not a list")
    pass_counts: list[int] = []
    for number, p in enumerate(passes, 1):
        name = f"pass-{number}.csv"
        where = f"draw.json passes[{number - 1}]"
        if not isinstance(p, dict) or p.get("pass") != number or type(p.get("pass")) is not int:
            raise Mismatch(where, None, f"is not pass {number}")
        released = p.get("released")
        if not isinstance(released, list):
            raise Mismatch(where, None, "released is not a list")
        for item in released:
            if not isinstance(item, dict) or item.get("site_id") not in site_of:
                raise Mismatch(where, None, f"released {item!r} is not at a site in stock.csv")
            units = item.get("units")
            if type(units) is not int or units < 0:
                raise Mismatch(where, None, f"released {item!r}: units is not a whole number")
            left[site_of[item["site_id"]]] += units
        newly = set(walk.run(placed, left))
        expected = []
        for r, n in enumerate(order, 1):
            if n in newly:
                site_id = site_ids[placed[n]]  # type: ignore[index]
                expected.append(f"{r},{receipts[n]},{site_id}\n")
                won_in[n] = number
        data = need(files, name)
        compare(name, data, expected)
        if not isinstance(p.get("digest"), str) or sha256_hex(data) != p["digest"]:
            raise Mismatch(where, None, f"digest is not the SHA-256 of {name}")
        pass_counts.append(len(newly))

    # the record's sites
    choosing = [0] * len(site_ids)
    winners = [0] * len(site_ids)
    for n, s in enumerate(wants):
        choosing[s] += 1
        if (at := draw_placed[n]) is not None:
            winners[at] += 1
    sites = rec["sites"]
    if not isinstance(sites, list) or len(sites) != len(site_ids):
        raise Mismatch("draw.json", None, f"sites does not list the {len(site_ids)} sites")
    for s, item in enumerate(sites):
        want = {
            "site_id": site_ids[s],
            "district": district[s],
            "stock": stock[s],
            "entries": choosing[s],
            "winners": winners[s],
        }
        if not isinstance(item, dict) or any(
            item.get(k) != v or type(item.get(k)) is not type(v) for k, v in want.items()
        ):
            raise Mismatch("draw.json", None, f"sites[{s}] is {item!r}, the replay gives {want!r}")

    return Replay(
        round_id=rid,
        stage=stage,
        files=files,
        site_ids=site_ids,
        receipts=receipts,
        order=order,
        placed=placed,
        won_in=won_in,
        drawn=len(drawn),
        passes=pass_counts,
    )


@dataclass(slots=True)
class Walk:
    """Rule 5 over the entries not yet placed, in rank order."""

    order: list[int]
    wants: list[int]
    accepts: list[bool]
    district: list[str]
    sites_in: dict[str, list[int]]
    per_person: int

    def run(self, placed: list[int | None], left: list[int]) -> list[int]:
        """Place what can be placed (updating ``placed`` and ``left``); return who was placed."""
        pp = self.per_person
        full: set[str] = set()  # districts with no site left at >= per_person (units only drop)
        got: list[int] = []
        for n in self.order:
            if placed[n] is not None:
                continue
            s = self.wants[n]
            if left[s] >= pp:
                left[s] -= pp
                placed[n] = s
                got.append(n)
                continue
            if not self.accepts[n] or self.district[s] in full:
                continue
            best: int | None = None
            for t in self.sites_in[self.district[s]]:  # site_id order: ties keep the first
                if left[t] >= pp and (best is None or left[t] > left[best]):
                    best = t
            if best is None:
                full.add(self.district[s])
                continue
            left[best] -= pp
            placed[n] = best
            got.append(n)
        return got


def check_round(rnd: dict[str, Any], rec: dict[str, Any]) -> tuple[int, bool]:
    """per_person from the Round, and whether every weight must be 1."""
    if rnd.get("round_id") != rec["round_id"]:
        raise Mismatch("round.json", None, f"round_id is {rnd.get('round_id')!r}, not the draw's")
    if "mode" in rnd and rnd["mode"] != "lottery":
        raise Mismatch("round.json", None, f"mode is {rnd['mode']!r}, not 'lottery'")
    per_person = rnd.get("per_person")
    if type(per_person) is not int or per_person < 1:
        raise Mismatch("round.json", None, f"per_person {per_person!r} is not a whole number >= 1")
    weighting = rnd.get("loss_weighting")
    if weighting is not None and type(weighting) is not bool:
        raise Mismatch("round.json", None, f"loss_weighting {weighting!r} is not true or false")
    draw = rnd.get("draw")
    if isinstance(draw, dict) and "commitment" in draw and draw["commitment"] != rec["commitment"]:
        raise Mismatch("round.json", None, "draw.commitment is not the record's commitment")
    return per_person, weighting is False


def hex_member(rec: dict[str, Any], member: str) -> None:
    value = rec[member]
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise Mismatch("draw.json", None, f"{member} {value!r} is not 64 lowercase hex digits")


def need(files: Mapping[str, bytes], name: str) -> bytes:
    data = files.get(name)
    if data is None:
        raise Mismatch(name, None, "missing")
    return data


def compare(name: str, data: bytes, lines: Iterable[str]) -> None:
    """The file must be the header ``rank,receipt,site_id`` and exactly these lines; else name
    the first line that differs. Compared in chunks, so the replayed file never exists whole."""
    pos, number = 0, 0
    batch = ["rank,receipt,site_id\n"]
    for line in itertools.chain(lines, [None]):
        if line is not None:
            batch.append(line)
            if len(batch) < 16384:
                continue
        chunk = "".join(batch).encode("utf-8")
        if data[pos : pos + len(chunk)] != chunk:
            for want in batch:
                number += 1
                raw = want.encode("utf-8")
                if data[pos : pos + len(raw)] != raw:
                    _differs(name, data, pos, number, want)
                pos += len(raw)
        pos += len(chunk)
        number += len(batch)
        batch = []
    if pos != len(data):
        raise Mismatch(name, number + 1, "a line the replay does not give")


def _differs(name: str, data: bytes, pos: int, number: int, want: str) -> NoReturn:
    if pos >= len(data):
        raise Mismatch(name, number, f"missing; the replay gives {want[:-1]!r}")
    end = data.find(b"\n", pos)
    got = data[pos : len(data) if end < 0 else end].decode("utf-8", "replace")
    if end < 0 and got == want[:-1]:
        raise Mismatch(name, number, "the last line does not end with LF")
    raise Mismatch(name, number, f"is {got!r}, the replay gives {want[:-1]!r}")


# -- one citizen's entry ---------------------------------------------------------------------


def b64url_decode(text: str, length: int, what: str) -> bytes:
    body = text.strip().rstrip("=")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", body):
        raise ValueError(f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64url") from None
    if len(raw) != length:
        raise ValueError(f"{what} is {len(raw)} bytes, not {length}")
    return raw


def signature_valid(public_key: str, signature: str, statement: bytes) -> bool:
    """Ed25519 check with the ``cryptography`` package."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        raise Mismatch("signature", None, "checking it needs the cryptography package") from None
    try:
        key = Ed25519PublicKey.from_public_bytes(b64url_decode(public_key, 32, "public key"))
        key.verify(b64url_decode(signature, 64, "signature"), statement)
    except (ValueError, InvalidSignature):
        return False
    return True


def _result(replay: Replay, n: int) -> list[str]:
    if replay.stage == "frozen":
        return ["  the draw has not run yet"]
    rank = replay.order.index(n) + 1
    out = [f"  rank {rank} of {len(replay.receipts)} (results.csv line {rank + 1})"]
    at, won_in = replay.placed[n], replay.won_in[n]
    if at is None:
        out.append("  not drawn")
    else:
        source = "the draw, results.csv" if won_in == 0 else f"pass {won_in}, pass-{won_in}.csv"
        out.append(f"  drawn at site {replay.site_ids[at]} ({source})")
    return out


def check_citizen(replay: Replay, args: argparse.Namespace, public_key: str | None) -> list[str]:
    """The citizen's own line: in entries.csv, its rank and result, and its signature."""
    receipt = args.receipt
    if args.entry_id is not None:
        text = f"allot-receipt-1\n{replay.round_id}\n{args.entry_id}"
        receipt = hashlib.sha256(text.encode("utf-8")).hexdigest()
    receipt = receipt.strip().lower()
    out = [f"receipt {receipt}"]
    n = bisect.bisect_left(replay.receipts, receipt)
    listed = n < len(replay.receipts) and replay.receipts[n] == receipt
    site_id, accept = args.site_id, args.accept_district
    if not listed:
        out.append("  NOT in entries.csv")
    else:
        header = "receipt,site_id,district,accept_district,weight"
        records = csv_records("entries.csv", replay.files["entries.csv"], header)
        line, fields = next(itertools.islice(records, n, None))
        _receipt, listed_site, _district, listed_accept, weight = fields
        out.append(
            f"  in entries.csv line {line}: site {listed_site}, accept_district {listed_accept},"
            f" weight {weight}"
        )
        out.extend(_result(replay, n))
        site_id = site_id if site_id is not None else listed_site
        accept = accept if accept is not None else listed_accept
    signature_ok: bool | None = None
    if args.signature is not None:
        if public_key is None:
            raise Mismatch("signature", None, "give --public-key (or --url to fetch the draw key)")
        if site_id is None or accept is None:
            raise Mismatch(
                "signature", None, "the receipt is not listed: give --site-id and --accept-district"
            )
        statement = f"allot-entry-1\n{replay.round_id}\n{receipt}\n{site_id}\n{accept}\n"
        signature_ok = signature_valid(public_key, args.signature, statement.encode("utf-8"))
        out.append(
            f"  signature over (site {site_id}, accept_district {accept}): "
            + ("valid, made by the draw key" if signature_ok else "NOT valid for this key")
        )
    if not listed:
        if signature_ok:
            out.append(
                "  the service signed this entry and it is missing from the frozen list: unless"
                " it was withdrawn or excluded (cooldown), keep this as proof and complain"
            )
        raise Mismatch("entries.csv", None, "\n".join([*out, "receipt not in entries.csv"]))
    if signature_ok is False:
        raise Mismatch("signature", None, "\n".join(out))
    return out


# -- where the files come from ---------------------------------------------------------------


def read_dir(directory: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name in ("draw.json", "round.json", "entries.csv", "stock.csv", "results.csv"):
        path = directory / name
        if path.exists():
            files[name] = path.read_bytes()
    if "draw.json" in files:
        rec = load_json("draw.json", files["draw.json"])
        passes = rec.get("passes")
        for n in range(1, (len(passes) if isinstance(passes, list) else 0) + 1):
            path = directory / f"pass-{n}.csv"
            if path.exists():
                files[path.name] = path.read_bytes()
    return files


def fetch(url: str, name: str, timeout: float) -> bytes:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise Mismatch(name, None, f"{url} is not an http(s) address")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - checked above
            data: bytes = answer.read()
            return data
    except urllib.error.HTTPError as exc:
        raise Mismatch(name, None, f"GET {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Mismatch(name, None, f"GET {url}: {exc}") from None


def read_url(base: str, round_id: str, timeout: float) -> dict[str, bytes]:
    root = f"{base.rstrip('/')}/api/v1/rounds/{urllib.parse.quote(round_id, safe='')}"
    files = {
        "round.json": fetch(root, "round.json", timeout),
        "draw.json": fetch(f"{root}/draw", "draw.json", timeout),
    }
    rec = load_json("draw.json", files["draw.json"])
    names = []
    if rec.get("status") in ("frozen", "drawing", "drawn"):
        names += ["entries.csv", "stock.csv"]
    if rec.get("status") == "drawn":
        passes = rec.get("passes")
        count = len(passes) if isinstance(passes, list) else 0
        names += ["results.csv", *(f"pass-{n}.csv" for n in range(1, count + 1))]
    for name in names:
        files[name] = fetch(f"{root}/draw/{name}", name, timeout)
    return files


def fetch_public_key(base: str, timeout: float) -> str:
    url = f"{base.rstrip('/')}/api/v1/draw-key"
    answer = load_json("draw-key", fetch(url, "draw-key", timeout))
    key = answer.get("public_key")
    if not isinstance(key, str):
        raise Mismatch("draw-key", None, "no public_key in the answer")
    return key


# -- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dir", type=Path, help="a directory with the published files")
    source.add_argument("--url", help="the service's base URL, e.g. https://masks.example.gov.cn")
    parser.add_argument("--round", help="the round_id (required with --url)")
    parser.add_argument("--save", type=Path, help="with --url: also write the files fetched here")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    mine = parser.add_argument_group("one citizen's entry (optional)")
    who = mine.add_mutually_exclusive_group()
    who.add_argument("--receipt", help="the entry's receipt (64 hex digits)")
    who.add_argument("--entry-id", help="the entry_id; its receipt is computed from it")
    mine.add_argument("--signature", help="the entry's signature (base64url)")
    mine.add_argument("--public-key", help="the draw key (base64url; --url fetches it)")
    mine.add_argument("--site-id", help="the site the signature names, if not as listed")
    mine.add_argument("--accept-district", choices=("0", "1"), help="likewise, 0 or 1")


def frozen_report(replay: Replay) -> list[str]:
    return [
        f"{ALGORITHM} round {replay.round_id}: frozen, NOT drawn yet; what is published matches",
        "  commitment = SHA-256(secret)",
        f"  stock.csv: {len(replay.site_ids)} sites; entries.csv: {len(replay.receipts)}"
        " entries; digests match",
        "  keep these files: the draw must be computed from exactly them",
    ]


def drawn_report(replay: Replay) -> list[str]:
    entries = len(replay.receipts)
    return [
        f"{ALGORITHM} round {replay.round_id}: the published draw replays exactly",
        "  commitment = SHA-256(secret)",
        f"  stock.csv: {len(replay.site_ids)} sites; entries.csv: {entries} entries; digests match",
        "  seed = SHA-256(seed text)",
        f"  results.csv: {entries} ranks, {replay.drawn} drawn; digest matches",
        *(
            f"  pass-{n}.csv: {count} drawn; digest matches"
            for n, count in enumerate(replay.passes, 1)
        ),
        "  sites in the record match",
    ]


def run(args: argparse.Namespace) -> int:
    try:
        if args.url is not None:
            if not args.round:
                raise Mismatch("--round", None, "needed with --url")
            files = read_url(args.url, args.round, args.timeout)
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                for name, data in files.items():
                    (args.save / name).write_bytes(data)
        else:
            files = read_dir(args.dir)
        replay = verify(files, args.round)
        lines = frozen_report(replay) if replay.stage == "frozen" else drawn_report(replay)
        if args.receipt is not None or args.entry_id is not None:
            key = args.public_key
            if key is None and args.signature is not None and args.url is not None:
                key = fetch_public_key(args.url, args.timeout)
            lines += check_citizen(replay, args, key)
    except Mismatch as exc:
        print(f"verify-draw: MISMATCH: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"verify-draw: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="verify-draw", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
