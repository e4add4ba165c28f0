"""What the locustfile and the runner share: identities, answer checks, the record format.

Nothing here imports locust or gevent (locust monkey-patches the standard library on import,
which the asyncio runner must not see).

Records: each locust worker process appends JSON lines to ``<out>/raw/<pid>.jsonl``:

* ``{"k": "a", ...}`` one per request: ``t`` (epoch seconds when answered), ``ms`` (locust's
  response time), ``who`` (actor), ``op``, ``st`` (HTTP status, 0 when none), ``code``
  (problem code, or ``connection`` / ``timeout``), ``fail`` (``""`` or the failure class:
  ``5xx``, ``connection``, ``timeout``, ``body``, ``status``), ``ra`` (for a 429/503: whether it
  carried a valid Retry-After) and ``why`` (the reason of a failure).
* ``{"k": "g", ...}`` one per 201/200 reservation answer: ``n`` (the simulated citizen's number,
  never the ID itself), ``rid``, ``site``, ``qty``, ``st``, ``who``, ``t``.
* ``{"k": "e", ...}`` one per 201/200 entry answer and per entry lookup (lottery mode): ``n``,
  ``eid`` (entry_id), ``site``, ``acc`` (accept_district), ``st``, ``who``, ``op``, ``t``,
  ``conc`` (true when a twin request of the same citizen was in flight: either may be last).
* ``{"k": "c", ...}`` one per finished citizen: ``n``, ``who``, ``asked`` (units asked for, 0
  when no answer came), ``end`` (``granted``, ``sold-out``, ``gave-up``, ``refused``, ``none``).
* ``{"k": "v", ...}`` a violation found after the fact (not tied to one request): ``who``, ``why``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from stdnum.cn import ric

from allocator.rules import PICKUP_CODE
from service.schemas import fields

# -- environment handed from the runner to the locust processes -------------------------------

ENV_ROUND = "LOADTEST_ROUND"
ENV_OUT = "LOADTEST_RAW_DIR"
ENV_PER_PERSON = "LOADTEST_PER_PERSON"
ENV_OPENS_AT = "LOADTEST_OPENS_AT"  # epoch seconds
ENV_CLOSES_AT = "LOADTEST_CLOSES_AT"
ENV_ENDS_AT = "LOADTEST_ENDS_AT"  # epoch seconds: no citizen arrives after this
ENV_BOTS = "LOADTEST_BOTS"
ENV_TIMEOUT = "LOADTEST_TIMEOUT"  # seconds before a request counts as timed out
ENV_P99_MS = "LOADTEST_P99_MS"
ENV_FRESH_CONNECTIONS = "LOADTEST_FRESH_CONNECTIONS"  # "1": a new connection per citizen
ENV_MODE = "LOADTEST_MODE"  # "fcfs" (reservations) or "lottery" (entries)

# -- identities -------------------------------------------------------------------------------

# Real county codes (Beijing, Shanghai, Guangzhou, Shenzhen, Wuhan, Chengdu, Xi'an, ...): the
# service does not check them, but a crowd that looks real keeps the test honest.
REGIONS = (
    "110101", "110102", "110105", "110106", "110108", "310101", "310104", "310105", "310106",
    "310107", "310110", "310112", "310115", "440103", "440104", "440105", "440106", "440305",
    "440306", "420102", "420103", "420106", "510104", "510105", "510107", "610102", "610103",
    "320102", "320104", "330102", "330106", "370102", "370103", "120101", "120102", "500103",
)  # fmt: skip
BORN_FROM = dt.date(1940, 1, 1)
BORN_DAYS = 20000  # 1940-01-01 .. 1994-10-04
PER_PROCESS = 10_000_000  # citizen numbers of one locust process: index * PER_PROCESS + counter

# Client addresses, as the trusted proxy (the loopback) reports them in X-Forwarded-For: the
# citizens spread over 198.18.0.0/15 (RFC 2544, benchmarking), the bot sits on one address.
CITIZEN_NET = (198 << 24) | (18 << 16)
CITIZEN_NET_SIZE = 1 << 17
BOT_ADDRESS = "203.0.113.7"

# The public shapes, from the declarations the OpenAPI document is built from (pure data: no
# aiohttp, nothing that locust's monkey-patching could disturb).
RESERVATION_FIELDS = fields("Reservation")
ROUND_FIELDS = fields("Round")
SITE_FIELDS = fields("SiteStock")
ALTERNATIVE_FIELDS = fields("Alternative")
PROBLEM_FIELDS = fields("Problem")
ENTRY_FIELDS = fields("Entry")
SIGNATURE = re.compile(r"[A-Za-z0-9_-]{86}")


def citizen_id(n: int) -> str:
    """A valid 18-character resident ID, a different one for every n >= 0 (up to ~7e8)."""
    seq, rest = n % 1000, n // 1000
    day, region = rest % BORN_DAYS, rest // BORN_DAYS
    if region >= len(REGIONS):
        raise ValueError(f"citizen number {n} is out of range")
    born = BORN_FROM + dt.timedelta(days=day)
    body = f"{REGIONS[region]}{born:%Y%m%d}{seq:03d}"
    return body + ric.calc_check_digit(body + "0")  # ISO 7064 MOD 11-2; stdnum ignores the 18th


def phone(n: int) -> str:
    """An 11-digit mobile number, 1[3-9] then 9 digits."""
    return f"1{3 + n % 7}{(n * 7919) % 1_000_000_000:09d}"


def client_address(n: int) -> str:
    a = CITIZEN_NET + n % CITIZEN_NET_SIZE
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


def mask(citizen: str) -> str:
    return citizen[:6] + "*" * (len(citizen) - 10) + citizen[-4:]


# -- checking answers -------------------------------------------------------------------------


def retry_after_ok(value: str | None) -> bool:
    """The contract's Retry-After: whole seconds, at least 1."""
    return value is not None and value.isascii() and value.isdigit() and int(value) >= 1


def _missing(body: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    return [n for n in names if n not in body]


def _is_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return parsed.tzinfo is not None


def problem_wrong(body: Any, status: int) -> str | None:
    """Why a problem+json body is not one (None when it is)."""
    if not isinstance(body, dict):
        return "error body is not a JSON object"
    missing = _missing(body, PROBLEM_FIELDS)
    if missing:
        return f"problem body lacks {', '.join(missing)}"
    if body["status"] != status:
        return f"problem status {body['status']!r} differs from HTTP {status}"
    return None


def reservation_wrong(
    body: Any,
    *,
    round_id: str,
    site_id: str | None,
    per_person: int,
    citizen: str,
    statuses: Sequence[str] = ("confirmed",),
) -> str | None:
    """Why a Reservation body is wrong for this citizen's request (None when it is right)."""
    if not isinstance(body, dict):
        return "reservation body is not a JSON object"
    missing = _missing(body, RESERVATION_FIELDS)
    if missing:
        return f"reservation lacks {', '.join(missing)}"
    rid = body["reservation_id"]
    if not isinstance(rid, str) or len(rid) < 16:
        return f"reservation_id {rid!r} is too short to hold 96 random bits"
    if body["round_id"] != round_id:
        return f"round_id {body['round_id']!r}, asked {round_id!r}"
    if site_id is not None and body["site_id"] != site_id:
        return f"site_id {body['site_id']!r}, asked {site_id!r}"
    if body["quantity"] != per_person:
        return f"quantity {body['quantity']!r}, per_person is {per_person}"
    if body["status"] not in statuses:
        return f"status {body['status']!r}, expected {' or '.join(statuses)}"
    if not isinstance(body["pickup_code"], str) or not PICKUP_CODE.fullmatch(body["pickup_code"]):
        return f"pickup_code {body['pickup_code']!r} is not 8 characters of the alphabet"
    if body["citizen_id_masked"] != mask(citizen):
        return "citizen_id_masked does not match the citizen's ID"
    for name in ("pickup_start", "pickup_end", "created_at"):
        if not _is_time(body[name]):
            return f"{name} {body[name]!r} is not RFC 3339 with an offset"
    return None


def receipt(round_id: str, entry_id: str) -> str:
    """An entry's public name (API.md, Entry): what entries.csv and results.csv list."""
    return hashlib.sha256(f"allot-receipt-1\n{round_id}\n{entry_id}".encode()).hexdigest()


def entry_wrong(
    body: Any,
    *,
    round_id: str,
    site_id: str | None,
    accept_district: bool | None,
    citizen: str,
) -> str | None:
    """Why an Entry body is wrong for this citizen's request (None when it is right): after an
    entry request it must carry this request's choice (the last choice counts)."""
    if not isinstance(body, dict):
        return "entry body is not a JSON object"
    missing = _missing(body, ENTRY_FIELDS)
    if missing:
        return f"entry lacks {', '.join(missing)}"
    eid = body["entry_id"]
    if not isinstance(eid, str) or len(eid) < 16:
        return f"entry_id {eid!r} is too short to hold 96 random bits"
    if body["round_id"] != round_id:
        return f"round_id {body['round_id']!r}, asked {round_id!r}"
    if site_id is not None and body["site_id"] != site_id:
        return f"site_id {body['site_id']!r}, asked {site_id!r}"
    if accept_district is not None and body["accept_district"] is not accept_district:
        return f"accept_district {body['accept_district']!r}, asked {accept_district!r}"
    if body["status"] != "registered":
        return f"status {body['status']!r} while the round is open"
    if body["receipt"] != receipt(round_id, eid):
        return "receipt is not SHA-256 of allot-receipt-1, round_id and entry_id"
    if not isinstance(body["signature"], str) or not SIGNATURE.fullmatch(body["signature"]):
        return "signature is not 64 bytes of base64url"
    if body["citizen_id_masked"] != mask(citizen):
        return "citizen_id_masked does not match the citizen's ID"
    if not _is_time(body["created_at"]):
        return f"created_at {body['created_at']!r} is not RFC 3339 with an offset"
    return None


def alternatives_wrong(body: Any, *, asked_site: str, per_person: int) -> str | None:
    alternatives = body.get("alternatives") if isinstance(body, dict) else None
    if not isinstance(alternatives, list):
        return "sold-out without an alternatives list"
    if len(alternatives) > 5:
        return f"{len(alternatives)} alternatives, at most 5 allowed"
    for alt in alternatives:
        if not isinstance(alt, dict) or _missing(alt, ALTERNATIVE_FIELDS):
            return f"alternative {alt!r} lacks fields"
        if alt["site_id"] == asked_site:
            return "the sold-out site is offered as its own alternative"
        if not isinstance(alt["remaining"], int) or alt["remaining"] < per_person:
            return f"alternative {alt['site_id']} offered with {alt['remaining']!r} units left"
    return None


def round_wrong(body: Any, round_id: str | None = None) -> str | None:
    if not isinstance(body, dict):
        return "round body is not a JSON object"
    missing = _missing(body, ROUND_FIELDS)
    if missing:
        return f"round lacks {', '.join(missing)}"
    if round_id is not None and body["round_id"] != round_id:
        return f"round_id {body['round_id']!r}, asked {round_id!r}"
    if body["status"] not in ("upcoming", "open", "closed"):
        return f"round status {body['status']!r}"
    if not isinstance(body["remaining"], int) or body["remaining"] < 0:
        return f"round remaining {body['remaining']!r}"
    return None


def rounds_wrong(body: Any, round_id: str) -> str | None:
    rounds = body.get("rounds") if isinstance(body, dict) else None
    if not isinstance(rounds, list):
        return "no rounds list"
    for rnd in rounds:
        wrong = round_wrong(rnd)
        if wrong:
            return wrong
    if round_id not in {r["round_id"] for r in rounds}:
        return f"round {round_id!r} is missing from the list"
    return None


def sites_wrong(body: Any) -> str | None:
    sites = body.get("sites") if isinstance(body, dict) else None
    if not isinstance(sites, list) or not sites:
        return "no sites list"
    for site in sites:
        if not isinstance(site, dict) or _missing(site, SITE_FIELDS):
            return f"site {site!r} lacks fields"
        if not isinstance(site["remaining"], int) or site["remaining"] < 0:
            return f"site {site['site_id']} shows remaining {site['remaining']!r}"
    return None


# -- figures ----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])
