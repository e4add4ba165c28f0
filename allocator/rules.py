"""The domain's patterns and limits, declared once.

What an identifier, a pickup code, a citizen ID or a phone looks like, and how large a share, a
batch or a name may be: the domain (``allocator/``) and the service (``service/validation.py``,
``service/schemas.py`` and from it the OpenAPI document) all import these, none keeps a copy.

Each pattern is a plain string (``*_REGEX``) in the subset that Python's ``re`` and ECMA-262
(JSON Schema's ``pattern``) read alike: ASCII classes and counted repetitions, no anchors, no
``\\d``. Python matches the compiled form (``*_PATTERN``, ``re.ASCII``) with ``fullmatch``;
``service/schemas.py`` anchors the string (``^...$``) for the document.
"""

from __future__ import annotations

import re
from typing import Final

# -- identifiers: round_id, site_id, batch_id ------------------------------------------------

ID_MAX_LENGTH: Final = 64
ID_REGEX: Final = rf"[a-z0-9_-]{{1,{ID_MAX_LENGTH}}}"
ID_PATTERN: Final = re.compile(ID_REGEX, re.ASCII)
ID_RULE: Final = f"1-{ID_MAX_LENGTH} characters of a-z, 0-9, '_' and '-'"

# reservation_id = 128 random bits (22 URL-safe base64 characters), a dot, then the round_id:
# the round is needed to find the reservation's keys, and it is public anyway. Group 1 is the
# random part, group 2 the round_id.
RESERVATION_SECRET_LENGTH: Final = 22
RESERVATION_ID_REGEX: Final = rf"([A-Za-z0-9_-]{{{RESERVATION_SECRET_LENGTH}}})\.({ID_REGEX})"
RESERVATION_ID: Final = re.compile(RESERVATION_ID_REGEX, re.ASCII)
# entry_id (a lottery round's entry) has the same form: 128 random bits, a dot, the round_id.
ENTRY_ID_REGEX: Final = RESERVATION_ID_REGEX
ENTRY_ID: Final = re.compile(ENTRY_ID_REGEX, re.ASCII)

# -- pickup codes -----------------------------------------------------------------------------

PICKUP_ALPHABET: Final = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no 0/O, 1/I: read over a counter
PICKUP_CODE_LENGTH: Final = 8
PICKUP_CODE_REGEX: Final = f"[{PICKUP_ALPHABET}]{{{PICKUP_CODE_LENGTH}}}"
PICKUP_CODE: Final = re.compile(PICKUP_CODE_REGEX, re.ASCII)
PICKUP_CODE_RULE: Final = f"{PICKUP_CODE_LENGTH} characters of {PICKUP_ALPHABET}"

# -- citizens: the canonical forms (allocator/identity.py: NFKC, trimmed, upper case) --------

CITIZEN_ID_REGEX: Final = "[0-9]{17}[0-9X]"
CITIZEN_ID_SHAPE: Final = re.compile(CITIZEN_ID_REGEX, re.ASCII)
# citizen_id_masked: the first 6 and the last 4 characters, '*' between
CITIZEN_ID_MASKED_REGEX: Final = r"[0-9]{6}\*{8}[0-9]{3}[0-9X]"
PHONE_REGEX: Final = "1[3-9][0-9]{9}"
PHONE_SHAPE: Final = re.compile(PHONE_REGEX, re.ASCII)

# -- rounds, sites, batches, reservations -----------------------------------------------------

MAX_TEXT: Final = 200  # a title, a site's name, address or district: 1-200 characters, trimmed
MAX_PER_PERSON: Final = 1000  # units in one citizen's share
MAX_BATCH_UNITS: Final = 10_000_000  # units for one site in one batch
MAX_SITES_AT_ONCE: Final = 10_000  # sites in one PUT /api/v1/admin/sites
MAX_ALTERNATIVES: Final = 5  # sites offered with a sold-out answer
# Round times: the years a distribution campaign can be in, far inside what Python's datetime,
# the millisecond arithmetic and PostgreSQL's timestamptz can hold in any UTC offset.
FIRST_YEAR: Final = 2000
LAST_YEAR: Final = 2999
MODES: Final = ("fcfs", "lottery")  # API.md: first come first served, or Lottery rounds
ROUND_STATUSES: Final = ("upcoming", "open", "closed")
# A reservation's status: "expired" is recorded by the sweep (allocator/expiry.py) within ~10 s
# after pickup_end, and shown for a confirmed one past pickup_end until then.
RESERVATION_STATUSES: Final = ("confirmed", "collected", "cancelled", "expired")
# Lottery rounds (API.md, Lottery rounds): an entry's status as shown, the draw's status, and
# public_randomness_source / public_randomness: 1-256 printable characters.
ENTRY_STATUSES: Final = ("registered", "withdrawn", "excluded", "won", "not-drawn")
DRAW_STATUSES: Final = ("registering", "frozen", "drawing", "drawn")
MAX_RANDOMNESS_TEXT: Final = 256
HEX64_REGEX: Final = "[0-9a-f]{64}"
# Why a reservation cannot be collected or cancelled (the `reason` of not-collectable);
# "citizen": the ID given at the desk is not the holder's.
NOT_COLLECTABLE_REASONS: Final = ("collected", "cancelled", "expired", "citizen")

# -- entitlement (allocator/entitlement.py) ---------------------------------------------------

PROGRAMME_REGEX: Final = ID_REGEX  # a programme is named like a round
REGION_REGEX: Final = "[0-9]{2}(?:[0-9]{2}){0,2}"  # 2, 4 or 6 digits: an ID's issuing prefix
MAX_COOLDOWN_DAYS: Final = 365
MAX_AGE_LIMIT: Final = 150  # the largest min_age or max_age an operator may set
ELIGIBILITY_RULES: Final = ("regions", "birth_year_last_digit", "min_age", "max_age")
