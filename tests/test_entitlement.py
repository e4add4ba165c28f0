"""Entitlement's pure core: eligibility rules, derived groups, cooldown and loss weighting."""

from __future__ import annotations

import datetime as dt
import itertools
import zoneinfo
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stdnum.cn import ric

from allocator.entitlement import (
    EXCLUDED,
    NOT_DRAWN,
    NOT_ENTERED,
    RULE_ORDER,
    WITHDRAWN,
    WON,
    Eligibility,
    age_at,
    age_band,
    cooldown_until,
    cooldown_until_ms,
    loss_streaks,
    loss_weight,
    loss_weights,
    parse_cooldown_days,
    parse_programme,
    recent_rounds,
    region,
)
from allocator.errors import InvalidRequest
from allocator.identity import normalise_citizen_id
from service.problems import status_of

CST = dt.timezone(dt.timedelta(hours=8))


def make_id(born: str | dt.date, area: str = "440106", seq: int = 123) -> str:
    """A valid canonical ID issued in ``area`` for someone born on ``born``."""
    day = born if isinstance(born, dt.date) else dt.date.fromisoformat(born)
    body = f"{area}{day:%Y%m%d}{seq:03d}"
    number = body + ric.calc_check_digit(body + "0")
    return normalise_citizen_id(number, today=dt.date(9999, 12, 31))


def d(iso: str) -> dt.date:
    return dt.date.fromisoformat(iso)


def fields(exc: pytest.ExceptionInfo[InvalidRequest]) -> list[str]:
    assert status_of(exc.value) == 422
    return [e["field"] for e in exc.value.extra["errors"]]


# -- parsing eligibility -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("anyone", ["eligibility"]),
        ([], ["eligibility"]),
        (18, ["eligibility"]),
        ({"minage": 18}, ["eligibility.minage"]),
        ({"min_age": 18, "rgions": ["44"]}, ["eligibility.rgions"]),
        ({"birth_year_last_digit": []}, ["eligibility.birth_year_last_digit"]),
        ({"birth_year_last_digit": 3}, ["eligibility.birth_year_last_digit"]),
        ({"birth_year_last_digit": [1, 10]}, ["eligibility.birth_year_last_digit[1]"]),
        ({"birth_year_last_digit": [-1]}, ["eligibility.birth_year_last_digit[0]"]),
        ({"birth_year_last_digit": [True]}, ["eligibility.birth_year_last_digit[0]"]),
        ({"birth_year_last_digit": [2, 1.0]}, ["eligibility.birth_year_last_digit[1]"]),
        ({"birth_year_last_digit": ["1"]}, ["eligibility.birth_year_last_digit[0]"]),
        ({"birth_year_last_digit": [1, 3, 1]}, ["eligibility.birth_year_last_digit[2]"]),
        ({"min_age": -1}, ["eligibility.min_age"]),
        ({"min_age": 151}, ["eligibility.min_age"]),
        ({"min_age": True}, ["eligibility.min_age"]),
        ({"min_age": 18.0}, ["eligibility.min_age"]),
        ({"min_age": "18"}, ["eligibility.min_age"]),
        ({"max_age": 200}, ["eligibility.max_age"]),
        ({"max_age": False}, ["eligibility.max_age"]),
        ({"min_age": 30, "max_age": 29}, ["eligibility"]),
        ({"min_age": -5, "max_age": 3}, ["eligibility.min_age"]),  # no range check on a bad end
        ({"regions": []}, ["eligibility.regions"]),
        ({"regions": "44"}, ["eligibility.regions"]),
        ({"regions": ["4"]}, ["eligibility.regions[0]"]),
        ({"regions": ["444"]}, ["eligibility.regions[0]"]),
        ({"regions": ["4401061"]}, ["eligibility.regions[0]"]),
        ({"regions": [44]}, ["eligibility.regions[0]"]),
        ({"regions": ["\uff14\uff14"]}, ["eligibility.regions[0]"]),  # fullwidth 44
        ({"regions": ["\u0664\u0664"]}, ["eligibility.regions[0]"]),  # Arabic-Indic 44
        ({"regions": ["44\n"]}, ["eligibility.regions[0]"]),
        (
            {"regions": ["44", "4x", "4401", None]},
            ["eligibility.regions[1]", "eligibility.regions[3]"],
        ),
        (
            {"birth_year_last_digit": [12], "min_age": 200, "regions": ["4"], "extra": 1},
            [
                "eligibility.extra",
                "eligibility.birth_year_last_digit[0]",
                "eligibility.min_age",
                "eligibility.regions[0]",
            ],
        ),
    ],
)
def test_bad_eligibility_is_refused_naming_each_bad_field(value: Any, expected: list[str]) -> None:
    """An operator sees every mistake at once, each under its own field name (422)."""
    with pytest.raises(InvalidRequest) as exc:
        Eligibility.parse(value)
    assert fields(exc) == expected
    assert all(e["message"] for e in exc.value.extra["errors"])


@pytest.mark.parametrize(
    ("value", "public"),
    [
        (None, None),
        ({}, None),
        ({"min_age": None, "regions": None}, None),
        ({"birth_year_last_digit": [3, 1, 0]}, {"birth_year_last_digit": [0, 1, 3]}),
        ({"min_age": 0, "max_age": 150}, {"min_age": 0, "max_age": 150}),
        ({"min_age": 30, "max_age": 30}, {"min_age": 30, "max_age": 30}),
        ({"max_age": 17}, {"max_age": 17}),
        ({"regions": ["4401", "44", "440106"]}, {"regions": ["4401", "44", "440106"]}),
        (
            {"regions": ["35"], "max_age": 64, "birth_year_last_digit": [9], "min_age": 18},
            {"birth_year_last_digit": [9], "min_age": 18, "max_age": 64, "regions": ["35"]},
        ),
    ],
)
def test_good_eligibility_parses_to_its_normalised_public_shape(
    value: Any, public: dict[str, Any] | None
) -> None:
    """to_json is the same rules back (digits sorted, regions as given), and parses to itself."""
    rules = Eligibility.parse(value)
    if public is None:
        assert rules is None
        return
    assert rules is not None
    assert rules.to_json() == public
    assert Eligibility.parse(rules.to_json()) == rules


# -- checking eligibility ------------------------------------------------------------------------

BORN_2004_06_15 = make_id("2004-06-15")
BORN_LEAP = make_id("2004-02-29")


@pytest.mark.parametrize(
    ("rules", "citizen", "opens", "failed"),
    [
        # min_age: the birthday itself counts, the day before does not
        ({"min_age": 18}, BORN_2004_06_15, "2022-06-15", None),
        ({"min_age": 18}, BORN_2004_06_15, "2022-06-14", "min_age"),
        ({"max_age": 17}, BORN_2004_06_15, "2022-06-14", None),
        ({"max_age": 17}, BORN_2004_06_15, "2022-06-15", "max_age"),
        # 29 February: the birthday is 1 March in a common year, 29 February in a leap year
        ({"min_age": 18}, BORN_LEAP, "2022-02-28", "min_age"),
        ({"min_age": 18}, BORN_LEAP, "2022-03-01", None),
        ({"min_age": 20}, BORN_LEAP, "2024-02-28", "min_age"),
        ({"min_age": 20}, BORN_LEAP, "2024-02-29", None),
        ({"max_age": 17}, BORN_LEAP, "2022-02-28", None),
        ({"max_age": 17}, BORN_LEAP, "2022-03-01", "max_age"),
        # born after the round opened: younger than any minimum
        ({"min_age": 0}, BORN_2004_06_15, "2003-01-01", "min_age"),
        ({"max_age": 0}, BORN_2004_06_15, "2003-01-01", None),
        # elderly path
        ({"min_age": 65}, make_id("1957-03-10"), "2022-03-09", "min_age"),
        ({"min_age": 65}, make_id("1957-03-10"), "2022-03-10", None),
        # birth-year rotation reads the year's last digit (2004 → 4)
        ({"birth_year_last_digit": [4, 9]}, BORN_2004_06_15, "2022-01-01", None),
        ({"birth_year_last_digit": [0, 5]}, BORN_2004_06_15, "2022-01-01", "birth_year_last_digit"),
        ({"birth_year_last_digit": [0]}, make_id("1990-01-01"), "2022-01-01", None),
        # regions: prefixes of 2, 4 and 6 digits of 440106
        ({"regions": ["44"]}, BORN_2004_06_15, "2022-01-01", None),
        ({"regions": ["4401"]}, BORN_2004_06_15, "2022-01-01", None),
        ({"regions": ["440106"]}, BORN_2004_06_15, "2022-01-01", None),
        ({"regions": ["45", "4402", "440107"]}, BORN_2004_06_15, "2022-01-01", "regions"),
        ({"regions": ["45", "4402", "440106"]}, BORN_2004_06_15, "2022-01-01", None),
        ({"regions": ["01"]}, BORN_2004_06_15, "2022-01-01", "regions"),  # not a substring test
        # several rules fail: the first in RULE_ORDER is named
        (
            {"regions": ["11"], "birth_year_last_digit": [0], "min_age": 60},
            BORN_2004_06_15,
            "2022-01-01",
            "regions",
        ),
        (
            {"regions": ["44"], "birth_year_last_digit": [0], "min_age": 60},
            BORN_2004_06_15,
            "2022-01-01",
            "birth_year_last_digit",
        ),
        (
            {"regions": ["44"], "birth_year_last_digit": [4], "min_age": 18, "max_age": 64},
            BORN_2004_06_15,
            "2022-06-15",
            None,
        ),
    ],
)
def test_check_names_the_first_failing_rule(
    rules: dict[str, Any], citizen: str, opens: str, failed: str | None
) -> None:
    """A refusal names one rule, the first in the documented order; an eligible citizen passes."""
    parsed = Eligibility.parse(rules)
    assert parsed is not None
    assert parsed.check(citizen, d(opens)) == failed


def test_rule_order_is_the_documented_one() -> None:
    """The order is part of what citizens are told; changing it must be deliberate."""
    assert RULE_ORDER == ("regions", "birth_year_last_digit", "min_age", "max_age")


# -- derived groups ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("born", "on", "band"),
    [
        ("2004-06-15", "2022-06-14", "0-17"),
        ("2004-06-15", "2022-06-15", "18-39"),
        ("1982-06-15", "2022-06-14", "18-39"),
        ("1982-06-15", "2022-06-15", "40-64"),
        ("1957-06-15", "2022-06-14", "40-64"),
        ("1957-06-15", "2022-06-15", "65+"),
        ("2004-02-29", "2022-02-28", "0-17"),
        ("2004-02-29", "2022-03-01", "18-39"),
        ("2022-01-01", "2022-01-01", "0-17"),
        ("1900-01-01", "2022-01-01", "65+"),
        ("2023-01-01", "2022-01-01", "0-17"),  # born after the date
    ],
)
def test_age_band_at_its_boundaries(born: str, on: str, band: str) -> None:
    """The fairness report's bands turn over on the birthday, not a day early or late."""
    assert age_band(make_id(born), d(on)) == band


def test_region_is_the_six_digit_issuing_prefix() -> None:
    """The fairness report keeps this, never the ID."""
    assert region(make_id("1980-01-01", area="350203")) == "350203"


# -- programme and cooldown ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["masks", "gz-masks_2020", "a", "0" * 64])
def test_programme_names_in_the_contracts_alphabet_are_kept(value: str) -> None:
    assert parse_programme(value) == value


def test_no_programme_is_none() -> None:
    assert parse_programme(None) is None


@pytest.mark.parametrize(
    "value", ["", "Masks", "a" * 65, "gz masks", "masks\n", "m\u00e4sks", 5, []]
)
def test_bad_programme_is_refused_naming_it(value: object) -> None:
    """A programme name outside [a-z0-9_-]{1,64} → 422 on `programme`."""
    with pytest.raises(InvalidRequest) as exc:
        parse_programme(value)
    assert fields(exc) == ["programme"]


@pytest.mark.parametrize(("value", "days"), [(None, 0), (0, 0), (10, 10), (365, 365)])
def test_cooldown_days_in_range_are_kept_and_absent_is_zero(value: object, days: int) -> None:
    assert parse_cooldown_days(value) == days


@pytest.mark.parametrize("value", [-1, 366, True, 7.0, "7", [7]])
def test_bad_cooldown_days_are_refused_naming_them(value: object) -> None:
    """A negative, too long, fractional or non-numeric cooldown → 422 on `cooldown_days`."""
    with pytest.raises(InvalidRequest) as exc:
        parse_cooldown_days(value)
    assert fields(exc) == ["cooldown_days"]


def test_cooldown_until_adds_whole_days_in_the_given_offset() -> None:
    """Guangzhou's 10 days: the bar lifts ten days to the minute after the reservation."""
    made = dt.datetime(2020, 2, 25, 9, 30, 15, 123000, tzinfo=CST)
    until = cooldown_until(made, 10)
    assert until == dt.datetime(2020, 3, 6, 9, 30, 15, 123000, tzinfo=CST)
    assert until.utcoffset() == dt.timedelta(hours=8)
    assert cooldown_until(made, 0) == made


def test_cooldown_until_counts_elapsed_time_across_a_daylight_saving_change() -> None:
    """One day of cooldown is 24 hours even when the clocks move (here Berlin, spring 2024)."""
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    made = dt.datetime(2024, 3, 30, 12, 0, tzinfo=berlin)
    until = cooldown_until(made, 1)
    # (subtracting two datetimes of one tzinfo compares wall clocks, so compare instants)
    assert until.timestamp() - made.timestamp() == 24 * 3600
    assert (until.hour, until.utcoffset()) == (13, dt.timedelta(hours=2))


def test_cooldown_until_in_ms_agrees_with_the_datetime_form() -> None:
    """The Lua scripts will keep milliseconds; both forms must give the same instant."""
    made = dt.datetime(2020, 2, 25, 9, 30, 15, 123000, tzinfo=CST)
    made_ms = int(made.timestamp() * 1000)
    assert cooldown_until_ms(made_ms, 7) == int(cooldown_until(made, 7).timestamp() * 1000)
    assert cooldown_until_ms(made_ms, 7) - made_ms == 7 * 86_400_000


@pytest.mark.parametrize("days", [-1, 366])
def test_cooldown_until_refuses_days_out_of_range(days: int) -> None:
    made = dt.datetime(2020, 2, 25, tzinfo=CST)
    with pytest.raises(ValueError, match="cooldown_days"):
        cooldown_until(made, days)
    with pytest.raises(ValueError, match="cooldown_days"):
        cooldown_until_ms(0, days)


def test_cooldown_until_refuses_a_naive_datetime() -> None:
    """A time without an offset is ambiguous by up to a day; it is a programming error."""
    with pytest.raises(ValueError, match="aware"):
        cooldown_until(dt.datetime(2020, 2, 25), 1)


# -- loss weighting ------------------------------------------------------------------------------

L, W, X, S, N = NOT_DRAWN, WON, EXCLUDED, WITHDRAWN, NOT_ENTERED


@pytest.mark.parametrize(
    ("history", "weight"),
    [
        ([], 1),
        ([L], 2),
        ([L, L], 3),
        ([L, L, L], 4),
        ([L, L, L, L, L], 4),
        ([W, L, L, L], 1),
        ([L, W, L], 2),
        ([N, L, L, L], 1),
        ([L, N, L, L], 2),  # a skipped round ends the streak: it was not entered and lost
        ([L, L, S, L], 3),  # a withdrawn entry was not in the draw
        ([L, X, L], 2),  # excluded for a cooldown: recently served
    ],
)
def test_loss_weight_counts_the_most_recent_run_of_losses(history: list[str], weight: int) -> None:
    """weight = 1 + consecutive most recent rounds entered and not drawn, at most 3."""
    assert loss_weight(history) == weight


def test_loss_weight_reads_no_further_than_it_needs() -> None:
    """An endless history of losses still weighs 4: only three rounds are ever read."""
    assert loss_weight(itertools.repeat(L)) == 4


@pytest.mark.parametrize("outcome", ["registered", "not_drawn", "lost", ""])
def test_loss_weight_refuses_an_unknown_outcome(outcome: str) -> None:
    """A misspelt status must fail loudly, not weigh everyone 1."""
    with pytest.raises(ValueError, match="unknown"):
        loss_weight([outcome])


T0 = dt.datetime(2020, 3, 1, tzinfo=CST)


def drawn_at(days: int) -> dt.datetime:
    return T0 + dt.timedelta(days=days)


def test_loss_streaks_from_ledger_rows() -> None:
    """Bulk streaks for a freeze, from rows in any order, skipping older rounds."""
    drawn = [("r1", drawn_at(1)), ("r4", drawn_at(4)), ("r2", drawn_at(2)), ("r3", drawn_at(3))]
    rows = [
        # alice lost r4, r3, r2 (and r1, which is older than three rounds)
        ("r1", "alice", L), ("r2", "alice", L), ("r3", "alice", L), ("r4", "alice", L),
        # bob lost r4 and r2 but sat r3 out: his streak is 1
        ("r4", "bob", L), ("r2", "bob", L),
        # carol won r3
        ("r4", "carol", L), ("r3", "carol", W), ("r2", "carol", L),
        # dan withdrew, re-entered and lost r4; then lost r3
        ("r4", "dan", S), ("r4", "dan", L), ("r3", "dan", L),
        # erin lost r3 but was not in r4
        ("r3", "erin", L),
        # frank lost only in a round not drawn before this freeze
        ("r5", "frank", L),
        # gina was excluded from r4
        ("r4", "gina", X), ("r3", "gina", L),
    ]  # fmt: skip
    assert recent_rounds(drawn) == ["r4", "r3", "r2"]
    streaks = loss_streaks(drawn, reversed(rows))
    assert streaks == {"alice": 3, "bob": 1, "carol": 1, "dan": 2}
    weights = loss_weights(drawn, rows, ["alice", "bob", "carol", "dan", "erin", "frank", "gina"])
    assert weights == {
        "alice": 4, "bob": 2, "carol": 2, "dan": 3, "erin": 1, "frank": 1, "gina": 1,
    }  # fmt: skip


def test_loss_streaks_with_no_drawn_round_weigh_everyone_one() -> None:
    assert loss_streaks([], [("r1", "alice", L)]) == {}
    assert loss_weights([], [], ["alice"]) == {"alice": 1}


def test_recent_rounds_break_ties_by_round_id() -> None:
    """Two rounds drawn at the same instant are ordered the same way whatever the input order."""
    drawn = [("a", drawn_at(1)), ("c", drawn_at(2)), ("b", drawn_at(2)), ("z", drawn_at(0))]
    assert recent_rounds(drawn) == ["c", "b", "a"]
    assert recent_rounds(reversed(drawn)) == ["c", "b", "a"]


@pytest.mark.parametrize("status", [N, "registered", "confirmed"])
def test_loss_streaks_refuse_a_row_that_is_not_a_drawn_entry(status: str) -> None:
    with pytest.raises(ValueError, match="status"):
        loss_streaks([("r1", drawn_at(1))], [("r1", "alice", status)])


# -- properties against plain models -------------------------------------------------------------


def model_age(born: dt.date, on: dt.date) -> int:
    """Birthdays by date arithmetic: the n-th falls on born's day in year +n, or 1 March."""

    def birthday(n: int) -> dt.date:
        try:
            return born.replace(year=born.year + n)
        except ValueError:  # 29 February in a common year
            return dt.date(born.year + n, 3, 1)

    n = on.year - born.year
    return n if birthday(n) <= on else n - 1


def model_check(rules: dict[str, Any], citizen: str, opens: dt.date) -> str | None:
    born = dt.date(int(citizen[6:10]), int(citizen[10:12]), int(citizen[12:14]))
    age = model_age(born, opens)
    failing = {
        "regions": "regions" in rules and not any(citizen.startswith(r) for r in rules["regions"]),
        "birth_year_last_digit": "birth_year_last_digit" in rules
        and born.year % 10 not in rules["birth_year_last_digit"],
        "min_age": "min_age" in rules and age < rules["min_age"],
        "max_age": "max_age" in rules and age > rules["max_age"],
    }
    return next((rule for rule in RULE_ORDER if failing[rule]), None)


AREAS = ["440106", "440105", "440203", "441900", "350203", "110101"]
leap_days = st.sampled_from([d("1960-02-29"), d("2000-02-29"), d("2004-02-29"), d("2012-02-29")])
births = st.one_of(st.dates(dt.date(1900, 1, 1), dt.date(2030, 12, 31)), leap_days)
opening = st.one_of(
    st.dates(dt.date(1950, 1, 1), dt.date(2040, 12, 31)),
    st.builds(
        dt.date,
        st.integers(1990, 2040),
        st.sampled_from([2, 3]),
        st.sampled_from([1, 28]),
    ),
)


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, Any]:
    rules: dict[str, Any] = {}
    if draw(st.booleans()):
        rules["birth_year_last_digit"] = draw(st.lists(st.integers(0, 9), min_size=1, unique=True))
    ages = sorted(draw(st.lists(st.integers(0, 150), min_size=2, max_size=2)))
    if draw(st.booleans()):
        rules["min_age"] = ages[0]
    if draw(st.booleans()):
        rules["max_age"] = ages[1]
    if draw(st.booleans()):
        prefixes = st.sampled_from(AREAS).flatmap(lambda a: st.sampled_from([a[:2], a[:4], a]))
        rules["regions"] = draw(st.lists(prefixes, min_size=1, max_size=4))
    return rules


@given(rule_sets(), st.sampled_from(AREAS), births, opening)
def test_check_agrees_with_a_plain_model(
    rules: dict[str, Any], area: str, born: dt.date, opens: dt.date
) -> None:
    """check = first failing rule by startswith and date-arithmetic birthdays."""
    citizen = make_id(born, area=area)
    parsed = Eligibility.parse(rules)
    if parsed is None:
        assert rules == {}
        return
    assert parsed.check(citizen, opens) == model_check(rules, citizen, opens)
    assert age_at(citizen, opens) == model_age(born, opens)


@given(births, opening)
def test_age_band_agrees_with_the_model_age(born: dt.date, on: dt.date) -> None:
    age = model_age(born, on)
    expected = "0-17" if age < 18 else "18-39" if age < 40 else "40-64" if age < 65 else "65+"
    assert age_band(make_id(born), on) == expected


def model_weight(history: list[str]) -> int:
    for k in (3, 2, 1):
        if len(history) >= k and history[:k] == [NOT_DRAWN] * k:
            return 1 + k
    return 1


outcomes = st.sampled_from([L, W, X, S, N])


@given(st.lists(outcomes, max_size=8))
def test_loss_weight_agrees_with_a_plain_model(history: list[str]) -> None:
    weight = loss_weight(history)
    assert weight == model_weight(history)
    assert 1 <= weight <= 4


@st.composite
def ledgers(
    draw: st.DrawFn,
) -> tuple[list[tuple[str, dt.datetime]], list[tuple[str, str, str]]]:
    n_rounds = draw(st.integers(0, 6))
    days = draw(st.lists(st.integers(0, 4), min_size=n_rounds, max_size=n_rounds))  # ties
    drawn = [(f"r{i}", drawn_at(day)) for i, day in enumerate(days)]
    round_ids = [r for r, _ in drawn] + ["undrawn"]
    rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from(round_ids),
                st.sampled_from(["ann", "ben", "cai", "dee"]),
                st.sampled_from([L, L, L, W, X, S]),
            ),
            max_size=30,
        )
    )
    return drawn, rows


@given(ledgers())
def test_bulk_weights_agree_with_each_citizens_history(
    ledger: tuple[list[tuple[str, dt.datetime]], list[tuple[str, str, str]]],
) -> None:
    """The freeze's one-pass weights equal loss_weight of each citizen's history, built naively."""
    drawn, rows = ledger
    citizens = ["ann", "ben", "cai", "dee", "eve"]
    newest_first = [r for r, _ in sorted(drawn, key=lambda x: (x[1], x[0]), reverse=True)]

    def outcome(citizen: str, round_id: str) -> str:
        mine = [s for r, c, s in rows if r == round_id and c == citizen]
        if W in mine:
            return W
        if L in mine:
            return L
        return mine[0] if mine else N

    weights = loss_weights(drawn, rows, citizens)
    for c in citizens:
        assert weights[c] == loss_weight([outcome(c, r) for r in newest_first])
        assert 1 <= weights[c] <= 4
