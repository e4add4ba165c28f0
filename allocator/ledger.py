"""The ledger writer: drains each round's Redis stream into PostgreSQL.

Every state change a Lua script makes is appended, in the same atomic step, to the round's
stream. This writer reads the stream through a consumer group and commits entries in batches:

* rows are written with ``INSERT … ON CONFLICT`` keyed by reservation_id, and a status only ever
  moves forward (confirmed -> collected | cancelled | expired), so a replayed or reordered entry
  changes nothing; batches and carry-overs (``kind=carry``, lua/carry.lua) once per key; a
  batch's reservations go in as one ``INSERT … SELECT … FROM unnest(…)``
  (one statement, one round trip), after folding the batch's entries of one reservation into
  the one that statement would have kept, applied one after the other;
* an entry is acknowledged (``XACK``, then ``XDEL``) only after its transaction committed, so a
  writer killed in between leaves it pending, and it is delivered again;
* after a batch smaller than ``batch_size`` the writer waits ``linger_ms`` before reading
  again, so that under a steady flow its batches grow (one commit's cost is shared by more
  entries) instead of committing every few entries as they trickle in;
* on start a consumer first re-reads its own pending entries, and entries a dead consumer left
  pending longer than ``claim_idle_ms`` are taken over with ``XAUTOCLAIM``;
* while PostgreSQL is down, nothing is acknowledged and the writer backs off; reservations go on
  in Redis and the backlog (the stream's length) shows as ledger lag;
* an entry PostgreSQL refuses for its data ``max_attempts`` times is moved to the round's
  dead-letter stream and logged, so one bad entry cannot stop the ledger;
* Redis Cluster: every call on the streams goes out as one pipeline per node, the nodes at once,
  each behind a breaker of its own (:class:`_Nodes`), so a node that fails or hangs costs only
  its own rounds' ledger progress; the other nodes' entries are committed meanwhile;
* every entry carries the round's change sequence number ``seq``; the transaction that writes
  the rows also raises ``rounds.ledger_seq`` to the highest one (never lowers it), and the
  worker's floors learn it at once (allocator/integrity.py: how a Redis that lost data the
  ledger has is noticed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from allocator import topology
from allocator.config import LedgerSettings
from allocator.db import TRANSIENT_PG_ERRORS
from allocator.draw import entry_receipt
from allocator.integrity import RAISE_LEDGER_SEQ, RAISE_LEDGER_SEQS, Floors
from allocator.keys import Keys, RoundKeys

log = logging.getLogger("allot.ledger")

GROUP = "ledger"
LAG_INTERVAL = 1.0  # seconds between two readings of the backlog (allot_ledger_lag)
POLL_MS = 50  # cluster mode: the pause after a pass that found no new entry (no blocking read)
NODE_BREAKER = (0.25, 2.0)  # cluster mode: a failed node is skipped this long, doubling up to


class _Nodes:
    """Cluster mode: the writer's pipelines, one per node, and a breaker per node.

    Why not one pipeline for all nodes: redis-py 7.4's cluster pipeline runs each node's share
    as a task under one ``asyncio.gather`` (no ``return_exceptions``), and a node whose
    connection must be (re)made sends the handshake outside the try that turns a command's
    failure into its result. After its first timeout a hung node's connection is closed, so
    every later pipeline reconnects to it, times out in the handshake, and the whole pipeline
    raises, ``raise_on_error=False`` notwithstanding: the healthy nodes' replies were lost
    with it, and the ledger stalled for every round (measured: tests/test_cluster.py, the hung
    shard; issue 11). Apart, a node's failure is the result of its own pipeline only.

    After a failure the node is skipped for ``NODE_BREAKER[0]`` seconds, doubling on each
    further failure up to ``NODE_BREAKER[1]``: a hung node would cost each pass a socket
    timeout, and the others' progress would wait on it."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer
        self._down_until: dict[str, float] = {}
        self._pause: dict[str, float] = {}

    def by_node(self, streams: Sequence[str]) -> dict[str, list[str]]:
        """node -> its streams, leaving out the nodes whose breaker is open and the streams
        whose slot has no primary now (read on a later pass). A single Redis is one node, ""."""
        redis = self.writer.redis
        if not topology.is_cluster(redis):
            return {"": list(streams)} if streams else {}
        now = time.monotonic()
        grouped: dict[str, list[str]] = {}
        for stream in streams:
            node = topology.node_name(redis, stream)
            if node and self._down_until.get(node, 0.0) <= now:
                grouped.setdefault(node, []).append(stream)
        return grouped

    def down(self) -> list[str]:
        now = time.monotonic()
        return sorted(n for n, until in self._down_until.items() if until > now)

    async def pipelines(
        self, grouped: dict[str, list[str]], queue: Callable[[Pipeline, str, list[str]], None]
    ) -> dict[str, list[Any] | BaseException]:
        """Each node's replies (``queue`` fills its pipeline), or what failed it. The nodes
        are asked at once; a failed node's breaker opens."""

        async def one(node: str, names: list[str]) -> list[Any]:
            async with self.writer.redis.pipeline(transaction=False) as pipe:
                queue(pipe, node, names)
                return list(await pipe.execute(raise_on_error=False))

        return await self.each(grouped, one)

    async def each(
        self,
        grouped: dict[str, list[str]],
        call: Callable[[str, list[str]], Awaitable[Any]],
    ) -> dict[str, Any]:
        """``call(node, streams)`` for every node at once: node -> its result, or what failed
        it (its breaker then opens)."""
        names = list(grouped)
        results = await asyncio.gather(
            *(call(n, grouped[n]) for n in names), return_exceptions=True
        )
        out: dict[str, Any] = {}
        for node, result in zip(names, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # CancelledError and the like
            if isinstance(result, RedisError | RedisClusterException | OSError):
                self.failed(node, result)  # RedisClusterException: a slot not covered now
            elif isinstance(result, Exception):
                raise result
            else:
                self.answered(node)
            out[node] = result
        return out

    def failed(self, node: str, exc: BaseException) -> None:
        writer = self.writer
        if not topology.is_cluster(writer.redis):
            raise exc  # a single Redis: the pass fails, and the writer backs off
        pause = min(NODE_BREAKER[1], self._pause.get(node, NODE_BREAKER[0] / 2) * 2)
        self._pause[node] = pause
        self._down_until[node] = time.monotonic() + pause
        # a primary may have changed ("?": a slot without one, no node to name)
        topology.mark_stale(writer.redis, None if node == "?" else node)
        if writer.floors is not None:
            writer.floors.redis_failed()  # the Redis that comes back may be an older copy
        log.warning(
            "ledger writer: node %s: %s: %s; its rounds' streams skipped for %.2fs",
            node,
            type(exc).__name__,
            exc,
            pause,
        )

    def answered(self, node: str) -> None:
        self._pause.pop(node, None)
        self._down_until.pop(node, None)


async def create_group(redis: Redis, stream: str) -> None:
    """The one place the ledger's consumer group is created (by the writer, by an operator's
    round write, by a rebuild). It starts at 0, so no entry written before it existed is
    skipped; a group already there is left as it is."""
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


UPSERT_RESERVATION = """
INSERT INTO reservations (reservation_id, round_id, site_id, quantity, status, pickup_code,
                          citizen_hash, phone_hash, citizen_id_masked, created_at, updated_at,
                          channel, age_band, region)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
ON CONFLICT (reservation_id) DO UPDATE
   SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at, recorded_at = now()
 WHERE reservations.status = 'confirmed' AND EXCLUDED.status <> 'confirmed'
"""

# The whole batch at once, one array per column. Each reservation_id appears once (``_fold``):
# ON CONFLICT DO UPDATE may not touch the same row twice in one statement.
UPSERT_RESERVATIONS = """
INSERT INTO reservations (reservation_id, round_id, site_id, quantity, status, pickup_code,
                          citizen_hash, phone_hash, citizen_id_masked, created_at, updated_at,
                          channel, age_band, region)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[],
                     $12::text[], $13::text[], $14::text[])
ON CONFLICT (reservation_id) DO UPDATE
   SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at, recorded_at = now()
 WHERE reservations.status = 'confirmed' AND EXCLUDED.status <> 'confirmed'
"""

INSERT_BATCH = """
INSERT INTO batches (round_id, batch_id, digest, items, units, loaded_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (round_id, batch_id) DO NOTHING
"""


INSERT_CARRY = """
INSERT INTO carries (from_round, to_round, batch_id, items, parts, units, carried_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (from_round, to_round, batch_id) DO NOTHING
"""

# A lottery entry (lua/enter.lua, withdraw.lua, award.lua). The row keeps the state of the
# highest change number `seq` it has seen: a redelivered or reordered older entry changes
# nothing. `not-drawn` is never stored by the stream nor (since migration 0009) by the draw:
# the entries_shown view derives it from the draw's awards.
UPSERT_ENTRY = """
INSERT INTO entries (entry_id, round_id, receipt, site_id, accept_district, status,
                     citizen_hash, phone_hash, citizen_id_masked, reservation_id, seq,
                     created_at, updated_at, channel, age_band)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (entry_id) DO UPDATE
   SET site_id = EXCLUDED.site_id, accept_district = EXCLUDED.accept_district,
       status = EXCLUDED.status, reservation_id = EXCLUDED.reservation_id, seq = EXCLUDED.seq,
       updated_at = EXCLUDED.updated_at, recorded_at = now()
 WHERE entries.seq < EXCLUDED.seq
"""


# The batch's entries at once, one array per column, one row per entry_id (``_fold_entries``),
# for the same reason as UPSERT_RESERVATIONS: one statement instead of one per entry halved
# PostgreSQL's CPU per entry in `make bench` (docs/performance.md).
UPSERT_ENTRIES = """
INSERT INTO entries (entry_id, round_id, receipt, site_id, accept_district, status,
                     citizen_hash, phone_hash, citizen_id_masked, reservation_id, seq,
                     created_at, updated_at, channel, age_band)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::boolean[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[],
                     $12::timestamptz[], $13::timestamptz[], $14::text[], $15::text[])
ON CONFLICT (entry_id) DO UPDATE
   SET site_id = EXCLUDED.site_id, accept_district = EXCLUDED.accept_district,
       status = EXCLUDED.status, reservation_id = EXCLUDED.reservation_id, seq = EXCLUDED.seq,
       updated_at = EXCLUDED.updated_at, recorded_at = now()
 WHERE entries.seq < EXCLUDED.seq
"""


def _ts(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


@dataclass(frozen=True, slots=True)
class Entry:
    round_id: str
    entry_id: bytes
    fields: dict[bytes, bytes]

    @property
    def seq(self) -> int | None:
        """The round's change sequence number of this entry (None in entries made before it)."""
        raw = self.fields.get(b"seq")
        if raw is None or not raw.isdigit():
            return None
        return int(raw)

    def statement(self) -> tuple[str, tuple[Any, ...]]:
        kind = self.fields.get(b"kind", b"").decode()
        if kind == "reservation":
            r = orjson.loads(self.fields[b"record"])
            return UPSERT_RESERVATION, (
                r["id"],
                self.round_id,
                r["site"],
                int(r["qty"]),
                r["status"],
                r["code"],
                r["cit"],
                r["ph"],
                r["mask"],
                _ts(int(r["created"])),
                _ts(int(r["updated"])),
                r.get("ch") or "api",  # records made before channels: api
                r.get("age"),
                r.get("reg"),
            )
        if kind == "entry":
            e = orjson.loads(self.fields[b"record"])
            return UPSERT_ENTRY, (
                e["id"],
                self.round_id,
                entry_receipt(self.round_id, e["id"]),
                e["site"],
                bool(int(e["acc"])),
                e["status"],
                e["cit"],
                e["ph"],
                e["mask"],
                e.get("res") or None,
                self.seq or 0,
                _ts(int(e["created"])),
                _ts(int(e["updated"])),
                e.get("ch") or "api",  # entries made before channels: api
                e.get("age"),
            )
        if kind == "batch":
            items = orjson.loads(self.fields[b"items"])
            return INSERT_BATCH, (
                self.round_id,
                self.fields[b"batch_id"].decode(),
                self.fields[b"digest"].decode(),
                orjson.dumps(items).decode(),
                sum(int(q) for _, q in items),
                _ts(int(self.fields[b"at"])),
            )
        if kind == "carry":  # lua/carry.lua: an empty Lua list arrives encoded as {}
            c = orjson.loads(self.fields[b"record"])
            items = [[str(s), int(q)] for s, q in (c.get("items") or [])]
            parts = [[str(s), int(r), int(e)] for s, r, e in (c.get("parts") or [])]
            return INSERT_CARRY, (
                self.round_id,
                c["to"],
                c["batch_id"],
                orjson.dumps(items).decode(),
                orjson.dumps(parts).decode(),
                sum(q for _, q in items),
                _ts(int(c["at"])),
            )
        raise ValueError(f"unknown ledger entry kind {kind!r}")


def consumer_name(configured: str = "") -> str:
    """The writer's name in the consumer group: ``[ledger] consumer`` when set, else
    ``<hostname>-ledger``. Stable across restarts, so that a restarted writer re-reads its own
    pending entries first; two writers running at once need two names."""
    return configured or f"{socket.gethostname()}-ledger"


class LedgerWriter:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        keys: Keys,
        settings: LedgerSettings,
        *,
        consumer: str | None = None,
        block_ms: int = 200,
        on_lag: Callable[[int], None] | None = None,
        floors: Floors | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self.redis = redis
        # [redis] wait_replicas: new entries are committed only once that many replicas have
        # them, so the ledger is never ahead of a replica that a failover promotes (its rounds
        # would then be refused as lost until `allot rebuild`)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.pool = pool
        self.keys = keys
        self.settings = settings
        self.consumer = consumer or consumer_name(settings.consumer)
        self.block_ms = block_ms
        self.on_lag = on_lag
        self.floors = floors  # this worker's copy of the ledger's marks, raised after each commit
        self.committed = 0  # entries committed by this writer, for tests and logs
        self.last_batch = 0  # entries in the last batch read
        self._groups: set[str] = set()
        # round_id -> its keys under its hash tag (allocator/tags.py), refreshed with the streams
        self._round_keys: dict[str, RoundKeys] = {}
        self._failures: dict[bytes, int] = {}
        self._stopping = asyncio.Event()
        self._backoff = 0.0
        self._nodes = _Nodes(self)
        self._last_streams: dict[str, str] = {}  # cluster mode: used while the list's node fails
        self._list_retry_at = 0.0
        self._list_pause = 0.0
        self._backlogs: dict[str, int] = {}  # node -> its streams' length when last read

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Drain until stop() is called; every failure is logged and retried, never raised."""
        log.info("ledger writer %s started (pid %d)", self.consumer, os.getpid())
        loop = asyncio.get_running_loop()
        next_claim = next_lag = 0.0
        while not self._stopping.is_set():
            try:
                streams = await self._streams()
                if loop.time() >= next_claim:
                    await self._autoclaim(streams)
                    next_claim = loop.time() + self.settings.claim_idle_ms / 2000
                if loop.time() >= next_lag:  # also while PostgreSQL is down: the backlog grows
                    await self._report_lag(streams)
                    next_lag = loop.time() + LAG_INTERVAL
                progressed = await self.step(streams)
                self._backoff = 0.0
                if not progressed and not streams:
                    await self._sleep(self.block_ms / 1000)
                elif progressed and self.last_batch < self.settings.batch_size:
                    # a trickle: let entries gather, a bigger batch costs less per entry
                    await self._sleep(self.settings.linger_ms / 1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, RedisError | OSError):
                    topology.mark_stale(self.redis)  # cluster mode: a primary may have changed
                if isinstance(exc, RedisError | OSError) and self.floors is not None:
                    self.floors.redis_failed()  # the Redis that comes back may be an older copy
                self._backoff = min(5.0, max(0.1, self._backoff * 2))
                level = logging.WARNING if _transient(exc) else logging.ERROR
                log.log(
                    level,
                    "ledger writer: %s: %s; retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    self._backoff,
                )
                await self._sleep(self._backoff)
        log.info("ledger writer %s stopped", self.consumer)

    def stop(self) -> None:
        self._stopping.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- one pass ----------------------------------------------------------------------------

    async def step(self, streams: dict[str, str] | None = None) -> bool:
        """Commit one batch: this consumer's pending entries first, else new ones."""
        if streams is None:
            streams = await self._streams()
        if not streams:
            return False
        entries = await self._read(streams, "0", None)
        if not entries:
            entries = await self._read(streams, ">", self.block_ms)
        if not entries:
            return False
        self.last_batch = len(entries)
        await self._commit(entries, streams)
        return True

    async def _read(self, streams: dict[str, str], start: str, block: int | None) -> list[Entry]:
        """Entries of every stream from ``start`` ("0": this consumer's pending, ">": new)."""
        count = self.settings.batch_size
        if self.wait_replicas:
            return await self._read_replicated(streams, start, count, block)
        if not topology.is_cluster(self.redis):
            return self._parse(
                await self.redis.xreadgroup(
                    GROUP, self.consumer, dict.fromkeys(streams, start), count, block=block
                )
            )

        # Redis Cluster: one XREADGROUP per stream, each on its round's node (one read of
        # several streams is CROSSSLOT), one pipeline per node, the nodes at once (_Nodes), and
        # never blocking (a blocked read would hold a node's connection, and one node's silence
        # would delay the others). A node that fails costs only its streams.
        def queue(pipe: Pipeline, _node: str, names: list[str]) -> None:
            for stream in names:
                pipe.xreadgroup(GROUP, self.consumer, {stream: start}, count)

        replies = await self._nodes.pipelines(self._nodes.by_node(list(streams)), queue)
        entries: list[Entry] = []
        unreadable = 0
        for reply in replies.values():
            if isinstance(reply, BaseException):
                continue
            for r in reply:
                if isinstance(r, Exception):
                    unreadable += 1
                else:
                    entries += self._parse(r)
        if unreadable:
            log.warning("ledger writer: %d streams unreadable now", unreadable)
            topology.mark_stale(self.redis)
            if self.floors is not None:
                self.floors.redis_failed()
        if not entries and block:
            await self._sleep(min(block, POLL_MS) / 1000)
        return entries

    async def _read_replicated(
        self, streams: dict[str, str], start: str, count: int, block: int | None
    ) -> list[Entry]:
        """Entries, each node's kept only when WAIT on the connection that read them (one per
        node, after the node's reads: a read of new entries is a write, replicated after the
        entries it returns) says enough replicas have them; the others stay pending and are
        read again. (A re-read of pending entries writes nothing: its WAIT covers what that
        connection wrote before, which is a weaker check, for the rare entries read again.)"""
        cluster = topology.is_cluster(self.redis)
        if cluster:
            _ = await topology.initialized(self.redis)
        grouped = self._nodes.by_node(list(streams))

        def queue(pipe: Pipeline, node: str, names: list[str]) -> None:
            target: dict[str, Any] = {}
            if cluster:
                target["target_nodes"] = topology.as_cluster(self.redis).get_node(node_name=node)
            for stream in names:
                pipe.xreadgroup(GROUP, self.consumer, {stream: start}, count)  # by key
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms, **target)

        replies = await self._nodes.pipelines(grouped, queue)
        entries: list[Entry] = []
        unconfirmed = 0
        for node, reply in replies.items():
            if isinstance(reply, BaseException):
                continue  # the node failed: its streams wait for a later pass
            names = grouped[node]
            read, acked = reply[: len(names)], reply[len(names)]
            moved = cluster and any(topology.node_name(self.redis, s) != node for s in names)
            if moved or isinstance(acked, Exception) or int(acked) < self.wait_replicas:
                # (moved: the map changed meanwhile, a read went elsewhere than the WAIT)
                unconfirmed += sum(1 for r in read if r and not isinstance(r, Exception))
                continue
            entries += [e for r in read if not isinstance(r, Exception) for e in self._parse(r)]
        if unconfirmed:
            log.warning(
                "ledger writer: %d streams' new entries not yet on %d replica(s); kept pending",
                unconfirmed,
                self.wait_replicas,
            )
        if not entries and block:
            await self._sleep(min(block, POLL_MS) / 1000)
        return entries

    async def drain(self) -> None:
        """Commit until every stream is empty; callers bound it with asyncio.timeout."""
        while True:
            streams = await self._streams()
            await self.step(streams)
            if not await self.backlog(streams):
                return

    async def backlog(self, streams: dict[str, str] | None = None) -> int:
        """Entries not yet committed: every committed entry is deleted from its stream. Raises
        while a node does not answer (or is skipped by its breaker): a count without it would
        tell :meth:`drain` it is done."""
        if streams is None:
            streams = await self._streams()
        lengths = await self._lengths(streams)
        failed = [r for r in lengths.values() if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        if topology.is_cluster(self.redis):
            down = self._nodes.down()
            if any(topology.node_name(self.redis, s) in (None, *down) for s in streams):
                raise ConnectionError("ledger backlog unknown: a node skipped or without primary")
        return sum(n for n in lengths.values() if isinstance(n, int))

    async def _lengths(self, streams: dict[str, str]) -> dict[str, int | BaseException]:
        """node -> its streams' entries (XLEN), or what failed it."""

        def queue(pipe: Pipeline, _node: str, names: list[str]) -> None:
            for stream in names:
                pipe.xlen(stream)

        replies = await self._nodes.pipelines(self._nodes.by_node(list(streams)), queue)
        out: dict[str, int | BaseException] = {}
        for node, reply in replies.items():
            if isinstance(reply, BaseException):
                out[node] = reply
                continue
            bad = next((r for r in reply if isinstance(r, Exception)), None)
            out[node] = bad if bad is not None else sum(int(r) for r in reply)
        return out

    async def _streams(self) -> dict[str, str]:
        """stream key -> round_id for every round, with its consumer group in place. Cluster
        mode: while the list of rounds cannot be read (its keys' nodes fail), the list last
        read, asked again after a pause that doubles (a round made meanwhile is read once they
        answer): without it, a hung node holding the list stalled every round's ledger."""
        if not topology.is_cluster(self.redis):
            return await self._read_streams()
        if self._last_streams and time.monotonic() < self._list_retry_at:
            return await self._groups_in_place(self._last_streams)
        try:
            streams = await self._read_streams()
        except (RedisError, OSError) as exc:
            if not self._last_streams:
                raise  # nothing known yet: the pass fails, the writer backs off
            self._list_pause = min(NODE_BREAKER[1], max(NODE_BREAKER[0], self._list_pause * 2))
            self._list_retry_at = time.monotonic() + self._list_pause
            topology.mark_stale(self.redis)
            log.warning(
                "ledger writer: the list of rounds unreadable (%s: %s); the last one read, for"
                " %.2fs",
                type(exc).__name__,
                exc,
                self._list_pause,
            )
            return await self._groups_in_place(self._last_streams)
        self._list_pause = 0.0
        self._last_streams = streams
        return dict(streams)

    async def _read_streams(self) -> dict[str, str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(self.keys.rounds)
            pipe.hgetall(self.keys.round_tags)  # each round's hash tag (allocator/tags.py)
            members, tags_raw = await pipe.execute()
        round_ids = sorted(m.decode() for m in members)
        tags = {k.decode(): v.decode() for k, v in tags_raw.items()}
        self._round_keys = {r: self.keys.round(r, tags.get(r)) for r in round_ids}
        streams = {rk.ledger: r for r, rk in self._round_keys.items()}
        return await self._groups_in_place(streams)

    async def _groups_in_place(self, streams: dict[str, str]) -> dict[str, str]:
        """The streams, each with its consumer group made (once per writer); cluster mode: a
        stream whose node fails is left out of this pass."""
        missing = [s for s in streams if s not in self._groups]
        if not missing:
            return streams
        if not topology.is_cluster(self.redis):
            for stream in missing:
                await create_group(self.redis, stream)
                self._groups.add(stream)
            return streams

        async def create(_node: str, names: list[str]) -> None:
            for stream in names:
                await create_group(self.redis, stream)
                self._groups.add(stream)

        await self._nodes.each(self._nodes.by_node(missing), create)
        return {s: r for s, r in streams.items() if s in self._groups}

    def _parse(self, reply: Any) -> list[Entry]:
        entries: list[Entry] = []
        for stream, items in reply or []:
            round_id = self._round_of_stream(stream.decode())
            for entry_id, fields in items:
                if fields:  # a pending entry deleted meanwhile comes back with no fields
                    entries.append(Entry(round_id, entry_id, fields))
        return entries

    def _round_of_stream(self, stream: str) -> str:
        # <prefix>:{r:<round_id>}:ledger, or <prefix>:{p:<programme>}:r:<round_id>:ledger
        if stream.endswith("}:ledger"):
            return stream.rsplit("{r:", 1)[1].split("}", 1)[0]
        return stream.removesuffix(":ledger").rsplit("}:r:", 1)[1]

    def _rk(self, round_id: str) -> RoundKeys:
        return self._round_keys.get(round_id) or self.keys.round(round_id)

    async def _commit(self, entries: Sequence[Entry], streams: dict[str, str]) -> None:
        marks = _marks(entries)
        try:
            reservations, others = _split(entries)
            async with self.pool.acquire() as con, con.transaction():
                if reservations:
                    await con.execute(UPSERT_RESERVATIONS, *_columns(_fold(reservations)))
                for sql, rows in others.items():  # batches, carries, entries
                    if sql == UPSERT_ENTRIES:
                        await con.execute(sql, *_columns(_fold_entries(rows)))
                    else:
                        await con.executemany(sql, rows)
                if marks:
                    rounds, seqs = zip(*sorted(marks.items()), strict=True)
                    await con.execute(RAISE_LEDGER_SEQS, list(rounds), list(seqs))
        except TRANSIENT_PG_ERRORS:
            raise
        except (asyncpg.PostgresError, ValueError, KeyError) as exc:
            log.warning("ledger batch of %d refused (%s); committing one by one", len(entries), exc)
            for entry in entries:
                await self._commit_one(entry)
            return
        self._committed(marks)
        await self._ack(entries)

    async def _commit_one(self, entry: Entry) -> None:
        marks = _marks([entry])
        try:
            sql, row = entry.statement()
            async with self.pool.acquire() as con, con.transaction():
                await con.execute(sql, *row)
                if marks:
                    await con.executemany(RAISE_LEDGER_SEQ, sorted(marks.items()))
        except TRANSIENT_PG_ERRORS:
            raise
        except (asyncpg.PostgresError, ValueError, KeyError) as exc:
            failures = self._failures.get(entry.entry_id, 0) + 1
            self._failures[entry.entry_id] = failures
            if failures < self.settings.max_attempts:
                log.warning(
                    "ledger entry %s of round %s refused (%d/%d): %s",
                    entry.entry_id.decode(),
                    entry.round_id,
                    failures,
                    self.settings.max_attempts,
                    exc,
                )
                return
            await self._dead_letter(entry, exc)
            return
        self._committed(marks)
        await self._ack([entry])

    def _committed(self, marks: dict[str, int]) -> None:
        if self.floors is not None:
            for round_id, seq in marks.items():
                self.floors.raise_to(round_id, seq)

    async def _dead_letter(self, entry: Entry, exc: Exception) -> None:
        rk = self._rk(entry.round_id)
        log.error(
            "ledger entry %s of round %s moved to %s after %d attempts: %s",
            entry.entry_id.decode(),
            entry.round_id,
            rk.dead,
            self.settings.max_attempts,
            exc,
        )
        fields = dict(entry.fields)
        fields[b"error"] = str(exc).encode()
        fields[b"entry_id"] = entry.entry_id
        await self.redis.xadd(rk.dead, fields)  # type: ignore[arg-type]
        await self._ack([entry])

    async def _ack(self, entries: Sequence[Entry]) -> None:
        by_stream: dict[str, list[bytes]] = {}
        for e in entries:
            by_stream.setdefault(self._rk(e.round_id).ledger, []).append(e.entry_id)
            self._failures.pop(e.entry_id, None)
        if not topology.is_cluster(self.redis):
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, ids in by_stream.items():
                    pipe.xack(stream, GROUP, *ids)
                    pipe.xdel(stream, *ids)
                await pipe.execute()
            self.committed += len(entries)
            return

        # per node: a node that fails now keeps its entries pending, committed again (the
        # writes are idempotent) once it answers; the other nodes' acknowledgements stand
        def queue(pipe: Pipeline, _node: str, names: list[str]) -> None:
            for stream in names:
                pipe.xack(stream, GROUP, *by_stream[stream])
                pipe.xdel(stream, *by_stream[stream])

        grouped: dict[str, list[str]] = {}
        for stream in by_stream:  # every node, its breaker open or not: its entries are done
            grouped.setdefault(topology.node_name(self.redis, stream) or "?", []).append(stream)
        await self._nodes.pipelines(grouped, queue)
        self.committed += len(entries)

    async def _autoclaim(self, streams: dict[str, str]) -> None:
        """Take over entries another consumer left pending for longer than claim_idle_ms; the
        nodes at once, each node's streams one after the other."""
        await self._nodes.each(self._nodes.by_node(list(streams)), self._autoclaim_streams)

    async def _autoclaim_streams(self, _node: str, streams: list[str]) -> None:
        for stream in streams:
            start = "0-0"
            while True:
                reply = await self.redis.xautoclaim(
                    stream,
                    GROUP,
                    self.consumer,
                    self.settings.claim_idle_ms,
                    start_id=start,
                    count=self.settings.batch_size,
                )  # not justid: redis-py then drops the cursor, and we must page
                start_b, claimed = reply[0], reply[1]
                if claimed:
                    log.warning(
                        "ledger writer %s took over %d pending entries of %s",
                        self.consumer,
                        len(claimed),
                        stream,
                    )
                start = start_b.decode() if isinstance(start_b, bytes) else str(start_b)
                if start == "0-0":
                    break

    async def _report_lag(self, streams: dict[str, str]) -> None:
        """The backlog; cluster mode: a node that does not answer counts with its last reading."""
        if self.on_lag is None:
            return
        lengths = await self._lengths(streams)
        # a node skipped or failed now keeps its last reading; a node gone from the map, none
        down = set(self._nodes.down())
        self._backlogs = {
            node: n if isinstance(n, int) else self._backlogs.get(node, 0)
            for node, n in lengths.items()
        } | {node: n for node, n in self._backlogs.items() if node in down}
        self.on_lag(sum(self._backlogs.values()))


def _marks(entries: Sequence[Entry]) -> dict[str, int]:
    """round_id -> the highest change sequence number among the entries."""
    marks: dict[str, int] = {}
    for entry in entries:
        seq = entry.seq
        if seq is not None and seq > marks.get(entry.round_id, 0):
            marks[entry.round_id] = seq
    return marks


def _split(
    entries: Sequence[Entry],
) -> tuple[list[tuple[Any, ...]], dict[str, list[tuple[Any, ...]]]]:
    """The batch's reservation rows (in stream order), and the other rows (batches, carries,
    entries: these under UPSERT_ENTRIES) by their statement. The tables do not refer to each
    other, so their order between them does not matter; each kind keeps its stream order."""
    reservations: list[tuple[Any, ...]] = []
    others: dict[str, list[tuple[Any, ...]]] = {}
    for entry in entries:
        sql, row = entry.statement()
        if sql == UPSERT_RESERVATION:
            reservations.append(row)
        elif sql == UPSERT_ENTRY:
            others.setdefault(UPSERT_ENTRIES, []).append(row)
        else:
            others.setdefault(sql, []).append(row)
    return reservations, others


def _fold(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One row per reservation_id: the one that decides the outcome when the rows are upserted
    one after the other in stream order. The forward-only rule keeps a row's first insert,
    moves its status once, off 'confirmed', and never again: so the first row that is not
    'confirmed' decides (its record is the reservation's full record with that status), else
    the first row."""
    chosen: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        rid, status = row[0], row[4]
        held = chosen.get(rid)
        if held is None or (held[4] == "confirmed" and status != "confirmed"):
            chosen[rid] = row
    return list(chosen.values())


# Columns of an UPSERT_ENTRY row that a later change of the entry may set (the statement's SET).
_ENTRY_MUTABLE = (
    3,
    4,
    5,
    9,
    10,
    12,
)  # site_id, accept_district, status, reservation_id, seq, updated_at
_ENTRY_SEQ = 10


def _fold_entries(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One row per entry_id, as the rows upserted one by one in stream order would leave it:
    the first row's insert (its fixed columns: receipt, citizen, created_at, channel, ...), then
    only a row with a higher ``seq`` than the one kept moves the changeable columns. Upserting
    the folded row therefore ends in the same state, whether or not the entry was already in
    the table."""
    chosen: dict[str, list[Any]] = {}
    for row in rows:
        held = chosen.get(row[0])
        if held is None:
            chosen[row[0]] = list(row)
        elif row[_ENTRY_SEQ] > held[_ENTRY_SEQ]:
            for i in _ENTRY_MUTABLE:
                held[i] = row[i]
    return [tuple(r) for r in chosen.values()]


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as one list per column, for unnest()."""
    return [list(column) for column in zip(*rows, strict=True)]


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (*TRANSIENT_PG_ERRORS, RedisError))
