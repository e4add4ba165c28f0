"""Typed application keys: every resource the handlers read from ``request.app``."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from allocator.admission import AdmissionQueue
from allocator.cache import TtlCache
from allocator.config import Settings
from allocator.desk import DeskTokens
from allocator.facade import Allocator
from allocator.ledger import LedgerWriter
from allocator.throttle import FailureThrottle
from service.client import Network
from service.feeds import Feed
from service.metrics import Metrics

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
REDIS = web.AppKey("redis", Redis)
PG_POOL = web.AppKey("pg_pool", asyncpg.Pool)
ALLOCATOR = web.AppKey("allocator", Allocator)
LEDGER = web.AppKey("ledger", LedgerWriter)
ADMISSION = web.AppKey("admission", AdmissionQueue)
AUTH_THROTTLE = web.AppKey("auth_throttle", FailureThrottle)  # failed operator and desk tokens
DESK_TOKENS = web.AppKey("desk_tokens", DeskTokens)
TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple[Network, ...])
SITE_FEEDS = web.AppKey("site_feeds", TtlCache[str, Feed])  # rendered sites.csv per round
