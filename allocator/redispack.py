"""Commands packed in C: redis-py's asyncio connection with hiredis's command packer.

redis-py's synchronous connections pack commands with ``hiredis.pack_command`` when hiredis is
installed (``redis.connection.HiredisRespSerializer``); its asyncio connections pack them in
Python, argument by argument (``redis.asyncio.connection.Connection.pack_command``). A claim
batch is one EVALSHA of a few hundred arguments (a key and an item string per claim, and more),
so the Python packer was about a third of a worker's CPU in ``claim_many``
(docs/performance.md, "A lean worker"). :class:`PackedConnection` uses redis-py's own hiredis
serializer instead: the same bytes (tests/test_redispack.py compares them), the same DataError
for a value that cannot be sent.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import Connection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE


class PackedConnection(Connection):
    """A TCP connection whose commands are packed by hiredis (see the module's doc)."""

    _serializer = HiredisRespSerializer() if HIREDIS_AVAILABLE else None

    def pack_command(self, *args: Any) -> list[bytes]:
        if self._serializer is None:
            return super().pack_command(*args)
        packed: list[bytes] = self._serializer.pack(*args)
        return packed
