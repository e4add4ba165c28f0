"""`allot serve` as a real process tree: workers share the port, and kill -9 loses nothing.

(The ledger writer's own process, under this supervisor and alone: tests/test_writer_process.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from allocator.config import Settings
from tests.helpers import ADMIN
from tests.processes import Server, post, seed_http

pytestmark = pytest.mark.slow


@pytest.fixture
def server(settings: Settings, tmp_path: Path, redis: Redis) -> Iterator[Server]:
    s = Server(settings, tmp_path / "serve.log")
    yield s
    s.stop()


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
    """The image's own command, started for real (supervisor, two workers and the ledger
    writer): no locust, no gevent patching, no matplotlib in any process, whatever is installed
    next to it."""
    server.env["PYTHONPROFILEIMPORTTIME"] = "1"  # every process lists each module it imports
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        server.start(workers=2)
        await server.wait_ready(session)
        async with asyncio.timeout(30):  # both workers' apps and the writer have started
            while len(re.findall(r"worker \d ready", server.log.read_text())) < 2 or not re.search(
                r"ledger writer \S+ started", server.log.read_text()
            ):
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


# -- the operations listener ----------------------------------------------------------------


def listener_owners(port: int, pids: list[int]) -> list[int]:
    """Which of ``pids`` hold a socket listening on ``port`` (from /proc: who owns the fd)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    assert inodes, f"nothing listens on port {port}"
    owners = []
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    owners.append(pid)
                    break
    return owners


async def requests_served(session: aiohttp.ClientSession, server: Server) -> int:
    """Requests the citizens' port has answered, all workers summed (each one is timed)."""
    async with session.get(f"{server.ops_url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("allot_request_duration_seconds_count")
    )


async def scrape_50_at_once_and_count_worker_requests(
    session: aiohttp.ClientSession, server: Server
) -> None:
    """50 concurrent scrapes all answered; then the workers' request count has moved by
    exactly the one citizens' request made afterwards: no scrape ran in a worker."""
    before = await requests_served(session, server)

    async def scrape() -> tuple[int, str]:
        async with session.get(f"{server.ops_url}/metrics") as r:
            return r.status, await r.text()

    answers = await asyncio.gather(*(scrape() for _ in range(50)))
    assert {status for status, _ in answers} == {200}
    for _, text in answers:
        for series in ("allot_request_duration_seconds_bucket", "allot_queue_depth"):
            assert series in text
    async with session.get(f"{server.url}/healthz") as r:
        assert r.status == 200
    async with asyncio.timeout(15):  # /metrics is rendered at most once a second
        while (after := await requests_served(session, server)) == before:
            await asyncio.sleep(0.2)
    assert after == before + 1


async def test_metrics_are_served_by_the_supervisor_and_scrapes_never_reach_a_worker(
    server: Server,
) -> None:
    """One scrape blocked a worker's loop for ~47 ms and 50 scrapers brought 503s: now the
    supervisor alone holds the operations port, and the workers do not see a scrape."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        server.start(workers=2)
        await server.wait_ready(session)
        assert server.proc is not None
        supervisor, workers = server.proc.pid, server.workers()
        assert len(workers) == 2
        everyone = [supervisor, *workers]
        assert listener_owners(server.ops_port, everyone) == [supervisor]
        assert supervisor not in listener_owners(server.port, everyone)  # workers' alone
        async with session.get(f"{server.url}/metrics") as r:
            assert r.status == 404
            assert r.content_type == "application/problem+json"
        for path in ("/healthz", "/readyz"):  # on both ports
            for url in (server.url, server.ops_url):
                async with session.get(url + path) as r:
                    assert r.status == 200, (url, path, await r.text())
        await scrape_50_at_once_and_count_worker_requests(session, server)


async def test_a_single_worker_serves_operations_on_their_own_port(server: Server) -> None:
    """`--workers 1` is supervised too (one worker and the ledger writer): the listener runs
    in the supervisor, off the citizens' loop, with the same answers as with N workers."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        server.start(workers=1)
        await server.wait_ready(session)
        assert server.proc is not None
        assert listener_owners(server.ops_port, [server.proc.pid]) == [server.proc.pid]
        async with session.get(f"{server.url}/metrics") as r:
            assert r.status == 404
        async with session.get(f"{server.ops_url}/readyz") as r:
            assert r.status == 200
        await scrape_50_at_once_and_count_worker_requests(session, server)


async def test_a_taken_operations_port_stops_serve_with_its_reason(server: Server) -> None:
    """Serving on without metrics or readiness would leave on-call blind; say why and stop."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.ops_port))
        taken.listen()
        server.start(workers=2)
        assert server.proc is not None
        code = await asyncio.to_thread(server.proc.wait, 60)
    assert code == 2
    assert "operations listener cannot listen" in server.log.read_text()


# -- what clients send never reaches the log; slow clients are cut off ------------------------

ID, PHONE, GUESS = "11010519491231002X", "13912345678", "guessed-token-5f1e"
JSON_BODY = f'{{"citizen_id": "{ID}", "phone": "{PHONE}", "site_id": "s1"}}'.encode()
POST_HEAD = b"POST /api/v1/rounds/r1/reservations HTTP/1.1\r\nHost: t\r\n"
HOSTILE = [
    # the reported case: chunked framing announced, a plain JSON body sent
    POST_HEAD + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + JSON_BODY,
    # a good first chunk, then garbage where the next chunk size belongs
    POST_HEAD
    + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (len(JSON_BODY), JSON_BODY)
    + b"zz"
    + JSON_BODY
    + b"\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nX Citizen: " + ID.encode() + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nX-Phone: " + PHONE.encode() * 900 + b"\r\n\r\n",
    b"GET /api/v1/admin/rounds/r1/stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    b"Authorization: Bearer " + GUESS.encode() + b"\xff\xfe\r\n\r\n",
    b"GET /api/v1/admin/rounds/r1/stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    b"Authorization: Bearer " + GUESS.encode() + b"\r\n\r\n",
    b"\x16\x03\x01\x00\xa5" + PHONE.encode() + b"\r\n\r\n",
]


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionResetError):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


async def test_nothing_a_client_sends_reaches_the_log_and_slow_clients_are_cut_off(
    server: Server, tmp_path: Path
) -> None:
    """aiohttp logged such a body, ID and phone in clear, with a traceback per request; slow
    heads and bodies stayed open for minutes. Both through a real `allot serve`."""
    config = tmp_path / "allot.toml"
    config.write_text("[service]\nheader_timeout_ms = 500\nbody_timeout_ms = 500\n")
    server.env["ALLOT_CONFIG"] = str(config)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        server.start(workers=2)
        await server.wait_ready(session)
        for _ in range(4):
            for data in HOSTILE:
                answer = await raw_exchange(server.port, data)
                status = int(answer.split(b" ", 2)[1])
                assert status in (400, 401), answer[:200]
                assert b"application/problem+json" in answer
                for secret in (ID, PHONE, GUESS):
                    assert secret.encode() not in answer
        first = await raw_exchange(server.port, HOSTILE[0])
        assert b'"code":"bad-request"' in first
        # a head trickled byte by byte, and a body that never comes
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in POST_HEAD + b"X-Pad: " + b"a" * 10_000:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(10):  # closed, and nothing was answered
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
        finally:
            sender.cancel()
            writer.close()
        late = POST_HEAD + b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{"
        assert b'"code":"request-timeout"' in await raw_exchange(server.port, late)
    server.stop()
    log = server.log.read_text(errors="replace")
    assert "malformed HTTP request" in log  # they are seen...
    assert log.count("malformed HTTP request") <= 6, log  # ...once per 10 s and worker
    for secret in (ID, PHONE, GUESS, "Traceback", JSON_BODY.decode()[:12]):
        assert secret not in log, secret


def test_a_started_worker_freezes_what_it_holds_and_collects_the_young_less_often() -> None:
    """tune_gc (run by each worker once its app has started): what exists then is out of the
    collector's sight, and generation 0 is collected every GC_GEN0 allocations, not 700."""
    import gc

    from service.cli import GC_GEN0, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_GEN0, before[1], before[2])
        assert before[0] < GC_GEN0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
