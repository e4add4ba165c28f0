"""The operations listener: ``/metrics``, ``/healthz`` and ``/readyz`` on ``[service] ops_host``
and ``ops_port`` (127.0.0.1:9180 by default; ``ALLOT_OPS_PORT``, ``ALLOT_OPS_HOST``).

It never runs on a citizens' event loop. It is its own small aiohttp application on its own
event loop, in a thread of

* the **supervisor** of ``allot serve``: ``/metrics`` aggregates the files of every worker and
  of the ledger writer (the multiprocess collector, ~47 ms and 60 KB a render) in the
  supervisor, so a scrape costs the workers nothing at all;
* ``allot ledger`` run alone: it renders that process's registry (``allot_ledger_lag``).

Either way ``/metrics`` is rendered at most once a second: concurrent or repeated scrapes within
that second get the same bytes. ``/readyz`` uses the very handler of the citizens' port on its
own Redis client and PostgreSQL pool, so it checks both for real. The citizens' port keeps
``/healthz`` and ``/readyz`` and answers ``/metrics`` with 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from allocator import db, topology
from allocator.config import ConfigError, Settings
from allocator.errors import Problem
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from service import views
from service.app import http_problem, redis_client, unforeseen
from service.appkeys import ALLOCATOR, SETTINGS
from service.problems import problem_response

log = logging.getLogger("allot.ops")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The listener hashes no ID or phone (it answers only /metrics, /healthz and /readyz), so it
# needs no pepper: `allot ledger` serves it without ALLOT_ID_PEPPER.
OPS_PEPPER = b"the operations listener hashes nothing"


class MetricsCache:
    """The rendered metrics, at most ``max_age`` seconds old, rendered by the first scrape that
    finds them stale. Rendering is synchronous, so scrapes of one loop never render twice."""

    def __init__(
        self,
        render: Callable[[], bytes],
        max_age: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._render = render
        self._max_age = max_age
        self._clock = clock
        self._body = b""
        self._at = float("-inf")
        self.renders = 0

    def get(self) -> bytes:
        if self._clock() - self._at >= self._max_age:
            self._body = self._render()
            self._at = self._clock()
            self.renders += 1
        return self._body


OPS_METRICS = web.AppKey("ops_metrics", MetricsCache)


@web.middleware
async def ops_front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Failures as problem+json, like the citizens' port (without its request metrics)."""
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(problem)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(http_problem(request, exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return unforeseen(request, exc)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPS_METRICS].get(), headers={"Content-Type": CONTENT_TYPE})


def create_ops_app(settings: Settings, render: Callable[[], bytes]) -> web.Application:
    """The operations application. ``render`` returns the Prometheus text to serve."""
    app = web.Application(middlewares=[ops_front])
    app[SETTINGS] = settings
    app[OPS_METRICS] = MetricsCache(render)

    async def stores(app: web.Application) -> AsyncIterator[None]:
        """Its own Redis client and PostgreSQL pool: /readyz checks the stores for real."""
        redis = redis_client(settings)
        pool = await db.create_pool(settings.database_url)
        app[ALLOCATOR] = Allocator(
            redis,
            pool,
            Keys(settings.service.redis_prefix),
            Hasher(OPS_PEPPER),
            timeout=settings.service.redis_timeout_ms / 1000,
            gate=settings.gate,
        )
        yield
        await topology.close_client(redis)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pool.close(), 5)

    app.cleanup_ctx.append(stores)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", views.healthz)
    app.router.add_get("/readyz", views.readyz)
    return app


class OpsListener:
    """The operations app on its own event loop, in a daemon thread of this process.

    ``start()`` returns once the port is bound, or raises what prevented it (a port in use
    must stop ``allot serve`` at once, not leave it running blind).
    """

    def __init__(self, settings: Settings, render: Callable[[], bytes]) -> None:
        self._settings = settings
        self._render = render
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="allot-ops", daemon=True)

    @property
    def address(self) -> str:
        s = self._settings.service
        return f"http://{s.ops_host}:{s.ops_port}"

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the operations listener did not start within {timeout:g} s")
        if isinstance(self._failure, OSError):  # most likely the port is taken
            raise ConfigError(
                f"the operations listener cannot listen on {self.address}: {self._failure}"
                " (set [service] ops_port / ALLOT_OPS_PORT, ops_host / ALLOT_OPS_HOST)"
            ) from self._failure
        if self._failure is not None:
            raise self._failure
        log.info("operations listener on %s (/metrics, /healthz, /readyz)", self.address)

    def stop(self, timeout: float = 10) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        s = self._settings.service
        runner = web.AppRunner(
            create_ops_app(self._settings, self._render), access_log=None, handle_signals=False
        )
        try:
            await runner.setup()
            await web.TCPSite(runner, s.ops_host, s.ops_port).start()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            await runner.cleanup()
            return
        self._stop = asyncio.Event()
        self._loop = loop
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
