"""The gate's checks: pure functions of what the crowd saw and what the stores hold afterwards.

Each check answers pass (True), fail (False) or not applicable (None, with the reason in its
figure: e.g. reconcile against a deployment whose stores the gate cannot reach). A check that
is not applicable never counts as a pass in disguise: the table prints ``n/a`` and why.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from loadtest.crowd import percentile

if TYPE_CHECKING:
    from loadtest.lottery import LotteryFacts

LIVE = ("confirmed", "collected", "expired")


@dataclass
class Records:
    """Everything the locust processes wrote (see ``loadtest.crowd`` for the format)."""

    answers: list[dict[str, Any]] = field(default_factory=list)
    grants: list[dict[str, Any]] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)  # lottery mode
    citizens: list[dict[str, Any]] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0


def read_records(raw_dir: Path) -> Records:
    records = Records()
    sink = {
        "a": records.answers,
        "g": records.grants,
        "e": records.entries,
        "c": records.citizens,
        "v": records.violations,
    }
    for path in sorted(raw_dir.glob("*.jsonl")):
        records.files += 1
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a process cut off mid-line; its other lines still count
            sink.get(record.get("k", ""), []).append(record)
    return records


@dataclass
class LedgerFacts:
    """The round's rows in PostgreSQL, read after the run."""

    rows: dict[str, tuple[float, float]]  # reservation_id -> (created_at, recorded_at), epoch s
    live_units: int
    live_reservations: int
    doubles: int  # citizens holding more than one live reservation
    waited: float  # seconds the gate waited for rows still missing


@dataclass
class FaultFacts:
    kind: str  # kill-worker | restart-postgres | kill-redis-primary
    started: float  # epoch seconds
    ended: float | None  # worker replaced and ready / PostgreSQL answering again
    recovered: bool
    detail: str


@dataclass
class Facts:
    stock: int  # units loaded, as the service reports them afterwards
    planned_stock: int
    batches: int  # deliveries the service accepted
    planned_batches: int
    per_person: int
    final_stats: dict[str, Any] | None
    ledger: LedgerFacts | None
    reconcile_rc: int | None
    reconcile_note: str
    fault: FaultFacts | None
    p99_budget_ms: float
    client_rate: float  # the per-address token bucket the bot is held to
    client_burst: int
    locust_requests: int
    locust_exceptions: int
    locust_processes: int
    ledger_deadline: float = 30.0
    fault_window: float = 15.0  # seconds after a kill in which cut connections are its doing
    lottery: LotteryFacts | None = None  # --mode lottery: the freeze, the draw and its files


@dataclass
class Check:
    name: str
    ok: bool | None
    figure: str
    value: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("pass" if self.ok else "FAIL")


def _n(value: float) -> str:
    return f"{value:,.0f}"


# -- derived figures --------------------------------------------------------------------------


def answered_latencies(records: Records) -> list[float]:
    return sorted(float(a["ms"]) for a in records.answers if a["st"])


def client_grants(records: Records) -> dict[str, dict[str, Any]]:
    """reservation_id -> the first answer granting it, for every reservation a client saw."""
    seen: dict[str, dict[str, Any]] = {}
    for g in sorted(records.grants, key=lambda g: g["t"]):
        seen.setdefault(g["rid"], g)
    return seen


def created_ids(records: Records) -> set[str]:
    return {g["rid"] for g in records.grants if g["st"] == 201}


def demand_units(records: Records) -> int:
    return sum(int(c["asked"]) for c in records.citizens)


def fault_excused(answer: dict[str, Any], fault: FaultFacts | None, window: float) -> bool:
    """A connection cut by the injected kill (kill-worker), or a 503 with Retry-After while the
    killed Redis primary's shard failed over (kill-redis-primary); only within the window."""
    if fault is None or not fault.started - 0.5 <= answer["t"] <= fault.started + window:
        return False
    if fault.kind == "kill-worker":
        return bool(answer["fail"] == "connection")
    return (
        fault.kind == "kill-redis-primary"
        and answer["fail"] == "5xx"
        and answer["st"] == 503
        and bool(answer.get("ra"))
    )


def failover_claims_in_doubt(facts: Facts, records: Records) -> int:
    """kill-redis-primary: claims answered 503 within the window. A claim batch the shard
    decided but could not confirm on a replica (WAIT timed out, or the slot moved meanwhile) is
    answered 503: its reservation exists, and the citizen learns of it on a retry (200, the same
    reservation); one who never retries holds it unknowingly (docs/operations.md)."""
    return sum(
        1
        for a in records.answers
        if a.get("op") in ("reserve", "resubmit")
        and fault_excused(a, facts.fault, facts.fault_window)
        and facts.fault is not None
        and facts.fault.kind == "kill-redis-primary"
    )


# -- the checks -------------------------------------------------------------------------------


def check_crowd_ran(facts: Facts, records: Records) -> Check:
    """The crowd ran as planned: requests made and recorded alike, stock delivered, no crash."""
    asked = sum(1 for c in records.citizens if c["asked"])
    ok = (
        facts.locust_requests > 0
        and asked > 0
        and facts.locust_exceptions == 0
        and len(records.answers) == facts.locust_requests
        and facts.batches == facts.planned_batches
        and facts.stock == facts.planned_stock
    )
    figure = (
        f"{_n(facts.locust_requests)} requests ({_n(len(records.answers))} recorded by"
        f" {records.files} process(es)), {_n(asked)} citizens asked;"
        f" {facts.locust_exceptions} errors in the crowd's code; stock {_n(facts.stock)} of"
        f" {_n(facts.planned_stock)} loaded in {facts.batches} of {facts.planned_batches} batches"
    )
    return Check(
        "crowd-ran",
        ok,
        figure,
        {
            "requests": facts.locust_requests,
            "recorded": len(records.answers),
            "citizens_asked": asked,
            "locust_exceptions": facts.locust_exceptions,
            "batches": facts.batches,
        },
    )


def check_no_oversell(facts: Facts, records: Records) -> Check:
    sources: dict[str, int] = {
        "clients": sum(int(g["qty"]) for g in client_grants(records).values())
    }
    negative: list[str] = []
    if facts.final_stats is not None:
        stats = facts.final_stats
        sources["service"] = int(stats.get("reserved", 0)) + int(stats.get("collected", 0))
        negative = [s["site_id"] for s in stats.get("sites", []) if int(s["remaining"]) < 0]
    if facts.ledger is not None:
        sources["ledger"] = facts.ledger.live_units
    granted = max(sources.values())
    ok = granted <= facts.stock and not negative
    figure = f"granted {_n(granted)} of {_n(facts.stock)} (" + ", ".join(
        f"{k} {_n(v)}" for k, v in sources.items()
    )
    figure += ")" + (f"; negative stock at {', '.join(negative)}" if negative else "")
    return Check(
        "no-oversell",
        ok,
        figure,
        {"granted": granted, "stock": facts.stock, "sources": sources, "negative": negative},
    )


def check_nothing_stranded(facts: Facts, records: Records) -> Check:
    demand = demand_units(records)
    known = set(client_grants(records))
    live: int | None = None
    if facts.ledger is not None:
        live = facts.ledger.live_reservations
    elif facts.final_stats is not None:
        live = int(facts.final_stats.get("reservations", 0))
    unknown = max(0, live - len(known)) if live is not None else 0
    problems: list[str] = []
    left: int | None = None
    if facts.final_stats is not None:
        sites = facts.final_stats.get("sites", [])
        left = sum(max(0, int(s["remaining"])) for s in sites)
        if demand > facts.stock:
            stuck = [s["site_id"] for s in sites if int(s["remaining"]) >= facts.per_person]
            if stuck:
                problems.append(f"shares left at {', '.join(stuck)} though demand exceeded stock")
    elif demand > facts.stock:
        problems.append("the service's stats could not be read")
    in_doubt = failover_claims_in_doubt(facts, records)
    if unknown > in_doubt:
        problems.append(f"{unknown} reservation(s) held that no client was ever told of")
    ratio = f" ({demand / facts.stock:.1f}x)" if facts.stock else ""
    figure = f"demand {_n(demand)} units for {_n(facts.stock)} in stock{ratio}; "
    figure += f"{'?' if left is None else _n(left)} left; {unknown} reservations unknown to clients"
    if unknown and unknown <= in_doubt:
        figure += f" (at most the {in_doubt} claims answered 503 during the failover)"
    if problems:
        figure += " - " + "; ".join(problems)
    return Check(
        "nothing-stranded",
        not problems,
        figure,
        {"demand": demand, "left": left, "unknown_reservations": unknown, "live": live},
    )


def check_one_per_citizen(facts: Facts, records: Records) -> Check:
    by_citizen: dict[int, set[str]] = defaultdict(set)
    created: Counter[int] = Counter()
    for g in records.grants:
        by_citizen[g["n"]].add(g["rid"])
        if g["st"] == 201:
            created[g["n"]] += 1
    twice = sum(1 for rids in by_citizen.values() if len(rids) > 1)
    twice_201 = sum(1 for n in created.values() if n > 1)
    doubles = facts.ledger.doubles if facts.ledger is not None else None
    ok = twice == 0 and twice_201 == 0 and not doubles
    figure = f"{twice} citizens saw two reservations, {twice_201} got two 201s; ledger: " + (
        "not readable" if doubles is None else f"{doubles} citizens with two live"
    )
    return Check(
        "one-per-citizen",
        ok,
        figure,
        {"two_reservations": twice, "two_201": twice_201, "ledger_doubles": doubles},
    )


def check_same_reservation_on_retry(facts: Facts, records: Records) -> Check:
    """The impatient citizens' resubmissions get the reservation they already hold."""
    first: dict[int, str] = {}
    again = wrong = 0
    for g in sorted(records.grants, key=lambda g: g["t"]):
        if g["who"] != "impatient":
            continue
        if g["n"] not in first:
            first[g["n"]] = g["rid"]
            continue
        again += 1
        if g["rid"] != first[g["n"]] or g["st"] != 200:
            wrong += 1
    if again == 0:
        return Check(
            "same-reservation-on-retry",
            None,
            "no impatient resubmission came after a grant (sold out before they came?)",
        )
    return Check(
        "same-reservation-on-retry",
        wrong == 0,
        f"{_n(again - wrong)} of {_n(again)} resubmissions answered 200 with the same reservation",
        {"resubmissions": again, "wrong": wrong},
    )


def check_ledger_complete(facts: Facts, records: Records) -> Check:
    created = created_ids(records)
    deadline = facts.ledger_deadline
    if facts.ledger is not None:
        rows = facts.ledger.rows
        missing = sorted(created - set(rows))
        delays = []
        for rid in created & set(rows):
            created_at, recorded_at = rows[rid]
            since = created_at
            fault = facts.fault
            if (
                fault is not None
                and fault.kind == "restart-postgres"
                and fault.ended is not None
                and fault.started <= created_at <= fault.ended
            ):
                since = fault.ended  # the contract's 30 s start when PostgreSQL is back
            delays.append(recorded_at - since)
        worst = max(delays, default=0.0)
        ok = not missing and worst <= deadline
        figure = (
            f"{_n(len(created) - len(missing))} of {_n(len(created))} reservations answered 201"
            f" are in the ledger; slowest {worst:.1f} s (limit {deadline:.0f} s)"
        )
        if missing:
            figure += f"; missing e.g. {', '.join(missing[:3])}"
        return Check(
            "ledger-complete",
            ok,
            figure,
            {"created": len(created), "missing": len(missing), "slowest_s": round(worst, 3)},
        )
    if facts.final_stats is None:
        return Check("ledger-complete", False, "neither the ledger nor the stats could be read")
    ledger = facts.final_stats.get("ledger") or {}
    recorded, lag = ledger.get("recorded"), ledger.get("lag")
    ok = isinstance(recorded, int) and recorded >= len(created) and lag == 0
    return Check(
        "ledger-complete",
        ok,
        f"by count (no --database-url): the service reports {recorded} recorded, lag {lag},"
        f" for {_n(len(created))} answered 201",
        {"created": len(created), "recorded": recorded, "lag": lag},
    )


def check_reconcile(facts: Facts, records: Records) -> Check:
    if facts.reconcile_rc is None:
        return Check("reconcile", None, facts.reconcile_note)
    return Check(
        "reconcile",
        facts.reconcile_rc == 0,
        f"allot reconcile exited {facts.reconcile_rc}"
        + (f": {facts.reconcile_note}" if facts.reconcile_note else ""),
        {"exit": facts.reconcile_rc},
    )


def check_no_server_errors(facts: Facts, records: Records) -> Check:
    counts: Counter[str] = Counter()
    excused = 0
    for a in records.answers:
        if a["fail"] in ("5xx", "connection", "timeout"):
            if fault_excused(a, facts.fault, facts.fault_window):
                excused += 1
            else:
                counts[a["fail"]] += 1
    figure = (
        f"5xx {counts['5xx']}, connections lost {counts['connection']},"
        f" timeouts {counts['timeout']}"
    )
    if excused and facts.fault is not None and facts.fault.kind == "kill-redis-primary":
        figure += f" (+{excused} 503 with Retry-After while the killed primary failed over)"
    elif excused:
        figure += f" (+{excused} connections cut by the injected kill, retried by their clients)"
    return Check(
        "no-server-errors",
        not counts,
        figure,
        {**{k: counts[k] for k in ("5xx", "connection", "timeout")}, "cut_by_fault": excused},
    )


def check_valid_answers(facts: Facts, records: Records) -> Check:
    wrong = [a for a in records.answers if a["fail"] in ("body", "status")]
    reasons = Counter(f"{a['who']} {a['op']}: {a['why']}" for a in wrong)
    reasons.update(f"{v['who']}: {v['why']}" for v in records.violations)
    total = len(wrong) + len(records.violations)
    figure = f"{total} wrong answers"
    if reasons:
        figure += "; " + "; ".join(f"{why} (x{n})" for why, n in reasons.most_common(3))
    return Check(
        "valid-answers",
        total == 0,
        figure,
        {"wrong": total, "reasons": dict(reasons.most_common(20))},
    )


def check_p99(facts: Facts, records: Records) -> Check:
    latencies = answered_latencies(records)
    p99 = percentile(latencies, 99)
    return Check(
        "p99",
        bool(latencies) and p99 <= facts.p99_budget_ms,
        f"p99 of {_n(len(latencies))} answered requests {p99:.0f} ms"
        f" (budget {facts.p99_budget_ms:.0f} ms)",
        {"p99_ms": round(p99, 1), "budget_ms": facts.p99_budget_ms, "answered": len(latencies)},
    )


def check_retry_after(facts: Facts, records: Records) -> Check:
    told = [a for a in records.answers if a["st"] in (429, 503)]
    if not told:
        return Check("retry-after", None, "no 429 or 503 was answered: nothing to honour")
    bad = sum(1 for a in told if not a["ra"])
    return Check(
        "retry-after",
        bad == 0,
        f"{_n(len(told) - bad)} of {_n(len(told))} 429/503 answers carried Retry-After >= 1 s",
        {"answers": len(told), "without": bad},
    )


def over_bucket(times: list[float], rate: float, burst: float) -> int:
    """How many of these admissions a token bucket (rate/s, burst) would have refused."""
    tokens, last, over = burst, None, 0
    for t in sorted(times):
        if last is not None:
            tokens = min(burst, tokens + (t - last) * rate)
        last = t
        if tokens >= 1:
            tokens -= 1
        else:
            over += 1
    return over


def check_bot_held_back(facts: Facts, records: Records) -> Check:
    """The bot's one address is admitted no faster than the per-address bucket allows.

    Only answers about stock count: sold-out and round-not-open are honest whatever the gate
    does (and a service may give them before the gate). Every such answer but a 429 is an
    admission; replaying the configured bucket over their times (with 20 % more burst and one
    second of rate as slack for timing) must refuse none of them. Leaving the other answers out
    can only make the replayed bucket fuller than the real one, so a finding is never false.
    """
    gated = any(a["st"] == 429 and a["code"] == "rate-limited" for a in records.answers)
    bot = [
        a
        for a in records.answers
        if a["who"] == "bot" and a["op"] in ("reserve", "enter") and a["st"]
    ]
    # unavailable (503): the store did not decide, or (a replica wait that timed out) did not
    # say; left out like the others, which can only make the replayed bucket fuller
    contested = [a for a in bot if a["code"] not in ("sold-out", "round-not-open", "unavailable")]
    if not gated:
        return Check(
            "bot-held-back",
            None,
            f"no answer was 429 rate-limited: the service shows no gate ({len(bot)} bot requests)",
        )
    if not contested:
        return Check(
            "bot-held-back",
            None,
            f"all {len(bot)} bot requests met sold-out or a closed round: nothing to hold back",
        )
    admitted = [a["t"] for a in contested if a["st"] != 429]
    limited = sum(1 for a in contested if a["st"] == 429 and a["code"] == "rate-limited")
    granted = sum(1 for a in contested if a["st"] == 201)
    slack_burst = facts.client_burst * 1.2 + facts.client_rate
    over = over_bucket(admitted, facts.client_rate, slack_burst)
    return Check(
        "bot-held-back",
        over == 0,
        f"bot: {len(admitted)} of {len(contested)} claims admitted, {limited} answered 429"
        f" rate-limited ({limited / len(contested):.0%}), {granted} shares; the per-address"
        f" bucket ({facts.client_rate:g}/s, burst {facts.client_burst}) would have refused"
        f" {over} of those admitted",
        {
            "bot_requests": len(bot),
            "contested": len(contested),
            "admitted": len(admitted),
            "rate_limited": limited,
            "granted": granted,
            "over_bucket": over,
        },
    )


def check_fault(facts: Facts, records: Records) -> Check:
    fault = facts.fault
    if fault is None:
        return Check("fault", None, "no fault injected")
    took = f" in {fault.ended - fault.started:.1f} s" if fault.ended else ""
    return Check(
        f"fault:{fault.kind}",
        fault.recovered,
        fault.detail + took,
        {"started": fault.started, "ended": fault.ended},
    )


CHECKS: tuple[Callable[[Facts, Records], Check], ...] = (
    check_crowd_ran,
    check_no_oversell,
    check_nothing_stranded,
    check_one_per_citizen,
    check_same_reservation_on_retry,
    check_ledger_complete,
    check_reconcile,
    check_no_server_errors,
    check_valid_answers,
    check_p99,
    check_retry_after,
    check_bot_held_back,
)


def run_checks(facts: Facts, records: Records) -> list[Check]:
    if facts.lottery is not None:
        return run_lottery_checks(facts, records)
    checks = [check(facts, records) for check in CHECKS]
    if facts.fault is not None:
        checks.append(check_fault(facts, records))
    return checks


def passed(checks: Iterable[Check]) -> bool:
    return all(c.ok is not False for c in checks)


def run_lottery_checks(facts: Facts, records: Records) -> list[Check]:
    """--mode lottery: the entries take the place of reservations; the draw is checked too.

    ``nothing-stranded``, ``one-per-citizen``, ``same-reservation-on-retry`` and
    ``ledger-complete`` judge reservations the crowd was answered, which a registration crowd
    never is: their lottery counterparts take their place."""
    from loadtest import lottery as lt

    draw = facts.lottery
    assert draw is not None
    doubles = facts.ledger.doubles if facts.ledger is not None else None
    checks = [
        check_crowd_ran(facts, records),
        lt.check_freeze_and_draw(draw),
        lt.check_entries_complete(draw, records),
        check_no_oversell(facts, records),
        lt.check_winners_within_stock(draw),
        lt.check_one_entry_per_citizen(draw, records, doubles),
        lt.check_same_entry_on_retry(records),
        lt.check_verify_draw(draw),
        lt.check_fairness(lt.lottery_fairness(draw, records)),
        check_reconcile(facts, records),
        check_no_server_errors(facts, records),
        check_valid_answers(facts, records),
        check_p99(facts, records),
        check_retry_after(facts, records),
        check_bot_held_back(facts, records),
    ]
    if facts.fault is not None:
        checks.append(check_fault(facts, records))
    return checks
