"""A private PostgreSQL for ``--fault restart-postgres``: the gate may stop and start it at will.

The system's PostgreSQL is never restarted by the gate. This one lives in a fresh
``mkdtemp(prefix="allot-loadtest-pg-")`` (data and socket; removed by ``close()``), listens on
127.0.0.1 only, trusts local connections and runs with ``fsync=off`` (its data survives a stop,
not a machine crash). As root it runs as the ``postgres`` OS user, as PostgreSQL insists.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pg_bin(name: str) -> str:
    """initdb, postgres, pg_isready: on PATH, else in the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in versions:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(f"{name} not found (install PostgreSQL's server package)")


class PrivatePostgres:
    """start() / stop() / close(); ``url_for(db)`` once started. Logs go to ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = free_port()
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @staticmethod
    def _run_as() -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam("postgres")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _prepare(self) -> Path:
        if self._base is None:
            self._base = Path(tempfile.mkdtemp(prefix="allot-loadtest-pg-"))
            self._base.chmod(0o755)
            (self._base / "sock").mkdir()
            if os.geteuid() == 0:
                pw = pwd.getpwnam("postgres")
                os.chown(self._base, pw.pw_uid, pw.pw_gid)
                os.chown(self._base / "sock", pw.pw_uid, pw.pw_gid)
        data = self._base / "data"
        if not (data / "PG_VERSION").is_file():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with (self.log_dir / "initdb.log").open("ab") as out:
                subprocess.run(  # noqa: S603 - a fixed argv, no shell
                    [pg_bin("initdb"), "-D", str(data), "--no-sync", "-A", "trust",
                     "-U", "postgres", "-E", "UTF8", "--locale=C"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    check=True, cwd=self._base, **self._run_as(),
                )  # fmt: skip
        return self._base

    def _answers(self) -> bool:
        result = subprocess.run(  # noqa: S603 - a fixed argv, no shell
            [pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", "postgres", "-d", "postgres", "-t", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            check=False,
        )  # fmt: skip
        return result.returncode == 0

    def start(self) -> None:
        if self.running:
            return
        base = self._prepare()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with (self.log_dir / "postgres.log").open("ab") as out:
                self._proc = subprocess.Popen(  # noqa: S603 - a fixed argv, no shell
                    [pg_bin("postgres"), "-D", str(base / "data"), "-p", str(self.port),
                     "-k", str(base / "sock"), "-c", "listen_addresses=127.0.0.1",
                     "-c", "fsync=off", "-c", "max_connections=200"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    cwd=base, **self._run_as(),
                )  # fmt: skip
            while self._proc.poll() is None:
                if self._answers():
                    return
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the private PostgreSQL did not answer in time")
                time.sleep(0.1)
            self._proc.wait()  # exited early (the port still held by its predecessor): retry
            if time.monotonic() > deadline:
                raise RuntimeError("the private PostgreSQL exited while starting; see its log")
            time.sleep(0.3)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are cut, as in an outage."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
