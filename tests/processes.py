"""The installed ``allot`` command as real processes, for tests: ``allot serve`` (a supervisor,
its workers and its ledger writer) and ``allot ledger`` alone. Each runs in its own session,
against the test's own database and Redis key prefix, with its output in a log file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from allocator.config import Settings
from loadtest.servers import free_port
from tests.helpers import ADMIN, ADMIN_TOKEN, REDIS_URL, citizen_id, phone, round_body

ALLOT = str(Path(sys.executable).with_name("allot"))


def children(pid: int) -> dict[int, str]:
    """pid -> process name (/proc/<pid>/comm) of each child of ``pid``: the supervisor names
    its workers allot-w<N> and its writer allot-ledger; multiprocessing's resource tracker is
    left as it is."""
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                found[int(child)] = Path(f"/proc/{child}/comm").read_text().strip()
    return found


def allot_env(settings: Settings, redis_url: str = REDIS_URL) -> dict[str, str]:
    return {
        **os.environ,
        "ALLOT_REDIS_URL": redis_url,
        "ALLOT_REDIS_PREFIX": settings.service.redis_prefix,
        "ALLOT_DATABASE_URL": settings.database_url,
        "ALLOT_ADMIN_TOKEN": ADMIN_TOKEN,
        "ALLOT_ID_PEPPER": "test-pepper",
    }


class _Process:
    """One ``allot`` command line in a session of its own."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self, *args: str) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [ALLOT, *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill_all(self) -> None:
        """kill -9 of the whole process group at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything the process left behind

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Server(_Process):
    """``allot serve`` on free ports (citizens' and operations')."""

    def __init__(self, settings: Settings, log: Path, redis_url: str = REDIS_URL) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ops_port = free_port()
        self.ops_url = f"http://127.0.0.1:{self.ops_port}"
        env = {**allot_env(settings, redis_url), "ALLOT_OPS_PORT": str(self.ops_port)}
        super().__init__(env, log)

    def start(self, workers: int = 2, *extra: str) -> None:
        self.expected = (workers, "--no-ledger" not in extra)
        self._start("serve", "--port", str(self.port), "--workers", str(workers), *extra)

    def workers(self) -> list[int]:
        """Worker pids (not the ledger writer, not multiprocessing's resource tracker)."""
        return sorted(p for p, name in children(self.pid).items() if name.startswith("allot-w"))

    def writer(self) -> int | None:
        """The ledger writer's pid, if one runs."""
        found = [p for p, name in children(self.pid).items() if name == "allot-ledger"]
        assert len(found) <= 1, found
        return found[0] if found else None

    async def wait_ready(self, session: aiohttp.ClientSession, within: float = 30) -> None:
        """/readyz answers 200, and every process started has taken its name."""
        async with asyncio.timeout(within):
            while True:
                try:
                    async with session.get(f"{self.url}/readyz") as r:
                        workers, writer = self.expected
                        if (
                            r.status == 200
                            and len(self.workers()) == workers
                            and (self.writer() is not None) == writer
                        ):
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)


class Writer(_Process):
    """``allot ledger`` alone, without an operations listener unless ``ops`` is asked for."""

    def __init__(
        self, settings: Settings, log: Path, redis_url: str = REDIS_URL, **env: str
    ) -> None:
        super().__init__({**allot_env(settings, redis_url), **env}, log)
        self.ops_port = free_port()
        self.env["ALLOT_OPS_PORT"] = str(self.ops_port)

    def start(self, *args: str, ops: bool = False) -> None:
        self._start("ledger", *args, *(() if ops else ("--no-ops",)))

    def kill(self) -> None:
        """kill -9, for good: nothing restarts it."""
        self.kill_all()

    async def wait_started(self, within: float = 30) -> None:
        async with asyncio.timeout(within):
            while f"started (pid {self.pid})" not in self.text():
                assert self.proc is not None
                assert self.proc.poll() is None, self.text()
                await asyncio.sleep(0.05)


def config_file(path: Path, text: str) -> dict[str, str]:
    """An allot.toml with ``text``, as the environment that points at it."""
    path.write_text(text)
    return {"ALLOT_CONFIG": str(path)}


async def seed_http(session: aiohttp.ClientSession, url: str, units: int) -> None:
    sites = {"sites": [{"site_id": "s1", "name": "One", "address": "Road 1", "district": "d"}]}
    async with session.put(f"{url}/api/v1/admin/sites", json=sites, headers=ADMIN) as r:
        assert r.status == 200
    async with session.put(f"{url}/api/v1/admin/rounds/r1", json=round_body(), headers=ADMIN) as r:
        assert r.status == 201
    batch = {"batch_id": "b1", "items": [{"site_id": "s1", "quantity": units}]}
    async with session.post(
        f"{url}/api/v1/admin/rounds/r1/batches", json=batch, headers=ADMIN
    ) as r:
        assert r.status == 201


async def post(session: aiohttp.ClientSession, url: str, n: int) -> tuple[int, Any]:
    body = {"citizen_id": citizen_id(n), "phone": phone(n), "site_id": "s1"}
    # Each citizen from their own address (documentation prefix), as seen by a trusted proxy:
    # the real per-address token bucket of the default config then treats them as a crowd.
    headers = {"X-Forwarded-For": f"2001:db8::{n:x}"}
    try:
        async with session.post(
            f"{url}/api/v1/rounds/r1/reservations", json=body, headers=headers
        ) as r:
            return r.status, await r.json()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return 0, repr(exc)  # the connection died with the service: no answer was given
