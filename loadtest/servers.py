"""Throwaway private Redis and PostgreSQL servers, for the tests and the load test's faults
(``--fault restart-postgres``): they stop, kill or hang them at will, never the system's.

Both classes are synchronous; async tests call them through ``asyncio.to_thread``. Every
lifecycle method takes a lock, so one instance may be driven from several threads. Processes
are always waited for (pytest turns the ResourceWarning of an unreaped Popen into an error).

    with PrivateRedis(tmp_path / "redis", appendonly=True) as r:
        ...  # r.url, r.kill(), r.restart(), r.pause(), r.resume(), r.aof_dir

    with PrivatePostgres(tmp_path / "pg") as pg:
        ...  # pg.url, pg.url_for("allot_test"), pg.kill(), pg.restart()

Where PostgreSQL's files live: PostgreSQL refuses to run as root, so as root the server runs
as the ``postgres`` OS user, which must be able to traverse every ancestor of its data
directory. pytest's ``tmp_path`` lies under ``/tmp/pytest-of-root`` (mode 0700, and pytest
resets that mode at each session), and a Unix socket path must stay under ~107 bytes, which a
long test name in ``tmp_path`` can exceed. So PrivatePostgres keeps its data directory and
socket directory in a fresh ``tempfile.mkdtemp(prefix="allot-pg-")`` (mode 0755, owned by the
server's user), which it creates on first start and removes on ``close()``; nothing else
outside ``directory`` is created or touched. ``directory`` receives the server and initdb logs,
which therefore survive ``close()`` for post-mortems.
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
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["PrivatePostgres", "PrivateRedis", "cpu_seconds", "free_port", "redis_ping"]

REDIS_START_TIMEOUT = 10.0
PG_START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# Fast and deterministic: no fsync during initdb, trust auth, C locale whatever the host's.
INITDB_OPTIONS = ("--no-sync", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C")
PG_ISREADY_OPTIONS = ("-U", "postgres", "-d", "postgres", "-t", "1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, from /proc/<pid>/stat (0 once it is gone): what the
    benchmarks charge a server process for a run (bench/run.py, loadtest/ceiling.py)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def _which(name: str, *extra_dirs: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for d in extra_dirs:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(f"{name} not found on PATH or in {', '.join(extra_dirs) or '-'}")


def _pg_bin(name: str) -> str:
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    return _which(name, *(str(v) for v in versions))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _reap(proc: subprocess.Popen[bytes], sig: int | None, timeout: float) -> None:
    """Send ``sig`` (if any) and wait; SIGKILL if it does not exit within ``timeout``."""
    if proc.poll() is None and sig is not None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class _Server:
    """Shared lifecycle: one Popen kept per run, a lock, context management."""

    def __init__(self, directory: Path) -> None:
        # Absolute: redis-server applies --dir (a chdir) before it opens --logfile, so a
        # relative directory (allot loadtest's reports/...) would name a log file that does
        # not exist from there, and the server would exit at once, every retry.
        self.directory = Path(directory).resolve()
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._lock = threading.RLock()

    # -- to be provided by subclasses
    def _launch(self, port: int) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError

    def _log_path(self) -> Path:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Called under the lock before each launch."""

    _start_timeout = 10.0
    _name = "server"

    # -- public API
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self._name} has not been started")
        return self._port

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start (a no-op when already running); the first start picks the port for good."""
        with self._lock:
            if self.running:
                return
            self._discard()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._prepare()
            if self._port is None:
                self._port = free_port()
            deadline = time.monotonic() + self._start_timeout
            while True:
                proc = self._launch(self._port)
                self._proc = proc
                while proc.poll() is None:
                    if self._answers():
                        return
                    if time.monotonic() > deadline:
                        _reap(proc, signal.SIGKILL, 5)
                        self._proc = None
                        raise RuntimeError(
                            f"{self._name} on port {self._port} did not answer within "
                            f"{self._start_timeout:.0f}s; log tail:\n{_tail(self._log_path())}"
                        )
                    time.sleep(0.05)
                # Exited early: typically the port is still held by a dying predecessor (or,
                # after kill(), PostgreSQL's old backends still hold shared memory). Retry.
                proc.wait()
                self._proc = None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self._name} exited with status {proc.returncode} while starting; "
                        f"log tail:\n{_tail(self._log_path())}"
                    )
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, then reap: a crash, not a shutdown."""
        with self._lock:
            if self._proc is not None:
                _reap(self._proc, signal.SIGKILL, STOP_TIMEOUT)
            self._proc = None
            self._paused = False

    def restart(self) -> None:
        """Stop if running, then start again on the same port with the same data."""
        with self._lock:
            self.stop()
            self.start()

    def close(self) -> None:
        """Stop the server (idempotent)."""
        with self._lock:
            self.stop()

    def stop(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        if self._proc is not None:
            _reap(self._proc, None, STOP_TIMEOUT)
            self._proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRedis(_Server):
    """A redis-server of our own on 127.0.0.1; never daemonized, so we can stop, kill or hang it.

    RDB snapshots are off (``--save ""``). With ``appendonly=True`` every write is fsynced to
    the AOF before it is acknowledged (``appendfsync always``, as production should run), so
    acknowledged data survives ``kill()`` + ``restart()``, and a power loss. ``appendfsync``
    chooses another policy (``everysec``, ``no``) for tests and benchmarks about that choice.
    Without ``appendonly`` a restart starts empty (a lost dataset).
    """

    _start_timeout = REDIS_START_TIMEOUT
    _name = "redis-server"

    def __init__(
        self, directory: Path, *, appendonly: bool = False, appendfsync: str = "always"
    ) -> None:
        super().__init__(directory)
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.appendonly = appendonly
        self.appendfsync = appendfsync

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def aof_dir(self) -> Path:
        """Where the append-only files live (Redis 7: a manifest, a base and increments)."""
        return self.directory / "appendonlydir"

    def _log_path(self) -> Path:
        return self.directory / "redis.log"

    def _launch(self, port: int) -> subprocess.Popen[bytes]:
        cmd = [
            _which("redis-server"),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--save", "",
            "--logfile", str(self._log_path()),
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            cmd += ["--appendfsync", self.appendfsync]
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _answers(self) -> bool:
        return redis_ping(self.port, timeout=0.5)

    def stop(self) -> None:
        """Orderly shutdown (SIGTERM: no RDB is written; the AOF, if on, is flushed)."""
        with self._lock:
            if self._proc is None:
                return
            if self._paused:
                self.resume()
            _reap(self._proc, signal.SIGTERM, STOP_TIMEOUT)
            self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its port but answers nothing, like a hung host."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError("redis-server is not running")
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.send_signal(signal.SIGCONT)
            self._paused = False


def redis_ping(port: int, *, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True when a Redis on host:port answers PING (no client library, no pool left behind)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivatePostgres(_Server):
    """A PostgreSQL cluster of our own on 127.0.0.1 (trust auth, superuser ``postgres``).

    Tuned for tests: ``fsync=off`` (data survives ``stop()``/``kill()`` of the server, not of the
    machine). ``kill()`` SIGKILLs the postmaster; the next start performs crash recovery.
    See the module docstring for where the files live and why.
    """

    _start_timeout = PG_START_TIMEOUT
    _name = "postgres"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._base: Path | None = None

    # -- where things are
    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        if self._base is None:
            raise RuntimeError("postgres has not been started")
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        if self._base is None:
            raise RuntimeError("postgres has not been started")
        return self._base / "sock"

    def _log_path(self) -> Path:
        return self.directory / "postgres.log"

    # -- which OS user runs the server
    @staticmethod
    def _run_as() -> dict[str, Any]:
        """Popen keywords that drop root to the postgres user (none when not root)."""
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise RuntimeError("running as root, but there is no 'postgres' OS user") from exc
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _prepare(self) -> None:
        if self._base is None:
            self._base = Path(tempfile.mkdtemp(prefix="allot-pg-"))
            self._base.chmod(0o755)
            self.socket_dir.mkdir()
            if os.geteuid() == 0:
                pw = pwd.getpwnam("postgres")
                os.chown(self._base, pw.pw_uid, pw.pw_gid)
                os.chown(self.socket_dir, pw.pw_uid, pw.pw_gid)
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()

    def _initdb(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        log = self.directory / "initdb.log"
        with log.open("ab") as out:
            result = subprocess.run(
                [_pg_bin("initdb"), "-D", str(self.data_dir), *INITDB_OPTIONS],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
                cwd=self._base,  # the server user may not be able to read the caller's cwd
                **self._run_as(),
            )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{_tail(log)}")

    def _launch(self, port: int) -> subprocess.Popen[bytes]:
        cmd = [
            _pg_bin("postgres"),
            "-D", str(self.data_dir),
            "-p", str(port),
            "-k", str(self.socket_dir),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off",
            "-c", "max_connections=100",
        ]  # fmt: skip
        # The child keeps its own copy of the log descriptor; ours is closed on return.
        with self._log_path().open("ab") as out:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._base,
                **self._run_as(),
            )

    def _answers(self) -> bool:
        port = str(self.port)
        result = subprocess.run(
            [_pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", port, *PG_ISREADY_OPTIONS],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return result.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open sessions are cut, a checkpoint is written."""
        with self._lock:
            if self._proc is None:
                return
            _reap(self._proc, signal.SIGINT, STOP_TIMEOUT)
            self._proc = None

    def close(self) -> None:
        """Stop the server and remove its mkdtemp() directory (logs in ``directory`` stay)."""
        with self._lock:
            self.stop()
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None
