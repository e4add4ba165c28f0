"""What the gate shows: the table of checks on stdout, and plot.png (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.checks import FaultFacts, Records
from loadtest.crowd import percentile

if TYPE_CHECKING:
    from loadtest.runner import Plan


def print_table(summary: dict[str, Any], out: Path) -> None:
    checks = summary["checks"]
    width = max((len(c["name"]) for c in checks), default=10)
    lat = summary.get("answered_latency_ms") or {}
    print()
    print(
        f"allot loadtest - {summary['target']} round {summary['round_id']}:"
        f" {summary['config']['users']} devices, {summary['requests']:,} requests,"
        f" {summary['rps'] or 0:,.0f} req/s, p99 {lat.get('p99', 0):,.0f} ms,"
        f" granted {summary['granted']} of {summary['stock']}"
    )
    print(f"{'check':<{width}}  result  figure")
    print(f"{'-' * width}  ------  {'-' * 40}")
    for c in checks:
        print(f"{c['name']:<{width}}  {c['result']:<6}  {c['figure']}")
    print_fairness(summary)
    failed = [c["name"] for c in checks if c["ok"] is False]
    print()
    if failed:
        print(f"FAILED: {', '.join(failed)}   (report: {out}/)")
    else:
        print(f"PASSED: every check holds   (report: {out}/)")
    # the closing line CI reads, as test runners print it (n/a checks count as skipped)
    n_pass = sum(1 for c in checks if c["ok"] is True)
    n_na = sum(1 for c in checks if c["ok"] is None)
    print(f"loadtest: {n_pass} passed, {len(failed)} failed, {n_na} skipped")


def print_fairness(summary: dict[str, Any]) -> None:
    """The crowd's fairness by behaviour, and the service's own fairness report (issue 12)."""
    fairness = summary.get("fairness") or {}
    for mode in ("lottery", "fcfs"):
        verdict = fairness.get(mode)
        if not verdict:
            continue
        how = "checked" if fairness.get("enforced") else "information only: speed decides FCFS"
        print()
        print(f"fairness by behaviour ({mode}, {how}): {verdict['result']}")
        choices = any(g.get("expected_rate") is not None for g in verdict["groups"])
        head = f"{'group':<10}  {'asked':>7}  {'won':>7}  {'rate':>6}  {'vs best':>7}"
        print(head + ("  expected from choices" if choices else ""))
        for g in verdict["groups"]:
            mark = "  < 4/5 of best" if g["under_four_fifths"] else ""
            if g["significantly_under"]:
                mark += " (beyond chance)"
            expected = g.get("expected_rate")
            shown = f"  {expected:>21.1%}" if choices and expected is not None else ""
            print(
                f"{g['group']:<10}  {g['asked']:>7,}  {g['won']:>7,}  {g['rate']:>6.1%}"
                f"  {g['ratio_to_best']:>7.2f}{shown}{mark}"
            )
        print(f"chi-square {verdict['chi2']:.2f}, df {verdict['df']}, p {verdict['p_value']:.3g}")
    report = summary.get("fairness_report")
    if not report:
        return
    print()
    if report.get("error"):
        print(f"the service's fairness report: not available ({report['error']})")
        return
    print("the service's fairness report (GET /api/v1/admin/rounds/{id}/fairness):")
    rows = report.get("rows") or []
    width = max((len(str(r["group"])) for r in rows), default=5)
    print(f"{'dimension':<9}  {'group':<{width}}  {'asked':>7}  {'granted':>7}  {'rate':>6}")
    for r in rows:
        rate = "-" if r["rate"] is None else f"{r['rate']:.1%}"
        mark = "  < 0.8 x best" if r["under_four_fifths"] else ""
        print(
            f"{r['dimension']:<9}  {r['group']:<{width}}  {r['asked']:>7,}  {r['granted']:>7,}"
            f"  {rate:>6}{mark}"
        )


def _per_second(records: Records, origin: float) -> dict[str, Any]:
    counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    latencies: dict[int, list[float]] = defaultdict(list)
    for a in records.answers:
        second = math.floor(a["t"] - origin)
        st = a["st"]
        if a["fail"]:
            kind = "failed"
        elif st in (200, 201) and a["op"] in ("reserve", "resubmit", "reserve-twice"):
            kind = "reserved (200/201)"
        elif st == 409:
            kind = "409 sold-out / already-reserved"
        elif st == 429:
            kind = "429"
        else:
            kind = "reads and lookups"
        counts[kind][second] += 1
        if st:
            latencies[second].append(float(a["ms"]))
    return {"counts": counts, "latencies": latencies}


def plot(
    path: Path,
    records: Records,
    samples: list[dict[str, Any]],
    deliveries: list[dict[str, Any]],
    plan: Plan,
    fault: FaultFacts | None,
    budget_ms: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = plan.opens_at
    data = _per_second(records, origin)
    seconds = sorted({s for c in data["counts"].values() for s in c})
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    fig.suptitle(
        f"allot loadtest - round {plan.round_id}: {plan.users} devices, stock {plan.stock}"
        + (f", fault {fault.kind}" if fault else ""),
        fontsize=12,
    )

    order = [
        "reserved (200/201)",
        "409 sold-out / already-reserved",
        "429",
        "reads and lookups",
        "failed",
    ]
    colours = ["#2a9d8f", "#e9c46a", "#f4a261", "#8ab6d6", "#d62828"]
    if seconds:
        xs = list(range(seconds[0], seconds[-1] + 1))
        stacks = [[data["counts"][k].get(x, 0) for x in xs] for k in order]
        ax1.stackplot(xs, stacks, labels=order, colors=colours, step="post", alpha=0.9)
        total = [sum(col) for col in zip(*stacks, strict=True)]
        ax1.plot(xs, total, color="black", linewidth=0.8, drawstyle="steps-post", label="total")
    ax1.set_ylabel("answers per second")
    ax1.set_title("throughput, by outcome", fontsize=10, loc="left")
    ax1.legend(loc="upper right", fontsize=8, ncol=2)

    lat_x = sorted(data["latencies"])
    for q, style in ((50, "-"), (95, "--"), (99, "-")):
        ys = [percentile(sorted(data["latencies"][x]), q) for x in lat_x]
        ax2.plot(
            lat_x,
            ys,
            style,
            drawstyle="steps-post",
            linewidth=1.6 if q == 99 else 1.0,
            label=f"p{q}",
        )
    ax2.axhline(budget_ms, color="#d62828", linestyle=":", label=f"p99 budget {budget_ms:.0f} ms")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms, log)")
    ax2.set_title("latency of answered requests, per second", fontsize=10, loc="left")
    ax2.legend(loc="upper right", fontsize=8)

    good = [s for s in samples if s.get("remaining") is not None]
    ax3.step(
        [s["t"] - origin for s in good],
        [s["remaining"] for s in good],
        where="post",
        color="#264653",
        label="remaining stock",
    )
    for d in deliveries:
        ax3.annotate(
            f"+{d['units']}",
            (d["t"] - origin, 0.97),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            ha="center",
            va="top",
            color="#2a9d8f" if d["status"] in (200, 201) else "#d62828",
        )
        ax3.axvline(d["t"] - origin, color="#2a9d8f", linewidth=0.6, alpha=0.6)
    peak = max([s["remaining"] for s in good] + [1])
    ax3.set_ylabel("units remaining")
    ax3.set_ylim(bottom=0, top=peak * 1.15)
    ax3.set_xlabel("seconds after the opening second")
    ax3.set_title(
        "stock (+ deliveries) and ledger backlog, from the admin stats every 0.5 s",
        fontsize=10,
        loc="left",
    )
    lag = ax3.twinx()
    lag.plot(
        [s["t"] - origin for s in good],
        [s.get("lag") or 0 for s in good],
        color="#9b5de5",
        linewidth=0.9,
        label="ledger lag (entries)",
    )
    lag.set_ylabel("ledger lag (entries)")
    lag.set_ylim(bottom=0)
    handles = ax3.get_legend_handles_labels()[0] + lag.get_legend_handles_labels()[0]
    ax3.legend(handles, [str(h.get_label()) for h in handles], loc="upper right", fontsize=8)

    for ax in (ax1, ax2, ax3):
        ax.axvline(0, color="grey", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
        if fault is not None:
            end = (fault.ended or fault.started + 1) - origin
            ax.axvspan(fault.started - origin, end, color="#d62828", alpha=0.12, zorder=0)
    ax1.annotate("opening second", (0, 1), xycoords=("data", "axes fraction"), fontsize=8, va="top")
    if fault is not None:
        ax1.annotate(
            fault.kind,
            (fault.started - origin, 0.9),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            color="#d62828",
            va="top",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
