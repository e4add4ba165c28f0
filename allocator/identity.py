"""Citizen IDs and phones: validate, normalise, mask, and hash with the pepper.

What a citizen typed is first brought to one canonical form (:func:`canonical`): Unicode NFKC,
so that fullwidth digits from a Chinese keyboard and the mathematical digits some phones insert
count as the ASCII digits they show; surrounding space stripped; upper case. Only that form is
validated, hashed, masked and checked against eligibility rules, so two renderings of one ID are
one citizen. After NFKC only ASCII ``0-9`` and ``X`` are accepted: Arabic-Indic, Devanagari and
the other decimal digit sets stay themselves under NFKC and are refused, never read as numbers.

Validation uses python-stdnum's ``cn.ric`` check character (ISO 7064 MOD 11-2); the birth date
is read directly from characters 7-14. We do not call ``stdnum.cn.ric.validate`` itself: it
also rejects region codes missing from its table, which the public contract does not ask for
and which would refuse real residents whose county was renamed after the table was made.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import time
import unicodedata
from collections.abc import Callable

from stdnum.cn import ric

# Explicit ASCII classes (allocator/rules.py): in a Python str pattern \d is every Unicode digit.
from allocator.rules import CITIZEN_ID_SHAPE as _ID_SHAPE
from allocator.rules import PHONE_SHAPE as _PHONE


class InvalidIdentity(ValueError):
    """The value is not a valid citizen ID or phone; the message is safe to show the citizen."""


def canonical(value: str) -> str:
    """The one form of what a citizen typed: NFKC, stripped, upper case (not yet validated)."""
    return unicodedata.normalize("NFKC", value).strip().upper()


def normalise_citizen_id(value: str, today: dt.date | None = None) -> str:
    """Return the canonical 18-character ASCII ID (upper-case X), or raise InvalidIdentity."""
    number = canonical(value)
    if len(number) != 18 or not _ID_SHAPE.fullmatch(number):
        raise InvalidIdentity(
            "must be 18 characters: 17 digits 0-9 and a digit or X (other digit sets are refused)"
        )
    if ric.calc_check_digit(number) != number[17]:
        raise InvalidIdentity("the check character does not match (ISO 7064 MOD 11-2)")
    try:  # not ric.get_birth_date: it re-cleans the string, and the shape is checked above
        born = dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError as exc:
        raise InvalidIdentity("characters 7-14 are not a valid date of birth") from exc
    if born > (today or _today()):
        raise InvalidIdentity("the date of birth in characters 7-14 is in the future")
    return number


def _today() -> dt.date:
    return _day(int(time.time() // 86400))


@functools.lru_cache(maxsize=2)
def _day(days_since_epoch: int) -> dt.date:
    """The date, computed once a day rather than once a request (UTC; a birth is a date)."""
    return dt.date(1970, 1, 1) + dt.timedelta(days=days_since_epoch)


def validate_phone(value: str) -> str:
    """Return the canonical 11-digit ASCII phone (same canonical form as IDs), or raise."""
    number = canonical(value)
    if not _PHONE.fullmatch(number):
        raise InvalidIdentity("must be 11 digits 0-9 starting 13-19")
    return number


def mask_citizen_id(number: str) -> str:
    """First 6 and last 4 characters, '*' between (of the canonical ID, so ASCII)."""
    return number[:6] + "*" * (len(number) - 10) + number[-4:]


class Hasher:
    """Keyed hashes (HMAC-SHA256 with ALLOT_ID_PEPPER); the only form in which IDs are kept."""

    __slots__ = ("_citizen", "_client_mac", "_key", "_phone", "client")

    def __init__(self, pepper: bytes) -> None:
        self._key = pepper
        # HMAC-SHA256 (RFC 2104) from hashlib's SHA-256 states: the inner hash with the key's
        # inner pad and the purpose prefix absorbed, the outer with the outer pad, made once;
        # each hash copies both (C calls only). The same digest as hmac.digest(pepper,
        # b"<purpose>:" + value, "sha256") (tests/test_identity.py) at 0.5 against 1.4 µs; the
        # hmac module's own objects wrap every copy and update in Python frames.
        block = hashlib.sha256(pepper).digest() if len(pepper) > 64 else pepper
        block = block.ljust(64, b"\0")
        outer = hashlib.sha256(bytes(x ^ 0x5C for x in block))
        inner = bytes(x ^ 0x36 for x in block)
        self._citizen = (hashlib.sha256(inner + b"citizen:"), outer)
        self._phone = (hashlib.sha256(inner + b"phone:"), outer)
        self._client_mac = (hashlib.sha256(inner + b"client:"), outer)
        # A client address repeats (keep-alive connections, a proxy's many clients, a crowd
        # retrying): its hash is remembered, a few thousand at most. IDs and phones are not.
        self.client: Callable[[str], str] = functools.lru_cache(maxsize=4096)(self._client)

    def citizen(self, number: str) -> str:
        return _mac(self._citizen, number.encode())

    def phone(self, number: str) -> str:
        return _mac(self._phone, number.encode())

    def _client(self, address: str) -> str:
        return _mac(self._client_mac, address.encode())[:32]


def _mac(keyed: tuple[hashlib._Hash, hashlib._Hash], message: bytes) -> str:
    """HMAC-SHA256 of ``message`` (after the purpose prefix) from the pre-keyed states."""
    inner = keyed[0].copy()
    inner.update(message)
    outer = keyed[1].copy()
    outer.update(inner.digest())
    return outer.hexdigest()
