"""The public shapes of the HTTP interface, declared once as JSON Schema (2020-12) fragments.

``SCHEMAS`` holds every request and response body of the contract (API.md) under the name the
OpenAPI document gives it (``#/components/schemas/<name>``); ``service/openapi.py`` builds the
document from these and from the route table, and the load test reads its field lists from
here. Patterns and limits come from ``allocator/rules.py``; problem codes from
``service/problems.py``.

Response shapes are strict where the contract is exact: every member the contract lists is
``required`` and nothing else may appear (``additionalProperties: false``), so a member added to
an answer must be declared here, and the contract tests (which validate every body they receive
against the served document) fail until it is. Request bodies are not closed: unknown members
are ignored by the service, never refused (``service/validation.py``). Members that the service
sends beyond the contract are marked "Extension beyond the contract".
"""

from __future__ import annotations

from typing import Any, Final

from allocator import rules
from service.problems import PROBLEM_CODES, ProblemCode

# -- the HTTP request limits (service/validation.py reads them) -------------------------------

JSON_LIMIT: Final = 16 * 1024  # bytes of a JSON body, after Content-Encoding is decoded
CSV_LIMIT: Final = 1024 * 1024  # bytes of a CSV batch, likewise

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    """A reference to ``#/components/schemas/<name>``."""
    return {"$ref": f"#/components/schemas/{name}"}


def anchored(regex: str) -> str:
    """A rules.*_REGEX as a JSON Schema pattern (which matches anywhere unless anchored)."""
    return f"^{regex}$"


def _closed(
    properties: dict[str, Schema], *, optional: tuple[str, ...] = (), **extra: Any
) -> Schema:
    """An object whose members are exactly ``properties`` (all required but ``optional``)."""
    return {
        "type": "object",
        **extra,
        "required": [name for name in properties if name not in optional],
        "properties": properties,
        "additionalProperties": False,
    }


def _text() -> Schema:
    """A name, address, district or title as an operator sends it (validation ``text``)."""
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": rules.MAX_TEXT,
        "description": "Trimmed; no control characters (Unicode Cc: NUL, newline, tab ...).",
    }


def _count(description: str | None = None) -> Schema:
    schema: Schema = {"type": "integer", "minimum": 0}
    if description:
        schema["description"] = description
    return schema


def _randomness_text() -> Schema:
    """public_randomness_source, public_randomness: 1-256 printable characters."""
    return {"type": "string", "minLength": 1, "maxLength": rules.MAX_RANDOMNESS_TEXT}


def _nullable(schema: Schema) -> Schema:
    return {"oneOf": [{"type": "null"}, schema]}


def _with(name: str, description: str) -> Schema:
    """A reference with a description of its own (allowed beside $ref in OpenAPI 3.1)."""
    return {**ref(name), "description": description}


# -- values -----------------------------------------------------------------------------------

_VALUES: dict[str, Schema] = {
    "Id": {
        "type": "string",
        "pattern": anchored(rules.ID_REGEX),
        "description": f"A `round_id`, `site_id` or `batch_id`: {rules.ID_RULE}.",
        "examples": ["spring-2026"],
    },
    "DeskTokenId": {
        "type": "string",
        "pattern": "^desk-[0-9a-f]{16}$",
        "description": "A desk token's public name.",
    },
    "ReservationId": {
        "type": "string",
        "pattern": anchored(rules.RESERVATION_ID_REGEX),
        "description": (
            f"Unguessable (128 random bits as {rules.RESERVATION_SECRET_LENGTH} URL-safe base64 "
            "characters), a dot, then the `round_id`. It is the citizen's only key to the "
            "reservation."
        ),
        "examples": ["Qm9vdHN0cmFwcGluZ0lEeA.spring-2026"],
    },
    "EntryId": {
        "type": "string",
        "pattern": anchored(rules.ENTRY_ID_REGEX),
        "description": (
            f"Unguessable (128 random bits as {rules.RESERVATION_SECRET_LENGTH} URL-safe base64 "
            "characters), a dot, then the `round_id`. It is the citizen's only key to the entry."
        ),
        "examples": ["RW50cnlJZEV4YW1wbGUwMQ.lottery-2026"],
    },
    "CitizenId": {
        "type": "string",
        "pattern": anchored(rules.CITIZEN_ID_REGEX),
        "description": (
            "An 18-character PRC resident ID: 17 digits and an ISO 7064 MOD 11-2 check "
            "character, with a valid date of birth in chars 7-14. A lower-case `x` is "
            "accepted and normalised to `X`. What is typed is first canonicalised (Unicode "
            "NFKC, trimmed, upper case), so fullwidth digits count as the ASCII digits they "
            "show; the pattern is that canonical form, and digits of other scripts are refused."
        ),
        "examples": ["11010519491231002X"],
    },
    "CitizenIdMasked": {
        "type": "string",
        "pattern": anchored(rules.CITIZEN_ID_MASKED_REGEX),
        "description": "The first 6 and last 4 characters of the ID, `*` between.",
        "examples": ["110105********002X"],
    },
    "Phone": {
        "type": "string",
        "pattern": anchored(rules.PHONE_REGEX),
        "description": (
            "11 digits: `1`, then `3`-`9`, then 9 digits; canonicalised like `CitizenId`."
        ),
        "examples": ["13800138000"],
    },
    "PickupCode": {
        "type": "string",
        "pattern": anchored(rules.PICKUP_CODE_REGEX),
        "description": (
            f"{rules.PICKUP_CODE_LENGTH} characters of `{rules.PICKUP_ALPHABET}`, unique "
            "within its site and round."
        ),
        "examples": ["7KQ2MZ9P"],
    },
    "Programme": {
        "type": "string",
        "pattern": anchored(rules.PROGRAMME_REGEX),
        "description": (
            "Groups rounds (e.g. every mask round of a city): a live reservation in one round "
            "of a programme bars its citizen from the others for that round's `cooldown_days`."
        ),
        "examples": ["masks-guangzhou"],
    },
    "CooldownDays": {
        "type": "integer",
        "minimum": 0,
        "maximum": rules.MAX_COOLDOWN_DAYS,
        "description": (
            "A reservation in this round, unless cancelled, bars its citizen from every other "
            "round of the programme until its `created_at` + this many days (24 h each)."
        ),
    },
    "Eligibility": _closed(
        {
            "birth_year_last_digit": {
                "type": "array",
                "minItems": 1,
                "maxItems": 10,
                "uniqueItems": True,
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "description": "The last digit of the year of birth (rotation by birth year).",
            },
            "min_age": {
                "type": "integer",
                "minimum": 0,
                "maximum": rules.MAX_AGE_LIMIT,
                "description": "Whole years at `opens_at` (its date in its offset), at least.",
            },
            "max_age": {
                "type": "integer",
                "minimum": 0,
                "maximum": rules.MAX_AGE_LIMIT,
                "description": "Whole years at `opens_at`, at most; not below `min_age`.",
            },
            "regions": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "pattern": anchored(rules.REGION_REGEX)},
                "description": "Prefixes (2, 4 or 6 digits) of the ID's first six: where it "
                "was issued.",
                "examples": [["44", "4401", "440106"]],
            },
        },
        optional=("birth_year_last_digit", "min_age", "max_age", "regions"),
        description=(
            "Who may take part: every rule given must hold (failing one: 409 `not-eligible` "
            "naming it, before any stock is touched)."
        ),
    ),
    "Hex64": {
        "type": "string",
        "pattern": anchored(rules.HEX64_REGEX),
        "description": "A SHA-256 hash (or a 32-byte secret) in lowercase hex.",
    },
    "Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": (
            "RFC 3339 with an offset. Round times must be in the years "
            f"{rules.FIRST_YEAR}-{rules.LAST_YEAR}."
        ),
        "examples": ["2026-03-01T09:00:00+08:00"],
    },
}

# -- citizens' answers ------------------------------------------------------------------------

_CITIZENS: dict[str, Schema] = {
    "Round": _closed(
        {
            "round_id": ref("Id"),
            "title": {"type": "string"},
            "opens_at": ref("Timestamp"),
            "closes_at": ref("Timestamp"),
            "per_person": {
                "type": "integer",
                "minimum": 1,
                "description": "Units in one citizen's share.",
            },
            "pickup_start": ref("Timestamp"),
            "pickup_end": ref("Timestamp"),
            "mode": {
                "type": "string",
                "enum": list(rules.MODES),
                "description": (
                    "`fcfs`: first come, first served. `lottery`: a registration window, then a "
                    "draw anyone can replay (entries, not reservations)."
                ),
            },
            "status": {"type": "string", "enum": list(rules.ROUND_STATUSES)},
            "remaining": _count("Units left over all sites."),
            "programme": {
                **_nullable(ref("Programme")),
                "description": "The programme the round belongs to, or `null`.",
            },
            "cooldown_days": ref("CooldownDays"),
            "eligibility": {
                **_nullable(ref("Eligibility")),
                "description": "Who may take part; `null`: anyone.",
            },
            "draw": {
                "oneOf": [{"type": "null"}, ref("RoundDraw")],
                "description": "`null` for an `fcfs` round.",
            },
        },
        description="One distribution campaign.",
    ),
    "RoundDraw": _closed(
        {
            "commitment": _with(
                "Hex64", "Hex SHA-256 of the round's 32-byte secret, published from creation."
            ),
            "public_randomness_source": {
                "type": "string",
                "description": "The public random value that will decide the draw.",
            },
            "status": {"type": "string", "enum": list(rules.DRAW_STATUSES)},
        },
        description=(
            "A lottery round's draw as far as the Round shows it; the whole record is "
            "`GET /api/v1/rounds/{round_id}/draw`."
        ),
    ),
    "RoundList": _closed({"rounds": {"type": "array", "items": ref("Round")}}),
    "SiteStock": _closed(
        {
            "site_id": ref("Id"),
            "name": {"type": "string"},
            "address": {"type": "string"},
            "district": {"type": "string"},
            "remaining": _count("Units left; may lag the truth by up to 2 s."),
        },
        description="A pickup point with its remaining units in one round.",
    ),
    "SiteList": _closed({"sites": {"type": "array", "items": ref("SiteStock")}}),
    "ReservationRequest": {
        "type": "object",
        "required": ["citizen_id", "phone", "site_id"],
        "properties": {
            "citizen_id": ref("CitizenId"),
            "phone": ref("Phone"),
            "site_id": ref("Id"),
        },
    },
    "Reservation": _closed(
        {
            "reservation_id": ref("ReservationId"),
            "round_id": ref("Id"),
            "site_id": ref("Id"),
            "quantity": {"type": "integer", "minimum": 1},
            "status": {"type": "string", "enum": list(rules.RESERVATION_STATUSES)},
            "pickup_code": ref("PickupCode"),
            "pickup_start": ref("Timestamp"),
            "pickup_end": ref("Timestamp"),
            "created_at": ref("Timestamp"),
            "citizen_id_masked": ref("CitizenIdMasked"),
        },
        description="One citizen's claim of `per_person` units at one site in one round.",
    ),
}

_LOTTERY: dict[str, Schema] = {
    "EntryRequest": {
        "type": "object",
        "required": ["citizen_id", "phone", "site_id"],
        "properties": {
            "citizen_id": ref("CitizenId"),
            "phone": ref("Phone"),
            "site_id": ref("Id"),
            "accept_district": {
                "type": "boolean",
                "default": False,
                "description": "Also take a share at another site of the same district.",
            },
        },
    },
    "Entry": _closed(
        {
            "entry_id": ref("EntryId"),
            "round_id": ref("Id"),
            "site_id": ref("Id"),
            "accept_district": {"type": "boolean"},
            "status": {"type": "string", "enum": list(rules.ENTRY_STATUSES)},
            "receipt": _with(
                "Hex64",
                'SHA-256 of `"allot-receipt-1\n" + round_id + "\n" + entry_id`: the '
                "entry's public name in the draw's files.",
            ),
            "signature": {
                "type": "string",
                "pattern": "^[A-Za-z0-9_-]{86}$",
                "description": (
                    "base64url Ed25519 signature by the draw key (`GET /api/v1/draw-key`) over "
                    '`"allot-entry-1\n{round_id}\n{receipt}\n{site_id}\n{0|1}\n"`.'
                ),
            },
            "weight": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": 4,
                "description": "`null` until the freeze.",
            },
            "created_at": ref("Timestamp"),
            "citizen_id_masked": ref("CitizenIdMasked"),
            "reservation_id": {
                "oneOf": [{"type": "null"}, ref("ReservationId")],
                "description": "The winner's reservation, once won.",
            },
        },
        description="One citizen's entry in a lottery round.",
    ),
    "DrawRequest": {
        "type": "object",
        "required": ["public_randomness"],
        "properties": {
            "public_randomness": {
                **_randomness_text(),
                "description": (
                    "The value the round's `public_randomness_source` published, as text: 1-256 "
                    "printable characters (NFC)."
                ),
            },
        },
    },
    "DrawRecord": _closed(
        {
            "round_id": ref("Id"),
            "algorithm": {"const": "allot-draw-1"},
            "status": {"type": "string", "enum": list(rules.DRAW_STATUSES)},
            "commitment": ref("Hex64"),
            "public_randomness_source": {"type": "string"},
            "frozen_at": _nullable(ref("Timestamp")),
            "entries": _nullable(_count("Lines of entries.csv.")),
            "entries_digest": _nullable(ref("Hex64")),
            "stock_digest": _nullable(ref("Hex64")),
            "public_randomness": _nullable({"type": "string"}),
            "secret": _nullable(_with("Hex64", "Published at the freeze.")),
            "seed": _nullable(ref("Hex64")),
            "drawn_at": _nullable(ref("Timestamp")),
            "results_digest": _nullable(ref("Hex64")),
            "passes": {"type": "array", "items": ref("DrawPass")},
            "sites": _nullable({"type": "array", "items": ref("DrawSite")}),
        },
        description=(
            'A lottery round\'s draw (`allot-draw-1`, API.md "The draw, step by step"); '
            "members not yet known are `null`."
        ),
    ),
    "DrawPass": _closed(
        {
            "pass": {"type": "integer", "minimum": 1},
            "at": ref("Timestamp"),
            "released": {
                "type": "array",
                "items": _closed({"site_id": ref("Id"), "units": _count()}),
            },
            "digest": ref("Hex64"),
        }
    ),
    "DrawSite": _closed(
        {
            "site_id": ref("Id"),
            "district": {"type": "string"},
            "stock": _count("Units at the freeze."),
            "entries": _count("Entries choosing the site."),
            "winners": _nullable(_count("Winners the draw placed here; `null` until drawn.")),
        }
    ),
    "DrawFile": {
        "type": "string",
        "description": "A published file of the draw, byte-exact (UTF-8, LF line ends).",
    },
    "DrawKey": _closed(
        {
            "public_key": {
                "type": "string",
                "pattern": "^[A-Za-z0-9_-]{43}$",
                "description": "base64url of the raw 32-byte Ed25519 public key.",
            }
        }
    ),
}

# -- operators' bodies and answers ------------------------------------------------------------

_OPERATORS: dict[str, Schema] = {
    "RoundSpec": {
        "type": "object",
        "description": "What an operator sets on a round.",
        "required": [
            "title",
            "opens_at",
            "closes_at",
            "per_person",
            "pickup_start",
            "pickup_end",
        ],
        "properties": {
            "title": _text(),
            "opens_at": ref("Timestamp"),
            "closes_at": _with("Timestamp", "After `opens_at`."),
            "per_person": {"type": "integer", "minimum": 1, "maximum": rules.MAX_PER_PERSON},
            "pickup_start": ref("Timestamp"),
            "pickup_end": _with("Timestamp", "After `pickup_start`, and not before `closes_at`."),
            "mode": {
                "type": "string",
                "enum": list(rules.MODES),
                "default": rules.MODES[0],
                "description": "Optional; cannot change once the round has opened.",
            },
            "public_randomness_source": {
                **_randomness_text(),
                "description": (
                    "Required for a `lottery` round: names a public random value that will "
                    "exist only after `closes_at` (a drand round, a state lottery's numbers). "
                    "Cannot change once the round has opened."
                ),
            },
            "programme": {
                **_nullable(ref("Programme")),
                "description": (
                    "Optional. Cannot change once the round has opened, nor once a batch has "
                    "been loaded into it."
                ),
            },
            "cooldown_days": {**ref("CooldownDays"), "default": 0},
            "eligibility": {
                **_nullable(ref("Eligibility")),
                "description": (
                    "Optional; `null`, absent or `{}`: anyone. Cannot change once the round "
                    "has opened."
                ),
            },
            "loss_weighting": {
                "type": ["boolean", "null"],
                "default": False,
                "description": (
                    "Optional. Only lottery rounds read it (an entry's `weight` grows with the "
                    "citizen's consecutive not-drawn entries in the programme); accepted on any "
                    "round. Cannot change once the round has opened."
                ),
            },
        },
    },
    "Site": {
        "type": "object",
        "description": "A pickup point, as an operator declares it.",
        "required": ["site_id", "name", "address", "district"],
        "properties": {
            "site_id": ref("Id"),
            "name": _text(),
            "address": _text(),
            "district": _text(),
        },
    },
    "SitesUpsert": {
        "type": "object",
        "required": ["sites"],
        "properties": {
            "sites": {
                "type": "array",
                "minItems": 1,
                "maxItems": rules.MAX_SITES_AT_ONCE,
                "items": ref("Site"),
                "description": "Each `site_id` at most once.",
            },
        },
    },
    "SitesUpserted": _closed({"upserted": _count()}),
    "BatchItem": {
        "type": "object",
        "required": ["site_id", "quantity"],
        "properties": {
            "site_id": ref("Id"),
            "quantity": {
                "type": "integer",
                "minimum": 1,
                "maximum": rules.MAX_BATCH_UNITS,
                "description": "Whole units.",
            },
        },
    },
    "Batch": {
        "type": "object",
        "description": (
            "Inventory loaded into a round, once per `batch_id`: either `items`, or "
            "`carry_from` (a carry-over: each site of that earlier round gives its unclaimed "
            "units, remaining + expired, to the same site of this round)."
        ),
        "required": ["batch_id"],
        "oneOf": [{"required": ["items"]}, {"required": ["carry_from"]}],
        "properties": {
            "batch_id": ref("Id"),
            "items": {
                "type": "array",
                "minItems": 1,
                "items": ref("BatchItem"),
                "description": "Each `site_id` at most once; every site must exist.",
            },
            "carry_from": _with(
                "Id",
                "The earlier round whose leftovers this batch takes, after its `pickup_end`; "
                "not this round. Not together with `items`.",
            ),
        },
    },
    "BatchCsv": {
        "type": "string",
        "description": (
            "CSV with the header `site_id,quantity`, then one row per site. The `batch_id` "
            "comes in the query."
        ),
        "examples": ["site_id,quantity\npharmacy-12,500\ncentre-3,200\n"],
    },
    "BatchAnswer": _closed(
        {
            "batch_id": ref("Id"),
            "units_added": _count(),
            "sites": _count("How many sites the batch names."),
            "carried_from": _with(
                "Id", "Only in the answer to a carry-over: the round the units came from."
            ),
        },
        optional=("carried_from",),
    ),
    "SiteStats": _closed(
        {
            "site_id": ref("Id"),
            "loaded": _count(),
            "reserved": _count(),
            "collected": _count(),
            "expired": _count(
                "Units of expired reservations (not collected by `pickup_end`) not yet carried "
                "over."
            ),
            "carried_out": _count("Units carried over to later rounds."),
            "remaining": _count(),
            "entries": _count(
                "Lottery rounds only. Extension beyond the contract: live entries choosing the "
                "site."
            ),
        },
        optional=("entries",),
        description=(
            "One site's units in the round: `loaded` = `remaining` + `reserved` + `collected` "
            "+ `expired` + `carried_out`."
        ),
    ),
    "Stats": _closed(
        {
            "round_id": ref("Id"),
            "loaded": _count(),
            "reserved": _count(),
            "collected": _count(),
            "expired": _count(),
            "carried_out": _count(),
            "remaining": _count(),
            "reservations": _count("Live reservations."),
            "entries": _count("Lottery rounds only: live (not withdrawn) entries."),
            "sites": {"type": "array", "items": ref("SiteStats")},
            "ledger": _closed(
                {
                    "recorded": {
                        "type": ["integer", "null"],
                        "minimum": 0,
                        "description": (
                            "Reservations recorded in PostgreSQL; `null` while PostgreSQL "
                            "cannot be reached."
                        ),
                    },
                    "lag": _count("Ledger entries not yet written to PostgreSQL."),
                }
            ),
            "lost": {
                "oneOf": [
                    {"type": "null"},
                    _closed(
                        {
                            "round_id": ref("Id"),
                            "since": ref("Timestamp"),
                            "redis_seq": _count("The round's last change that Redis holds."),
                            "ledger_seq": _count("The round's last change the ledger holds."),
                            "detail": {"type": "string"},
                        }
                    ),
                ],
                "description": (
                    "Extension beyond the contract. `null`, or what Redis has lost of the round "
                    "that the ledger has: citizens get 503 for the round until `allot rebuild` "
                    "restores it."
                ),
            },
        },
        optional=("entries",),
        description=(
            "A round's figures in units, except `reservations` (live reservations), `entries` "
            "and `ledger` (reservations)."
        ),
    ),
    "PickupRequest": {
        "type": "object",
        "required": ["site_id", "pickup_code"],
        "properties": {
            "site_id": ref("Id"),
            "pickup_code": ref("PickupCode"),
            "citizen_id": _with(
                "CitizenId", "Optional: when given, it must be the reservation holder's."
            ),
            "round_id": _with(
                "Id",
                "Extension beyond the contract. Optional: when absent, the server finds the "
                "round holding that pickup code at that site.",
            ),
        },
    },
}

_FAIRNESS: dict[str, Schema] = {
    "FairnessGroup": _closed(
        {
            "dimension": {"enum": ["district", "age_band", "channel", "weight"]},
            "group": {
                "type": "string",
                "description": (
                    "A district (of the site asked for); an age band `0-17`, `18-39`, `40-64`, "
                    "`65+` at `opens_at`; a channel `desk`, `web`, `mini-program`, `api`; or, "
                    "for a lottery round from its freeze on, a weight `1` to `4`."
                ),
            },
            "asked": _count(
                "Distinct citizens who reserved or were refused sold-out; in a lottery round, "
                "those with an entry not withdrawn."
            ),
            "granted": _count(
                "Distinct citizens holding a reservation not cancelled; in a lottery round, "
                "winners whose reservation was not cancelled."
            ),
            "share_of_asked": {"type": "number", "minimum": 0, "maximum": 1},
            "share_of_granted": {"type": "number", "minimum": 0, "maximum": 1},
        }
    ),
    "FairnessReport": _closed(
        {"round_id": ref("Id"), "groups": {"type": "array", "items": ref("FairnessGroup")}},
        description=(
            "Granted share against asked share per group; kept without clear IDs. A group "
            "nobody asked in and nobody was granted in is left out."
        ),
    ),
}

_DESK: dict[str, Schema] = {
    "DeskTokenRequest": {
        "type": "object",
        "required": ["site_id", "label"],
        "properties": {
            "site_id": _with("Id", "The site the token is bound to; it must exist."),
            "label": {**_text(), "description": "Who holds it, e.g. the counter's name."},
        },
    },
    "DeskTokenCreated": _closed(
        {
            "token": {
                "type": "string",
                "pattern": "^allot-desk-[A-Za-z0-9_-]{43}$",
                "description": "The token (256 random bits), shown this once; stored hashed.",
            },
            "token_id": ref("DeskTokenId"),
            "site_id": ref("Id"),
            "label": _text(),
        }
    ),
    "DeskToken": _closed(
        {
            "token_id": ref("DeskTokenId"),
            "site_id": ref("Id"),
            "label": _text(),
            "created_at": ref("Timestamp"),
            "revoked_at": {
                "oneOf": [{"type": "null"}, ref("Timestamp")],
                "description": "When it was revoked; `null` while it is valid.",
            },
        },
        description="A desk token's public fields: never the token itself.",
    ),
}

# -- operations -------------------------------------------------------------------------------

_OPERATIONS: dict[str, Schema] = {
    # The contract says only "200 while the process runs": the status code is what counts, so
    # the body is not closed.
    "Health": {
        "type": "object",
        "description": "A probe's answer; informational, the status code is what counts.",
        "required": ["status"],
        "properties": {"status": {"type": "string", "examples": ["ok", "ready"]}},
    },
}

# -- problems (RFC 9457) ----------------------------------------------------------------------

# The members a problem body may add to type, title, status, detail and code; which code may
# carry which is declared in service/problems.py (members: required, extensions: optional).
PROBLEM_MEMBERS: dict[str, Schema] = {
    "errors": {
        "type": "array",
        "description": "With `invalid-request`: one entry per bad field.",
        "minItems": 1,
        "items": ref("FieldError"),
    },
    "alternatives": {
        "type": "array",
        "description": (
            f"With `sold-out`: up to {rules.MAX_ALTERNATIVES} sites with stock, same district "
            "first."
        ),
        "maxItems": rules.MAX_ALTERNATIVES,
        "items": ref("Alternative"),
    },
    "reason": {
        "type": "string",
        "enum": list(rules.NOT_COLLECTABLE_REASONS),
        "description": (
            "Extension beyond the contract. With `not-collectable`: why, for programs "
            "(`citizen`: the given ID does not match the holder)."
        ),
    },
    "opens_at": _with("Timestamp", "Extension beyond the contract. With `round-not-open`."),
    "closes_at": _with("Timestamp", "Extension beyond the contract. With `round-not-open`."),
    "rule": {
        "type": "string",
        "enum": sorted(rules.ELIGIBILITY_RULES),
        "description": "With `not-eligible`: the rule of the round's `eligibility` that failed.",
    },
    "until": _with("Timestamp", "With `in-cooldown`: when the cooldown ends."),
    "lost_rounds": {
        "type": "array",
        "items": ref("Id"),
        "description": (
            "Extension beyond the contract. With `unavailable` from `/readyz`: the rounds Redis "
            "has lost data of, or lacks, that the ledger has (`allot rebuild` heals them)."
        ),
    },
}

_PROBLEM_PARTS: dict[str, Schema] = {
    "FieldError": _closed(
        {
            "field": {"type": "string", "examples": ["items[3].quantity"]},
            "message": {"type": "string", "minLength": 1},
        }
    ),
    "Alternative": _closed(
        {
            "site_id": ref("Id"),
            "name": {"type": "string"},
            "district": {"type": "string"},
            "remaining": _count(),
        },
        description="Another site that still has stock for a share.",
    ),
}


def problem_schema(codes: tuple[ProblemCode, ...]) -> Schema:
    """The body of every error answer with one of ``codes``.

    Closed like the other answers; each code's status is the one of its table row, the members
    the contract adds to a code are required with it, and no extension member appears with a
    code that does not carry it.
    """
    carriers: dict[str, list[str]] = {}
    for p in codes:
        for member in (*p.members, *p.extensions):
            carriers.setdefault(member, []).append(p.code)
    by_status: dict[int, list[str]] = {}
    for p in codes:
        by_status.setdefault(p.status, []).append(p.code)
    rules_of_codes: list[Schema] = [
        {
            "if": {"required": ["code"], "properties": {"code": {"enum": names}}},
            "then": {"properties": {"status": {"const": status}}},
        }
        for status, names in by_status.items()
    ]
    rules_of_codes += [
        {
            "if": {"required": ["code"], "properties": {"code": {"const": p.code}}},
            "then": {"required": list(p.members)},
        }
        for p in codes
        if p.members
    ]
    return {
        "type": "object",
        "description": (
            "Every error answer (RFC 9457, `application/problem+json`), with a stable `code`."
        ),
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {
                "type": "string",
                "format": "uri-reference",
                "examples": ["urn:allot:problem:sold-out"],
            },
            "title": {"type": "string", "minLength": 1},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "code": {"type": "string", "enum": [p.code for p in codes]},
            **{m: s for m, s in PROBLEM_MEMBERS.items() if m in carriers},
        },
        "additionalProperties": False,
        "allOf": rules_of_codes,
        "dependentSchemas": {
            member: {"properties": {"code": {"enum": names}}} for member, names in carriers.items()
        },
    }


def schemas() -> dict[str, Schema]:
    """``#/components/schemas`` of the document: every shape above, and the Problem of the
    codes served today."""
    served = tuple(p for p in PROBLEM_CODES if p.served)
    return {
        **_VALUES,
        **_CITIZENS,
        **_LOTTERY,
        **_OPERATORS,
        **_DESK,
        **_FAIRNESS,
        **_OPERATIONS,
        **_PROBLEM_PARTS,
        "Problem": problem_schema(served),
    }


SCHEMAS: Final = schemas()


def fields(name: str) -> tuple[str, ...]:
    """The members a closed answer always has, in declaration order (e.g. the load test's
    checks)."""
    return tuple(SCHEMAS[name]["required"])
