"""Where the service's draw key (allocator/receipts.py) comes from.

``ALLOT_DRAW_KEY`` when set. Otherwise the key is generated once, by whichever worker needs it
first, and kept in PostgreSQL (table ``draw_key``, one row; ``INSERT … ON CONFLICT DO NOTHING``
then read back, so every worker and node signs with the same key). That is logged at WARNING
the first time: a key in the database is as safe as the database's backups.
"""

from __future__ import annotations

import asyncio
import logging

from allocator.errors import Unavailable
from allocator.receipts import DrawKey
from allocator.store import Store

log = logging.getLogger("allot.drawkey")


class DrawKeys:
    def __init__(self, store: Store, configured: str | None) -> None:
        self.store = store
        self._key = DrawKey.from_text(configured) if configured else None
        self._lock = asyncio.Lock()

    async def get(self) -> DrawKey:
        """The draw key; Unavailable while PostgreSQL cannot give it (only without the env)."""
        if self._key is not None:
            return self._key
        async with self._lock:
            if self._key is None:
                self._key = await self._load()
        return self._key

    async def _load(self) -> DrawKey:
        fresh = DrawKey.generate().private_text()
        try:
            async with self.store.pg() as con:
                made = await con.fetchval(
                    "INSERT INTO draw_key (private_key) VALUES ($1) ON CONFLICT (id) DO NOTHING"
                    " RETURNING true",
                    fresh,
                )
                text = await con.fetchval("SELECT private_key FROM draw_key")
        except Unavailable:
            raise
        except OSError as exc:
            raise Unavailable("The draw key is not readable yet; please try again.") from exc
        key = DrawKey.from_text(text)
        if made:
            log.warning(
                "generated the lottery draw key and kept it in PostgreSQL (table draw_key);"
                " public key %s. Set ALLOT_DRAW_KEY to keep it out of the database.",
                key.public_key(),
            )
        return key
