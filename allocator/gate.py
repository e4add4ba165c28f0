"""The gate: three token buckets every claim passes before anything else is decided.

Buckets: the whole round (``global``), the client address (``client``, its HMAC) and the
citizen (``citizen``, the citizen hash), each with a rate (tokens a second) and a burst. The
buckets live in Redis and are spent inside claim.lua, in the same EVALSHA as the claim, so
admission and decision are one atomic step; a claim refused by the gate changes nothing else.
claim.lua keeps all of a round's buckets as fields of one hash (two generations, see the script);
enter.lua still keeps one key per bucket, with the same arithmetic.
This module is the gate's Python side: its ARGV, its keys, and the refusal it comes to.
"""

from __future__ import annotations

from dataclasses import dataclass

from allocator.config import GateSettings
from allocator.errors import RateLimited
from allocator.keys import RoundKeys

REFUSALS = {
    "global": "Very many people are reserving right now; please try again in a moment.",
    "client": "Too many requests from your address; please wait a moment.",
    "citizen": "Too many attempts for this ID number; please wait a moment.",
}


@dataclass(frozen=True, slots=True)
class Gate:
    """The bucket settings, in the order claim.lua reads them (ARGV[2..7])."""

    args: tuple[float, int, float, int, float, int]

    @classmethod
    def from_settings(cls, gate: GateSettings | None = None) -> Gate:
        gate = gate or GateSettings()
        return cls(
            (
                gate.global_rate,
                gate.global_burst,
                gate.client_rate,
                gate.client_burst,
                gate.citizen_rate,
                gate.citizen_burst,
            )
        )

    @staticmethod
    def claim_buckets(rk: RoundKeys) -> tuple[str, str]:
        """KEYS[7] and KEYS[8] of claim.lua and of enter.lua: the hash of all the round's
        buckets, in its two generations (an item names its buckets by the client and citizen
        hashes it carries)."""
        return rk.gate_generations

    @staticmethod
    def refusal(bucket: str, wait_ms: int) -> RateLimited:
        """What a claim the ``bucket`` refused is told: wait until it holds a token again."""
        return RateLimited(REFUSALS[bucket], retry_after=wait_ms / 1000)
