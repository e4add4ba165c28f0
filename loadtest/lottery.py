"""The gate's lottery checks (``allot loadtest --mode lottery``): pure functions of what the
crowd was answered, the draw's published files and the ledger, like ``loadtest.checks``.

The crowd records every entry answer (``{"k": "e"}``, see ``loadtest.crowd``) by citizen number,
with the entry_id; an entry's receipt (its name in the published files) is computed from it,
so the checks match the crowd's entries to the lines of entries.csv and results.csv without any
personal data.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from loadtest import crowd
from loadtest.checks import Check, Records
from loadtest.fairness import Verdict, groups_from, judge

FREEZE_WITHIN = 60.0  # the contract: frozen within 60 s after closes_at


@dataclass
class LotteryFacts:
    """What the gate saw of the freeze and the draw, and the files it fetched."""

    round_id: str
    per_person: int
    problem: str = ""  # why the draw could not be reached ("" when it was)
    record: dict[str, Any] | None = None  # the final draw record
    entries: list[dict[str, str]] = field(default_factory=list)  # entries.csv
    stock: list[dict[str, str]] = field(default_factory=list)  # stock.csv
    results: list[dict[str, str]] = field(default_factory=list)  # results.csv
    freeze_after_close: float | None = None  # seconds from closes_at to the freeze being seen
    draw_took: float | None = None  # seconds from the draw request to "drawn"
    verify_rc: int | None = None
    verify_note: str = ""
    ledger_entry_doubles: int | None = None  # citizen hashes with two entries in the ledger


def parse_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


def _entry_records(records: Records) -> dict[int, list[dict[str, Any]]]:
    by_citizen: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in records.entries:
        by_citizen[e["n"]].append(e)
    for rows in by_citizen.values():
        rows.sort(key=lambda e: e["t"])
    return by_citizen


def _choice(e: dict[str, Any]) -> tuple[str, str]:
    return e["site"], "1" if e["acc"] else "0"


def expected_choices(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """What a citizen's entry may hold at the freeze: the choice of the last answer (an entry
    answer or a lookup); every choice of the twin requests when that answer was one of them
    (either may have been applied last); and any choice whose answer was lost (it may have been
    applied unseen)."""
    answered = [e for e in rows if e["st"] in (200, 201)]
    if not answered:
        return set()
    last = answered[-1]
    choices = {_choice(last)}
    if last.get("conc"):
        choices |= {_choice(e) for e in answered if e.get("conc")}
    choices |= {_choice(e) for e in rows if e["st"] not in (200, 201)}
    return choices


def check_freeze_and_draw(lottery: LotteryFacts) -> Check:
    """The round froze within the contract's 60 s of closes_at, and the draw finished."""
    if lottery.problem:
        return Check("freeze-and-draw", False, lottery.problem)
    after = lottery.freeze_after_close
    record = lottery.record or {}
    figure = (
        f"frozen {after if after is not None else float('nan'):.1f} s after closes_at (limit"
        f" {FREEZE_WITHIN:.0f} s) with {record.get('entries')} entries; drawn in"
        f" {lottery.draw_took or 0:.1f} s"
    )
    return Check(
        "freeze-and-draw",
        after is not None and after <= FREEZE_WITHIN and record.get("status") == "drawn",
        figure,
        {
            "freeze_after_close_s": None if after is None else round(after, 2),
            "draw_s": None if lottery.draw_took is None else round(lottery.draw_took, 2),
            "entries": record.get("entries"),
        },
    )


def check_entries_complete(lottery: LotteryFacts, records: Records) -> Check:
    """Every entry answered 201/200 is in entries.csv, with the citizen's last choice."""
    frozen = {row["receipt"]: row for row in lottery.entries}
    answered = missing = wrong = 0
    examples: list[str] = []
    for rows in _entry_records(records).values():
        ok_rows = [e for e in rows if e["st"] in (200, 201)]
        if not ok_rows:
            continue
        answered += 1
        receipt = crowd.receipt(lottery.round_id, ok_rows[-1]["eid"])
        row = frozen.get(receipt)
        if row is None:
            missing += 1
            examples.append(f"receipt {receipt[:12]}... is missing")
            continue
        if (row["site_id"], row["accept_district"]) not in expected_choices(rows):
            wrong += 1
            last = ok_rows[-1]
            examples.append(
                f"receipt {receipt[:12]}... holds {row['site_id']}/{row['accept_district']},"
                f" last answered {last['site']}/{int(bool(last['acc']))}"
            )
    figure = (
        f"{answered - missing - wrong:,} of {answered:,} entries answered 201/200 are in"
        f" entries.csv with their last choice ({len(frozen):,} lines)"
    )
    if missing or wrong:
        figure += f"; {missing} missing, {wrong} with another choice, e.g. {examples[0]}"
    if not answered:
        figure += "; no entry was answered"
    return Check(
        "entries-complete",
        answered > 0 and missing == 0 and wrong == 0,
        figure,
        {"answered": answered, "missing": missing, "wrong_choice": wrong, "lines": len(frozen)},
    )


def check_winners_within_stock(lottery: LotteryFacts) -> Check:
    """Winners x per_person <= the units stock.csv lists, at every site."""
    units = {row["site_id"]: int(row["units"]) for row in lottery.stock}
    winners = Counter(row["site_id"] for row in lottery.results if row["site_id"])
    over = sorted(s for s, n in winners.items() if n * lottery.per_person > units.get(s, 0))
    total = sum(winners.values())
    figure = (
        f"{total:,} winners for {sum(units.values()):,} units at {len(units)} sites"
        f" ({lottery.per_person} each)"
    )
    if over:
        figure += f"; more winners than units at {', '.join(over)}"
    return Check(
        "winners-within-stock",
        bool(units) and not over,
        figure,
        {"winners": total, "units": sum(units.values()), "over": over},
    )


def check_one_entry_per_citizen(
    lottery: LotteryFacts, records: Records, reservation_doubles: int | None
) -> Check:
    """One entry per citizen (every answer the same entry_id; the ledger: one row per citizen
    hash) and at most one win (each receipt once in results.csv; at most one live reservation
    per citizen hash in the ledger)."""
    twice = sum(
        1
        for rows in _entry_records(records).values()
        if len({e["eid"] for e in rows if e["st"] in (200, 201)}) > 1
    )
    receipts = Counter(row["receipt"] for row in lottery.entries)
    listed_twice = sum(1 for n in receipts.values() if n > 1)
    results = Counter(row["receipt"] for row in lottery.results)
    ranked_twice = sum(1 for n in results.values() if n > 1)
    entry_doubles = lottery.ledger_entry_doubles
    problems = twice + listed_twice + ranked_twice + (entry_doubles or 0)
    problems += reservation_doubles or 0
    figure = (
        f"{twice} citizens were answered two entries; {listed_twice} receipts listed twice,"
        f" {ranked_twice} ranked twice; ledger: "
        + (
            "not readable"
            if entry_doubles is None
            else f"{entry_doubles} citizens with two entries,"
            f" {reservation_doubles or 0} with two live reservations"
        )
    )
    return Check(
        "one-entry-per-citizen",
        problems == 0,
        figure,
        {
            "two_entries": twice,
            "receipt_listed_twice": listed_twice,
            "receipt_ranked_twice": ranked_twice,
            "ledger_entry_doubles": entry_doubles,
            "ledger_reservation_doubles": reservation_doubles,
        },
    )


def check_same_entry_on_retry(records: Records) -> Check:
    """The impatient entrants' resubmissions get the entry they already have (200)."""
    first: dict[int, str] = {}
    again = wrong = 0
    for e in sorted(records.entries, key=lambda e: e["t"]):
        if e["who"] != "impatient" or e["op"] != "resubmit" or e["st"] not in (200, 201):
            continue
        if e["n"] not in first:
            first[e["n"]] = e["eid"]
            continue
        again += 1
        if e["eid"] != first[e["n"]] or e["st"] != 200:
            wrong += 1
    if again == 0:
        return Check("same-entry-on-retry", None, "no impatient resubmission after an entry")
    return Check(
        "same-entry-on-retry",
        wrong == 0,
        f"{again - wrong:,} of {again:,} resubmissions answered 200 with the same entry",
        {"resubmissions": again, "wrong": wrong},
    )


def check_verify_draw(lottery: LotteryFacts) -> Check:
    if lottery.verify_rc is None:
        return Check("verify-draw", False, lottery.verify_note or "allot verify-draw did not run")
    return Check(
        "verify-draw",
        lottery.verify_rc == 0,
        f"allot verify-draw --url exited {lottery.verify_rc}"
        + (f": {lottery.verify_note}" if lottery.verify_note else ""),
        {"exit": lottery.verify_rc},
    )


# -- fairness by behaviour ----------------------------------------------------------------------


def lottery_fairness(lottery: LotteryFacts, records: Records) -> Verdict:
    """Entrants (an entry answered 201/200) and winners (a site in results.csv), by group.

    Each group's row also carries ``expected_rate``: the rate its entrants' own choices predict,
    each entrant counted at the win rate of everyone who made the same choice (site and
    accept_district, as entries.csv has it). A site's odds are its units over its entrants, so
    they differ widely (a popular site is a poor bet), and groups choose differently (polite
    citizens sometimes move to another site, a duplicate's last choice is often its second):
    a gap between ``rate`` and ``expected_rate`` is the draw's doing, a gap between two groups'
    ``expected_rate`` is their choices'. Information only; the verdict is ``judge``'s."""
    won_receipts = {row["receipt"] for row in lottery.results if row["site_id"]}
    frozen = {row["receipt"]: (row["site_id"], row["accept_district"]) for row in lottery.entries}
    asked: dict[str, set[int]] = defaultdict(set)
    won: dict[str, set[int]] = defaultdict(set)
    choice_of: dict[str, list[tuple[str, str] | None]] = defaultdict(list)
    for n, rows in _entry_records(records).items():
        ok_rows = [e for e in rows if e["st"] in (200, 201)]
        if not ok_rows:
            continue
        who = ok_rows[-1]["who"]
        asked[who].add(n)
        receipt = crowd.receipt(lottery.round_id, ok_rows[-1]["eid"])
        if receipt in won_receipts:
            won[who].add(n)
        choice_of[who].append(frozen.get(receipt))
    verdict = judge(groups_from(asked, won))
    by_choice: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in lottery.entries:
        tally = by_choice[(row["site_id"], row["accept_district"])]
        tally[0] += 1
        tally[1] += row["receipt"] in won_receipts
    for g in verdict.groups:
        odds = [by_choice[c][1] / by_choice[c][0] for c in choice_of[g["group"]] if c]
        g["expected_rate"] = round(sum(odds) / len(odds), 4) if odds else None
    expected = ", ".join(
        f"{g['group']} {g['expected_rate']:.0%}"
        for g in verdict.groups
        if g.get("expected_rate") is not None
    )
    if expected:
        verdict.figure += f"; expected from their site choices: {expected}"
    return verdict


def fcfs_fairness(records: Records) -> Verdict:
    """Askers (a reservation request answered other than 429) and holders, by group."""
    asked: dict[str, set[int]] = defaultdict(set)
    won: dict[str, set[int]] = defaultdict(set)
    granted = {g["n"] for g in records.grants}
    for c in records.citizens:
        if c["who"] == "reader" or not c["asked"]:
            continue
        asked[c["who"]].add(c["n"])
        if c["n"] in granted:
            won[c["who"]].add(c["n"])
    return judge(groups_from(asked, won))


def check_fairness(verdict: Verdict) -> Check:
    """The lottery's promise: the chance of a share does not depend on how one behaved."""
    return Check("fairness", verdict.fair, verdict.figure, verdict.as_dict())
