"""The domain's error hierarchy. The service maps each to problem+json by its status and code."""

from __future__ import annotations

from typing import Any


class Problem(Exception):
    """An answer that is not a success; ``code`` is the contract's stable code."""

    status = 500
    code = "unavailable"
    title = "Problem"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        self.headers: dict[str, str] = {}
        # Shared by problems that are the same answer (e.g. one site's sold-out from memory), so
        # the service serializes that answer once, not once per request.
        self.memo: dict[str, bytes] | None = None


class MalformedJson(Problem):
    status, code, title = 400, "malformed-json", "Body is not a JSON object"


class BadRequest(Problem):
    """Not a well-formed HTTP/1.1 request (framing, request line, headers): the contract's
    table has no code for it, and ``malformed-json`` would misname a header error."""

    status, code, title = 400, "bad-request", "Malformed HTTP request"


class Unauthorized(Problem):
    status, code, title = 401, "unauthorized", "Operator token missing or wrong"


class NotFound(Problem):
    status, code, title = 404, "not-found", "Not found"


class MethodNotAllowed(Problem):
    status, code, title = 405, "method-not-allowed", "Method not allowed"


class RoundNotOpen(Problem):
    status, code, title = 409, "round-not-open", "The round is not open for reservations"


class SoldOut(Problem):
    status, code, title = 409, "sold-out", "Sold out at this site"


class AlreadyReserved(Problem):
    status, code, title = 409, "already-reserved", "Already reserved in this round"


class BatchConflict(Problem):
    status, code, title = 409, "batch-conflict", "batch_id already loaded with other contents"


class NotCollectable(Problem):
    status, code, title = 409, "not-collectable", "This reservation cannot be collected"


class RequestTimeout(Problem):
    status, code, title = 408, "request-timeout", "The request did not arrive in time"


class PayloadTooLarge(Problem):
    status, code, title = 413, "payload-too-large", "Body too large"


class UnsupportedMediaType(Problem):
    status, code, title = 415, "unsupported-media-type", "Unsupported media type"


class InvalidRequest(Problem):
    status, code, title = 422, "invalid-request", "Invalid request"

    def __init__(self, errors: list[dict[str, str]], detail: str | None = None) -> None:
        super().__init__(
            detail or "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        )

    @classmethod
    def one(cls, field: str, message: str) -> InvalidRequest:
        return cls([{"field": field, "message": message}])


class _RetryLater(Problem):
    def __init__(self, detail: str, retry_after: float = 1.0, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = max(1, int(-(-retry_after // 1)))  # whole seconds, rounded up, >= 1
        self.headers["Retry-After"] = str(self.retry_after)


class RateLimited(_RetryLater):
    status, code, title = 429, "rate-limited", "Too many requests"


class Overloaded(_RetryLater):
    status, code, title = 429, "overloaded", "Too busy right now"


class Unavailable(_RetryLater):
    status, code, title = 503, "unavailable", "Service temporarily unavailable"


class RoundLost(Unavailable):
    """Redis has lost data of this round that the ledger has (or lacks the round altogether):
    the round is refused, never served from the older state, until ``allot rebuild``."""
