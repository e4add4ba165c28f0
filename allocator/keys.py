"""Every Redis key allot uses is built here, and nowhere else.

Per-round keys share one hash tag so each Lua script touches one slot and runs unchanged on Redis
Cluster: ``{r:<round_id>}`` for a round in no programme, ``{p:<programme>}`` for every round of a
programme (then a round's own keys carry ``r:<round_id>:`` after the tag), so that the claim
script can check and write the programme's entitlement hash (cooldowns) in the same call. Which
tag a round's keys use is fixed when the round is created and kept in the ``round-tags`` hash
(allocator/tags.py); callers pass it to :meth:`Keys.round`. Citizen IDs and phones never appear
in a key name: they are kept only as HMAC hashes inside hash fields.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoundKeys:
    """The keys of one round; see docs/architecture.md for what each holds."""

    round: str  # hash: title, times (ISO and *_ms), per_person, mode
    stock: str  # hash: site_id -> units left
    loaded: str  # hash: site_id -> units ever loaded
    tally: str  # hash: reserved:<site>, collected:<site>, expired:<site>, carried_out:<site>,
    # carried_expired:<site>, created, seq, lost (integrity.py)
    holders: str  # hash: citizen hash -> reservation_id (live: confirmed or collected)
    reservations: str  # hash: reservation_id -> record JSON
    batches: str  # hash: batch_id -> digest
    ledger: str  # stream: one entry per state change, drained into PostgreSQL
    dead: str  # stream: ledger entries that failed too often, kept for an operator
    # hash: citizen hash -> "<until_ms> <reservation_id>", the programme's cooldowns (claim.lua
    # checks and writes it, cancel.lua lifts it); <p>:{p:<programme>}:entitled, shared by all
    # the programme's rounds. A round in no programme gets <p>:{r:<round>}:entitled, which no
    # script ever writes (they read the round's `programme` first).
    entitled: str
    sweep: str  # hash: the expiry sweep's lock (owner, until) and its `done` mark (expire.lua)
    carries: str  # hash: "<to_round>/<batch_id>" -> carry-over record JSON (carry.lua)
    entries: str  # hash: entry_id -> entry record JSON (lottery rounds)
    entrants: str  # hash: citizen hash -> entry_id, for live (not withdrawn) entries
    _tag: str  # "<prefix>:{r:<round_id>}:" or "<prefix>:{p:<programme>}:r:<round_id>:"

    def codes(self, site_id: str) -> str:
        """Hash of pickup code -> reservation_id for one site in this round."""
        return f"{self._tag}codes:{site_id}"

    def site_holders(self, site_id: str) -> str:
        """Set of citizen hashes that reserved at this site (never shrinks: a safe superset)."""
        return f"{self._tag}siteholders:{site_id}"

    def fair_asked(self, dimension: str, group: str) -> str:
        """Set of citizen hashes that reserved or were refused sold-out, in one group of the
        fairness report (``district``, ``age_band`` or ``channel``)."""
        return f"{self._tag}fair:asked:{dimension}:{group}"

    @property
    def gate_global(self) -> str:
        """Token bucket of the whole round (hash: t tokens, ts ms) in the one-key-per-bucket
        layout of the scripts claim.lua and enter.lua replaced (tests/fixtures/*_v1.lua, kept
        for the differential tests and bench/claim_cpu.py); it and the next two are that
        layout's keys. Both scripts now use ``gate_generations``."""
        return f"{self._tag}gate:global"

    @property
    def gate_generations(self) -> tuple[str, str]:
        """The token buckets of claim.lua and enter.lua: every bucket of the round is a field of
        one hash, in two generations that take turns (``gate:0``, ``gate:1``; lua/claim.lua
        explains)."""
        return f"{self._tag}gate:0", f"{self._tag}gate:1"

    def gate_client(self, client_hash: str) -> str:
        return f"{self._tag}gate:client:{client_hash}"

    def gate_citizen(self, citizen_hash: str) -> str:
        return f"{self._tag}gate:citizen:{citizen_hash}"

    def all_static(self) -> tuple[str, ...]:
        return (
            self.round,
            self.stock,
            self.loaded,
            self.tally,
            self.holders,
            self.reservations,
            self.batches,
            self.sweep,
            self.carries,
            self.entries,
            self.entrants,
        )


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "allot"

    @property
    def rounds(self) -> str:
        """Set of every round_id."""
        return f"{self.prefix}:rounds"

    @property
    def sites(self) -> str:
        """Hash: site_id -> JSON {name, address, district}."""
        return f"{self.prefix}:sites"

    @property
    def round_tags(self) -> str:
        """Hash: round_id -> the hash tag of its keys (``r:<round_id>`` or ``p:<programme>``),
        fixed when the round is created (allocator/tags.py)."""
        return f"{self.prefix}:round-tags"

    @staticmethod
    def tag_for(round_id: str, programme: str | None) -> str:
        """The hash tag a round's keys use: its programme's, or its own."""
        return f"p:{programme}" if programme else f"r:{round_id}"

    def round(self, round_id: str, tag: str | None = None) -> RoundKeys:
        """The round's keys under ``tag`` (from the ``round-tags`` hash); None: ``r:<round_id>``,
        the tag of a round in no programme."""
        own = f"r:{round_id}"
        if tag is None or tag == own:
            tag = f"{self.prefix}:{{{own}}}:"
            entitled = tag + "entitled"
        else:
            if not tag.startswith("p:"):
                raise ValueError(f"not a round's hash tag: {tag!r}")
            entitled = f"{self.prefix}:{{{tag}}}:entitled"
            tag = f"{self.prefix}:{{{tag}}}:{own}:"
        return RoundKeys(
            round=tag + "round",
            stock=tag + "stock",
            loaded=tag + "loaded",
            tally=tag + "tally",
            holders=tag + "holders",
            reservations=tag + "reservations",
            batches=tag + "batches",
            ledger=tag + "ledger",
            dead=tag + "ledger:dead",
            entitled=entitled,
            sweep=tag + "sweep",
            carries=tag + "carries",
            entries=tag + "entries",
            entrants=tag + "entrants",
            _tag=tag,
        )

    def auth_failures(self, scope: str, client_hash: str) -> str:
        """Counter of failed authentications of one client address (its HMAC) in one scope,
        expiring with its window (allocator/throttle.py)."""
        return f"{self.prefix}:authfail:{scope}:{client_hash}"

    @property
    def desk_events(self) -> str:
        """Pub/sub channel: a desk token was revoked; every worker drops its desk-token cache."""
        return f"{self.prefix}:desk-events"

    @property
    def stock_events(self) -> str:
        """Pub/sub channel: "<round_id> <site_id>" when units come back (cancel, batch)."""
        return f"{self.prefix}:stock-events"


def wait_fence(key: str) -> str:
    """The key that :class:`allocator.topology.ReplicaWait` writes just before its WAIT, in the
    slot of ``key`` (a round's or programme's key: ``<prefix>:{<tag>}:...``), so that the WAIT
    counts from the primary's newest write even when the script before it wrote nothing. One
    per hash tag; it expires a minute after its last write."""
    close = key.find("}")
    if not key.count("{") or close < 0:
        raise ValueError(f"not a key with a hash tag: {key!r}")
    return f"{key[: close + 1]}:wait-fence"


class ScriptKeys:
    """The KEYS of one batched script call: the script's fixed keys first, then each per-item
    key once, referred to from ARGV by its 1-based position (as claim.lua and enter.lua read
    them). ``keys`` is what goes to the script."""

    __slots__ = ("_index", "keys")

    def __init__(self, fixed: list[str]) -> None:
        self.keys = fixed
        self._index: dict[str, int] = {}

    def ref(self, name: str) -> str:
        """``name``'s 1-based position in ``keys`` as ARGV text, adding it the first time."""
        at = self._index.get(name)
        if at is None:
            self.keys.append(name)
            at = self._index[name] = len(self.keys)
        return str(at)
