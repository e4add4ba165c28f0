"""`allot serve` as a real process tree: workers share the port, and kill -9 loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from allocator.config import Settings
from loadtest.servers import free_port
from tests.conftest import ADMIN, ADMIN_TOKEN, REDIS_URL, citizen_id, phone, round_body

pytestmark = pytest.mark.slow

ALLOT = str(Path(sys.executable).with_name("allot"))


class Server:
    def __init__(self, settings: Settings, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {
            **os.environ,
            "ALLOT_REDIS_URL": REDIS_URL,
            "ALLOT_REDIS_PREFIX": settings.service.redis_prefix,
            "ALLOT_DATABASE_URL": settings.database_url,
            "ALLOT_ADMIN_TOKEN": ADMIN_TOKEN,
            "ALLOT_ID_PEPPER": "test-pepper",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, workers: int = 2) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [ALLOT, "serve", "--port", str(self.port), "--workers", str(workers)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def workers(self) -> list[int]:
        """Worker pids (multiprocessing also starts a resource tracker, which is not one)."""
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        pids = []
        for pid in path.read_text().split():
            with contextlib.suppress(FileNotFoundError):
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
        return pids

    def kill_all(self) -> None:
        """kill -9 of the whole service: supervisor and workers at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    async def wait_ready(self, session: aiohttp.ClientSession, within: float = 30) -> None:
        async with asyncio.timeout(within):
            while True:
                try:
                    async with session.get(f"{self.url}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)


@pytest.fixture
def server(settings: Settings, tmp_path: Path, redis: Redis) -> Iterator[Server]:
    s = Server(settings, tmp_path / "serve.log")
    yield s
    s.stop()


async def seed_http(session: aiohttp.ClientSession, url: str, units: int) -> None:
    sites = {"sites": [{"site_id": "s1", "name": "One", "address": "Road 1", "district": "d"}]}
    async with session.put(f"{url}/api/v1/admin/sites", json=sites, headers=ADMIN) as r:
        assert r.status == 200
    async with session.put(f"{url}/api/v1/admin/rounds/r1", json=round_body(), headers=ADMIN) as r:
        assert r.status == 201
    batch = {"batch_id": "b1", "items": [{"site_id": "s1", "quantity": units}]}
    async with session.post(
        f"{url}/api/v1/admin/rounds/r1/batches", json=batch, headers=ADMIN
    ) as r:
        assert r.status == 201


async def post(session: aiohttp.ClientSession, url: str, n: int) -> tuple[int, Any]:
    body = {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": "s1"}
    # Each citizen from their own address (documentation prefix), as seen by a trusted proxy:
    # the real per-address token bucket of the default config then treats them as a crowd.
    headers = {"X-Forwarded-For": f"2001:db8::{n:x}"}
    try:
        async with session.post(
            f"{url}/api/v1/rounds/r1/reservations", json=body, headers=headers
        ) as r:
            return r.status, await r.json()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return 0, repr(exc)  # the connection died with the service: no answer was given


async def test_kill_9_of_the_service_under_load_loses_nothing_answered_201(
    server: Server, settings: Settings
) -> None:
    """Every reservation answered 201 before a kill -9 is in the ledger once the service is back."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        server.start()
        await server.wait_ready(session)
        await seed_http(session, server.url, 5000)

        answered: list[tuple[int, Any]] = []

        async def crowd() -> None:
            for start in range(0, 3000, 100):
                answered.extend(
                    await asyncio.gather(
                        *(post(session, server.url, n) for n in range(start, start + 100))
                    )
                )

        load = asyncio.create_task(crowd())
        while len(answered) < 600:
            await asyncio.sleep(0.01)
        server.kill_all()
        await load

        granted = {body["reservation_id"] for status, body in answered if status == 201}
        statuses = {status for status, _ in answered}
        odd = [b for s, b in answered if s not in (0, 201)][:3]
        assert statuses <= {0, 201}, (statuses, odd)  # answered 201, or never answered at all
        assert len(granted) >= 600

        server.start()
        await server.wait_ready(session)
        con = await asyncpg.connect(settings.database_url)
        try:
            async with asyncio.timeout(30):
                while True:
                    recorded = {
                        r["reservation_id"]
                        for r in await con.fetch("SELECT reservation_id FROM reservations")
                    }
                    if recorded >= granted:
                        break
                    await asyncio.sleep(0.2)
        finally:
            await con.close()
        async with session.get(f"{server.url}/api/v1/admin/rounds/r1/stats", headers=ADMIN) as r:
            stats = await r.json()
        assert stats["loaded"] == stats["remaining"] + stats["reserved"] + stats["collected"]
        assert stats["reservations"] >= len(granted)  # unanswered ones may have been decided too


async def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(server: Server) -> None:
    """The supervisor restarts a worker that died; the other one serves meanwhile."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        server.start(workers=2)
        await server.wait_ready(session)
        before = server.workers()
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        async with asyncio.timeout(20):
            while True:
                now = server.workers()
                if len(now) == 2 and before[0] not in now:
                    break
                await asyncio.sleep(0.1)
        await server.wait_ready(session)
        for _ in range(20):  # both workers answer on the shared port
            async with session.get(f"{server.url}/healthz") as r:
                assert r.status == 200
    assert "exited with -9; restarting" in server.log.read_text()


async def test_a_started_service_imports_nothing_of_the_load_test(server: Server) -> None:
    """The image's own command, started for real (supervisor and two workers): no locust, no
    gevent patching, no matplotlib in any process, whatever is installed next to it."""
    server.env["PYTHONPROFILEIMPORTTIME"] = "1"  # every process lists each module it imports
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        server.start(workers=2)
        await server.wait_ready(session)
        async with asyncio.timeout(30):  # both workers' apps have started (each logs its writer)
            while len(re.findall(r"ledger writer \S+ started", server.log.read_text())) < 2:
                await asyncio.sleep(0.1)
        for path in ("/api/v1/rounds", "/api/v1/rounds/r1/sites", "/", "/api/v1/openapi.json"):
            async with session.get(f"{server.url}{path}") as r:
                assert r.status in (200, 404), path
    server.stop()
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in server.log.read_text().splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    assert {"service.app", "service.views", "aiohttp.web"} <= imported  # the probe works
    roots = {m.split(".")[0] for m in imported}
    assert roots & {"loadtest", "locust", "gevent", "matplotlib"} == set()
