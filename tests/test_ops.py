"""The operations listener in-process (service/ops.py).

The listener as `allot serve` runs it (in the supervisor, scrapes off every worker) is tested
in tests/test_serve.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from allocator.config import ConfigError, Settings, load_settings
from service.ops import MetricsCache, create_ops_app
from tests.helpers import ADMIN

Client = TestClient[Any, Any]


def test_metrics_are_rendered_at_most_once_a_second() -> None:
    """A render costs ~47 ms with several workers; 50 scrapers must not cost 50 renders."""
    now = [100.0]
    renders: list[float] = []

    def render() -> bytes:
        renders.append(now[0])
        return f"# rendered at {now[0]}\n".encode()

    cache = MetricsCache(render, max_age=1.0, clock=lambda: now[0])
    first = cache.get()
    for _ in range(50):
        assert cache.get() == first
    now[0] += 0.999
    assert cache.get() == first
    now[0] += 0.002
    assert cache.get() != first
    assert renders == [100.0, pytest.approx(101.001)]


async def test_ops_readiness_checks_redis_for_real(
    settings: Settings, redis: Redis, aiohttp_client: Any
) -> None:
    """/readyz on the operations port must say 503 when Redis is gone, not just 'running'."""
    gone = replace(
        settings,
        redis_url="redis://127.0.0.1:1/0",
        service=replace(settings.service, redis_timeout_ms=300),
    )
    ops: Client = await aiohttp_client(create_ops_app(gone, lambda: b""))
    r = await ops.get("/readyz")
    assert r.status == 503
    assert r.content_type == "application/problem+json"
    assert (await r.json())["code"] == "unavailable"
    assert int(r.headers["Retry-After"]) >= 1
    assert (await ops.get("/healthz")).status == 200  # the process itself runs


async def test_the_console_reads_the_queue_depth_without_metrics(client: Client) -> None:
    """The console used to parse /metrics; it now asks this one operator endpoint."""
    r = await client.get("/api/v1/admin/queue", headers=ADMIN)
    assert r.status == 200
    assert await r.json() == {"queue_depth": 0.0}
    assert (await client.get("/api/v1/admin/queue")).status == 401


def test_the_operations_address_comes_from_the_environment() -> None:
    """The compose file publishes the port: ALLOT_OPS_HOST/PORT set it without a config file."""
    s = load_settings(environ={"ALLOT_OPS_PORT": "9999", "ALLOT_OPS_HOST": "10.0.0.5"})
    assert (s.service.ops_host, s.service.ops_port) == ("10.0.0.5", 9999)
    assert (Settings().service.ops_host, Settings().service.ops_port) == ("127.0.0.1", 9180)
    with pytest.raises(ConfigError, match="ALLOT_OPS_PORT"):
        load_settings(environ={"ALLOT_OPS_PORT": "metrics"})
