"""A throwaway Redis Cluster of our own: 3 primaries and 3 replicas on free ports of 127.0.0.1,
for the tests and the load test's ``--fault kill-redis-primary``. Never the system's Redis.

    with PrivateCluster(tmp_path / "cluster") as cluster:
        cluster.url                      # "redis://127.0.0.1:p1,redis://127.0.0.1:p2,..."
        cluster.primary_of_slot(slot)    # the node serving a slot now
        cluster.kill(node)               # kill -9, like a crashed host
        cluster.failover(replica)        # CLUSTER FAILOVER on a replica (planned, no loss)
        cluster.cut_off(replica)         # its primary's writes no longer reach it (a partition)
        cluster.hang(node)               # SIGSTOP: connections stay open, nothing answers
        cluster.wait_healthy()           # every slot served, every primary with a synced replica

Each node is a :class:`~loadtest.servers.PrivateRedis` started with ``cluster-enabled yes``, its
bus on a port of its own (``cluster-port``: the default, port + 10000, may be taken or out of
range), ``cluster-node-timeout`` :data:`NODE_TIMEOUT_MS` and ``repl-diskless-sync-delay 0`` so
that a replica is in sync within a second of the cluster's creation (about 3 s in all, with
``redis-cli --cluster create``). No persistence: a killed node restarts empty and rejoins as a
replica of whoever took its slots (its ``nodes.conf`` keeps its identity).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from loadtest.servers import PrivateRedis, free_port

__all__ = ["NODE_TIMEOUT_MS", "ClusterNodeServer", "PrivateCluster"]

NODE_TIMEOUT_MS = 2000  # cluster-node-timeout: a dead primary is failed over after ~2-3 s
CREATE_TIMEOUT = 30.0


def _redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli is not installed (apt-get install redis-tools)")
    return found


def command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command through redis-cli, its output as text ("" when the node does not answer)."""
    try:
        done = subprocess.run(
            [_redis_cli(), "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout.decode(errors="replace") if done.returncode == 0 else ""


def _info(port: int, section: str) -> dict[str, str]:
    if section == "cluster":
        text = command(port, "cluster", "info")
    else:
        text = command(port, "info", section)
    found: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep:
            found[name] = value
    return found


class ClusterNodeServer(PrivateRedis):
    """One cluster node: a PrivateRedis with cluster mode on and its bus port fixed."""

    _name = "redis-server (cluster node)"

    def __init__(self, directory: Path, port: int, bus_port: int) -> None:
        super().__init__(directory)
        self._port = port
        self.bus_port = bus_port

    def _launch(self, port: int) -> subprocess.Popen[bytes]:
        cmd = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self._log_path()),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # the healthy shards go on serving while one has no primary (docs/operations.md)
            "--cluster-require-full-coverage", "no",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            "--repl-diskless-load", "disabled",
        ]  # fmt: skip
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _free_pair() -> tuple[int, int]:
    """Two ports that nothing listened on a moment ago (the node's and its bus's)."""
    while True:
        a, b = free_port(), free_port()
        if a != b:
            return a, b


class PrivateCluster:
    """Six nodes, three primaries with one replica each, on free ports."""

    def __init__(self, directory: Path, *, primaries: int = 3) -> None:
        self.directory = Path(directory).resolve()  # see _Server.__init__
        self.nodes: list[ClusterNodeServer] = []
        for i in range(primaries * 2):
            port, bus = _free_pair()
            self.nodes.append(ClusterNodeServer(self.directory / f"node{i}", port, bus))
        self._lock = threading.RLock()

    @property
    def url(self) -> str:
        """ALLOT_REDIS_URL for it: every node a startup node."""
        return ",".join(f"redis://{n.address}" for n in self.nodes)

    def start(self) -> None:
        with self._lock:
            for node in self.nodes:
                node.start()
            done = subprocess.run(
                [_redis_cli(), "--cluster", "create", *(n.address for n in self.nodes),
                 "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True,
                timeout=CREATE_TIMEOUT,
                check=False,
            )  # fmt: skip
            if done.returncode != 0:
                self.close()
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r}")
            self.wait_healthy(CREATE_TIMEOUT)

    # -- what the cluster looks like now ------------------------------------------------------

    def node_at(self, port: int) -> ClusterNodeServer:
        return next(n for n in self.nodes if n.port == port)

    def role(self, node: ClusterNodeServer) -> str:
        """``master``, ``slave``, or "" for a node that does not answer."""
        return _info(node.port, "replication").get("role", "") if node.running else ""

    def primaries(self) -> list[ClusterNodeServer]:
        return [n for n in self.nodes if self.role(n) == "master"]

    def replicas(self) -> list[ClusterNodeServer]:
        return [n for n in self.nodes if self.role(n) == "slave"]

    def primary_of_slot(self, slot: int) -> ClusterNodeServer:
        """The running primary serving ``slot``, as a live node sees it."""
        for node in self.nodes:
            if not node.running:
                continue
            for line in command(node.port, "cluster", "nodes").splitlines():
                parts = line.split()
                if len(parts) < 9 or "master" not in parts[2] or "fail" in parts[2]:
                    continue
                for span in parts[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                        return self.node_at(port)
        raise RuntimeError(f"no live node serves slot {slot}")

    def replica_of(self, primary: ClusterNodeServer) -> ClusterNodeServer:
        for node in self.replicas():
            info = _info(node.port, "replication")
            if info.get("master_port") == str(primary.port):
                return node
        raise RuntimeError(f"{primary.address} has no replica")

    def healthy(self) -> bool:
        """Every live node says cluster_state ok, every slot is served, and each live primary
        has a replica in sync (master_link_status up)."""
        live = [n for n in self.nodes if n.running]
        for node in live:
            info = _info(node.port, "cluster")
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
        replicas = self.replicas()
        if not replicas or len(replicas) < len(self.primaries()):
            return False
        return all(_info(n.port, "replication").get("master_link_status") == "up" for n in replicas)

    def wait_healthy(self, within: float = 30.0) -> float:
        """Seconds until healthy(); RuntimeError past ``within``."""
        started = time.monotonic()
        while not self.healthy():
            if time.monotonic() - started > within:
                raise RuntimeError(f"the cluster is not healthy after {within:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - started

    # -- faults -------------------------------------------------------------------------------

    def kill(self, node: ClusterNodeServer) -> None:
        """kill -9: a crashed host. Its replica is promoted after cluster-node-timeout."""
        node.kill()

    def revive(self, node: ClusterNodeServer) -> None:
        """Start a killed node again (empty: it rejoins as a replica of its successor)."""
        node.start()

    def hang(self, *nodes: ClusterNodeServer) -> None:
        """SIGSTOP, like a hung host: its sockets stay open (connects succeed, the kernel
        queues them), nothing answers. A hung primary with a live replica is failed over after
        cluster-node-timeout; hang the replica too for a shard that stays down."""
        for node in nodes:
            node.pause()

    def unhang(self, *nodes: ClusterNodeServer) -> None:
        """SIGCONT after :meth:`hang`."""
        for node in nodes:
            node.resume()

    def cut_off(self, replica: ClusterNodeServer) -> None:
        """The replica stops receiving its primary's writes, as behind a network partition,
        while the cluster bus goes on (it still counts as a replica fit to be promoted): it is
        told to log in to its primary as a user that does not exist, and its replication link
        is dropped, so every reconnection fails. :meth:`reconnect` undoes it."""
        primary_port = _info(replica.port, "replication").get("master_port", "")
        ok = command(
            replica.port, "config", "set", "masteruser", "allot-cut-off", "masterauth", "-"
        )
        if ok.strip() != "OK" or not primary_port:
            raise RuntimeError(f"could not cut {replica.address} off its primary")
        _ = command(int(primary_port), "client", "kill", "type", "replica")

    def reconnect(self, replica: ClusterNodeServer) -> None:
        """Undo :meth:`cut_off` (also on a replica promoted meanwhile)."""
        _ = command(replica.port, "config", "set", "masteruser", "", "masterauth", "")

    def failover(self, replica: ClusterNodeServer, within: float = 15.0) -> None:
        """CLUSTER FAILOVER on a replica: a planned switch, the replica becomes the primary."""
        if command(replica.port, "cluster", "failover").strip() != "OK":
            raise RuntimeError(f"CLUSTER FAILOVER refused by {replica.address}")
        deadline = time.monotonic() + within
        while self.role(replica) != "master":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{replica.address} is not a primary after {within:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            for node in self.nodes:
                node.close()

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


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False
