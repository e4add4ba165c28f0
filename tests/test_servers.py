"""The private-server helpers themselves: start, answer, restart, crash, stop."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncpg
import pytest
import redis

from loadtest.cluster import ClusterNodeServer
from loadtest.servers import PrivatePostgres, PrivateRedis, free_port, redis_ping


def test_free_port_is_bindable() -> None:
    """The private servers listen on the port free_port() gives: it must really be free."""
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))  # EADDRINUSE if something listens there
        s.listen()
        assert s.getsockname() == ("127.0.0.1", port)


def _get(url: str, key: str) -> bytes | None:
    with redis.Redis.from_url(url, socket_timeout=2) as r:
        value: bytes | None = r.get(key)
        return value


def test_private_redis_and_a_cluster_node_start_from_a_relative_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """allot loadtest hands its private servers directories under a relative reports path;
    redis-server changes into --dir before it opens --logfile, so a relative path used to
    name a log that did not exist and the node never came up (the kill-redis-primary gate)."""
    monkeypatch.chdir(tmp_path)
    with PrivateRedis(Path("reports/redis")) as srv, redis.Redis.from_url(srv.url) as r:
        assert r.ping() is True
    assert (tmp_path / "reports" / "redis" / "redis.log").exists()
    port, bus = free_port(), free_port()
    while bus == port:
        bus = free_port()
    node = ClusterNodeServer(Path("reports/node0"), port, bus)
    try:
        node.start()
        with redis.Redis(port=node.port, socket_timeout=2) as r:
            assert r.ping() is True
    finally:
        node.stop()


@pytest.mark.slow
def test_private_redis_lifecycle(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "redis", appendonly=True) as srv:
        url = srv.url
        assert url == f"redis://127.0.0.1:{srv.port}/0"
        with redis.Redis.from_url(url, socket_timeout=2) as r:
            assert r.ping() is True
            r.set("k", "v1")

        srv.restart()  # orderly stop, same port, same directory
        assert srv.url == url
        assert _get(url, "k") == b"v1"

        with redis.Redis.from_url(url, socket_timeout=2) as r:
            r.set("k", "v2")
        srv.kill()  # crash: with appendfsync always the acknowledged write survives
        assert not redis_ping(srv.port)
        srv.restart()
        assert _get(url, "k") == b"v2"

        srv.pause()  # hung: the port is open but nothing answers
        assert not redis_ping(srv.port, timeout=0.3)
        srv.resume()
        assert redis_ping(srv.port)

        srv.pause()
        srv.stop()  # stop() copes with a paused server
        assert not srv.running
    assert not redis_ping(srv.port)


@pytest.mark.slow
def test_private_redis_without_appendonly_loses_data_on_restart(tmp_path: Path) -> None:
    srv = PrivateRedis(tmp_path / "redis")
    try:
        srv.start()
        with redis.Redis.from_url(srv.url, socket_timeout=2) as r:
            r.set("k", "v")
        srv.restart()
        assert _get(srv.url, "k") is None
    finally:
        srv.close()
    srv.close()  # idempotent


async def _select_one(url: str) -> int:
    con = await asyncpg.connect(url, timeout=5)
    try:
        value: int = await con.fetchval("SELECT 1")
        return value
    finally:
        await con.close()


@pytest.mark.slow
async def test_private_postgres_lifecycle(tmp_path: Path) -> None:
    pg = PrivatePostgres(tmp_path / "pg")
    try:
        await asyncio.to_thread(pg.start)
        assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        assert pg.url_for("allot_test").endswith(f":{pg.port}/allot_test")
        assert await _select_one(pg.url) == 1

        con = await asyncpg.connect(pg.url, timeout=5)
        try:
            await con.execute("CREATE DATABASE allot_test")
        finally:
            await con.close()
        con = await asyncpg.connect(pg.url_for("allot_test"), timeout=5)
        try:
            await con.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        finally:
            await con.close()

        port = pg.port
        await asyncio.to_thread(pg.restart)  # fast shutdown, same port, same data
        assert pg.port == port
        assert await _select_one(pg.url) == 1

        await asyncio.to_thread(pg.kill)  # crash: the next start runs crash recovery
        assert not pg.running
        await asyncio.to_thread(pg.restart)
        con = await asyncpg.connect(pg.url_for("allot_test"), timeout=5)
        try:
            assert await con.fetchval("SELECT x FROM t") == 42
        finally:
            await con.close()

        await asyncio.to_thread(pg.stop)
        assert not pg.running
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await asyncpg.connect(pg.url, timeout=2)
        base = pg.data_dir.parent
    finally:
        await asyncio.to_thread(pg.close)
    assert not base.exists()  # close() removes its mkdtemp() directory
    assert (tmp_path / "pg" / "postgres.log").is_file()  # logs stay for post-mortems
