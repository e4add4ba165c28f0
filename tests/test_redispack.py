"""allocator/redispack.py: commands packed by hiredis are byte for byte redis-py's own."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from allocator.config import Settings
from allocator.redispack import PackedConnection
from service.app import redis_client

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "a" * 40, 2, "{t}:k1", "{t}:k2", 100, 1.5, 1e20, -3, "1 2 s1 é ✓"),
    ("CONFIG GET", "maxmemory"),  # a command name of two words
    (b"SET", b"k", b"\x00\xff bytes", 0.1),
    ("SADD", "set", *(f"m{i}" for i in range(1000))),
]


@pytest.mark.parametrize("args", COMMANDS)
def test_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    assert b"".join(PackedConnection().pack_command(*args)) == b"".join(
        Connection().pack_command(*args)
    )


@pytest.mark.parametrize("bad", [None, True, object()])
def test_a_value_that_cannot_be_sent_is_a_data_error(bad: object) -> None:
    with pytest.raises(DataError):
        PackedConnection().pack_command("SET", "k", bad)


def test_the_service_client_packs_in_c(settings: Settings) -> None:
    client = redis_client(settings)
    assert client.connection_pool.connection_class is PackedConnection
