"""The Redis topology: one client factory for a single Redis and for Redis Cluster, and the few
places where the two differ (docs/operations.md, "Redis topology and durability").

``[redis] mode = "cluster"``: ALLOT_REDIS_URL names startup nodes, comma-separated. Every key of
a round shares one hash tag (allocator/keys.py), so every script runs on its round's slot, on
the primary that owns it; the cluster client routes each call by its first key.

We stay on redis-py 7.4 (pyproject.toml pins <8): 8.x retypes the asyncio client, which would
touch every module that types a client, and 7.4 serves once three of its gaps are worked around
here, each where it is used:

* after a failover its script cache knows nothing of the promoted replica (SCRIPT LOAD goes to
  the primaries it knew), so an EVALSHA there fails with NOSCRIPT for good. :class:`ClusterScript`
  answers NOSCRIPT with EVAL of the source, routed by key like the EVALSHA, which also caches
  the script on that node;
* its asyncio cluster client has no pub/sub. Classic PUBLISH in a cluster is forwarded over the
  cluster bus to every node, so a subscriber on any one node hears every message:
  :func:`subscription` subscribes on one node at a time (the next one after a failure);
* a keyless WAIT would go to a random node: :class:`ReplicaWait` sends it in the same
  pipeline as the script, to the script's node, so that it runs on the script's connection;
* the node of a command whose keys Redis flags "movablekeys" (XREADGROUP, XREAD: the ledger's
  reads) is found by asking one fixed node ``COMMAND GETKEYS`` before each call: with that
  node hung, every such call on every node waited out the socket timeout on it.
  :class:`_CommandsParser` finds those keys itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry
from redis.typing import EncodableT, KeyT

from allocator.config import Settings
from allocator.errors import Unavailable
from allocator.keys import wait_fence
from allocator.redispack import PackedConnection

log = logging.getLogger("allot.allocator")

MAX_CONNECTIONS = 64  # per node: a worker's claims are batched, 64 covers many rounds at once


class _CommandsParser(AsyncCommandsParser):
    """redis-py 7.4's key finder, without a round trip for the stream reads.

    A command flagged "movablekeys" has its keys found by ``COMMAND GETKEYS`` on the node the
    parser learnt the command table from (one node for the client's life), before the call is
    routed. XREADGROUP and XREAD are such commands: while that node hung (its socket open,
    nothing answering), every ledger read, on every node, first waited out the socket timeout
    on it and failed (measured: an XREADGROUP on a healthy primary took 0.80 s and raised
    "Timeout reading from" the hung one, an XLEN 0.000 s; tests/test_cluster.py, the ledger
    while one primary hangs). Their keys are the first half of what follows STREAMS."""

    async def get_keys(self, *args: Any) -> tuple[str, ...] | None:
        keys = stream_read_keys(args)
        if keys is not None:
            return keys
        return await super().get_keys(*args)


def stream_read_keys(args: Sequence[Any]) -> tuple[Any, ...] | None:
    """The stream keys of an XREADGROUP or XREAD command (its name first); None for any other
    command. The options before STREAMS (COUNT n, BLOCK ms, NOACK; after GROUP name consumer)
    take numbers, so the first STREAMS after them is the keyword."""
    if not args:
        return None
    name = _text(args[0]).upper()
    first = {"XREADGROUP": 4, "XREAD": 1}.get(name)
    if first is None:
        return None
    for i in range(first, len(args)):
        if _text(args[i]).upper() == "STREAMS":
            rest = tuple(args[i + 1 :])
            return rest[: len(rest) // 2] or None
    return None


def _text(arg: Any) -> str:
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


class _Cluster(RedisCluster):
    """redis-py 7.4's asyncio cluster client, with one method changed: ``initialize()``.

    Its own reads the slot map, then COMMAND from the first primary of the new map, and on any
    failure closes every connection and raises. While a killed primary is still in the map
    (until its replica is promoted, cluster-node-timeout and more), every re-initialization
    (after any failed call) would fail when that primary comes first, and take every shard's
    connections down with it. The command table does not change at a failover: once it is
    known, a re-initialization reads only the slot map (from any node that answers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = _CommandsParser()

    async def initialize(self) -> RedisCluster:
        if not self._initialize:
            return self
        if self.commands_parser.commands and self.nodes_manager.slots_cache:
            # A map is known and marked stale: it is read again in the background (one
            # re-reading at a time, :func:`mark_stale`), never by the call that found it stale.
            # Re-reading asks the startup nodes one after the other, each for up to the socket
            # timeout: with a hung node among them (its socket open, nothing answering), every
            # call on every shard waited behind the re-reading, and the healthy shards' claims
            # took seconds (tests/test_cluster.py, the hung shard). A call on the old map that
            # meets a moved slot follows the MOVED answer (redis-py updates that slot itself).
            mark_stale(cast(Redis, self))
            self._reclaim_pool_slots()  # as after a re-reading: see _one_node_per_name
            return self
        return await self.reread()

    async def reread(self) -> RedisCluster:
        """Read the slot map (and, the first time, the command table) now."""
        if not self._initialize:
            return self
        if not self.commands_parser.commands:
            try:
                _ = await super().initialize()
                self._one_node_per_name()
                return self
            except (RedisError, OSError):
                pass  # a client started while a primary is down: COMMAND from another one
        if not self._lock:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._initialize:
                await self.nodes_manager.initialize()
                self._one_node_per_name()
                if not self.commands_parser.commands:
                    await self._read_commands()
                self._initialize = False
        return self

    def _one_node_per_name(self) -> None:
        """After a re-reading of the slot map, point every slot at the node object the client
        keeps for that address, with the role the map gives it now.

        redis-py 7.4 keeps its old node objects (and their connections) but points the slots
        at new objects for the same addresses: the connections opened through the slots were
        dropped at the next re-reading without being closed (ResourceWarning: Unclosed
        ClusterNode), and the old objects kept their old role (a promoted replica stayed a
        "replica" among the primaries the client knows).

        Also takes back the pool slots of connections that never connected: a node's
        ``execute_command`` and ``execute_pipeline`` do not give a connection back when the
        connect fails, so a node that refused a few dozen calls answered MaxConnectionsError
        for good, even once it was back."""
        manager = self.nodes_manager
        kept = manager.nodes_cache
        for node in {id(n): n for ns in manager.slots_cache.values() for n in ns}.values():
            if node.name in kept and kept[node.name] is not node:
                kept[node.name].server_type = node.server_type
        for slot, nodes in manager.slots_cache.items():
            manager.slots_cache[slot] = [kept.get(n.name, n) for n in nodes]
        self._reclaim_pool_slots()

    def _reclaim_pool_slots(self) -> None:
        """Take back the pool slots of connections that never connected (see above)."""
        for node in self.nodes_manager.nodes_cache.values():
            free = set(map(id, node._free))
            node._connections = [c for c in node._connections if c.is_connected or id(c) in free]

    async def _read_commands(self) -> None:
        failure: BaseException | None = None
        for node in self.get_primaries():
            try:
                await self.commands_parser.initialize(node)
                self.nodes_manager.default_node = node
                return
            except (RedisError, OSError) as exc:
                failure = exc
        raise failure or ConnectionError("no primary answers COMMAND")


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def startup_nodes(redis_url: str) -> list[tuple[str, int]]:
    """host, port of each comma-separated node (the URL is checked by allocator/config.py)."""
    nodes = []
    for part in redis_url.split(","):
        split = urlsplit(part.strip())
        nodes.append((split.hostname or "127.0.0.1", split.port or 6379))
    return nodes


def redis_client(settings: Settings) -> Redis:
    """Bounded everything: connections, waits for a connection, connect and read timeouts.

    No automatic retries: a timed-out claim may have run, and the citizen's own retry is the
    safe one (it gets the same reservation back with 200). In cluster mode a failed call marks
    the slot map stale, and the next call reads the topology again before it runs.

    The cluster client is typed as ``Redis``: it has the same command methods, and the places
    where it differs go through this module.
    """
    timeout = settings.service.redis_timeout_ms / 1000
    if settings.redis.mode != "cluster":
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 0.5),
            health_check_interval=10,
            retry=Retry(NoBackoff(), 0),
            # commands packed in C (allocator/redispack.py; rediss://, unix:// keep theirs); the
            # cluster client builds its connections itself (redis-py 7.4): Python packing there
            connection_class=PackedConnection,
        )
        return Redis(connection_pool=pool)
    first = urlsplit(settings.redis_url.split(",")[0].strip())
    cluster = _Cluster(
        startup_nodes=[ClusterNode(h, p) for h, p in startup_nodes(settings.redis_url)],
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
        ssl=first.scheme == "rediss",
        max_connections=MAX_CONNECTIONS,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 0.5),
        health_check_interval=10,
        retry=AsyncRetry(NoBackoff(), 0),
        # a partly down cluster still serves the rounds of its healthy shards
        require_full_coverage=False,
    )
    return cast(Redis, cluster)


async def close_client(client: Redis) -> None:
    if is_cluster(client):
        task = _refreshing.pop(as_cluster(client), None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await client.aclose()
    if not is_cluster(client):
        await client.connection_pool.disconnect()


def as_cluster(client: Redis) -> RedisCluster:
    return cast(RedisCluster, client)


_refreshing: weakref.WeakKeyDictionary[RedisCluster, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def mark_stale(client: Redis, failed: str | None = None) -> None:
    """After a connection failure or timeout: read the slot map again, now, in the background.
    ``failed``: the ``host:port`` that failed, asked last by that re-reading (a hung node would
    cost it a socket timeout; redis-py 7.4 moves a node only after a failed single command).

    redis-py 7.4 marks its map stale itself after a failed single command, but not after a
    failed pipeline (its pipelines run with our zero retries), so a client whose calls are
    pipelines (a claim batch with WAIT, the ledger's reads) would go on asking a dead primary.
    So the map is read again here, one refresh at a time per client (see :class:`_Cluster`);
    ``_initialize`` is the flag redis-py's own command path sets."""
    if not is_cluster(client):
        return
    cluster = as_cluster(client)
    if failed is not None:
        cluster.nodes_manager.move_node_to_end_of_cached_nodes(failed)
    task = _refreshing.get(cluster)
    if task is not None and not task.done():
        return  # a refresh is under way, or has just been made
    cluster._initialize = True
    if task is None or task.done():
        _refreshing[cluster] = asyncio.get_running_loop().create_task(_refresh(cluster))


REFRESH_EVERY = 0.25  # seconds: at most four re-readings of the slot map a second per client


async def _refresh(cluster: RedisCluster) -> None:
    with contextlib.suppress(Exception):  # still down: the next failure refreshes again
        async with asyncio.timeout(2):
            if isinstance(cluster, _Cluster):
                _ = await cluster.reread()
            else:
                _ = await cluster.initialize()
    # the failures of the next moment are the same outage: one reading of the map serves them
    # (each reading also costs sockets that redis-py 7.4 closes only when collected)
    await asyncio.sleep(REFRESH_EVERY)


async def initialized(client: Redis) -> RedisCluster:
    """The cluster client, at once once it has a slot map (a stale one is read again in the
    background, :meth:`_Cluster.initialize`); the first time, after reading one."""
    return await as_cluster(client).initialize()


def node_name(client: Redis, key: str) -> str | None:
    """``host:port`` of the primary serving ``key`` as this client sees it; None when single."""
    if not is_cluster(client):
        return None
    try:
        node = as_cluster(client).get_node_from_key(key)
    except Exception:  # the slot is not covered right now (SlotNotCoveredError)
        return None
    return node.name if node is not None else None


# -- scripts -------------------------------------------------------------------------------


class ClusterScript(AsyncScript):
    """A script in cluster mode: EVALSHA routed by its first key; NOSCRIPT -> EVAL of the source.

    Why not redis-py's own fallback: it sends SCRIPT LOAD to the primaries it knew at start, so
    on a promoted replica every call failed with NOSCRIPT until restart (issue 11). EVAL goes
    where the keys live and leaves the script cached there. In a pipeline a NOSCRIPT would fail
    the whole pipeline, so a pipeline gets EVAL of the source at once (Redis looks the compiled
    script up by its SHA all the same; the cost is the bytes of the source).
    """

    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: Redis | None = None,
    ) -> Any:
        keys = list(keys or [])
        every = (*keys, *(args or []))
        target: Any = self.registered_client if client is None else client
        source = self.script.decode() if isinstance(self.script, bytes) else str(self.script)
        if isinstance(target, ClusterPipeline):
            # queued, not awaited: awaiting a cluster pipeline (re)initializes it, which empties
            # its queue (redis-py 7.4)
            return target.execute_command("EVAL", source, len(keys), *every)
        try:
            return await target.execute_command("EVALSHA", self.sha, len(keys), *every)
        except NoScriptError:
            return await target.execute_command("EVAL", source, len(keys), *every)


def script(client: Redis, source: str) -> AsyncScript:
    """The script object for this client's topology."""
    if is_cluster(client):
        return ClusterScript(client, source)
    return client.register_script(source)


# -- a script whose answer waits for replicas ----------------------------------------------


FENCE_TTL_MS = 60_000  # the wait fence (allocator/keys.py) outlives any retry, then goes


class ReplicaWait:
    """``[redis] wait_replicas``: a script's reply is used only after that many replicas
    acknowledged its writes, with WAIT on the script's own connection (one pipeline: the
    script, a write to the slot's wait fence, then WAIT). WAIT promises to cover that
    connection's previous writes; the fence is one, made after everything the primary did
    before, so the WAIT covers a first try's change too when the retry's script writes
    nothing (a cancel found already cancelled, say). Fewer within
    ``wait_timeout_ms``: Unavailable (with a retry_after).

    One object, made by the facade (allocator/facade.py) and shared by every part whose script
    answers someone: claims, lottery entries and withdrawals, cancel, pickup, batches, retire,
    carry-over, the lottery's award and settle. The change did happen on the primary; each
    script is idempotent for its retry (the same reservation or entry back, cancelled or
    withdrawn again, already collected, the same batch_id replayed), and if the primary died
    before a replica had it, the retry simply makes it again."""

    def __init__(self, redis: Redis, replicas: int, timeout_ms: int) -> None:
        self.redis = redis
        self.replicas = replicas
        self.timeout_ms = timeout_ms

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self.replicas <= 0:
            return await script(keys=keys, args=args)
        reply, acked = await self._pipelined(script, keys, args, by_sha=True)
        if isinstance(reply, NoScriptError):  # a new or promoted primary: send the source
            reply, acked = await self._pipelined(script, keys, args, by_sha=False)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < self.replicas:
            log.warning(
                "WAIT %d: %s replicas acknowledged a write on %s within %d ms; unavailable",
                self.replicas,
                acked,
                keys[0],  # a round's (or programme's) key: no citizen in it
                self.timeout_ms,
            )
            raise Unavailable(
                "This change is not yet safely stored; please try again.", retry_after=1
            )
        return reply

    async def _pipelined(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], *, by_sha: bool
    ) -> tuple[Any, Any]:
        head = ("EVALSHA", script.sha) if by_sha else ("EVAL", script.script)
        wait: dict[str, Any] = {}
        node = None
        if is_cluster(self.redis):
            cluster = await initialized(self.redis)
            node = cluster.get_node_from_key(keys[0])
            wait["target_nodes"] = node
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command(*head, len(keys), *keys, *args)
            # WAIT promises only "the previous write commands sent in the context of the
            # current connection". A script that wrote nothing (a retried cancel that finds the
            # reservation cancelled, on another pooled connection than the first try) would
            # then leave the first try's change uncovered. Redis 7.0 in fact counts from the
            # primary's offset after any command (tests/test_replica_wait.py pins that); this
            # write in the script's slot, on the same connection, makes the documented promise
            # enough, for one small SET per waited call.
            pipe.execute_command("SET", wait_fence(keys[0]), b"1", "PX", FENCE_TTL_MS)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms, **wait)
            reply, fenced, acked = await pipe.execute(raise_on_error=False)
        if isinstance(fenced, Exception) and not isinstance(reply, Exception):
            raise fenced
        now = as_cluster(self.redis).get_node_from_key(keys[0]) if node is not None else None
        if node is not None and (now is None or now.name != node.name):
            # the slot moved meanwhile (MOVED): the script ran elsewhere, WAIT says nothing of it
            raise Unavailable("The reservation store is changing over; please try again.")
        return reply, acked


# -- pub/sub -------------------------------------------------------------------------------

_next_node = itertools.count()


async def publish(client: Redis, channel: str, message: str) -> None:
    """PUBLISH; in cluster mode on any node (redis-py 7.4's asyncio cluster client has no
    ``publish``), which forwards it to every other node."""
    if not is_cluster(client):
        await client.publish(channel, message)
        return
    cluster: Any = client  # its execute_command is untyped
    await cluster.execute_command("PUBLISH", channel, message, target_nodes=RedisCluster.RANDOM)


@asynccontextmanager
async def subscription(client: Redis, *channels: str) -> AsyncIterator[PubSub]:
    """A PubSub subscribed to ``channels``. Single Redis: the client's own. Cluster: a plain
    connection to one node (PUBLISH reaches every node of a cluster), the next node on each
    call, so a subscriber whose node died resubscribes elsewhere."""
    if not is_cluster(client):
        async with client.pubsub(ignore_subscribe_messages=True) as ps:
            await ps.subscribe(*channels)
            yield ps
        return
    cluster = await initialized(client)
    nodes = sorted(cluster.get_nodes(), key=lambda n: n.name)
    node = nodes[next(_next_node) % len(nodes)]
    kwargs = node.connection_kwargs
    single = Redis(
        host=node.host,
        port=int(node.port),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        socket_timeout=kwargs.get("socket_timeout"),
        socket_connect_timeout=kwargs.get("socket_connect_timeout"),
        health_check_interval=10,
    )
    try:
        async with single.pubsub(ignore_subscribe_messages=True) as ps:
            await ps.subscribe(*channels)
            yield ps
    finally:
        await single.aclose()


# -- readiness -----------------------------------------------------------------------------


async def down_primaries(client: Redis, keys: Sequence[str], each: float = 1.0) -> list[str]:
    """``host:port`` of each primary serving one of ``keys`` (all primaries when none is given)
    that does not answer PING within ``each`` seconds; [] for a single Redis (its own check is the
    script it runs). At most about twice ``each`` in all.

    The PINGs go out at once, each straight to its node: one after the other, a hung primary
    (its socket open, nothing answering) took a whole ``each`` before the next was asked, and
    the cluster client's own routing first waits for any re-reading of the slot map under way,
    which itself waits on the hung node: readiness then said "the cluster does not answer"
    instead of naming the primary (tests/test_cluster.py, the hung shard)."""
    if not is_cluster(client):
        return []
    cluster = as_cluster(client)
    try:
        async with asyncio.timeout(each):
            cluster = await initialized(client)
    except TimeoutError:
        pass  # a re-reading of the slot map is waiting on a hung node: the map we have
    except (RedisError, OSError) as exc:
        return [f"(no node answers: {type(exc).__name__})"]
    nodes: dict[str, ClusterNode] = {}
    for key in keys:
        try:
            node = cluster.get_node_from_key(key)
        except Exception:  # a slot nobody serves now
            return [f"the primary of {key.split('}')[0]}}}"]
        if node is not None:
            nodes[node.name] = node
    if not keys:
        nodes = {n.name: n for n in cluster.get_primaries()}

    async def answers(node: ClusterNode) -> bool:
        # the client's own object for that address, whose connections its aclose() closes (a
        # slot may point at another one after an interrupted reading of the map)
        node = cluster.get_node(node_name=node.name) or node
        try:
            # the socket timeout fires first; this bounds the connect and a full pool's wait
            async with asyncio.timeout(each + 0.2):
                _ = await node.execute_command("PING")
        except Exception:
            return False
        return True

    names = sorted(nodes)
    up = await asyncio.gather(*(answers(nodes[n]) for n in names))
    return [name for name, ok in zip(names, up, strict=True) if not ok]
