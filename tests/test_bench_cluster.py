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
from loadtest.ceiling import DRIVERS, LAYOUTS, TABLE_COLUMNS, WAITS, ClusterRun, NodeCost
from tests.helpers import PG_URL

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


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
async def test_the_cluster_part_measures_one_primary_and_three_and_renders_its_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLOT_DATABASE_URL", PG_URL)
    out = tmp_path / "performance.md"
    args = tiny(out)

    runs = await bench.cluster_bench(args)

    kinds = sorted((r.driver, r.wait, r.layout) for r in runs)
    assert kinds == sorted((d, w, lay) for d in DRIVERS for w in WAITS for lay in LAYOUTS)
    for run in runs:
        check_run(run)
    by = {(r.driver, r.wait, r.layout): r for r in runs}
    for driver in DRIVERS:
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
    width = len(TABLE_COLUMNS)
    assert header.count("|") == width + 1
    assert all(row.count("|") == width + 1 for row in body)
    three_rows = [row for row in body if "| 3 on 3 |" in row]
    assert len(three_rows) == 4
    for row in three_rows:  # a figure for each of the three primaries
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells[5].split(" / ")) == 3, row
    assert "python bench/run.py --cluster-only --duration 1 --rounds 1" in section
    assert section.count("µs (~") == 4  # one round's ceiling: each driver, each setting

    # the section replaces only its own part of the file
    out.write_text("# Performance\n\n<!-- bench: main -->\nkept\n<!-- /bench: main -->\n")
    out.write_text(bench.replace_section(out.read_text(), bench.CLUSTER_SECTION, section))
    text = out.read_text()
    assert "<!-- bench: main -->\nkept\n<!-- /bench: main -->" in text
    assert text.count("<!-- bench: cluster -->") == 1
    assert text.rstrip().endswith("<!-- /bench: cluster -->")


def known_run(driver: str, wait: int, layout: str) -> ClusterRun:
    """A run with round numbers: each loaded primary decided 10,000 claims on 0.3 s of CPU
    (30 µs a claim) and 0.2 s in scripts, in 40 calls; the replicas spent 0.1 s each."""
    n = LAYOUTS[layout]
    nodes = {
        port: NodeCost("primary", 10_000, 40, 200_000, 0.3)
        if port < 7000 + n
        else NodeCost("primary", cpu_s=0.08)
        for port in (7000, 7001, 7002)
    }
    nodes.update({port: NodeCost("replica", cpu_s=0.1) for port in (7003, 7004, 7005)})
    claims = {f"r{i}": 10_000 for i in range(n)}
    return ClusterRun(driver, wait, layout, 2.0, claims, nodes, client_cpu_us=12.5)


def test_the_cluster_section_computes_its_figures_from_what_each_node_spent() -> None:
    runs = [
        known_run(d, w, lay) for d in DRIVERS for w in WAITS for lay in LAYOUTS
    ]  # fmt: skip
    args = argparse.Namespace(
        duration=2.0, rounds=1, connections=16, cluster_batch=BATCH, cluster_workers=1
    )
    section = bench.render_cluster(runs, args)
    rows = {
        tuple(c.strip() for c in row.strip("|").split("|")[:3]): row
        for row in section.splitlines()
        if row.startswith(("| claim_many", "| allot serve"))
    }
    assert len(rows) == 8
    one = [c.strip() for c in rows["claim_many", "0", "1 on 1"].strip("|").split("|")]
    # 10,000 claims in 2 s; 30 µs of CPU and 20 µs in scripts a claim; 1e6 / 30 a second;
    # 40 calls per 10,000 claims; 3 x 0.1 s of replica CPU over 10,000 claims; the client's
    assert one == ["claim_many", "0", "1 on 1", "5,000", "–", "30.0", "20.0", "33,333", "4.0",
                   "30.0", "12.5", "0"]  # fmt: skip
    three = [c.strip() for c in rows["allot serve", "1", "3 on 3"].strip("|").split("|")]
    assert three[3:9] == ["15,000", "3.00", "30.0 / 30.0 / 30.0", "20.0 / 20.0 / 20.0",
                          "33,333 / 33,333 / 33,333", "4.0"]  # fmt: skip
    assert three[9] == "10.0"  # 0.3 s of replica CPU over 30,000 claims
    # the idle primaries: 0.08 s of CPU in a 2 s run
    text = " ".join(section.split())
    assert "spent 40.0 ms of CPU per second" in text
    assert "its one primary used 15% of a core" in text  # 0.3 s of CPU in 2 s
    assert "each of the three used 15% to 15%" in text
    # three primaries at 30 µs a claim: three times one primary's ceiling
    assert "~100,000 (`wait_replicas = 0`)" in text
    assert text.count("30.0 µs (~33,333 claims/s)") == 4
