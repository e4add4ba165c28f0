"""The Lua scripts, loaded once from package data and called like functions.

``register_script`` runs EVALSHA and falls back to SCRIPT LOAD on NOSCRIPT, so a Redis restart
or ``SCRIPT FLUSH`` costs one extra round trip, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

SCRIPT_NAMES = (
    "claim",
    "cancel",
    "pickup",
    "load_batch",
    "integrity",
    "retire",
    "restore_cooldowns",
    "expire",
    "carry",
    "enter",
    "withdraw",
    "award",
    "settle",
)


def script_source(name: str) -> str:
    return (resources.files("lua") / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    claim: AsyncScript
    cancel: AsyncScript
    pickup: AsyncScript
    load_batch: AsyncScript
    integrity: AsyncScript
    retire: AsyncScript
    restore_cooldowns: AsyncScript
    expire: AsyncScript
    carry: AsyncScript
    enter: AsyncScript  # lottery entries (allocator/entries.py)
    withdraw: AsyncScript
    award: AsyncScript  # lottery winners' reservations (allocator/lottery.py)
    settle: AsyncScript  # the freeze's verdicts into the entry records (allocator/lottery.py)

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(**{name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES})
