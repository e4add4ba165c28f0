"""ReplicaWait ([redis] wait_replicas) on a private primary and replica: what its WAIT covers.

WAIT promises to cover "the previous write commands sent in the context of the current
connection". A retry whose script writes nothing (a cancel that finds the reservation already
cancelled), sent on another pooled connection than the first try, must still not be answered
while the replica lacks the first try's change. Redis 7.0 counts from the primary's offset
after any command, and ReplicaWait also writes a fence in the slot before its WAIT, so that the
documented promise alone is enough: the test holds if either does. The replica is stopped
with SIGSTOP: the primary still counts it as connected, but it acknowledges nothing, like a
replica that lags.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from allocator.errors import Unavailable
from allocator.keys import wait_fence
from allocator.topology import ReplicaWait
from loadtest.servers import PrivateRedis

# writes once; every later call writes nothing and answers "already"
ONCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'already' end
redis.call('SET', KEYS[1], '1')
return 'done'
"""
KEY = "allot-test:{r:wait}:once"


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[PrivateRedis, PrivateRedis]]:
    primary = PrivateRedis(tmp_path / "primary")
    replica = PrivateRedis(tmp_path / "replica")
    await asyncio.to_thread(primary.start)
    await asyncio.to_thread(replica.start)
    client = Redis.from_url(replica.url)
    try:
        await client.replicaof("127.0.0.1", str(primary.port))
        deadline = time.monotonic() + 20
        while (await client.info("replication")).get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    yield primary, replica
    await asyncio.to_thread(replica.close)
    await asyncio.to_thread(primary.close)


def test_the_wait_fence_is_in_the_slot_of_the_key_it_guards() -> None:
    assert wait_fence("allot:{p:masks}:r:R1:round") == "allot:{p:masks}:wait-fence"
    assert wait_fence("allot:{r:R1}:round") == "allot:{r:R1}:wait-fence"
    with pytest.raises(ValueError, match="hash tag"):
        wait_fence("allot:rounds")


async def test_a_retry_whose_script_writes_nothing_still_waits_for_the_replica(
    pair: tuple[PrivateRedis, PrivateRedis],
) -> None:
    primary, replica = pair
    first = Redis.from_url(primary.url)  # the first try's connection
    retry = Redis.from_url(primary.url)  # the retry's, another pooled connection
    mirror = Redis.from_url(replica.url)
    try:
        on_first = first.register_script(ONCE)
        on_retry = retry.register_script(ONCE)
        await asyncio.to_thread(replica.pause)
        try:
            with pytest.raises(Unavailable):
                await ReplicaWait(first, 1, 200).run(on_first, [KEY], [])
            assert await first.get(KEY) == b"1"  # the change did happen on the primary
            # the retry's script writes nothing, on a connection that never wrote
            with pytest.raises(Unavailable):
                await ReplicaWait(retry, 1, 200).run(on_retry, [KEY], [])
        finally:
            await asyncio.to_thread(replica.resume)
        assert await ReplicaWait(retry, 1, 5000).run(on_retry, [KEY], []) == b"already"
        assert await mirror.get(KEY) == b"1"  # answered only once the replica had it
        assert 0 < await first.pttl(wait_fence(KEY)) <= 60_000  # the fence goes by itself
    finally:
        for client in (first, retry, mirror):
            await client.aclose()
