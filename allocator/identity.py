"""Citizen IDs and phones: validate, normalise, mask, and hash with the pepper.

Validation uses python-stdnum's ``cn.ric`` check character (ISO 7064 MOD 11-2); the birth date
is read directly from characters 7-14. We do not call ``stdnum.cn.ric.validate`` itself: it
also rejects region codes missing from its table, which the public contract does not ask for
and which would refuse real residents whose county was renamed after the table was made.
"""

from __future__ import annotations

import datetime as dt
import functools
import hmac
import re
import time

from stdnum.cn import ric

_ID_SHAPE = re.compile(r"\d{17}[\dX]")
_PHONE = re.compile(r"1[3-9]\d{9}")


class InvalidIdentity(ValueError):
    """The value is not a valid citizen ID or phone; the message is safe to show the citizen."""


def normalise_citizen_id(value: str, today: dt.date | None = None) -> str:
    """Return the 18-character ID with an upper-case X, or raise InvalidIdentity."""
    number = value.strip().upper()
    if len(number) != 18 or not _ID_SHAPE.fullmatch(number):
        raise InvalidIdentity("must be 18 characters: 17 digits and a digit or X")
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
    if not _PHONE.fullmatch(value):
        raise InvalidIdentity("must be 11 digits starting 13-19")
    return value


def mask_citizen_id(number: str) -> str:
    """First 6 and last 4 characters, '*' between."""
    return number[:6] + "*" * (len(number) - 10) + number[-4:]


class Hasher:
    """Keyed hashes (HMAC-SHA256 with ALLOT_ID_PEPPER); the only form in which IDs are kept."""

    __slots__ = ("_key",)

    def __init__(self, pepper: bytes) -> None:
        self._key = pepper

    # hmac.digest is the one-shot C path: no HMAC object per call (three calls per request)
    def citizen(self, number: str) -> str:
        return hmac.digest(self._key, b"citizen:" + number.encode(), "sha256").hex()

    def phone(self, number: str) -> str:
        return hmac.digest(self._key, b"phone:" + number.encode(), "sha256").hex()

    def client(self, address: str) -> str:
        return hmac.digest(self._key, b"client:" + address.encode(), "sha256").hex()[:32]
