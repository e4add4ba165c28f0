"""The ``allot`` command: serve, ledger, migrate, demo, reconcile, rebuild, draw, verify-draw."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import gc
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any

import orjson

from allocator import db, topology
from allocator.config import ConfigError, Settings, load_settings
from allocator.keys import Keys

log = logging.getLogger("allot.cli")

GC_GEN0 = 50_000  # allocations between two collections of the youngest generation (default 700)
PR_SET_NAME = 15  # prctl(2): the calling thread's name, which for the main thread is the comm


def setup_logging(level: str = "INFO") -> None:
    from service import logsafe

    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    logsafe.install()  # aiohttp's own lines: never what a client sent, never a flood


# -- serve ----------------------------------------------------------------------------------


def name_process(name: str) -> None:
    """Show ``name`` (at most 15 bytes) as this process's name in ps, top and /proc/<pid>/comm,
    so that on-call can tell the workers and the ledger writer apart. Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def tune_gc() -> None:
    """Once the worker has started: everything it holds from then on (modules, the app, its
    caches) moves to a permanent generation the collector no longer walks, and the youngest
    generation is collected after GC_GEN0 allocations instead of 700. A request allocates a few
    hundred tracked objects and frees nearly all of them by reference counting, so at 700 the
    collector ran every few requests and walked the young survivors each time. The threshold
    bounds what cyclic garbage can pile up between collections; the 10,000-request queue check
    of bench/run.py measures the memory. Measured (docs/performance.md): worker CPU per
    reservation -4 to -7 %, RSS unchanged."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)


def run_worker(settings: Settings, host: str, port: int, worker: int, reuse_port: bool) -> None:
    """One worker process: its own uvloop event loop and pools, no ledger writer (that is a
    process of its own, service/writer.py). The supervisor serves its metrics."""
    import uvloop

    from allocator.identity import Hasher
    from service import http
    from service.app import create_app

    setup_logging()
    name_process(f"allot-w{worker}")
    app = create_app(settings, worker=worker, run_ledger=False)

    async def started(_app: object) -> None:
        tune_gc()
        log.info("worker %d ready (pid %d)", worker, os.getpid())

    app.on_startup.append(started)
    hasher = Hasher(settings.pepper_bytes)
    guard = http.ConnectionGuard(http.Limits.from_settings(settings), hasher.client)
    http.serve(
        app,
        guard,
        host=host,
        port=port,
        reuse_port=reuse_port,
        loop=uvloop.new_event_loop(),
        shutdown_timeout=5,
        backlog=4096,  # a flash crowd connects at once; 128 overflows, clients retry in 1-3 s
    )


def run_ledger_writer(settings: Settings, consumer: str) -> None:
    """The supervised ledger writer (service/writer.py)."""
    from service import writer

    writer.run(settings, consumer, child=True)


@dataclass
class _Child:
    """One supervised process slot: a worker, or the ledger writer."""

    label: str  # for the log: "worker 0", "ledger writer"
    name: str  # the process's name: allot-w0, allot-ledger
    target: Callable[..., None]
    args: tuple[Any, ...]
    process: Any = None
    started: float = float("-inf")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


def supervise(settings: Settings, host: str, port: int, workers: int, *, ledger: bool) -> int:
    """Run N workers on one port (SO_REUSEPORT) and, with ``ledger``, the ledger writer; restart
    any of them that dies. The supervisor serves the operations listener (aggregated /metrics,
    /healthz, /readyz) in a thread. On SIGTERM or SIGINT the workers stop first, then the
    writer, which commits what they wrote last."""
    from allocator.ledger import consumer_name
    from service.metrics import render_multiprocess
    from service.ops import OpsListener

    ctx = multiprocessing.get_context("spawn")
    metrics_dir = tempfile.mkdtemp(prefix="allot-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the spawned processes
    listener = OpsListener(settings, lambda: render_multiprocess(metrics_dir))
    listener.start()  # before any worker: a port in use stops the start here
    stopping = False
    slots = [
        _Child(f"worker {i}", f"allot-w{i}", run_worker, (settings, host, port, i, workers > 1))
        for i in range(workers)
    ]
    writer: _Child | None = None
    if ledger:
        consumer = consumer_name(settings.ledger.consumer)
        writer = _Child("ledger writer", "allot-ledger", run_ledger_writer, (settings, consumer))
        slots.append(writer)
    writer_stopped = False

    def start(child: _Child) -> None:
        if time.monotonic() - child.started < 1.0:
            time.sleep(1.0)  # a process that dies at once must not spin the CPU
        child.started = time.monotonic()
        child.process = ctx.Process(target=child.target, args=child.args, name=child.name)
        child.process.start()
        log.info("%s started (pid %s)", child.label, child.process.pid)

    def interrupt(child: _Child) -> None:
        if child.alive:
            os.kill(child.process.pid, signal.SIGINT)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in slots:
            if child is not writer:
                interrupt(child)

    for child in slots:
        start(child)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "serving on http://%s:%d with %d worker%s%s",
        host,
        port,
        workers,
        "s" if workers > 1 else "",
        " and the ledger writer" if writer is not None else " (no ledger writer: --no-ledger)",
    )
    while not stopping or any(child.alive for child in slots):
        wait_for_sentinels([c.process.sentinel for c in slots if c.alive], timeout=1.0)
        if stopping:
            workers_gone = not any(c.alive for c in slots if c is not writer)
            if writer is not None and workers_gone and not writer_stopped:
                log.info("workers stopped; stopping the ledger writer (pid %s)", writer.process.pid)
                interrupt(writer)  # it commits what they wrote last
                writer_stopped = True
            continue
        for child in slots:
            if child.alive:
                continue
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.process.pid)  # type: ignore[no-untyped-call]
            log.error(
                "%s (pid %s) exited with %s; restarting",
                child.label,
                child.process.pid,
                child.process.exitcode,
            )
            child.process.close()
            start(child)
    for child in slots:
        child.process.join()
    listener.stop()
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    settings.pepper_bytes  # noqa: B018 - refuse to start without a pepper, before anything else
    if settings.dev_mode and not settings.id_pepper:
        log.warning("development mode: a fixed, public ID pepper is in use; never in production")
    applied = asyncio.run(db.migrate(settings.database_url, attempts=15))
    if applied:
        log.info("migrations applied: %s", ", ".join(applied))
    workers = args.workers or settings.service.workers
    host = args.host or settings.service.host
    port = args.port or settings.service.port
    return supervise(settings, host, port, workers, ledger=args.ledger)


def cmd_ledger(args: argparse.Namespace, settings: Settings) -> int:
    """The ledger writer alone, for a deployment that runs it apart from `allot serve`."""
    from allocator.ledger import consumer_name
    from service import writer

    applied = asyncio.run(db.migrate(settings.database_url, attempts=15))
    if applied:
        log.info("migrations applied: %s", ", ".join(applied))
    consumer = args.consumer or consumer_name(settings.ledger.consumer)
    writer.run(settings, consumer, ops=args.ops)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    applied = asyncio.run(db.migrate(settings.database_url, attempts=15))
    print(orjson.dumps({"applied": applied}).decode())
    return 0


# -- demo, reconcile, rebuild -----------------------------------------------------------------

DEMO_ROUND = "demo"
DEMO_SITES = [
    ("xuhui-01", "漕溪药房", "徐汇区漕溪北路 88 号", "徐汇区"),
    ("xuhui-02", "田林社区卫生服务中心", "徐汇区田林路 120 号", "徐汇区"),
    ("jingan-01", "静安寺大药房", "静安区南京西路 1688 号", "静安区"),
    ("jingan-02", "曹家渡社区活动中心", "静安区万航渡路 701 号", "静安区"),
    ("pudong-01", "陆家嘴药房", "浦东新区世纪大道 100 号", "浦东新区"),
    ("pudong-02", "花木社区卫生服务中心", "浦东新区梅花路 550 号", "浦东新区"),
]
DEMO_UNITS = 500


async def demo(settings: Settings) -> dict[str, Any]:
    """A round open now (for a week), six sites in three districts, 500 units each."""
    from allocator.model import Round, Site
    from service.shapes import batch_body

    async with _stores(settings) as (allocator, _redis, _con):
        await allocator.upsert_sites([Site(*s) for s in DEMO_SITES])
        tz = dt.timezone(dt.timedelta(hours=8))
        now = dt.datetime.now(tz).replace(microsecond=0)
        existing = await allocator.find_round(DEMO_ROUND)
        opens = existing.opens_at if existing and existing.opens_at <= now else now
        rnd = Round(
            round_id=DEMO_ROUND,
            title="口罩预约（演示） Mask reservation (demo)",
            opens_at=opens - dt.timedelta(minutes=1),
            closes_at=now + dt.timedelta(days=7),
            per_person=5,
            pickup_start=opens - dt.timedelta(minutes=1),
            pickup_end=now + dt.timedelta(days=14),
        )
        await allocator.upsert_round(rnd)
        answer = await allocator.load_batch(
            DEMO_ROUND, "demo-initial", [(s[0], DEMO_UNITS) for s in DEMO_SITES]
        )
        return {"round_id": DEMO_ROUND, "batch": batch_body(answer), "new_batch": answer.created}


class _stores:
    """An allocator with real Redis and PostgreSQL connections for one CLI command."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> Any:
        from allocator.facade import Allocator
        from allocator.identity import Hasher
        from service.app import redis_client

        await db.migrate(self.settings.database_url, attempts=15)
        self.redis = redis_client(self.settings)
        self.pool = await db.create_pool(self.settings.database_url)
        self.con = await self.pool.acquire()
        keys = Keys(self.settings.service.redis_prefix)
        pepper = (
            self.settings.pepper_bytes
            if (self.settings.id_pepper or self.settings.dev_mode)
            else b"-"
        )
        self.allocator = Allocator(
            self.redis,
            self.pool,
            keys,
            Hasher(pepper),
            timeout=5,
            draw_key=self.settings.draw_key,
            database_url=self.settings.database_url,
            # `allot demo` loads a batch, `allot draw` awards: answered only once replicas have
            # them, as over HTTP
            wait_replicas=self.settings.redis.wait_replicas,
            wait_timeout_ms=self.settings.redis.wait_timeout_ms,
        )
        return self.allocator, self.redis, self.con

    async def __aexit__(self, *exc: object) -> None:
        self.allocator.lottery.close()
        await self.pool.release(self.con)
        await self.pool.close()
        await topology.close_client(self.redis)


async def _reconcile(settings: Settings, round_id: str | None, wait: float) -> dict[str, Any]:
    from allocator.reconcile import reconcile

    async with _stores(settings) as (allocator, redis, con):
        return await reconcile(
            redis, con, allocator.keys, [round_id] if round_id else None, wait=wait
        )


async def _rebuild(
    settings: Settings, round_id: str | None, force: bool, wait: float
) -> list[dict[str, Any]]:
    """One round as asked; without --round every round Redis lost data of or lacks (all of
    them with --force). A refusal of one round does not stop the others."""
    from allocator.rebuild import RebuildRefused, ledger_round_ids, needs_rebuild, rebuild_round

    async with _stores(settings) as (allocator, redis, con):
        if round_id:
            return [
                await rebuild_round(redis, con, allocator.keys, round_id, force=force, wait=wait)
            ]
        done: list[dict[str, Any]] = []
        for r in await ledger_round_ids(con):
            if not force and not await needs_rebuild(redis, con, allocator.keys, r):
                done.append({"round_id": r, "skipped": "Redis agrees with the ledger"})
                continue
            try:
                done.append(
                    await rebuild_round(redis, con, allocator.keys, r, force=force, wait=wait)
                )
            except RebuildRefused as exc:
                done.append({"round_id": r, "refused": str(exc)})
        return done


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from allocator.errors import Problem

    try:
        print(orjson.dumps(asyncio.run(demo(settings))).decode())
    except Problem as exc:  # e.g. Redis lost data of the demo round: `allot rebuild` first
        print(f"allot demo: {exc.detail}", file=sys.stderr)
        return 1
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    report = asyncio.run(_reconcile(settings, args.round, args.wait))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0 if report["ok"] else 1


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from allocator.rebuild import RebuildRefused

    try:
        summary = asyncio.run(_rebuild(settings, args.round, args.force, args.wait))
    except RebuildRefused as exc:
        print(f"allot rebuild: refused: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps({"rebuilt": summary}, option=orjson.OPT_INDENT_2).decode())
    refused = [r for r in summary if "refused" in r]
    for r in refused:
        print(f"allot rebuild: refused: {r['refused']}", file=sys.stderr)
    return 1 if refused else 0


def cmd_loadtest(args: argparse.Namespace, settings: Settings) -> int:
    from loadtest.options import missing_extras

    missing = missing_extras()
    if missing:
        print(
            f"allot loadtest: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
            " not installed; install the extra: pip install 'allot[loadtest]'",
            file=sys.stderr,
        )
        return 2
    from loadtest.runner import main as loadtest_main

    return loadtest_main(args, settings)


async def _draw(settings: Settings, round_id: str, value: str, wait: float) -> dict[str, Any]:
    """What POST /api/v1/admin/rounds/{round_id}/draw does, waiting until it is drawn."""
    async with _stores(settings) as (allocator, _redis, _con):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            record: dict[str, Any] = await allocator.draw(round_id, value)
            if record["status"] == "drawn" or loop.time() >= deadline:
                return record


def cmd_draw(args: argparse.Namespace, settings: Settings) -> int:
    from allocator.draw import DrawInputError, check_public_randomness
    from allocator.errors import Problem

    try:
        value = check_public_randomness(args.public_randomness)
    except DrawInputError as exc:
        print(f"allot draw: {exc}", file=sys.stderr)
        return 2
    try:
        record = asyncio.run(_draw(settings, args.round, value, args.wait))
    except Problem as exc:
        print(f"allot draw: {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    print(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
    return 0 if record["status"] == "drawn" else 1


def cmd_verify_draw(args: argparse.Namespace, settings: Settings) -> int:
    from allocator.verify_draw import run

    return run(args)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def build_parser(*, loadtest_options: bool = True) -> argparse.ArgumentParser:
    """The command line. The load test's options are added only when asked for (main() does so
    for `allot loadtest ...` alone), so that no other command imports anything of loadtest/."""
    parser = argparse.ArgumentParser(prog="allot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="apply migrations, then serve HTTP")
    serve.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port (default $ALLOT_PORT, else 8080)")
    serve.add_argument("--workers", type=_count, help="worker processes sharing the port")
    serve.add_argument(
        "--no-ledger",
        dest="ledger",
        action="store_false",
        help="run no ledger writer (one runs apart, as `allot ledger`)",
    )
    serve.set_defaults(func=cmd_serve)
    led = sub.add_parser(
        "ledger", help="the ledger writer alone (stream -> PostgreSQL), apart from `allot serve`"
    )
    led.add_argument(
        "--consumer", help="its name in the consumer group (default [ledger] consumer, else"
        " <hostname>-ledger); every writer running at once needs its own"
    )  # fmt: skip
    led.add_argument(
        "--no-ops",
        dest="ops",
        action="store_false",
        help="no operations listener (/metrics with allot_ledger_lag, /healthz, /readyz)",
    )
    led.set_defaults(func=cmd_ledger)
    sub.add_parser("migrate", help="apply pending SQL migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("demo", help="create a demo round open now, with sites and stock").set_defaults(
        func=cmd_demo
    )
    rec = sub.add_parser(
        "reconcile", help="JSON report of Redis against the ledger; exit 1 on a mismatch"
    )
    rec.add_argument("--round", help="only this round")
    rec.add_argument("--wait", type=float, default=30.0, help="seconds to let the ledger catch up")
    rec.set_defaults(func=cmd_reconcile)
    reb = sub.add_parser(
        "rebuild",
        help="rebuild Redis state from the ledger (every round Redis lost data of, or --round)",
    )
    reb.add_argument("--round", help="only this round")
    reb.add_argument(
        "--force", action="store_true", help="overwrite state still in Redis (any round)"
    )
    reb.add_argument(
        "--wait", type=float, default=30.0, help="seconds to let the ledger drain the stream"
    )
    reb.set_defaults(func=cmd_rebuild)
    lt = sub.add_parser(
        "loadtest", help="flash-crowd load test and conservation checks (the release gate)"
    )
    if loadtest_options:
        from loadtest.options import add_arguments as add_loadtest_arguments

        add_loadtest_arguments(lt)
    lt.set_defaults(func=cmd_loadtest)
    dr = sub.add_parser(
        "draw", help="draw a frozen lottery round with its public randomness (as POST …/draw)"
    )
    dr.add_argument("--round", required=True, help="the lottery round")
    dr.add_argument(
        "--public-randomness", required=True, help="the value the named source published"
    )
    dr.add_argument(
        "--wait", type=float, default=600.0, help="seconds to wait for the winners' reservations"
    )
    dr.set_defaults(func=cmd_draw)
    from allocator.verify_draw import add_arguments as add_verify_draw_arguments

    vd = sub.add_parser(
        "verify-draw", help="replay a lottery draw from its published files; exit 1 on a mismatch"
    )
    add_verify_draw_arguments(vd)
    vd.set_defaults(func=cmd_verify_draw)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(loadtest_options=argv[:1] == ["loadtest"]).parse_args(argv)
    setup_logging()
    try:
        settings = load_settings()
        return int(args.func(args, settings))
    except ConfigError as exc:
        print(f"allot: configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
