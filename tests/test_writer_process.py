"""The ledger writer in its own process, under `allot serve`'s supervisor and as `allot ledger`.

Each of the ledger's promises, held by the real process: a 201 is in PostgreSQL within 5 s;
kill -9 of the writer under load loses nothing and its replacement, under the same consumer
name, commits what it had read; a writer killed for good is taken over by another after
``claim_idle_ms``; an entry PostgreSQL keeps refusing goes to the dead letters; its lag reaches
the supervisor's /metrics. (PostgreSQL down and back: tests/test_faults.py.)

PostgreSQL is made to hold the writer up, deterministically, by a transaction of the test that
locks ``reservations`` in SHARE mode: reads go on, the writer's INSERT waits, and the entries it
read stay pending in the consumer group until the lock goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.keys import Keys
from allocator.ledger import GROUP
from service.app import create_app
from tests.helpers import ADMIN, reserve, seed
from tests.processes import Server, Writer, config_file, post, seed_http

pytestmark = pytest.mark.slow


@pytest.fixture
def server(settings: Settings, tmp_path: Path, redis: Redis) -> Iterator[Server]:
    s = Server(settings, tmp_path / "serve.log")
    yield s
    s.stop()


@pytest.fixture
def writers(settings: Settings, tmp_path: Path, redis: Redis) -> Iterator[list[Writer]]:
    """`allot ledger` processes the test starts; each is stopped afterwards."""
    started: list[Writer] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture
async def workers(aiohttp_client: Any, settings: Settings, redis: Redis) -> TestClient[Any, Any]:
    """The citizens' application without a writer of its own, as `allot serve` runs it."""
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings, run_ledger=False))
    await seed(client, stock={"s1": 500})
    return client


@contextlib.asynccontextmanager
async def writes_held(database_url: str) -> AsyncIterator[None]:
    """Until the block ends, the writer's INSERT waits (reads of the ledger go on)."""
    con = await asyncpg.connect(database_url)
    tx = con.transaction()
    await tx.start()
    try:
        await con.execute("LOCK TABLE reservations IN SHARE MODE")
        yield
    finally:
        await tx.rollback()
        await con.close()


async def recorded(database_url: str) -> set[str]:
    con = await asyncpg.connect(database_url)
    try:
        rows = await con.fetch("SELECT reservation_id FROM reservations")
        return {r["reservation_id"] for r in rows}
    finally:
        await con.close()


async def all_recorded(database_url: str, wanted: set[str], within: float) -> None:
    async with asyncio.timeout(within):
        while not wanted <= await recorded(database_url):
            await asyncio.sleep(0.1)


async def pending_of(redis: Redis, stream: str) -> dict[str, int]:
    """consumer name -> entries delivered to it and not yet acknowledged."""
    return {
        c["name"].decode(): int(c["pending"]) for c in await redis.xinfo_consumers(stream, GROUP)
    }


async def until_pending(redis: Redis, stream: str, consumer: str, within: float = 20) -> int:
    async with asyncio.timeout(within):
        while not (n := (await pending_of(redis, stream)).get(consumer, 0)):
            await asyncio.sleep(0.05)
    return n


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float | None:
    async with session.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


async def test_service_ledger_writer_records_within_five_seconds(
    server: Server, settings: Settings
) -> None:
    """Inside `allot serve`, a reservation answered 201 is in PostgreSQL within 5 s."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        server.start(workers=1)
        await server.wait_ready(session)
        await seed_http(session, server.url, 5)
        status, body = await post(session, server.url, 1)
        assert status == 201
        rid = body["reservation_id"]
        con = await asyncpg.connect(settings.database_url)
        try:
            async with asyncio.timeout(5):
                while not await con.fetchval(
                    "SELECT 1 FROM reservations WHERE reservation_id = $1", rid
                ):
                    await asyncio.sleep(0.05)
        finally:
            await con.close()


async def test_serve_runs_one_writer_beside_its_workers_and_its_lag_reaches_the_metrics(
    server: Server, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """`--workers 2`: two workers and one writer process; no worker consumes the stream; the
    writer's allot_ledger_lag is in the supervisor's /metrics and follows the backlog."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        server.start(workers=2)
        await server.wait_ready(session)
        assert len(server.workers()) == 2
        assert server.writer() is not None
        await seed_http(session, server.url, 50)
        stream = keys.round("r1").ledger
        async with writes_held(settings.database_url):
            answers = await asyncio.gather(*(post(session, server.url, n) for n in range(10)))
            assert {s for s, _ in answers} == {201}
            async with asyncio.timeout(15):  # the ten reservations wait, at least
                while (await metric(session, server.ops_url, "allot_ledger_lag") or 0) < 10:
                    await asyncio.sleep(0.2)
        await all_recorded(settings.database_url, {b["reservation_id"] for _, b in answers}, 30)
        async with asyncio.timeout(15):
            while await metric(session, server.ops_url, "allot_ledger_lag") != 0:
                await asyncio.sleep(0.2)
        assert list(await pending_of(redis, stream)) == [f"{socket.gethostname()}-ledger"]
        async with session.get(f"{server.url}/api/v1/admin/rounds/r1/stats", headers=ADMIN) as r:
            stats = await r.json()
        assert stats["ledger"] == {"recorded": 10, "lag": 0}
        for url in (server.url, server.ops_url):
            async with session.get(f"{url}/readyz") as r:
                assert r.status == 200


async def test_kill_9_of_the_writer_under_load_loses_nothing_and_its_successor_commits_it(
    server: Server, settings: Settings, redis: Redis, keys: Keys, tmp_path: Path
) -> None:
    """The writer dies holding entries it read but never committed; the supervisor restarts it
    under the same consumer name, and it commits them. No takeover is possible here
    (claim_idle_ms is an hour): only the successor's re-read of its own pending entries can."""
    server.env.update(config_file(tmp_path / "allot.toml", "[ledger]\nclaim_idle_ms = 3600000\n"))
    server.env["ALLOT_LEDGER_CONSUMER"] = "the-writer"
    stream = keys.round("r1").ledger
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        server.start(workers=1)
        await server.wait_ready(session)
        await seed_http(session, server.url, 5000)
        answered: list[tuple[int, Any]] = []

        async def crowd(numbers: range) -> None:
            for start in range(numbers.start, numbers.stop, 50):
                batch = range(start, min(start + 50, numbers.stop))
                got = await asyncio.gather(*(post(session, server.url, n) for n in batch))
                answered.extend(got)

        async with writes_held(settings.database_url):
            load = asyncio.create_task(crowd(range(0, 1500)))
            held = await until_pending(redis, stream, "the-writer")
            victim = server.writer()
            assert victim is not None
            os.kill(victim, signal.SIGKILL)  # under load, holding `held` entries
            async with asyncio.timeout(20):
                while (successor := server.writer()) in (None, victim):
                    await asyncio.sleep(0.05)
            await load
        granted = {b["reservation_id"] for s, b in answered if s == 201}
        assert {s for s, _ in answered} == {201}  # the workers never noticed
        assert held > 0
        await all_recorded(settings.database_url, granted, 30)
    assert len(granted) == 1500
    async with asyncio.timeout(10):
        while await redis.xlen(stream):
            await asyncio.sleep(0.05)
    assert await pending_of(redis, stream) == {"the-writer": 0}  # nobody else ever consumed
    assert f"ledger writer (pid {victim}) exited with -9; restarting" in server.text()
    assert f"ledger writer the-writer started (pid {successor})" in server.text()


async def test_a_writer_killed_for_good_is_taken_over_by_another_after_claim_idle_ms(
    workers: TestClient[Any, Any],
    writers: list[Writer],
    settings: Settings,
    redis: Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """Two `allot ledger` under their own names: the first dies (kill -9) holding entries and
    never comes back; the second takes them over with XAUTOCLAIM once they idled past
    claim_idle_ms, and commits them. The first serves allot_ledger_lag on its own port."""
    env = config_file(tmp_path / "allot.toml", "[ledger]\nclaim_idle_ms = 1000\n")
    first = Writer(settings, tmp_path / "first.log", **env)
    second = Writer(settings, tmp_path / "second.log", **env)
    writers.extend([first, second])
    stream = keys.round("r1").ledger
    async with writes_held(settings.database_url):
        answers = [await reserve(workers, n) for n in range(40)]
        assert {a.status for a in answers} == {201}
        first.start("--consumer", "first", ops=True)  # its first read takes every entry
        held = await until_pending(redis, stream, "first")
        async with aiohttp.ClientSession() as session, asyncio.timeout(15):
            url = f"http://127.0.0.1:{first.ops_port}"
            while (await metric(session, url, "allot_ledger_lag") or 0) < 41:
                await asyncio.sleep(0.2)
        first.kill()
        second.start("--consumer", "second")
        await second.wait_started()
    granted = {(await a.json())["reservation_id"] for a in answers}
    await all_recorded(settings.database_url, granted, 30)
    async with asyncio.timeout(10):
        while await redis.xlen(stream):
            await asyncio.sleep(0.05)
    assert held == 41  # the batch entry and the 40 reservations, all read by the first
    assert await pending_of(redis, stream) == {"first": 0, "second": 0}
    assert "ledger writer second took over" in second.text()


async def test_an_entry_postgres_keeps_refusing_goes_to_the_dead_letters_and_the_rest_commit(
    workers: TestClient[Any, Any],
    writers: list[Writer],
    settings: Settings,
    redis: Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """One bad entry in the middle of the stream: `allot ledger` commits the others, moves it
    to the round's dead-letter stream after max_attempts, logs it, and goes on writing."""
    rk = keys.round("r1")
    ids = [(await (await reserve(workers, n)).json())["reservation_id"] for n in range(3)]
    bad = orjson.loads((await redis.xrange(rk.ledger))[-1][1][b"record"])
    bad.update(id="bad-entry", qty=0, code="ZZZZZZZZ")  # violates CHECK (quantity >= 1)
    await redis.xadd(rk.ledger, {"kind": "reservation", "record": orjson.dumps(bad)})
    ids += [(await (await reserve(workers, n)).json())["reservation_id"] for n in range(10, 12)]
    w = Writer(
        settings,
        tmp_path / "ledger.log",
        **config_file(tmp_path / "allot.toml", "[ledger]\nmax_attempts = 3\n"),
    )
    writers.append(w)
    w.start()
    await all_recorded(settings.database_url, set(ids), 30)
    async with asyncio.timeout(30):
        while not await redis.xlen(rk.dead):
            await asyncio.sleep(0.1)
    [(_, dead)] = await redis.xrange(rk.dead)
    assert orjson.loads(dead[b"record"])["id"] == "bad-entry"
    assert b"quantity" in dead[b"error"]
    assert "moved to" in w.text()
    later = (await (await reserve(workers, 20)).json())["reservation_id"]
    await all_recorded(settings.database_url, {later}, 10)  # it goes on writing
    assert await recorded(settings.database_url) == {*ids, later}


async def test_a_stopped_service_leaves_nothing_in_the_stream(
    server: Server, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """SIGTERM: the workers stop first, then the writer commits what is left, more than the
    batch it holds: it was held up until the moment it was told to stop."""
    stream = keys.round("r1").ledger
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        server.start(workers=2)
        await server.wait_ready(session)
        await seed_http(session, server.url, 1000)
        async with writes_held(settings.database_url):
            answers = []
            for start in range(0, 700, 100):  # more than one batch (batch_size 500)
                numbers = range(start, start + 100)
                answers += await asyncio.gather(*(post(session, server.url, n) for n in numbers))
            assert {s for s, _ in answers} == {201}
            await until_pending(redis, stream, f"{socket.gethostname()}-ledger")
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                while "stopping the ledger writer" not in server.text():
                    await asyncio.sleep(0.05)
        code = await asyncio.to_thread(server.proc.wait, 30)
    assert code == 0
    assert await redis.xlen(stream) == 0
    assert await recorded(settings.database_url) == {b["reservation_id"] for _, b in answers}


async def test_serve_without_a_writer_leaves_the_stream_to_allot_ledger(
    server: Server, writers: list[Writer], settings: Settings, tmp_path: Path
) -> None:
    """`allot serve --no-ledger` starts no writer; the entries wait until `allot ledger` runs."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        server.start(1, "--no-ledger")
        await server.wait_ready(session)
        assert server.writer() is None
        assert len(server.workers()) == 1
        await seed_http(session, server.url, 50)
        answers = await asyncio.gather(*(post(session, server.url, n) for n in range(5)))
        assert await metric(session, server.ops_url, "allot_ledger_lag") is None
    await asyncio.sleep(1)  # nothing would write them
    assert await recorded(settings.database_url) == set()
    w = Writer(settings, tmp_path / "ledger.log")
    writers.append(w)
    w.start()
    await all_recorded(settings.database_url, {b["reservation_id"] for _, b in answers}, 10)
