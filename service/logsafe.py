"""aiohttp's own log lines, made unable to leak what a client sent or to flood the log.

aiohttp logs a request it cannot parse with the raw bytes it choked on (a body with an ID and a
phone, a header value, a token) and a traceback, once per request. ``install()`` puts a filter
on every aiohttp logger that keeps only the constant words a message starts with and the
exception's class name (no arguments, no exception message, no traceback), and lets at most
one line per kind through every 10 s, counting the rest (``allocator.ratelog``). aiohttp's
access log is dropped altogether: allot keeps none, by design. allot's own HTTP layer
(``service/http.py``) answers parser errors itself and logs them the same way.
"""

from __future__ import annotations

import logging

from allocator.ratelog import INTERVAL, RateLimitedLog

# every logger aiohttp has (aiohttp/log.py)
AIOHTTP_LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)
_SAFE_HEAD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ -")
_HEAD_MAX = 80


def safe_head(message: object) -> str:
    """The constant words a log message starts with, up to the first character that could
    introduce a value (``%``, ``:``, a quote, a bracket, a digit ...)."""
    text = str(message)
    end = 0
    while end < len(text) and end < _HEAD_MAX and text[end] in _SAFE_HEAD_CHARS:
        end += 1
    return text[:end].strip() or "message"


class AiohttpLogFilter(logging.Filter):
    """Reduces every aiohttp record to one safe line, at most once per interval per kind."""

    def __init__(self, interval: float = INTERVAL) -> None:
        super().__init__()
        self._limit = RateLimitedLog(logging.getLogger("aiohttp"), interval)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "aiohttp.access":
            return False  # request lines and headers: allot keeps no access log
        head = safe_head(record.msg)
        exc_type = record.exc_info[0] if record.exc_info else None
        kind = f" ({exc_type.__name__})" if exc_type is not None else ""
        held = self._limit.admit(f"{record.name}:{record.levelno}:{head}{kind}")
        if held is None:
            return False
        record.msg = f"{head}{kind}; details withheld (they may hold what the client sent)"
        if held:
            record.msg += f" ({held} more like it suppressed since the last one)"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def install() -> None:
    """Put one filter on every aiohttp logger of this process (idempotent)."""
    loggers = [logging.getLogger(name) for name in AIOHTTP_LOGGERS]
    if any(isinstance(f, AiohttpLogFilter) for lg in loggers for f in lg.filters):
        return
    shared = AiohttpLogFilter()  # one rate limit across them all
    for logger in loggers:
        logger.addFilter(shared)
