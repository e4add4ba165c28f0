"""Entitlement rules, the pure core: eligibility, derived groups, cooldown, loss weighting.

This module does no I/O and keeps no state. It is what the contract's section *Entitlement:
programmes, cooldown, eligibility* computes; wiring it into rounds, the claim script and the
lottery freeze is done elsewhere (see docs/architecture.md, "Entitlement rules (pure core)").

Every function that reads a citizen ID expects the canonical form that
:func:`allocator.identity.normalise_citizen_id` returns: 18 ASCII characters, the region in
characters 1-6 and the birth date ``YYYYMMDD`` in characters 7-14. Such IDs are already
validated, so the helpers here only slice them; anything else raises ``ValueError`` (or
``IndexError`` for a string that is too short), a programming error, never a citizen's.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, TypeGuard

from allocator import rules
from allocator.errors import InvalidRequest

# -- eligibility ---------------------------------------------------------------------------------

#: The order in which :meth:`Eligibility.check` tries the rules; the first one that fails is
#: the one the citizen is told about. It runs from the rule that shuts a citizen out longest to
#: the one that lifts soonest, so the reason given is the one that matters: the issuing region
#: never changes (telling a non-resident "come back on your birth-year day" would mislead); the
#: birth-year digit is fixed for this round but rotates across rounds; the age limits depend on
#: the round's date (``min_age`` lifts as the citizen grows older). min_age and max_age cannot
#: both fail, since an empty age range is refused.
RULE_ORDER: Final = rules.ELIGIBILITY_RULES
Rule = Literal["regions", "birth_year_last_digit", "min_age", "max_age"]

MAX_AGE_LIMIT: Final = rules.MAX_AGE_LIMIT
_REGION = re.compile(rules.REGION_REGEX, re.ASCII)  # 2, 4 or 6 ASCII digits


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Who may take part in a round; every rule that is not ``None`` must hold.

    Build it with :meth:`parse` from what an operator sent (that validates); ``None`` in place
    of an ``Eligibility`` means anyone may take part.
    """

    birth_year_last_digit: frozenset[int] | None = None
    min_age: int | None = None
    max_age: int | None = None
    regions: tuple[str, ...] | None = None
    # regions split by prefix length, so that check() costs three set look-ups however many
    # regions the operator listed
    _by_length: tuple[frozenset[str], frozenset[str], frozenset[str]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        regions = self.regions or ()
        by_length = tuple(frozenset(r for r in regions if len(r) == n) for n in (2, 4, 6))
        object.__setattr__(self, "_by_length", by_length)

    @classmethod
    def parse(cls, obj: object) -> Eligibility | None:
        """Validate an operator's ``eligibility`` value; raise InvalidRequest naming each bad field.

        ``None`` (JSON ``null``), and an object with no rules, mean anyone: both give ``None``,
        so "no rule" has one representation. A member given as ``null`` counts as absent.
        """
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise InvalidRequest.one("eligibility", "must be an object or null")
        errors: list[dict[str, str]] = []

        def bad(name: str, message: str) -> None:
            errors.append({"field": f"eligibility{name}", "message": message})

        for key in obj:
            if key not in RULE_ORDER:
                bad(f".{key}", f"unknown rule; the rules are {', '.join(sorted(RULE_ORDER))}")

        digits: frozenset[int] | None = None
        raw_digits = obj.get("birth_year_last_digit")
        if raw_digits is not None:
            if not isinstance(raw_digits, list) or not raw_digits:
                bad(".birth_year_last_digit", "must be a non-empty list of digits 0-9")
            else:
                seen: set[int] = set()
                ok = True
                for i, d in enumerate(raw_digits):
                    where = f".birth_year_last_digit[{i}]"
                    if not _is_int(d) or not 0 <= d <= 9:
                        bad(where, "must be a whole number 0-9")
                        ok = False
                    elif d in seen:
                        bad(where, f"{d} is listed twice")
                        ok = False
                    else:
                        seen.add(d)
                if ok:
                    digits = frozenset(seen)

        ages: dict[str, int] = {}
        for name in ("min_age", "max_age"):
            value = obj.get(name)
            if value is None:
                continue
            if not _is_int(value) or not 0 <= value <= MAX_AGE_LIMIT:
                bad(f".{name}", f"must be a whole number of years 0-{MAX_AGE_LIMIT}")
            else:
                ages[name] = value
        if "min_age" in ages and "max_age" in ages and ages["min_age"] > ages["max_age"]:
            bad(
                "",
                f"min_age {ages['min_age']} is greater than max_age {ages['max_age']}: "
                "nobody could take part",
            )

        regions: tuple[str, ...] | None = None
        raw_regions = obj.get("regions")
        if raw_regions is not None:
            if not isinstance(raw_regions, list) or not raw_regions:
                bad(".regions", "must be a non-empty list of region prefixes")
            else:
                ok = True
                for i, r in enumerate(raw_regions):
                    if not isinstance(r, str) or not _REGION.fullmatch(r):
                        bad(f".regions[{i}]", "must be 2, 4 or 6 digits 0-9 (e.g. 44, 4401)")
                        ok = False
                if ok:
                    regions = tuple(raw_regions)

        if errors:
            raise InvalidRequest(errors)
        if digits is None and not ages and regions is None:
            return None
        return cls(digits, ages.get("min_age"), ages.get("max_age"), regions)

    def to_json(self) -> dict[str, object]:
        """The public shape: the rules given, digits sorted, regions as given."""
        out: dict[str, object] = {}
        if self.birth_year_last_digit is not None:
            out["birth_year_last_digit"] = sorted(self.birth_year_last_digit)
        if self.min_age is not None:
            out["min_age"] = self.min_age
        if self.max_age is not None:
            out["max_age"] = self.max_age
        if self.regions is not None:
            out["regions"] = list(self.regions)
        return out

    def check(self, canonical_id: str, opens_at: dt.date) -> Rule | None:
        """The first rule (in :data:`RULE_ORDER`) the citizen fails, or None if they may take part.

        ``opens_at`` is the round's opening *date*: pass ``round.opens_at.date()``, the calendar
        date in the offset the operator gave (ages change at local midnight, not UTC midnight).
        """
        if self.regions is not None:
            two, four, six = self._by_length
            if (
                canonical_id[:2] not in two
                and canonical_id[:4] not in four
                and canonical_id[:6] not in six
            ):
                return "regions"
        if (
            self.birth_year_last_digit is not None
            and int(canonical_id[9]) not in self.birth_year_last_digit
        ):
            return "birth_year_last_digit"
        if self.min_age is not None or self.max_age is not None:
            age = age_at(canonical_id, opens_at)
            if self.min_age is not None and age < self.min_age:
                return "min_age"
            if self.max_age is not None and age > self.max_age:
                return "max_age"
        return None


def _is_int(value: object) -> TypeGuard[int]:
    """A JSON integer: bool is a subclass of int in Python, but true is not 1 here."""
    return isinstance(value, int) and not isinstance(value, bool)


# -- derived groups ------------------------------------------------------------------------------


def birth_date(canonical_id: str) -> dt.date:
    """The birth date in characters 7-14 of a canonical ID."""
    return dt.date(int(canonical_id[6:10]), int(canonical_id[10:12]), int(canonical_id[12:14]))


def age_at(canonical_id: str, on: dt.date) -> int:
    """Whole years lived on ``on``; a birthday counts from its first moment.

    Someone born on 29 February has their birthday on 29 February in leap years and on
    **1 March** in other years: 28 February is still the last day before they complete the
    year, so born 2004-02-29 they are 17 on 2022-02-28 and 18 on 2022-03-01. This is the reading
    of, e.g., England and Wales and Hong Kong; a few jurisdictions (New Zealand) use 28 February
    instead. 1 March never counts anyone a year older before they have lived the full year.
    Born after ``on`` gives a negative age (below any ``min_age``; band ``0-17``).
    """
    # the same comparison as ((on.month, on.day) < (born.month, born.day)) on the ID's digits,
    # without a date object a request (zero-padded "MMDD" strings order as the pairs do)
    return on.year - int(canonical_id[6:10]) - (_month_day(on) < canonical_id[10:14])


@functools.lru_cache(maxsize=64)
def _month_day(on: dt.date) -> str:
    return f"{on.month:02d}{on.day:02d}"


AgeBand = Literal["0-17", "18-39", "40-64", "65+"]


def age_band(canonical_id: str, on: dt.date) -> AgeBand:
    """The fairness report's age group at ``on`` (the round's opening date)."""
    age = age_at(canonical_id, on)
    if age < 18:
        return "0-17"
    if age < 40:
        return "18-39"
    if age < 65:
        return "40-64"
    return "65+"


def region(canonical_id: str) -> str:
    """The six-digit issuing prefix: where the ID was issued, never who holds it."""
    return canonical_id[:6]


# -- programmes and cooldown ---------------------------------------------------------------------

PROGRAMME: Final = re.compile(rules.PROGRAMME_REGEX, re.ASCII)
MAX_COOLDOWN_DAYS: Final = rules.MAX_COOLDOWN_DAYS
DAY_MS: Final = 86_400_000


def parse_programme(value: object) -> str | None:
    """A round's ``programme``: absent or ``null`` → None (the round is in no programme)."""
    if value is None:
        return None
    if not isinstance(value, str) or not PROGRAMME.fullmatch(value):
        raise InvalidRequest.one("programme", "must be 1-64 characters of a-z, 0-9, _ and -")
    return value


def parse_cooldown_days(value: object) -> int:
    """A round's ``cooldown_days``: absent or ``null`` → 0 (no cooldown)."""
    if value is None:
        return 0
    if not _is_int(value) or not 0 <= value <= MAX_COOLDOWN_DAYS:
        raise InvalidRequest.one(
            "cooldown_days", f"must be a whole number of days 0-{MAX_COOLDOWN_DAYS}"
        )
    return value


def cooldown_until(created_at: dt.datetime, cooldown_days: int) -> dt.datetime:
    """The instant a reservation made at ``created_at`` stops barring its citizen.

    Exactly ``cooldown_days`` times 24 h of elapsed time later (computed in UTC, so a zone with
    daylight saving does not shift it), shown in ``created_at``'s own offset. The citizen is in
    cooldown while ``now < until`` and may reserve again from ``until`` on; 0 days → ``until`` is
    ``created_at``, which bars nothing afterwards.
    """
    if created_at.tzinfo is None or created_at.utcoffset() is None:
        raise ValueError("created_at must be an aware datetime")
    if not 0 <= cooldown_days <= MAX_COOLDOWN_DAYS:
        raise ValueError(f"cooldown_days must be 0-{MAX_COOLDOWN_DAYS}, not {cooldown_days}")
    until = created_at.astimezone(dt.UTC) + dt.timedelta(days=cooldown_days)
    return until.astimezone(created_at.tzinfo)


def cooldown_until_ms(created_ms: int, cooldown_days: int) -> int:
    """:func:`cooldown_until` in Unix milliseconds, the form the Lua scripts keep."""
    if not 0 <= cooldown_days <= MAX_COOLDOWN_DAYS:
        raise ValueError(f"cooldown_days must be 0-{MAX_COOLDOWN_DAYS}, not {cooldown_days}")
    return created_ms + cooldown_days * DAY_MS


# -- loss weighting ------------------------------------------------------------------------------

#: Outcomes of a citizen in one past lottery round. The first four are entry statuses of a drawn
#: round as the ledger keeps them; ``not-entered`` stands for "no entry in that round".
NOT_DRAWN: Final = "not-drawn"
WON: Final = "won"
WITHDRAWN: Final = "withdrawn"
EXCLUDED: Final = "excluded"
NOT_ENTERED: Final = "not-entered"
OUTCOMES: Final = frozenset({NOT_DRAWN, WON, WITHDRAWN, EXCLUDED, NOT_ENTERED})
MAX_STREAK: Final = 3  # so a weight is 1-4


def loss_weight(history: Iterable[str]) -> int:
    """An entry's weight: 1 + its current losing streak in the programme, at most 3 (so 1-4).

    ``history`` holds the citizen's outcome in each lottery round of the same programme drawn
    before this freeze, most recent first, one item per round (``not-entered`` where they had
    no entry). The contract counts "the consecutive most recent lottery rounds ... that the
    citizen entered and was not drawn in": the run of ``not-drawn`` at the head of the history.
    Anything else ends the run, because that round is not one they entered and lost:
    ``not-entered`` (they skipped it: rounds they sat out do not add to, and do not bridge, a
    streak), ``won``, ``withdrawn`` (their entry was gone before the draw; counting it would let
    anyone build weight by entering and withdrawing) and ``excluded`` (in cooldown, i.e. they
    had recently been served). FCFS rounds are not lottery rounds and are not in the history.
    An unknown outcome raises ValueError: a misspelt status must not quietly weigh everyone 1.
    """
    streak = 0
    for outcome in history:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown lottery outcome {outcome!r}")
        if outcome != NOT_DRAWN:
            break
        streak += 1
        if streak == MAX_STREAK:
            break
    return 1 + streak


def recent_rounds(drawn: Iterable[tuple[str, dt.datetime]]) -> list[str]:
    """The :data:`MAX_STREAK` most recently drawn rounds, most recent first.

    ``drawn`` is ``(round_id, drawn_at)`` for every lottery round of the programme drawn before
    this freeze. Only these rounds can change a weight, so the freeze need read the entries of
    these rounds only. Equal ``drawn_at`` are ordered by ``round_id`` (the later id first), so
    the answer never depends on the order rows came in.
    """
    ordered = sorted(drawn, key=lambda rd: (rd[1], rd[0]), reverse=True)
    return [round_id for round_id, _ in ordered[:MAX_STREAK]]


def loss_streaks(
    drawn: Iterable[tuple[str, dt.datetime]], rows: Iterable[tuple[str, str, str]]
) -> dict[str, int]:
    """Losing streaks (1-3) of every citizen who has one; absent from the dict means 0.

    ``drawn`` as in :func:`recent_rounds`; ``rows`` are ledger entries ``(round_id,
    citizen_hash, status)`` in any order. Rows of rounds older than the three most recent are
    skipped, so passing all of the programme's entries is correct, only slower. A citizen with
    several entries in one round (entered, withdrew, entered again) lost it if one of them is
    ``not-drawn`` and none ``won``. Then ``weight = 1 + streaks.get(citizen_hash, 0)``, the
    same as :func:`loss_weight` of that citizen's history. One pass over ``rows``; memory grows
    with the entries of three rounds, so a freeze of a million entries costs a few dicts.
    """
    position = {round_id: i for i, round_id in enumerate(recent_rounds(drawn))}
    lost: list[set[str]] = [set() for _ in position]
    won: list[set[str]] = [set() for _ in position]
    for round_id, citizen, status in rows:
        if status not in OUTCOMES or status == NOT_ENTERED:
            raise ValueError(f"not a status of an entry in a drawn round: {status!r}")
        i = position.get(round_id)
        if i is None:
            continue
        if status == NOT_DRAWN:
            lost[i].add(citizen)
        elif status == WON:
            won[i].add(citizen)
    losers = [lo - w for lo, w in zip(lost, won, strict=True)]
    streaks: dict[str, int] = {}
    if not losers:
        return streaks
    for citizen in losers[0]:
        n = 1
        while n < len(losers) and citizen in losers[n]:
            n += 1
        streaks[citizen] = n
    return streaks


def loss_weights(
    drawn: Iterable[tuple[str, dt.datetime]],
    rows: Iterable[tuple[str, str, str]],
    citizens: Iterable[str],
) -> dict[str, int]:
    """``citizen_hash → weight`` (1-4) for each of ``citizens``; see :func:`loss_streaks`."""
    streaks = loss_streaks(drawn, rows)
    return {c: 1 + streaks.get(c, 0) for c in citizens}
