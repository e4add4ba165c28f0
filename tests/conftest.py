"""Shared fixtures: real Redis and PostgreSQL, isolated per test.

* Redis: the server at ALLOT_TEST_REDIS_URL (default 127.0.0.1:6379/0); every test gets its own
  key prefix and deletes only keys under it afterwards.
* PostgreSQL: the server at ALLOT_TEST_DATABASE_URL; the session migrates one template
  database, every test gets a fresh copy of it, and each is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from allocator import db
from allocator.config import Settings, load_settings
from allocator.keys import Keys
from loadtest.cluster import PrivateCluster
from service import logsafe
from service.app import create_app
from service.appkeys import METRICS
from service.ops import create_ops_app
from tests.helpers import (  # noqa: F401  (re-exported: older tests import them from here)
    ADMIN,
    ADMIN_TOKEN,
    PG_URL,
    REDIS_URL,
    FakeClock,
    citizen_id,
    phone,
    reserve,
    round_body,
    seed,
    tz8,
)
from tests.openapi_check import ContractCheck

hypothesis_settings.register_profile(
    "allot",
    deadline=None,
    max_examples=40,
    stateful_step_count=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
hypothesis_settings.register_profile(
    "allot-long", parent=hypothesis_settings.get_profile("allot"), max_examples=300
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "allot"))


# -- the package as shipped -----------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """allot's wheel, built once per session from this checkout (offline, no build isolation)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(Path(__file__).resolve().parent.parent)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    [built] = out.glob("allot-*.whl")
    return built


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"allot_test_tmpl_{uuid.uuid4().hex[:10]}"
    asyncio.run(db.migrate(db.with_database(PG_URL, name)))
    yield name
    asyncio.run(_drop(name))


async def _drop(name: str) -> None:
    con = await asyncpg.connect(PG_URL)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


@pytest.fixture
async def database_url(pg_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test only."""
    name = f"allot_test_{uuid.uuid4().hex[:12]}"
    con = await asyncpg.connect(PG_URL)
    try:
        await con.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    finally:
        await con.close()
    yield db.with_database(PG_URL, name)
    await _drop(name)


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(database_url)
    yield con
    await con.close()


# -- Redis --------------------------------------------------------------------------------


@pytest.fixture
def redis_prefix() -> str:
    return f"allot-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis(redis_prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """A Redis Cluster of our own (3 primaries, 3 replicas, free ports; ~3 s to start), shared
    by the session's cluster tests (tests/test_cluster.py). A test that kills or fails over a
    node leaves it healthy again (``wait_healthy``)."""
    with PrivateCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def keys(redis_prefix: str) -> Keys:
    return Keys(redis_prefix)


# -- the service --------------------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, redis_prefix: str) -> Settings:
    base = load_settings(environ={})
    return replace(
        base,
        redis_url=REDIS_URL,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        id_pepper="test-pepper",
        # Every test request comes from 127.0.0.1: wide-open buckets here, so that tests of
        # the invariants see every claim decided; tests/test_gate.py uses the real defaults,
        # tests/test_auth_throttle.py the real limit of failed operator tokens.
        service=replace(
            base.service,
            redis_prefix=redis_prefix,
            redis_timeout_ms=2000,
            auth_failures_per_minute=10**6,
        ),
        gate=replace(
            base.gate,
            global_rate=1e6,
            global_burst=10**6,
            client_rate=1e6,
            client_burst=10**6,
            citizen_rate=1e6,
            citizen_burst=10**6,
        ),
    )


@pytest.fixture
async def client(
    settings: Settings, redis: Redis, aiohttp_client: AiohttpClient
) -> TestClient[Any, Any]:
    """The real application (ledger writer included) on a real socket.

    ``settings`` and ``redis`` come first, so they are torn down after the app has stopped."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def clock() -> FakeClock:
    """The monotonic clock of ``clocked_client``'s caches, sold-out board and breaker."""
    return FakeClock()


@pytest.fixture
async def clocked_client(
    settings: Settings, redis: Redis, aiohttp_client: AiohttpClient, clock: FakeClock
) -> TestClient[Any, Any]:
    """As ``client``, with time standing still until the test calls ``clock.advance()``."""
    return await aiohttp_client(create_app(settings, monotonic=clock))


@pytest.fixture
def contract() -> Iterator[ContractCheck]:
    """Answers received by a ``checked_client`` that the served OpenAPI document does not allow
    (tests/openapi_check.py); the test fails at teardown if there are any."""
    check = ContractCheck()
    yield check
    check.assert_clean()


@pytest.fixture
def checked_client(
    aiohttp_client: Any, contract: ContractCheck
) -> Callable[[web.Application], Awaitable[TestClient[Any, Any]]]:
    """Makes a test client whose every answer is checked against the document the app serves."""

    async def make(app: web.Application) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(app, middlewares=(contract.middleware,))
        await contract.load(client)
        return client

    return make


@pytest.fixture
async def ops(
    client: TestClient[Any, Any], settings: Settings, aiohttp_client: AiohttpClient
) -> TestClient[Any, Any]:
    """The operations listener of the app behind ``client``, on its own port as in
    `allot serve` (its own Redis client and PostgreSQL pool, that app's metrics)."""
    return await aiohttp_client(create_ops_app(settings, client.app[METRICS].render))


@pytest.fixture
def safe_aiohttp_logs() -> Iterator[None]:
    """aiohttp's loggers filtered as `allot serve` does (service/logsafe.py), for this test
    only: the filter is process-wide, and other tests read aiohttp's access log."""
    logsafe.install()
    yield
    for name in logsafe.AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, logsafe.AiohttpLogFilter)]:
            logger.removeFilter(f)


@pytest.fixture(autouse=True)
async def _fail_on_unretrieved_task_exceptions() -> AsyncIterator[None]:
    """Any 'Task exception was never retrieved' fails the test that caused it."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        seen.append(context)
        lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    yield
    loop.set_exception_handler(previous)
    assert not seen, f"unhandled exceptions in the event loop: {seen}"
