"""Stock events: units came back (a cancel, a batch), so every worker forgets what it said.

The worker that saw it forgets its stock snapshot and sold-out marks at once and publishes
``<round_id> <site_id>...`` on the stock-events channel; every worker follows the channel and
does the same. A lost message costs at most the board's TTL (1 s) of stale sold-out answers.
In Redis Cluster a PUBLISH is forwarded to every node over the cluster bus, so each worker
subscribes on one node (allocator/topology.py) and hears the workers of every allot node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from redis.exceptions import RedisError

from allocator import topology
from allocator.catalogue import Catalogue
from allocator.errors import RetryLater
from allocator.keys import Keys
from allocator.soldout import SoldOutBoard
from allocator.store import Store

log = logging.getLogger("allot.allocator")


class StockEvents:
    def __init__(self, store: Store, keys: Keys, catalogue: Catalogue, board: SoldOutBoard) -> None:
        self.store = store
        self.keys = keys
        self.catalogue = catalogue
        self.board = board

    def _forget(self, round_id: str, site_ids: Sequence[str]) -> None:
        self.catalogue.forget_stock(round_id)
        for site_id in site_ids:
            self.board.clear(round_id, site_id)

    async def units_returned(self, round_id: str, site_ids: Sequence[str]) -> None:
        """Units came back: forget sold-out marks here, and tell every other worker."""
        self._forget(round_id, site_ids)
        message = " ".join([round_id, *site_ids])
        try:
            await self.store.redis_call(
                topology.publish(self.store.redis, self.keys.stock_events, message)
            )
        except RetryLater:  # Unavailable, or Overloaded (a timeout in a busy loop)
            log.warning(
                "could not announce returned units of %s; marks expire within 1 s", round_id
            )

    async def follow(self, stop: asyncio.Event) -> None:
        """Clear this worker's sold-out marks when another worker announces returned units."""
        while not stop.is_set():
            try:
                # cluster mode: PUBLISH reaches every node, one node's subscription hears all
                async with topology.subscription(self.store.redis, self.keys.stock_events) as ps:
                    while not stop.is_set():
                        msg = await ps.get_message(timeout=min(0.5, self.store.timeout / 2))
                        if msg and msg.get("type") == "message":
                            round_id, *site_ids = msg["data"].decode().split()
                            self._forget(round_id, site_ids)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("stock events: %s: %s; resubscribing", type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
