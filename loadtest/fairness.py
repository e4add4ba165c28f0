"""Fairness figures: is the chance of a share independent of how a citizen behaved?

Pure functions and the standard library only (scipy is not a dependency): the chi-square test
of independence with its p-value from the regularized upper incomplete gamma function, the
four-fifths rule, and the table of the service's own fairness report.

The behaviour groups are the crowd's actors that ask for shares: ``citizen`` (polite),
``impatient`` (resubmitters), ``duplicate`` (two sites at once) and ``bot`` (one address, new
identities). A group's rate is its winners over its entrants (lottery: citizens whose entry was
answered 201/200; FCFS: citizens whose reservation request got an answer other than 429).

The verdict (``judge``): unfair when the chi-square test of independence of group and outcome
gives p <= ``ALPHA`` (0.001), or when a group's rate is under four fifths of the best group's
*and* that gap is not chance (the 2x2 chi-square of that group against all other entrants
pooled gives p <= ``ALPHA``). The point-estimate ratio alone is printed and marked, but a small
group (five duplicate submitters) falls under 0.8 by luck far too often to fail a release on it: the
regulators' four-fifths rule is read with a significance test for small samples too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ALPHA = 0.001
FOUR_FIFTHS = 0.8
GROUPS = ("citizen", "impatient", "duplicate", "bot")  # who asks for shares, in table order
_EPS = 1e-15
_MAX_ITER = 10_000


# -- the regularized incomplete gamma function --------------------------------------------------


def _lower_series(a: float, x: float) -> float:
    """P(a, x) by its power series: x^a e^-x / Gamma(a+1) * sum x^n / ((a+1)...(a+n)).

    Converges for every x, fast while x < a + 1."""
    term = total = 1.0 / a
    denominator = a
    for _ in range(_MAX_ITER):
        denominator += 1.0
        term *= x / denominator
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _upper_fraction(a: float, x: float) -> float:
    """Q(a, x) by its continued fraction (modified Lentz), fast for x >= a + 1:
    Q = e^-x x^a / Gamma(a) * 1/(x+1-a- 1(1-a)/(x+3-a- 2(2-a)/(x+5-a- ...)))."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return h * math.exp(-x + a * math.log(x) - math.lgamma(a))


def gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) = Gamma(a, x) / Gamma(a)."""
    if a <= 0:
        raise ValueError("a must be > 0")
    if x < 0:
        raise ValueError("x must be >= 0")
    if x == 0:
        return 1.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _lower_series(a, x))
    return min(1.0, _upper_fraction(a, x))


def chi2_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X chi-square with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if statistic <= 0:
        return 1.0
    return gamma_q(df / 2.0, statistic / 2.0)


def chi_square(table: Sequence[Sequence[int]]) -> tuple[float, int, float]:
    """Pearson's chi-square test of independence of an r x c table of counts: (statistic, df,
    p-value). Rows or columns that are all zero are left out; fewer than two of either leave
    nothing to test (0, 0, 1.0)."""
    rows = [list(r) for r in table if sum(r) > 0]
    if not rows:
        return 0.0, 0, 1.0
    columns = [j for j in range(len(rows[0])) if sum(r[j] for r in rows) > 0]
    rows = [[r[j] for j in columns] for r in rows]
    if len(rows) < 2 or len(columns) < 2:
        return 0.0, 0, 1.0
    total = sum(map(sum, rows))
    row_sums = [sum(r) for r in rows]
    col_sums = [sum(r[j] for r in rows) for j in range(len(columns))]
    statistic = 0.0
    for i, row in enumerate(rows):
        for j, observed in enumerate(row):
            expected = row_sums[i] * col_sums[j] / total
            statistic += (observed - expected) ** 2 / expected
    df = (len(rows) - 1) * (len(columns) - 1)
    return statistic, df, chi2_sf(statistic, df)


# -- the behaviour groups -----------------------------------------------------------------------


@dataclass
class Group:
    name: str
    asked: int
    won: int

    @property
    def rate(self) -> float:
        return self.won / self.asked if self.asked else 0.0


@dataclass
class Verdict:
    fair: bool | None  # None: nothing to compare (fewer than two groups, nobody or all won)
    statistic: float
    df: int
    p_value: float
    groups: list[dict[str, Any]]
    figure: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": "n/a" if self.fair is None else ("pass" if self.fair else "FAIL"),
            "chi2": round(self.statistic, 3),
            "df": self.df,
            "p_value": self.p_value,
            "alpha": ALPHA,
            "groups": self.groups,
            "figure": self.figure,
        }


def groups_from(asked: Mapping[str, set[int]], won: Mapping[str, set[int]]) -> list[Group]:
    """Groups in table order, from the citizen numbers who asked and who won, by group."""
    names = [g for g in GROUPS if asked.get(g)] + sorted(set(asked) - set(GROUPS))
    return [Group(g, len(asked[g]), len(asked[g] & won.get(g, set()))) for g in names if asked[g]]


def judge(groups: Iterable[Group]) -> Verdict:
    """Chi-square independence (p > ALPHA) and the four-fifths rule (see the module's text)."""
    present = [g for g in groups if g.asked > 0]
    statistic, df, p = chi_square([[g.won, g.asked - g.won] for g in present])
    best = max(present, key=lambda g: g.rate, default=None)
    rows: list[dict[str, Any]] = []
    failing: list[str] = []
    for g in present:
        ratio = g.rate / best.rate if best is not None and best.rate > 0 else 1.0
        gap_p = 1.0
        if best is not None and g is not best:
            # against everyone else pooled, not against the best group alone: the best of four
            # small groups is the luckiest, and testing against it fails fair draws by chance
            won = sum(o.won for o in present if o is not g)
            asked = sum(o.asked for o in present if o is not g)
            gap_p = chi_square([[g.won, g.asked - g.won], [won, asked - won]])[2]
        under = ratio < FOUR_FIFTHS
        significant = under and gap_p <= ALPHA
        if significant:
            failing.append(g.name)
        rows.append(
            {
                "group": g.name,
                "asked": g.asked,
                "won": g.won,
                "rate": round(g.rate, 4),
                "ratio_to_best": round(ratio, 4),
                "under_four_fifths": under,
                "gap_p_value": gap_p,
                "significantly_under": significant,
            }
        )
    rates = ", ".join(f"{g.name} {g.won}/{g.asked} ({g.rate:.0%})" for g in present)
    if df == 0:
        return Verdict(
            None,
            0.0,
            0,
            1.0,
            rows,
            f"nothing to compare (fewer than two groups, or nobody / everybody won): {rates}",
        )
    fair = p > ALPHA and not failing
    figure = f"{rates}; chi2 {statistic:.2f} (df {df}), p {p:.3g}"
    marked = [r["group"] for r in rows if r["under_four_fifths"]]
    if failing:
        figure += f"; under 4/5 of the best, beyond chance: {', '.join(failing)}"
    elif marked:
        figure += f"; under 4/5 of the best by chance only (gap p > {ALPHA:g}): {', '.join(marked)}"
    return Verdict(fair, statistic, df, p, rows, figure)


# -- the service's fairness report (GET /api/v1/admin/rounds/{id}/fairness) ----------------------


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The service's groups with their granted rate, marked under 0.8 x their dimension's best."""
    groups = [g for g in report.get("groups", []) if isinstance(g, dict)]
    best: dict[str, float] = {}
    for g in groups:
        rate = g["granted"] / g["asked"] if g.get("asked") else 0.0
        best[g["dimension"]] = max(best.get(g["dimension"], 0.0), rate)
    rows = []
    for g in groups:
        asked, granted = int(g.get("asked") or 0), int(g.get("granted") or 0)
        rate = granted / asked if asked else None
        top = best.get(g["dimension"], 0.0)
        rows.append(
            {
                "dimension": g["dimension"],
                "group": g["group"],
                "asked": asked,
                "granted": granted,
                "rate": None if rate is None else round(rate, 4),
                "under_four_fifths": rate is not None and top > 0 and rate < FOUR_FIFTHS * top,
            }
        )
    return rows
