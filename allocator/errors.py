"""The domain's refusals: each a ``code`` of the contract and the data that explains it.

Nothing here knows HTTP. A refusal carries its ``detail`` (one sentence for a person), its
``code`` and, in ``extra``, the data the contract names for that code (``alternatives``,
``errors``, ``reason``, ``opens_at``/``closes_at``, ``lost_rounds``, ``until``, ``rule``);
a retryable one carries ``retry_after`` in seconds. ``service/problems.py`` maps each code to
its HTTP answer (from the one problem-code table) and serialises it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Problem(Exception):
    """A refusal; ``code`` is the contract's stable code, ``extra`` its named data."""

    code: ClassVar[str] = "unavailable"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        # Refusals given from one memory (one mark of the sold-out board) share this object:
        # they are the same answer, so the service may serialise it once (service/problems.py).
        self.same_as: object | None = None


class NotFound(Problem):
    code = "not-found"


class RoundNotOpen(Problem):
    code = "round-not-open"


class SoldOut(Problem):
    code = "sold-out"


class AlreadyReserved(Problem):
    code = "already-reserved"


class BatchConflict(Problem):
    code = "batch-conflict"


class NotCollectable(Problem):
    code = "not-collectable"


class NotEligible(Problem):
    """The citizen fails a rule of the round's ``eligibility``; ``rule`` names it."""

    code = "not-eligible"


class InCooldown(Problem):
    """The citizen reserved in another round of the programme; ``until`` (RFC 3339) is when
    they may take part again."""

    code = "in-cooldown"


class CarryNotReady(Problem):
    """A carry-over from a round whose pickup window has not ended; the detail says when it
    ends."""

    code = "carry-not-ready"


class WrongMode(Problem):
    """A reservation on a lottery round, or an entry on an fcfs round."""

    code = "wrong-mode"


class AlreadyEntered(Problem):
    code = "already-entered"


class DrawNotReady(Problem):
    code = "draw-not-ready"


class DrawConflict(Problem):
    code = "draw-conflict"


class InvalidRequest(Problem):
    code = "invalid-request"

    def __init__(self, errors: list[dict[str, str]], detail: str | None = None) -> None:
        super().__init__(
            detail or "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        )

    @classmethod
    def one(cls, field: str, message: str) -> InvalidRequest:
        return cls([{"field": field, "message": message}])


class RetryLater(Problem):
    """A refusal that may succeed later: ``retry_after`` is how many seconds to wait (> 0)."""

    def __init__(self, detail: str, retry_after: float = 1.0, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = max(retry_after, 0.001)


class RateLimited(RetryLater):
    code = "rate-limited"


class Overloaded(RetryLater):
    code = "overloaded"


class Unavailable(RetryLater):
    code = "unavailable"


class RoundLost(Unavailable):
    """Redis has lost data of this round that the ledger has (or lacks the round altogether):
    the round is refused, never served from the older state, until ``allot rebuild``."""
