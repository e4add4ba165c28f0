"""The lottery test vectors in docs/lottery-vectors/: their inputs, and the generator.

    .venv/bin/python -m tests.lottery_vectors          # rewrite docs/lottery-vectors/
    .venv/bin/python -m tests.lottery_vectors --check  # exit 1 if a committed file differs

Every case is built by allocator/draw.py from the inputs below and then checked for the feature
it is meant to exercise (a fallback, a tie, a pass ...), so a change of inputs cannot quietly
make a case pointless. tests/test_draw.py regenerates them in memory and compares byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from allocator import draw as d
from allocator.receipts import DrawKey, b64url, entry_statement

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "docs" / "lottery-vectors"

# A throwaway Ed25519 key for the signature vectors, published on purpose: never use it.
TEST_KEY_SEED = hashlib.sha256(b"allot lottery test vectors: public test key, never use").digest()


@dataclass(frozen=True)
class Case:
    name: str
    about: str  # what the case exercises, one line
    round_id: str
    per_person: int
    loss_weighting: bool
    secret: bytes
    public_randomness: str
    source: str
    sites: list[tuple[str, str, int]]  # site_id, district, units at the freeze
    entries: list[tuple[str, str, bool, int]]  # entry_id, site_id, accept_district, weight
    passes: list[dict[str, int]] = field(default_factory=list)  # released units per pass


def _secret(label: str) -> bytes:
    return hashlib.sha256(f"allot lottery test vector secret: {label}".encode()).digest()


TIANHE = "Tianhe, East"  # a comma: quoted in the CSV files
YUEXIU = '越秀区 "Old Town"'  # double quotes (doubled inside the quoting) and non-ASCII text
HAIZHU = "Haizhu\nRiverside"  # a line break inside a quoted field

CASES = [
    Case(
        name="a-tiny",
        about=(
            "8 entries, 4 sites in 2 districts, per_person 2, weights 1-4; a district fallback, "
            "a fallback tie on units (the smaller site_id wins), districts with a comma, double "
            "quotes and non-ASCII text, a site left with 1 unit < per_person"
        ),
        round_id="vector-a",
        per_person=2,
        loss_weighting=True,
        secret=_secret("a"),
        public_randomness="福彩3D 2020037: 5 8 1",
        source="福彩3D 第2020037期 开奖号码, drawn 2020-02-16 21:15 +08:00",
        sites=[("t-1", TIANHE, 2), ("t-2", TIANHE, 4), ("t-3", TIANHE, 4), ("y-1", YUEXIU, 3)],
        entries=[
            ("entry-a1", "t-1", True, 1),
            ("entry-a2", "t-1", True, 4),
            ("entry-a3", "t-1", False, 2),
            ("entry-a4", "t-1", True, 3),
            ("entry-a5", "y-1", True, 1),
            ("entry-a6", "y-1", False, 2),
            ("entry-a7", "y-1", False, 1),
            ("entry-a8", "y-1", False, 4),
        ],
    ),
    Case(
        name="b-passes",
        about=(
            "12 entries, 3 sites in 2 districts, per_person 1; pass 1 after a cancelled win "
            "(1 unit released at b-s1), pass 2 after a later batch (2 units at b-n2) that also "
            "reaches entries of b-n1 through the district fallback"
        ),
        round_id="vector-b",
        per_person=1,
        loss_weighting=True,
        secret=_secret("b"),
        public_randomness=(
            "drand quicknet round 9123456: "
            "a51d8c4f6e1b7a09c3f2d8e4b6a1c7f0e9d2b3a4c5f6e7d8a9b0c1d2e3f4a5b6"
        ),
        source="drand quicknet (52db9ba70e0cc0f6eaf7803dd07447a1f5477735fd3f661792ba94600c84e971)",
        sites=[("b-n1", "North", 2), ("b-n2", "North", 1), ("b-s1", "South", 2)],
        entries=[
            ("entry-b01", "b-n1", True, 1),
            ("entry-b02", "b-n1", True, 2),
            ("entry-b03", "b-n1", False, 1),
            ("entry-b04", "b-n1", True, 3),
            ("entry-b05", "b-n1", True, 1),
            ("entry-b06", "b-n2", False, 1),
            ("entry-b07", "b-n2", True, 4),
            ("entry-b08", "b-s1", True, 1),
            ("entry-b09", "b-s1", False, 2),
            ("entry-b10", "b-s1", True, 1),
            ("entry-b11", "b-s1", False, 1),
            ("entry-b12", "b-s1", True, 2),
        ],
        passes=[{"b-s1": 1}, {"b-n2": 2}],
    ),
    Case(
        name="c-empty-site",
        about=(
            "10 entries, 5 sites in 3 districts, per_person 2, no loss_weighting (every weight "
            "1); nobody drawn at c-1 (1 unit < per_person: its entrants who accept the district "
            "go to c-2) nor at c-3 (0 units, its district has no other site), c-4 has no "
            "entrants; a district name with a line break"
        ),
        round_id="vector-c",
        per_person=2,
        loss_weighting=False,
        secret=_secret("c"),
        public_randomness="Guangdong Fucai 2020-02-16 #37: 03 11 18 24 29 31 + 07",
        source="Guangdong welfare lottery, draw of 2020-02-16",
        sites=[
            ("c-1", HAIZHU, 1),
            ("c-2", HAIZHU, 6),
            ("c-3", "Panyu", 0),
            ("c-4", "Liwan", 4),
            ("c-5", "Liwan", 2),
        ],
        entries=[
            ("entry-c01", "c-1", True, 1),
            ("entry-c02", "c-1", True, 1),
            ("entry-c03", "c-1", False, 1),
            ("entry-c04", "c-2", False, 1),
            ("entry-c05", "c-2", True, 1),
            ("entry-c06", "c-3", True, 1),
            ("entry-c07", "c-3", False, 1),
            ("entry-c08", "c-5", True, 1),
            ("entry-c09", "c-5", False, 1),
            ("entry-c10", "c-5", True, 1),
        ],
    ),
]

FROZEN_AT = "2020-02-17T00:00:30+08:00"
DRAWN_AT = "2020-02-17T21:20:00+08:00"


def build(case: Case) -> dict[str, bytes]:
    """Every file of the case's directory, by name."""
    district = {s[0]: s[1] for s in case.sites}
    receipts = {eid: d.entry_receipt(case.round_id, eid) for eid, *_ in case.entries}
    frozen = d.freeze(
        [
            d.EntryLine(receipts[eid], site, district[site], accept, weight)
            for eid, site, accept, weight in case.entries
        ],
        [d.StockLine(*s) for s in case.sites],
    )
    drawn = d.draw(case.round_id, case.per_person, case.secret, case.public_randomness, frozen)
    passes: list[d.Pass] = []
    for released in case.passes:
        passes.append(d.next_pass(drawn, passes, released))
    times = [f"2020-02-{18 + n}T10:00:00+08:00" for n in range(len(passes))]
    record = d.record(
        drawn,
        passes,
        public_randomness_source=case.source,
        frozen_at=FROZEN_AT,
        drawn_at=DRAWN_AT,
        pass_times=times,
    )
    left = passes[-1].left if passes else drawn.left
    rnd = {
        "round_id": case.round_id,
        "title": f"Test vector {case.name}",
        "opens_at": "2020-02-15T09:00:00+08:00",
        "closes_at": "2020-02-17T00:00:00+08:00",
        "per_person": case.per_person,
        "pickup_start": "2020-02-18T09:00:00+08:00",
        "pickup_end": "2020-02-25T18:00:00+08:00",
        "mode": "lottery",
        "status": "closed",
        "remaining": sum(left),
        "programme": None,
        "cooldown_days": 0,
        "eligibility": None,
        "loss_weighting": case.loss_weighting,
        "draw": record,
    }
    key = DrawKey.from_text(b64url(TEST_KEY_SEED))
    out = dict(d.files(drawn, passes))
    out["draw.json"] = _json(record)
    out["round.json"] = _json(rnd)
    out["receipts.json"] = _json(
        {
            "about": "entry_id -> receipt, and each entry's signature by the published test key",
            "test_private_key": key.private_text(),
            "public_key": key.public_key(),
            "entries": [
                {
                    "entry_id": eid,
                    "receipt": receipts[eid],
                    "statement": entry_statement(
                        case.round_id, receipts[eid], site, accept
                    ).decode(),
                    "signature": key.sign_entry(case.round_id, receipts[eid], site, accept),
                }
                for eid, site, accept, _w in case.entries
            ],
        }
    )
    out["README.md"] = _readme(case, drawn, passes).encode()
    for check in FEATURES[case.name]:
        check(case, drawn, passes)
    return out


def _json(value: object) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode()


# -- what each case must show --------------------------------------------------------------


def _fallbacks(drawn: d.Draw) -> list[tuple[d.Placed, bool]]:
    """Each fallback win of the draw, and whether it was decided by a tie on units."""
    left = {s.site_id: s.units for s in drawn.frozen.stock}
    by_receipt = {e.receipt: e for e in drawn.frozen.entries}
    district = {s.site_id: s.district for s in drawn.frozen.stock}
    out = []
    for p in drawn.winners():
        own = by_receipt[p.receipt].site_id
        if own != p.site_id:
            best = max(left[s] for s in left if district[s] == district[own] and s != own)
            tied = [s for s in left if district[s] == district[own] and left[s] == best]
            out.append((p, len(tied) > 1 and p.site_id == min(tied)))
        left[p.site_id] -= drawn.per_person
    return out


def _has_tie(case: Case, drawn: d.Draw, passes: list[d.Pass]) -> None:
    assert any(tie for _p, tie in _fallbacks(drawn)), f"{case.name}: no fallback tie"


def _has_quotes(case: Case, drawn: d.Draw, passes: list[d.Pass]) -> None:
    text = drawn.frozen.entries_csv.decode()
    assert '"Tianhe, East"' in text, case.name
    assert '"越秀区 ""Old Town"""' in text, case.name
    assert {e.weight for e in drawn.frozen.entries} == {1, 2, 3, 4}, case.name


def _passes_draw(case: Case, drawn: d.Draw, passes: list[d.Pass]) -> None:
    assert len(passes) == 2, case.name
    assert all(p.drawn for p in passes), case.name
    wants = {e.receipt: e.site_id for e in drawn.frozen.entries}
    assert any(wants[p.receipt] != p.site_id for p in passes[1].drawn), "pass 2: no fallback"


def _empty_sites(case: Case, drawn: d.Draw, passes: list[d.Pass]) -> None:
    sites = {s.site_id: s for s in drawn.sites()}
    for site in ("c-1", "c-3"):
        assert sites[site].entries, case.name
        assert not sites[site].winners, case.name
    assert not sites["c-4"].entries, case.name
    wants = {e.receipt: e.site_id for e in drawn.frozen.entries}
    assert any(wants[p.receipt] == "c-1" and p.site_id == "c-2" for p in drawn.winners())


Check = Callable[[Case, d.Draw, list[d.Pass]], None]
FEATURES: dict[str, list[Check]] = {
    "a-tiny": [_has_tie, _has_quotes],
    "b-passes": [_passes_draw],
    "c-empty-site": [_empty_sites],
}


def _readme(case: Case, drawn: d.Draw, passes: list[d.Pass]) -> str:
    wants = {e.receipt: e.site_id for e in drawn.frozen.entries}
    lines = [
        f"# Test vector {case.name}",
        "",
        f"{case.about}.",
        "",
        f"Inputs: `round.json` (per_person {case.per_person}), `entries.csv`, `stock.csv`, and in",
        "`draw.json` the secret and the public randomness. Expected: everything else in",
        "`draw.json` (seed, digests, sites), `results.csv`"
        + (", " + ", ".join(f"`pass-{p.number}.csv`" for p in passes) if passes else "")
        + ". `receipts.json` maps",
        "each entry_id to its receipt and signature (by a published test key).",
        "",
        f"- seed `{drawn.seed}`",
    ]
    for p in drawn.winners():
        how = "own site" if wants[p.receipt] == p.site_id else f"fallback from {wants[p.receipt]}"
        lines.append(f"- rank {p.rank} `{p.receipt[:12]}…` → {p.site_id} ({how})")
    for ps in passes:
        released = ", ".join(f"{u} at {s}" for s, u in ps.released)
        for p in ps.drawn:
            want = wants[p.receipt]
            how = "own site" if want == p.site_id else f"fallback from {want}"
            lines.append(
                f"- pass {ps.number} ({released} released): rank {p.rank} "
                f"`{p.receipt[:12]}…` → {p.site_id} ({how})"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for case in CASES:
        directory = VECTORS / case.name
        for name, data in build(case).items():
            path = directory / name
            if args.check:
                if not path.exists() or path.read_bytes() != data:
                    stale.append(str(path))
            else:
                directory.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    for stale_path in stale:
        print(f"differs: {stale_path}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
