"""The cluster part of `make bench` (bench/run.py, loadtest/ceiling.py), end to end on a tiny
setting: a private 3+3 cluster, both drivers, both wait_replicas settings, both layouts. What
is checked is the shape of what it reports (who decided which claims, what each node was
charged for), never a time or a rate."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from bench import run as bench
from loadtest.ceiling import LAYOUTS, WAITS, ClusterRun
from tests.helpers import PG_URL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"),
]

BATCH = 32


def tiny(out: Path) -> argparse.Namespace:
    return argparse.Namespace(
        duration=1.0, rounds=1, connections=16, cluster_batch=BATCH, cluster_workers=1,
        out=str(out),
    )  # fmt: skip


def check_run(run: ClusterRun) -> None:
    where = f"{run.driver}, wait_replicas={run.wait}, {run.layout}"
    assert run.refused == 0, where
    assert len(run.claims) == LAYOUTS[run.layout], where
    assert all(n > 0 for n in run.claims.values()), (where, run.claims)
    assert run.seconds > 0, where
    assert run.rate > 0, where
    # six nodes read, three of each role; only primaries decide claims
    assert sorted(c.role for c in run.nodes.values()) == ["primary"] * 3 + ["replica"] * 3
    assert all(c.claims == 0 for c in run.nodes.values() if c.role == "replica"), where
    loaded = run.loaded()
    # one round: one primary decided every claim; three rounds: three primaries did
    assert len(loaded) == LAYOUTS[run.layout], (where, loaded)
    assert sum(c.claims for c in loaded.values()) == run.total, where
    assert len(run.idle()) == 3 - len(loaded), where
    for cost in loaded.values():
        assert (cost.cpu_us_per_claim() or 0) > 0, (where, cost)
        assert (cost.script_us_per_claim() or 0) > 0, (where, cost)
        assert 0 < cost.calls < cost.claims, (where, cost)  # batched: a call decides several
        if run.driver == "claim_many":  # an EVALSHA per claim_many call of BATCH new citizens
            # (and maybe a few of the idle allot servers' own: expiry sweeps)
            assert cost.claims % BATCH == 0, (where, cost)
            assert cost.calls >= cost.claims // BATCH, (where, cost)
    assert (run.client_cpu_us or 0) > 0, where
    assert run.replica_cpu_us_per_claim() is not None, where


async def test_the_cluster_part_measures_one_primary_and_three_and_renders_its_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLOT_DATABASE_URL", PG_URL)
    out = tmp_path / "performance.md"
    args = tiny(out)

    runs = await bench.cluster_bench(args)

    kinds = sorted((r.driver, r.wait, r.layout) for r in runs)
    assert kinds == sorted((d, w, lay) for d in bench.DRIVERS for w in WAITS for lay in LAYOUTS)
    for run in runs:
        check_run(run)
    by = {(r.driver, r.wait, r.layout): r for r in runs}
    for driver in bench.DRIVERS:
        for wait in WAITS:
            one, three = by[driver, wait, "one"], by[driver, wait, "three"]
            # the one round is the first of the three: the same primary in both layouts
            assert set(one.loaded()) < set(three.loaded())
            assert set(one.claims) < set(three.claims)
    # wrk sends request n to round n mod 3: the ledger's rows split evenly over the rounds
    for wait in WAITS:
        counts = by["allot serve", wait, "three"].claims.values()
        assert max(counts) - min(counts) <= max(3, max(counts) // 20), counts

    section = bench.render_cluster(runs, args)
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    header, *body = rows
    assert len(body) == len(runs)  # one row per (driver, wait, layout); rounds=1
    width = len(bench.CLUSTER_COLUMNS)
    assert header.count("|") == width + 1
    assert all(row.count("|") == width + 1 for row in body)
    three_rows = [row for row in body if "| 3 on 3 |" in row]
    assert len(three_rows) == 4
    for row in three_rows:  # a figure for each of the three primaries
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells[5].split(" / ")) == 3, row
    assert "python bench/run.py --cluster-only --duration 1 --rounds 1" in section

    # the section replaces only its own part of the file
    out.write_text("# Performance\n\n<!-- bench: main -->\nkept\n<!-- /bench: main -->\n")
    out.write_text(bench.replace_section(out.read_text(), bench.CLUSTER_SECTION, section))
    text = out.read_text()
    assert "<!-- bench: main -->\nkept\n<!-- /bench: main -->" in text
    assert text.count("<!-- bench: cluster -->") == 1
    assert text.rstrip().endswith("<!-- /bench: cluster -->")
