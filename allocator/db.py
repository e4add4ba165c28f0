"""PostgreSQL: connection pool, database creation and migrations under an advisory lock."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("allot.db")

# pg_advisory_lock key held while migrating, so that N workers or replicas migrate exactly once.
MIGRATION_LOCK_KEY = 0x616C6C6F74  # "allot"

# Errors after which the same statement may well succeed later (connection lost, server
# starting or shutting down, out of connections). Anything else is a fault of the data.
TRANSIENT_PG_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


def migrations() -> list[tuple[str, str]]:
    """(version, sql) for every packaged migration, in order."""
    folder = resources.files("allocator.migrations")
    found = sorted(
        (p.name.removesuffix(".sql"), p.read_text(encoding="utf-8"))
        for p in folder.iterdir()
        if p.name.endswith(".sql")
    )
    return found


async def connect(url: str, *, attempts: int = 1, delay: float = 1.0) -> asyncpg.Connection:
    for attempt in range(1, attempts + 1):
        try:
            return await asyncpg.connect(url, timeout=5)
        except TRANSIENT_PG_ERRORS as exc:
            if attempt == attempts:
                raise
            log.warning(
                "postgres at %s not answering (%s); %d attempt(s) left",
                _safe(url),
                type(exc).__name__,
                attempts - attempt,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def with_database(url: str, name: str) -> str:
    """The same server, user and options, another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def ensure_database(url: str, *, attempts: int = 1) -> bool:
    """Create the database named in ``url`` if it does not exist; True when created."""
    try:
        con = await connect(url, attempts=attempts)
    except asyncpg.exceptions.InvalidCatalogNameError:
        pass
    else:
        await con.close()
        return False
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = await connect(with_database(url, "postgres"), attempts=attempts)
    try:
        await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), "")}"')
    except asyncpg.exceptions.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("created database %s", name)
    return True


async def migrate(url: str, *, attempts: int = 1) -> list[str]:
    """Apply pending migrations, each in its own transaction, under an advisory lock."""
    await ensure_database(url, attempts=attempts)
    con = await connect(url, attempts=attempts)
    applied: list[str] = []
    try:
        await con.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await con.fetch("SELECT version FROM schema_migrations")}
            for version, sql in migrations():
                if version in done:
                    continue
                async with con.transaction():
                    await con.execute(sql)
                    await con.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", version
                    )
                log.info("applied migration %s", version)
                applied.append(version)
        finally:
            await con.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await con.close()
    return applied


async def create_pool(url: str) -> asyncpg.Pool:
    """A pool that connects lazily, so the service starts and serves while PostgreSQL is down."""
    pool = await asyncpg.create_pool(
        url,
        min_size=0,
        max_size=8,
        timeout=2,
        command_timeout=5,
        max_inactive_connection_lifetime=60,
    )
    assert pool is not None
    return pool


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + host))
