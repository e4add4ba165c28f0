"""The application factory and the one middleware that turns every failure into problem+json."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import hdrs, web
from redis.asyncio import Redis

from allocator import db, topology
from allocator.admission import AdmissionQueue
from allocator.config import Settings
from allocator.desk import DeskTokens
from allocator.errors import NotFound, Problem, Unavailable
from allocator.facade import Allocator
from allocator.identity import Hasher
from allocator.keys import Keys
from allocator.ledger import LedgerWriter, consumer_name
from allocator.redistyping import awaited
from allocator.rules import ID_REGEX
from allocator.throttle import FailureThrottle
from service import pages
from service.appkeys import (
    ADMISSION,
    ALLOCATOR,
    AUTH_THROTTLE,
    DESK_TOKENS,
    LEDGER,
    METRICS,
    PG_POOL,
    REDIS,
    SETTINGS,
    SITE_FEEDS,
    TRUSTED_PROXIES,
)
from service.client import Network
from service.desk_views import routes as desk_routes
from service.feeds import feed_cache
from service.metrics import LedgerMetrics, Metrics
from service.problems import BadRequest, MethodNotAllowed, PayloadTooLarge, problem_response
from service.validation import CSV_LIMIT
from service.views import citizen_entry, citizen_reservation, ready_problem, routes

log = logging.getLogger("allot.service")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer timed; every failure as problem+json.

    Domain errors, aiohttp's own HTTP errors and anything unforeseen become problem+json.
    Nothing escapes as a bare 500 or a stack trace: an unforeseen error is logged with its trace
    and answered 503 ``unavailable`` with Retry-After, the one 5xx the contract allows.
    (One middleware, not two: each adds a frame and a wrapper to every waiting request.)
    """
    started = time.perf_counter()
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem_response(problem)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # a redirect or 304 Not Modified is an answer, not a failure
        response = problem_response(http_problem(request, exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        response = unforeseen(request, exc)
    request.app[METRICS].observe_request(
        route_name(request), response.status, time.perf_counter() - started
    )
    return response


# The hot route's path, as the router would match it: only this exact form (no query, no
# percent-escapes, a well-formed round id) is taken by HotRoutes; anything else, including
# every malformed variant, goes the ordinary way and is answered as before.
RESERVATIONS = "/api/v1/rounds/{round_id}/reservations"
ENTRIES = "/api/v1/rounds/{round_id}/entries"
_HOT_PATH = re.compile(rf"/api/v1/rounds/({ID_REGEX})/(reservations|entries)", re.ASCII)


class HotRoutes:
    """The application's request handler, with the reservation route served beneath the web
    layer; every other request goes to aiohttp's own handler (routing, then ``front``).

    A POST to ``/api/v1/rounds/{round_id}/reservations`` is the one request a flash crowd
    sends, and its cost per request decides the front door's throughput (docs/performance.md,
    "A lean worker"). aiohttp's web layer spends a sizeable share of it before and around the
    handler: resolving the route (resources are tried in turn), freezing the match, building
    the middleware chain's partials, a frame per middleware. This answers that one route
    directly: :func:`service.views.citizen_reservation` with what it needs bound once, wrapped
    in the same failure handling and timing as ``front``, so every answer, header and metric is
    the one the routed path gives (the contract tests run through here).

    It replaces ``Application._handle`` on this application's instance (aiohttp builds its
    ``Server`` from that bound method in ``Application._make_handler``, for every runner: the
    test server, ``web.run_app`` and service/http.py's GuardedRunner alike). pyproject.toml pins
    aiohttp's minor version; tests/test_reserve_api.py checks the route is served from here.
    """

    __slots__ = ("_admission", "_allocator", "_handle", "_metrics", "_trusted")

    def __init__(self, handle: Handler) -> None:
        self._handle = handle  # the application's own request handler
        self._allocator: Allocator | None = None
        self._admission: AdmissionQueue | None = None
        self._metrics: Metrics | None = None
        self._trusted: tuple[Network, ...] = ()

    def bind(
        self,
        allocator: Allocator,
        admission: AdmissionQueue,
        metrics: Metrics,
        trusted: tuple[Network, ...],
    ) -> None:
        """Serve the hot route with these (from the application's startup on)."""
        self._allocator = allocator
        self._admission = admission
        self._metrics = metrics
        self._trusted = trusted

    @property
    def serving(self) -> bool:
        return self._admission is not None

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        admission = self._admission
        if request.method == "POST" and admission is not None:
            found = _HOT_PATH.fullmatch(request.raw_path)
            if found is not None and hdrs.EXPECT not in request.headers:
                allocator, metrics = self._allocator, self._metrics
                assert allocator is not None  # bind() sets all three together
                assert metrics is not None
                if found.group(2) == "entries":
                    answer = citizen_entry(
                        request, found.group(1), allocator, admission, self._trusted
                    )
                    return await self._front(request, ENTRIES, answer, metrics)
                answer = citizen_reservation(
                    request, found.group(1), allocator, admission, metrics, self._trusted
                )
                return await self._front(request, RESERVATIONS, answer, metrics)
        return await self._handle(request)

    @staticmethod
    async def _front(
        request: web.Request,
        route: str,
        answer: Coroutine[Any, Any, web.StreamResponse],
        metrics: Metrics,
    ) -> web.StreamResponse:
        """``front`` around a hot route's handler (its coroutine, not yet started), the
        route's pattern known beforehand."""
        started = time.perf_counter()
        try:
            response = await answer
        except Problem as problem:
            response = ready_problem(problem)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = problem_response(http_problem(request, exc, route))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            response = unforeseen(request, exc, route)
        metrics.observe_request(route, response.status, time.perf_counter() - started)
        return response


def route_name(request: web.Request) -> str:
    """The route's pattern (``/api/v1/reservations/{reservation_id}``), never the path itself:
    a path can hold a reservation_id, the citizen's only key to a reservation."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def unforeseen(request: web.Request, exc: Exception, route: str | None = None) -> web.Response:
    """An error nobody foresaw: logged with its trace (not the path), answered 503. Except
    the client hanging up mid-request: nobody is left to answer, and nothing is wrong here.
    ``route``: the route's pattern, when the request was not routed by the router (HotRoutes)."""
    if isinstance(exc, ConnectionResetError) and request.transport is None:
        return problem_response(BadRequest("The connection closed before the request was read."))
    log.exception("unhandled error for %s %s", request.method, route or route_name(request))
    return problem_response(Unavailable("Something went wrong on our side; please try again."))


def http_problem(request: web.Request, exc: web.HTTPException, route: str | None = None) -> Problem:
    """aiohttp's own refusals (no route, wrong method, body too large) in the contract's terms."""
    if exc.status == 404:
        return NotFound(f"Nothing is at {request.path}.")
    if exc.status == 405:
        return MethodNotAllowed(
            f"{request.method} is not allowed here.", allow=exc.headers.get("Allow", "")
        )
    if exc.status == 413:
        return PayloadTooLarge("The body is too large.")
    log.warning(
        "HTTP %s for %s %s: %s",
        exc.status,
        request.method,
        route or route_name(request),
        exc.reason,
    )
    return Unavailable(exc.reason or "Please try again.")


def redis_client(settings: Settings) -> Redis:
    """The worker's Redis client, single or cluster (allocator/topology.py)."""
    return topology.redis_client(settings)


def create_app(
    settings: Settings,
    *,
    worker: int = 0,
    run_ledger: bool = True,
    monotonic: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The application; ``monotonic`` is the clock of its caches, sold-out board and breaker.

    ``run_ledger`` runs a ledger writer inside the application, for tests and for embedding it
    alone. ``allot serve`` passes False: its writer is a process of its own (service/writer.py),
    which keeps the drain off the workers' loops."""
    app = web.Application(
        middlewares=[front],
        client_max_size=CSV_LIMIT + 1,
        # Bodies are decoded by service.validation.read_body, which stops inflating at the size
        # limit; aiohttp's own decoding would inflate a gzip bomb in full (also while it drains
        # an unread body after the answer) and raise a 503 on a body that does not decode.
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[TRUSTED_PROXIES] = settings.gate.trusted_networks()
    app[METRICS] = Metrics()
    hot = HotRoutes(app._handle)
    object.__setattr__(app, "_handle", hot)  # see HotRoutes; a plain setattr warns in dev mode
    app[SITE_FEEDS] = feed_cache(monotonic)
    hasher = Hasher(settings.pepper_bytes)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client = redis_client(settings)
        app[REDIS] = client
        try:
            await asyncio.wait_for(awaited(client.ping()), 2)
        except Exception as exc:
            log.warning(
                "redis at startup: %s: %s; serving 503 until it answers", type(exc).__name__, exc
            )
        yield
        await topology.close_client(client)

    async def pg_ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await db.create_pool(settings.database_url)
        app[PG_POOL] = pool
        yield
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pool.close(), 5)

    async def allocator_ctx(app: web.Application) -> AsyncIterator[None]:
        allocator = Allocator(
            app[REDIS],
            app[PG_POOL],
            Keys(settings.service.redis_prefix),
            hasher,
            timeout=settings.service.redis_timeout_ms / 1000,
            gate=settings.gate,
            monotonic=monotonic,
            draw_key=settings.draw_key,
            database_url=settings.database_url,
            wait_replicas=settings.redis.wait_replicas,
            wait_timeout_ms=settings.redis.wait_timeout_ms,
        )
        app[ALLOCATOR] = allocator
        app[AUTH_THROTTLE] = FailureThrottle(
            allocator, limit=settings.service.auth_failures_per_minute, window=60.0
        )
        desks = DeskTokens(
            app[REDIS],
            allocator.keys,
            redis_call=allocator.store.redis_call,
            pg=allocator.store.pg,
            monotonic=monotonic,
        )
        app[DESK_TOKENS] = desks
        queue = AdmissionQueue(allocator, settings.queue, on_depth=app[METRICS].set_queue_depth)
        app[ADMISSION] = queue
        hot.bind(allocator, queue, app[METRICS], app[TRUSTED_PROXIES])
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(queue.run(), name="admission-dispatcher"),
            asyncio.create_task(allocator.follow_stock_events(stop), name="stock-events"),
            asyncio.create_task(allocator.loop_lag.run(), name="loop-lag"),
            asyncio.create_task(allocator.watch_integrity(stop), name="integrity"),
            asyncio.create_task(desks.follow(stop), name="desk-events"),
            asyncio.create_task(allocator.asks.run(stop), name="fairness-asks"),
            asyncio.create_task(
                allocator.run_expiry(stop, settings.service.expiry_sweep_ms / 1000),
                name="expiry-sweep",
            ),
            asyncio.create_task(allocator.watch_lottery(stop), name="lottery"),
        ]
        yield
        stop.set()
        allocator.lottery.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
        writer = LedgerWriter(
            app[REDIS],
            app[PG_POOL],
            Keys(settings.service.redis_prefix),
            settings.ledger,
            consumer=f"{consumer_name(settings.ledger.consumer)}-w{worker}",
            on_lag=LedgerMetrics(app[METRICS].registry).ledger_lag.set,
            floors=app[ALLOCATOR].floors,
            wait_replicas=settings.redis.wait_replicas,
            wait_timeout_ms=settings.redis.wait_timeout_ms,
        )
        app[LEDGER] = writer
        task = asyncio.create_task(writer.run(), name="ledger-writer")
        yield
        writer.stop()
        try:
            await asyncio.wait_for(task, 5)
        except TimeoutError:
            log.warning("ledger writer did not stop within 5 s; cancelled")

    app.cleanup_ctx.extend([redis_ctx, pg_ctx, allocator_ctx])
    if run_ledger:
        app.cleanup_ctx.append(ledger_ctx)
    app.add_routes(routes)
    app.add_routes(desk_routes)
    app.add_routes(pages.routes)
    return app
