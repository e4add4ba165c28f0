"""The release gate (`allot loadtest`) against small stand-ins: it passes an honest service,
fails one that oversells, one that answers 5xx and one that loses ledger rows, and its
summary.json agrees with locust's own CSVs. In lottery mode it passes the real service (a short
run: registration, freeze, draw, verify-draw) and fails a stand-in whose draw favours one
group, though its published files replay exactly. The chi-square p-value it judges fairness by
is checked against known values.

Each stand-in speaks just enough of the public API, in memory, for the gate to run its crowd
against it with ``--target``; the gate itself runs as a real `allot loadtest` subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import datetime as dt
import math
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from allocator import draw as drawing
from allocator.identity import normalise_citizen_id
from loadtest import crowd
from loadtest.checks import Check, Records, check_bot_held_back, passed
from loadtest.fairness import Group, chi2_sf, chi_square, gamma_q, judge
from loadtest.servers import free_port

pytestmark = pytest.mark.slow

TOKEN = "stand-in-token"
CODES = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"


# -- the stand-ins ----------------------------------------------------------------------------


def problem(status: int, code: str, **extra: Any) -> web.Response:
    body = {"type": f"urn:x:{code}", "title": code, "status": status, "detail": code, "code": code}
    return web.Response(
        body=orjson.dumps(body | extra), status=status, content_type="application/problem+json"
    )


def ok(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


class StandIn:
    """An in-memory allot, honest unless told to oversell, to fail, or to lose ledger rows."""

    def __init__(
        self,
        *,
        oversell: bool = False,
        fail_every: int = 0,
        lose_every: int = 0,
        database_url: str | None = None,
    ) -> None:
        self.oversell, self.fail_every, self.lose_every = oversell, fail_every, lose_every
        self.database_url = database_url
        self.pool: asyncpg.Pool | None = None
        self.sites: dict[str, dict[str, Any]] = {}
        self.rounds: dict[str, dict[str, Any]] = {}
        self.stock: dict[str, int] = {}
        self.loaded: dict[str, int] = {}
        self.holders: dict[str, str] = {}  # citizen_id -> reservation_id
        self.reservations: dict[str, dict[str, Any]] = {}
        self.posts = 0
        self.recorded = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/readyz", self.ready),
                web.put("/api/v1/admin/sites", self.put_sites),
                web.put("/api/v1/admin/rounds/{rid}", self.put_round),
                web.post("/api/v1/admin/rounds/{rid}/batches", self.post_batch),
                web.get("/api/v1/admin/rounds/{rid}/stats", self.get_stats),
                web.get("/api/v1/rounds", self.list_rounds),
                web.get("/api/v1/rounds/{rid}", self.get_round),
                web.get("/api/v1/rounds/{rid}/sites", self.list_sites),
                web.post("/api/v1/rounds/{rid}/reservations", self.reserve),
                web.get("/api/v1/reservations/{res}", self.get_reservation),
            ]
        )
        return app

    async def ready(self, request: web.Request) -> web.Response:
        return ok({"status": "ready"})

    def admin(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized

    def public_round(self, rid: str) -> dict[str, Any]:
        rnd = self.rounds[rid]
        now = dt.datetime.now(dt.UTC)
        opens = dt.datetime.fromisoformat(rnd["opens_at"])
        return rnd | {
            "round_id": rid,
            "mode": "fcfs",
            "draw": None,  # an fcfs round has no draw (API.md, Round)
            "programme": None,  # Entitlement (API.md): none, no cooldown, anyone may take part
            "cooldown_days": 0,
            "eligibility": None,
            "status": "upcoming" if now < opens else "open",
            "remaining": max(0, sum(self.stock.values())),
        }

    async def put_sites(self, request: web.Request) -> web.Response:
        self.admin(request)
        body = await request.json()
        for site in body["sites"]:
            self.sites[site["site_id"]] = site
        return ok({"upserted": len(body["sites"])})

    async def put_round(self, request: web.Request) -> web.Response:
        self.admin(request)
        rid = request.match_info["rid"]
        self.rounds[rid] = await request.json()
        if self.pool is not None:
            spec = self.rounds[rid]
            await self.pool.execute(
                "INSERT INTO rounds (round_id, title, opens_at, closes_at, per_person,"
                " pickup_start, pickup_end, spec) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                rid,
                spec["title"],
                *(dt.datetime.fromisoformat(spec[k]) for k in ("opens_at", "closes_at")),
                spec["per_person"],
                *(dt.datetime.fromisoformat(spec[k]) for k in ("pickup_start", "pickup_end")),
                orjson.dumps(spec).decode(),
            )
        return ok(self.public_round(rid), status=201)

    async def post_batch(self, request: web.Request) -> web.Response:
        self.admin(request)
        body = await request.json()
        for item in body["items"]:
            self.stock[item["site_id"]] = self.stock.get(item["site_id"], 0) + item["quantity"]
            self.loaded[item["site_id"]] = self.loaded.get(item["site_id"], 0) + item["quantity"]
        units = sum(i["quantity"] for i in body["items"])
        return ok(
            {"batch_id": body["batch_id"], "units_added": units, "sites": len(body["items"])},
            status=201,
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        self.admin(request)
        reserved = {s: self.loaded[s] - self.stock[s] for s in self.loaded}
        return ok(
            {
                "round_id": request.match_info["rid"],
                "loaded": sum(self.loaded.values()),
                "reserved": sum(reserved.values()),
                "collected": 0,
                "remaining": max(0, sum(self.stock.values())),
                "reservations": len(self.reservations),
                "sites": [
                    {
                        "site_id": s,
                        "loaded": self.loaded[s],
                        "reserved": reserved[s],
                        "remaining": max(0, self.stock[s]),  # an overseller hides it
                    }
                    for s in sorted(self.loaded)
                ],
                # what a careless service reports: everything it meant to record
                "ledger": {"recorded": len(self.reservations), "lag": 0},
            }
        )

    async def list_rounds(self, request: web.Request) -> web.Response:
        return ok({"rounds": [self.public_round(r) for r in self.rounds]})

    async def get_round(self, request: web.Request) -> web.Response:
        return ok(self.public_round(request.match_info["rid"]))

    async def list_sites(self, request: web.Request) -> web.Response:
        return ok(
            {
                "sites": [
                    self.sites[s] | {"remaining": max(0, units)} for s, units in self.stock.items()
                ]
            }
        )

    def reservation(self, rid: str, res_id: str, site: str, citizen: str) -> dict[str, Any]:
        rnd = self.rounds[rid]
        return {
            "reservation_id": res_id,
            "round_id": rid,
            "site_id": site,
            "quantity": rnd["per_person"],
            "status": "confirmed",
            "pickup_code": "".join(secrets.choice(CODES) for _ in range(8)),
            "pickup_start": rnd["pickup_start"],
            "pickup_end": rnd["pickup_end"],
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "citizen_id_masked": crowd.mask(citizen),
            "_citizen": citizen,
            "_phone": "",
        }

    async def reserve(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        body = await request.json()
        self.posts += 1
        if self.fail_every and self.posts % self.fail_every == 0:
            return web.Response(status=500, text="Internal Server Error")
        rnd = self.rounds[rid]
        if dt.datetime.now(dt.UTC) < dt.datetime.fromisoformat(rnd["opens_at"]):
            return problem(409, "round-not-open")
        citizen, site = body["citizen_id"], body["site_id"]
        if citizen in self.holders:
            held = self.reservations[self.holders[citizen]]
            if held["site_id"] == site and held["_phone"] == body["phone"]:
                return ok(self.public(held))
            return problem(409, "already-reserved")
        per_person = rnd["per_person"]
        if self.stock.get(site, 0) < per_person and not self.oversell:
            alternatives = [
                {
                    "site_id": s,
                    "name": self.sites[s]["name"],
                    "district": self.sites[s]["district"],
                    "remaining": units,
                }
                for s, units in self.stock.items()
                if s != site and units >= per_person
            ][:5]
            return problem(409, "sold-out", alternatives=alternatives)
        self.stock[site] = self.stock.get(site, 0) - per_person
        res = self.reservation(rid, secrets.token_urlsafe(16), site, citizen)
        res["_phone"] = body["phone"]
        self.reservations[res["reservation_id"]] = res
        self.holders[citizen] = res["reservation_id"]
        await self.record(res)
        location = f"/api/v1/reservations/{res['reservation_id']}"
        return ok(self.public(res), status=201, headers={"Location": location})

    async def record(self, res: dict[str, Any]) -> None:
        if self.pool is None:
            return
        self.recorded += 1
        if self.lose_every and self.recorded % self.lose_every == 0:
            return  # the row is "lost": the service still counts it as recorded
        now = dt.datetime.now(dt.UTC)
        await self.pool.execute(
            "INSERT INTO reservations (reservation_id, round_id, site_id, quantity, status,"
            " pickup_code, citizen_hash, phone_hash, citizen_id_masked, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, 'confirmed', $5, $6, 'p', $7, $8, $8)",
            res["reservation_id"],
            res["round_id"],
            res["site_id"],
            res["quantity"],
            res["pickup_code"],
            res["_citizen"],
            res["citizen_id_masked"],
            now,
        )

    @staticmethod
    def public(res: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in res.items() if not k.startswith("_")}

    async def get_reservation(self, request: web.Request) -> web.Response:
        res = self.reservations.get(request.match_info["res"])
        return ok(self.public(res)) if res else problem(404, "not-found")


class LotteryStandIn(StandIn):
    """An in-memory lottery whose draw is allot-draw-1 to the letter (allocator/draw.py writes
    its files, so verify-draw replays them exactly), but which gives every entry made from the
    bot's address weight 4, as if loss weighting had earned it: a rigged draw the files alone
    cannot show, and that only the crowd's win rates by behaviour reveal."""

    def __init__(self, favoured_address: str = crowd.BOT_ADDRESS) -> None:
        super().__init__()
        self.favoured = favoured_address
        self.entries: dict[str, dict[str, Any]] = {}  # entry_id -> entry
        self.by_citizen: dict[str, str] = {}  # citizen_id -> entry_id
        self.secret = secrets.token_bytes(32)
        self.frozen: drawing.FrozenList | None = None
        self.frozen_at = ""
        self.draw: drawing.Draw | None = None
        self.drawn_at = ""

    def app(self) -> web.Application:
        app = super().app()
        app.add_routes(
            [
                web.post("/api/v1/rounds/{rid}/entries", self.enter),
                web.get("/api/v1/entries/{eid}", self.get_entry),
                web.get("/api/v1/rounds/{rid}/draw", self.get_draw),
                web.get("/api/v1/rounds/{rid}/draw/{name}", self.get_file),
                web.post("/api/v1/admin/rounds/{rid}/draw", self.post_draw),
            ]
        )
        return app

    def public_round(self, rid: str) -> dict[str, Any]:
        commitment = drawing.commitment(self.secret)
        return super().public_round(rid) | {"mode": "lottery", "draw": {"commitment": commitment}}

    def closes(self, rid: str) -> dt.datetime:
        return dt.datetime.fromisoformat(self.rounds[rid]["closes_at"])

    def entry_body(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if not k.startswith("_")}

    async def enter(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        body = await request.json()
        rnd = self.rounds[rid]
        now = dt.datetime.now(dt.UTC)
        if not dt.datetime.fromisoformat(rnd["opens_at"]) <= now < self.closes(rid):
            return problem(409, "round-not-open")
        citizen = body["citizen_id"]
        accept = bool(body.get("accept_district", False))
        if citizen in self.by_citizen:
            entry = self.entries[self.by_citizen[citizen]]
            if entry["_phone"] != body["phone"]:
                return problem(409, "already-entered")
            entry["site_id"], entry["accept_district"] = body["site_id"], accept
            return ok(self.entry_body(entry))
        eid = secrets.token_urlsafe(16)
        entry = {
            "entry_id": eid,
            "round_id": rid,
            "site_id": body["site_id"],
            "accept_district": accept,
            "status": "registered",
            "receipt": crowd.receipt(rid, eid),
            "signature": base64.urlsafe_b64encode(secrets.token_bytes(64)).decode().rstrip("="),
            "weight": None,
            "created_at": now.isoformat(),
            "citizen_id_masked": crowd.mask(citizen),
            "reservation_id": None,
            "_phone": body["phone"],
            "_favoured": request.headers.get("X-Forwarded-For") == self.favoured,
        }
        self.entries[eid] = entry
        self.by_citizen[citizen] = eid
        return ok(
            self.entry_body(entry), status=201, headers={"Location": f"/api/v1/entries/{eid}"}
        )

    async def get_entry(self, request: web.Request) -> web.Response:
        entry = self.entries.get(request.match_info["eid"])
        return ok(self.entry_body(entry)) if entry else problem(404, "not-found")

    def freeze(self, rid: str) -> None:
        if self.frozen is not None or dt.datetime.now(dt.UTC) < self.closes(rid):
            return
        lines = [
            drawing.EntryLine(
                e["receipt"],
                e["site_id"],
                self.sites[e["site_id"]]["district"],
                e["accept_district"],
                4 if e["_favoured"] else 1,  # the rigging
            )
            for e in self.entries.values()
        ]
        stock = [
            drawing.StockLine(s, self.sites[s]["district"], units)
            for s, units in self.stock.items()
        ]
        self.frozen = drawing.freeze(lines, stock)
        self.frozen_at = dt.datetime.now(dt.UTC).isoformat()

    def draw_record(self, rid: str) -> dict[str, Any]:
        if self.draw is not None:
            return drawing.record(
                self.draw,
                public_randomness_source=self.rounds[rid]["public_randomness_source"],
                frozen_at=self.frozen_at,
                drawn_at=self.drawn_at,
            )
        frozen = self.frozen
        return {
            "round_id": rid,
            "algorithm": drawing.ALGORITHM,
            "status": "registering" if frozen is None else "frozen",
            "commitment": drawing.commitment(self.secret),
            "public_randomness_source": self.rounds[rid]["public_randomness_source"],
            "frozen_at": self.frozen_at or None,
            "entries": len(frozen.entries) if frozen else None,
            "entries_digest": frozen.entries_digest if frozen else None,
            "stock_digest": frozen.stock_digest if frozen else None,
            "public_randomness": None,
            "secret": self.secret.hex() if frozen else None,
            "seed": None,
            "drawn_at": None,
            "results_digest": None,
            "passes": [],
            "sites": [],
        }

    async def get_draw(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        self.freeze(rid)
        return ok(self.draw_record(rid))

    async def post_draw(self, request: web.Request) -> web.Response:
        self.admin(request)
        rid = request.match_info["rid"]
        self.freeze(rid)
        if self.frozen is None:
            return problem(409, "draw-not-ready")
        value = (await request.json())["public_randomness"]
        if self.draw is None:
            per_person = self.rounds[rid]["per_person"]
            self.draw = drawing.draw(rid, per_person, self.secret, value, self.frozen)
            self.drawn_at = dt.datetime.now(dt.UTC).isoformat()
            for placed in self.draw.winners():
                self.stock[placed.site_id] -= per_person
        return ok(self.draw_record(rid))

    async def get_file(self, request: web.Request) -> web.Response:
        if self.draw is None:
            return problem(404, "not-found")
        data = drawing.files(self.draw).get(request.match_info["name"])
        if data is None:
            return problem(404, "not-found")
        return web.Response(body=data, content_type="text/csv", charset="utf-8")


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    """Start a stand-in on a free loopback port; stopped after the test."""
    runners: list[web.AppRunner] = []
    pools: list[asyncpg.Pool] = []

    async def start(stand_in: StandIn) -> str:
        if stand_in.database_url:
            stand_in.pool = await asyncpg.create_pool(stand_in.database_url, min_size=1)
            pools.append(stand_in.pool)
        runner = web.AppRunner(stand_in.app(), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()
    for pool in pools:
        await pool.close()


async def gate(url: str, out: Path, *extra: str) -> tuple[int, str, dict[str, Any]]:
    """Run `allot loadtest --target url` (a small, short crowd); exit code, stdout, summary."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "loadtest",
        "--target", url, "--admin-token", TOKEN,
        "--users", "30", "--spawn-rate", "30", "--duration", "4", "--grace", "3",
        "--stock", "20", "--sites", "3", "--batches", "1", "--bots", "1",
        "--ledger-deadline", "3", "--out", str(out), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    text = stdout.decode() + stderr.decode()
    summary_path = out / "summary.json"
    summary = orjson.loads(summary_path.read_bytes()) if summary_path.exists() else {}
    assert proc.returncode is not None
    return proc.returncode, text, summary


async def self_hosted_lottery(out: Path) -> tuple[int, str, dict[str, Any]]:
    """A short `allot loadtest --mode lottery` against the real service it starts itself (its
    own database and Redis prefix, removed afterwards)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "loadtest", "--mode", "lottery",
        "--users", "80", "--spawn-rate", "80", "--duration", "6", "--grace", "3",
        "--stock", "60", "--sites", "4", "--batches", "2", "--bots", "1", "--out", str(out),
        env={**os.environ}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 240)
    summary_path = out / "summary.json"
    summary = orjson.loads(summary_path.read_bytes()) if summary_path.exists() else {}
    assert proc.returncode is not None
    return proc.returncode, stdout.decode() + stderr.decode(), summary


def verdicts(summary: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["result"] for c in summary["checks"]}


# -- the gate against the stand-ins -----------------------------------------------------------


async def test_the_gate_passes_an_honest_service_and_its_summary_matches_locusts_csv(
    serve: Any, tmp_path: Path
) -> None:
    """A release must be able to pass, and the summary must tell what locust itself measured."""
    url = await serve(StandIn())
    code, text, summary = await gate(url, tmp_path / "out", "--processes", "2")
    assert code == 0, text
    assert "PASSED" in text
    for name in (
        "passed", "requests", "failures", "rps", "latency_ms", "answered_latency_ms",
        "answers_by_status", "answers_by_code", "requests_by_name", "granted", "stock", "checks",
    ):  # fmt: skip
        assert name in summary, name
    assert summary["granted"] == summary["stock"] == 20
    assert all({"name", "result", "figure"} <= set(c) for c in summary["checks"])
    assert verdicts(summary)["reconcile"] == "n/a"  # no stores given: said, not faked
    assert verdicts(summary)["bot-held-back"] == "n/a"  # the stand-in has no gate

    with (tmp_path / "out" / "locust_stats.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    aggregated = rows[-1]
    assert aggregated["Name"] == "Aggregated"
    assert summary["requests"] == int(aggregated["Request Count"]) > 0
    assert summary["failures"] == int(aggregated["Failure Count"]) == 0
    assert summary["rps"] == pytest.approx(float(aggregated["Requests/s"]))
    assert summary["latency_ms"]["p99"] == float(aggregated["99%"])
    assert summary["latency_ms"]["p50"] == float(aggregated["50%"])
    assert sum(summary["answers_by_status"].values()) == summary["requests"]
    assert sum(summary["answers_by_code"].values()) == summary["requests"]
    by_name = {r["Name"]: int(r["Request Count"]) for r in rows[:-1]}
    assert {n: v["requests"] for n, v in summary["requests_by_name"].items()} == by_name
    # expected outcomes are counted under their own names
    assert any(name.endswith(": 409 sold-out") for name in by_name)
    assert any(name.endswith(": 201") for name in by_name)
    assert (tmp_path / "out" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "report.html").stat().st_size > 0


async def test_the_gate_fails_a_service_that_oversells(serve: Any, tmp_path: Path) -> None:
    """Granting more than the stock is the one thing a rationing service must never do."""
    url = await serve(StandIn(oversell=True))
    code, text, summary = await gate(url, tmp_path / "out")
    assert code == 1, text
    assert verdicts(summary)["no-oversell"] == "FAIL"
    assert "no-oversell" in text.split("FAILED:")[1]
    assert summary["granted"] > summary["stock"]


async def test_the_gate_fails_a_service_that_answers_5xx(serve: Any, tmp_path: Path) -> None:
    """A 500 under load is an outage for the citizen who got it, whatever else went right."""
    url = await serve(StandIn(fail_every=7))
    code, text, summary = await gate(url, tmp_path / "out")
    assert code == 1, text
    assert verdicts(summary)["no-server-errors"] == "FAIL"
    assert "no-server-errors" in text.split("FAILED:")[1]
    assert summary["answers_by_status"].get("500", 0) > 0


async def test_the_gate_fails_a_service_that_loses_ledger_rows(
    serve: Any, tmp_path: Path, database_url: str
) -> None:
    """A reservation answered 201 but missing from the ledger is a unit nobody can account for."""
    url = await serve(StandIn(lose_every=4, database_url=database_url))
    code, text, summary = await gate(url, tmp_path / "out", "--database-url", database_url)
    assert code == 1, text
    assert verdicts(summary)["ledger-complete"] == "FAIL"
    assert "ledger-complete" in text.split("FAILED:")[1]
    ledger_check = next(c for c in summary["checks"] if c["name"] == "ledger-complete")
    assert ledger_check["value"]["missing"] >= 1


async def test_the_gate_fails_loudly_when_the_service_is_not_ready(tmp_path: Path) -> None:
    """Nothing listening is the least ready a service can be; the gate must not shrug it off."""
    code, text, summary = await gate(f"http://127.0.0.1:{free_port()}", tmp_path / "out")
    assert code == 1, text
    assert "not ready" in text
    assert summary["passed"] is False


# -- the pieces -------------------------------------------------------------------------------


def test_simulated_citizens_have_valid_distinct_ids_across_processes() -> None:
    """IDs the service would refuse, or two processes sharing one, would fake the results."""
    numbers = [p * crowd.PER_PROCESS + c for p in range(3) for c in (0, 1, 999, 1000, 123_456)]
    ids = [crowd.citizen_id(n) for n in numbers]
    assert len(set(ids)) == len(ids)
    for cid in ids:
        assert normalise_citizen_id(cid) == cid
    assert crowd.citizen_id(0)[:6] == "110101"
    assert all(crowd.phone(n)[:2] in {f"1{d}" for d in "3456789"} for n in numbers)
    assert all(len(crowd.phone(n)) == 11 for n in numbers)


def test_the_bot_check_is_not_applicable_without_a_gate_and_strict_with_one() -> None:
    """Without any 429 the check must say n/a, never pass; with a gate it counts admissions."""

    def answer(t: float, st: int, code: str = "", who: str = "bot") -> dict[str, Any]:
        return {"t": t, "ms": 1.0, "who": who, "op": "reserve", "st": st, "code": code, "fail": ""}

    facts: Any = type("F", (), {"client_rate": 10.0, "client_burst": 20})()
    ungated = Records(answers=[answer(i / 40, 201) for i in range(200)])
    result: Check = check_bot_held_back(facts, ungated)
    assert result.ok is None
    assert passed([result])  # n/a does not fail the gate, and the table says why

    leaky = Records(
        answers=[answer(i / 40, 201) for i in range(200)]
        + [answer(0.0, 429, "rate-limited", who="impatient")]
    )
    assert check_bot_held_back(facts, leaky).ok is False  # 200 admitted in 5 s, allowance 70

    held = Records(
        answers=[answer(i / 40, 201 if i % 4 == 0 else 429, "" if i % 4 == 0 else "rate-limited")
                 for i in range(200)]
    )  # fmt: skip
    assert check_bot_held_back(facts, held).ok is True


# -- lottery mode ---------------------------------------------------------------------------------


async def test_the_lottery_gate_passes_the_real_service(tmp_path: Path) -> None:
    """Registration crowd, freeze, draw, verify-draw: every check holds on the real service."""
    code, text, summary = await self_hosted_lottery(tmp_path / "out")
    assert code == 0, text
    v = verdicts(summary)
    for name in (
        "crowd-ran", "freeze-and-draw", "entries-complete", "no-oversell", "winners-within-stock",
        "one-entry-per-citizen", "same-entry-on-retry", "verify-draw", "fairness", "reconcile",
        "no-server-errors", "valid-answers",
    ):  # fmt: skip
        assert v[name] == "pass", (name, text)
    assert summary["round_mode"] == "lottery"
    assert summary["draw"]["record"]["status"] == "drawn"
    assert summary["draw"]["verify_draw_exit"] == 0
    complete = next(c for c in summary["checks"] if c["name"] == "entries-complete")
    assert complete["value"]["answered"] > 0
    assert complete["value"]["missing"] == complete["value"]["wrong_choice"] == 0
    # every behaviour group entered, and the fairness result sits where an FCFS run puts its own
    fairness = summary["fairness"]
    assert fairness["enforced"] is True
    assert fairness["fcfs"] is None
    groups = {g["group"] for g in fairness["lottery"]["groups"]}
    assert {"citizen", "impatient", "bot"} <= groups
    assert fairness["lottery"]["result"] == "pass"
    assert 0.001 < fairness["lottery"]["p_value"] <= 1.0
    assert summary["fairness_report"]["error"] is None  # the service's own report, printed
    assert "the service's fairness report" in text
    assert (tmp_path / "out" / "draw" / "entries.csv").read_bytes().startswith(b"receipt,")


async def test_the_lottery_gate_fails_a_draw_that_favours_one_group(
    serve: Any, tmp_path: Path
) -> None:
    """The bot's address gets weight 4: the files replay exactly, and only fairness fails.

    Sized for power: one site (every entry competes for the same units), some 400 entrants and
    stock for about 40 % of them, so the rigged split (some 55 % of the bot's identities win
    against 20 % of the others) lies far beyond p = 0.001 (chi-square about 50, where 16.3
    is the limit)."""
    stand_in = LotteryStandIn()
    url = await serve(stand_in)
    code, text, summary = await gate(
        url, tmp_path / "out", "--mode", "lottery", "--users", "120", "--spawn-rate", "120",
        "--duration", "8", "--stock", "150", "--sites", "1",
    )  # fmt: skip
    assert code == 1, text
    v = verdicts(summary)
    assert v["fairness"] == "FAIL", text
    assert "fairness" in text.split("FAILED:")[1]
    # what the files can tell holds: the rigging is invisible to verify-draw
    for name in ("verify-draw", "entries-complete", "winners-within-stock", "freeze-and-draw"):
        assert v[name] == "pass", (name, text)
    rows = {g["group"]: g for g in summary["fairness"]["lottery"]["groups"]}
    assert rows["bot"]["rate"] > rows["citizen"]["rate"]
    assert summary["fairness"]["lottery"]["p_value"] <= 0.001
    assert stand_in.draw is not None


async def test_the_fcfs_gate_reports_fairness_without_judging_it(
    serve: Any, tmp_path: Path
) -> None:
    """An FCFS run computes the same fairness figures, as information: never a failed check."""
    code, text, summary = await gate(await serve(StandIn()), tmp_path / "out")
    assert code == 0, text
    assert "fairness" not in verdicts(summary)
    fairness = summary["fairness"]
    assert fairness["enforced"] is False
    assert fairness["lottery"] is None
    assert fairness["fcfs"]["result"] in ("pass", "FAIL", "n/a")
    assert {g["group"] for g in fairness["fcfs"]["groups"]} >= {"citizen"}
    assert "fairness by behaviour (fcfs, information only" in text


# -- the statistics -------------------------------------------------------------------------------


def test_chi_square_p_values_match_known_values() -> None:
    """The tables' critical values, closed forms for df 1 and even df, and a 2x2 by hand."""
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(6.6348966010212145, 1) == pytest.approx(0.01, rel=1e-9)
    assert chi2_sf(11.344866730144373, 3) == pytest.approx(0.01, rel=1e-9)
    assert chi2_sf(16.26623619623813, 3) == pytest.approx(0.001, rel=1e-9)
    assert chi2_sf(7.814727903251178, 3) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(67.50480655798947, 50) == pytest.approx(0.05, rel=1e-8)
    for x in (0.01, 0.5, 1.0, 2.0, 3.0, 7.5, 20.0, 60.0):
        # df 1: P(Z^2 >= x) = erfc(sqrt(x/2)); even df 2m: e^(-x/2) sum_{i<m} (x/2)^i / i!
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
        for m in (1, 2, 5, 20):
            closed = math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(m))
            assert chi2_sf(x, 2 * m) == pytest.approx(closed, rel=1e-9, abs=1e-300)
    assert chi2_sf(0.0, 3) == 1.0
    assert gamma_q(1.0, 0.0) == 1.0
    assert chi2_sf(1e4, 3) < 1e-300
    # 20/30 against 30/20: every expected count 25, statistic 4 * 25/25 = 4
    statistic, df, p = chi_square([[20, 30], [30, 20]])
    assert statistic == pytest.approx(4.0)
    assert df == 1
    assert p == pytest.approx(chi2_sf(4.0, 1)) == pytest.approx(0.0455, abs=1e-4)
    assert chi_square([[5, 0], [7, 0]]) == (0.0, 0, 1.0)  # nobody lost: nothing to test


def test_fairness_fails_a_rigged_split_and_forgives_a_small_group_its_luck() -> None:
    """A 0.8 ratio in a group of 30 is chance; a 20 % against 60 % split over hundreds is not."""
    lucky = judge([Group("citizen", 300, 90), Group("duplicate", 30, 6), Group("bot", 100, 30)])
    assert lucky.fair is True
    duplicate = next(g for g in lucky.groups if g["group"] == "duplicate")
    assert duplicate["under_four_fifths"]
    assert not duplicate["significantly_under"]
    rigged = judge([Group("citizen", 300, 60), Group("impatient", 50, 10), Group("bot", 100, 60)])
    assert rigged.fair is False
    assert rigged.p_value <= 0.001
    # each group is tested against all other entrants pooled: citizens (20 % against 47 %) are
    # significantly under; the 50 impatient (20 % against 30 %) are under 0.8 of the best but
    # not beyond chance on their own; the draw fails on the chi-square of the whole table
    assert {g["group"] for g in rigged.groups if g["significantly_under"]} == {"citizen"}
    assert {g["group"] for g in rigged.groups if g["under_four_fifths"]} == {"citizen", "impatient"}
    assert judge([Group("citizen", 10, 0), Group("bot", 10, 0)]).fair is None  # nobody won


def test_lottery_fairness_says_what_each_groups_site_choices_predict() -> None:
    """Groups that choose differently have different odds in a fair draw: the expected rate is
    each entrant's choice's win rate among everyone who made it, averaged over the group."""
    from loadtest.lottery import LotteryFacts, lottery_fairness

    round_id = "l1"
    records = Records()
    entries, results = [], []
    # site a: 4 entrants (2 citizens, 2 impatient), 1 unit; site b: 2 citizens, 2 units
    for n, (who, site, wins) in enumerate(
        [
            ("citizen", "a", True),
            ("citizen", "a", False),
            ("impatient", "a", False),
            ("impatient", "a", False),
            ("citizen", "b", True),
            ("citizen", "b", True),
        ]
    ):
        eid = f"e{n}.{round_id}"
        records.entries.append(
            {"n": n, "eid": eid, "site": site, "acc": False, "st": 201, "who": who, "t": n}
        )
        receipt = crowd.receipt(round_id, eid)
        entries.append({"receipt": receipt, "site_id": site, "accept_district": "0"})
        results.append({"receipt": receipt, "site_id": site if wins else ""})
    facts = LotteryFacts(round_id, 1, entries=entries, results=results)
    verdict = lottery_fairness(facts, records)
    rows = {g["group"]: g for g in verdict.groups}
    assert (rows["citizen"]["rate"], rows["citizen"]["expected_rate"]) == (0.75, 0.625)
    assert (rows["impatient"]["rate"], rows["impatient"]["expected_rate"]) == (0.0, 0.25)
    assert "expected from their site choices: citizen 62%, impatient 25%" in verdict.figure
