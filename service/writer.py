"""The ledger writer's process: the one ``allot serve`` supervises, and ``allot ledger``.

One uvloop event loop with its own Redis client and PostgreSQL pool, running one
:class:`~allocator.ledger.LedgerWriter` under a stable consumer name (``[ledger] consumer``, else
``<hostname>-ledger``): a writer restarted under the same name first re-reads the entries it had
read but not committed. Entries a writer under another name left pending longer than
``claim_idle_ms`` are taken over (``XAUTOCLAIM``), so a standby ``allot ledger`` on another host
finishes the work of one that died for good.

Its only metric is ``allot_ledger_lag`` (:class:`~service.metrics.LedgerMetrics`). Under
``allot serve`` it goes to the supervisor's multiprocess directory, and the supervisor's
operations listener serves it with the workers' series; ``allot ledger`` alone serves it on an
operations listener of its own (``--no-ops``: none).

SIGTERM or SIGINT: the writer finishes the batch in hand, then commits what is left in the
streams for at most :data:`STOP_DRAIN` seconds (the supervisor stops the workers first, so this
is what they wrote last), and exits. Whatever is left is committed by the next writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from allocator import db, topology
from allocator.config import Settings
from allocator.keys import Keys
from allocator.ledger import LedgerWriter
from service.metrics import LedgerMetrics

log = logging.getLogger("allot.ledger")

STOP_DRAIN = 5.0  # seconds a stopping writer goes on committing what is left


def run(settings: Settings, consumer: str, *, ops: bool = False, child: bool = False) -> None:
    """The process's body. ``child``: started by the supervisor (log setup, process name);
    ``ops``: serve /metrics, /healthz and /readyz on the operations port, in a thread."""
    import uvloop

    from service.cli import name_process, setup_logging
    from service.ops import OpsListener

    if child:
        setup_logging()
        name_process("allot-ledger")
    metrics = LedgerMetrics()
    listener = OpsListener(settings, metrics.render) if ops else None
    if listener is not None:
        listener.start()
    try:
        uvloop.run(serve(settings, consumer, metrics))
    finally:
        if listener is not None:
            listener.stop()


async def serve(settings: Settings, consumer: str, metrics: LedgerMetrics) -> None:
    from service.app import redis_client

    loop = asyncio.get_running_loop()
    redis = redis_client(settings)
    pool = await db.create_pool(settings.database_url)  # lazy: starts while PostgreSQL is down
    writer = LedgerWriter(
        redis,
        pool,
        Keys(settings.service.redis_prefix),
        settings.ledger,
        consumer=consumer,
        on_lag=metrics.ledger_lag.set,
        wait_replicas=settings.redis.wait_replicas,
        wait_timeout_ms=settings.redis.wait_timeout_ms,
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, writer.stop)
    try:
        await writer.run()
        await _last_drain(writer)
    finally:
        await topology.close_client(redis)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.close(), 5)


async def _last_drain(writer: LedgerWriter) -> None:
    try:
        async with asyncio.timeout(STOP_DRAIN):
            await writer.drain()
    except Exception as exc:  # PostgreSQL or Redis down, or more than STOP_DRAIN s of work
        with contextlib.suppress(Exception):
            left = await writer.backlog()
            log.warning(
                "ledger writer %s stopping with %d entries not yet committed (%s); the next"
                " writer commits them",
                writer.consumer,
                left,
                type(exc).__name__,
            )
