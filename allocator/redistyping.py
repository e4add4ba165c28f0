"""One helper for redis-py's typing, which declares every command as returning ``T`` or
``Awaitable[T]`` (the same methods serve the sync and asyncio clients)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar, cast

T = TypeVar("T")


def awaited(value: Awaitable[T] | T) -> Awaitable[T]:
    """The asyncio client always returns an awaitable; say so to the type checker."""
    return cast(Awaitable[T], value)
