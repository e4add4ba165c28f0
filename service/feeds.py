"""The open stock feed (sites.csv): what a rendered feed holds, and how it is rendered.

Each worker renders a round's feed at most once per FEED_TTL and keeps it in the cache the
application holds under ``service.appkeys.SITE_FEEDS`` (made by ``feed_cache``).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from allocator.cache import TtlCache

FEED_TTL = 1.0  # seconds a rendered sites.csv is served again (the stock itself lags up to 1 s)
FEED_COLUMNS = ("site_id", "name", "address", "district", "remaining", "updated_at")


@dataclass(frozen=True, slots=True)
class Feed:
    body: bytes
    gzipped: bytes | None
    etag: str


def feed_cache(clock: Callable[[], float] = time.monotonic) -> TtlCache[str, Feed]:
    """Rendered feeds by round_id, each kept FEED_TTL seconds by this (monotonic) clock."""
    return TtlCache(FEED_TTL, clock)


def render_feed(sites: list[dict[str, Any]], now: dt.datetime) -> bytes:
    """RFC 4180 CSV (CRLF, quoted where needed), one row per site, UTF-8 without a BOM."""
    updated = now.astimezone(dt.UTC).isoformat(timespec="seconds")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(FEED_COLUMNS)
    for s in sites:
        writer.writerow(
            [
                s["site_id"],
                _safe_cell(s["name"]),
                _safe_cell(s["address"]),
                _safe_cell(s["district"]),
                s["remaining"],
                updated,
            ]
        )
    return out.getvalue().encode()


def _safe_cell(text: str) -> str:
    """Text a spreadsheet would run as a formula gets a leading apostrophe (CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
