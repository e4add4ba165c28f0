"""Reading and checking request bodies. Every refusal names each bad field and changes nothing.

Unknown members of a citizen's body are ignored, never honoured: quantity, status and the like
are set by the server alone.

Bodies may be sent with ``Content-Encoding: gzip`` or ``deflate``; the size limits apply to the
decoded body, and decoding stops as soon as it passes the limit (aiohttp's own decoding is off,
see ``service.app``). Any other coding, or a body that does not decode, is 415.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
import zlib
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import hdrs, web

from allocator.draw import DrawInputError, check_public_randomness
from allocator.entitlement import Eligibility, parse_cooldown_days, parse_programme
from allocator.errors import InvalidRequest, NotFound
from allocator.identity import InvalidIdentity, normalise_citizen_id, validate_phone
from allocator.model import Round, Site, parse_rfc3339
from allocator.rules import (
    FIRST_YEAR,
    ID_PATTERN,
    ID_RULE,
    LAST_YEAR,
    MAX_BATCH_UNITS,
    MAX_PER_PERSON,
    MAX_SITES_AT_ONCE,
    MAX_TEXT,
    MODES,
    PICKUP_CODE,
    PICKUP_CODE_RULE,
)
from service.problems import MalformedJson, PayloadTooLarge, UnsupportedMediaType
from service.schemas import CSV_LIMIT as CSV_LIMIT  # re-exported: service.app and views read it
from service.schemas import JSON_LIMIT as JSON_LIMIT

DIGITS = re.compile(r"[0-9]{1,9}", re.ASCII)
READ_CHUNK = 64 * 1024
CODINGS = "gzip or deflate"
BARE_CR = re.compile(r"\r(?!\n)")
T = TypeVar("T")


def path_id(request: web.Request, name: str) -> str:
    """A round or site id from the path; one that cannot exist is simply not found."""
    value = request.match_info[name]
    if not ID_PATTERN.fullmatch(value):
        raise NotFound(f"There is no {name.removesuffix('_id')} {value!r}.")
    return value


def media_type(request: web.Request) -> str:
    return request.content_type.lower()


def _is_json(mt: str) -> bool:
    return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))


class BodyDecoder:
    """Inflates a gzip or deflate body piece by piece, never more than the caller has room for."""

    __slots__ = ("_coding", "_z")

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._z: Any = None  # zlib.Decompress, chosen on the first byte (see decode)

    @classmethod
    def for_coding(cls, header: str | None) -> BodyDecoder | None:
        """The decoder for a Content-Encoding header value; None for no coding (or identity)."""
        codings = [c.strip().lower() for c in (header or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if not codings:
            return None
        if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
            return cls(codings[0])
        raise UnsupportedMediaType(
            f"Send the body uncompressed or with Content-Encoding {CODINGS}."
        )

    def decode(self, data: bytes, room: int) -> bytes:
        """The decoded form of the next piece of body, at most ``room + 1`` bytes: more than
        ``room`` means the body is over the limit, and the rest is never inflated."""
        if self._z is None:
            if not data:
                return b""
            if self._coding == "deflate":
                # RFC 9110 'deflate' is zlib-wrapped; some clients send raw deflate (as aiohttp
                # accepted before): a zlib header has compression method 8 in the low nibble.
                self._z = zlib.decompressobj(zlib.MAX_WBITS if data[0] & 0x0F == 8 else -15)
            else:
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            return bytes(self._z.decompress(data, room + 1))
        except zlib.error:
            raise self._broken() from None

    def finish(self) -> None:
        """The body has ended: it must have been one whole compressed stream, nothing after."""
        if self._z is None or not self._z.eof or self._z.unused_data:
            raise self._broken()

    def _broken(self) -> UnsupportedMediaType:
        return UnsupportedMediaType(
            f"The body is not valid {self._coding} (Content-Encoding {CODINGS}, or none)."
        )


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The body is larger than {limit} bytes.")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole (decoded) body, refusing with 413 as soon as it exceeds ``limit`` (before
    parsing). With a Content-Encoding, decoded bytes are counted as they come."""
    decoder = BodyDecoder.for_coding(request.headers.get("Content-Encoding"))
    if request.content_length is not None:
        if request.content_length > limit:
            raise _too_large(limit)
        if decoder is None:
            return await request.read()  # the length is known and within the limit: one read
    chunks: list[bytes] = []  # chunked or compressed: count as it comes, and stop at the limit
    size = raw = 0
    while chunk := await request.content.read(READ_CHUNK):
        raw += len(chunk)
        if decoder is not None:
            chunk = decoder.decode(chunk, limit - size)
        size += len(chunk)
        if size > limit or raw > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    if decoder is not None:
        decoder.finish()
    return b"".join(chunks)


async def read_json(request: web.Request) -> dict[str, Any]:
    headers = request.headers
    # the common case first, without parsing the header: exactly application/json
    if headers.get(hdrs.CONTENT_TYPE) != "application/json" and not _is_json(media_type(request)):
        raise UnsupportedMediaType("Send the body as application/json.")
    if hdrs.CONTENT_ENCODING not in headers:
        # The whole body has arrived (the parser has seen its Content-Length, within the
        # limit): take it from the buffer at once. What read_body does too, in fewer steps.
        length = request.content_length
        payload = request.content
        if length is not None and length <= JSON_LIMIT and payload.is_eof():
            return parse_json_object(payload.read_nowait())
    raw = await read_body(request, JSON_LIMIT)
    return parse_json_object(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJson(f"The body is not valid JSON: {exc.msg}.") from None
    if not isinstance(body, dict):
        raise MalformedJson("The body must be a JSON object.")
    return body


class _Errors:
    """Collects one message per bad field, then raises them all at once."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.items.append({"field": field, "message": message})

    def check(self) -> None:
        if self.items:
            raise InvalidRequest(self.items)

    def string(
        self,
        body: Mapping[str, Any],
        name: str,
        field: str | None = None,
        *,
        optional: bool = False,
    ) -> str | None:
        field = field or name
        value = body.get(name)
        if value is None:
            if not optional:
                self.add(field, "is required")
            return None
        if not isinstance(value, str):
            self.add(field, "must be a string")
            return None
        return value

    def checked(
        self,
        body: Mapping[str, Any],
        name: str,
        check: Callable[[str], str],
        *,
        optional: bool = False,
    ) -> str | None:
        """The string member ``name`` as ``check`` returns it, or None with the reason recorded."""
        value = self.string(body, name, optional=optional)
        if value is None:
            return None
        try:
            return check(value)
        except InvalidIdentity as exc:
            self.add(name, str(exc))
            return None

    def ident(self, body: Mapping[str, Any], name: str, field: str | None = None) -> str | None:
        value = self.string(body, name, field)
        if value is not None and not ID_PATTERN.fullmatch(value):
            self.add(field or name, f"must be {ID_RULE}")
            return None
        return value

    def text(self, body: Mapping[str, Any], name: str, field: str | None = None) -> str | None:
        value = self.string(body, name, field)
        if value is None:
            return None
        value = value.strip()
        if not 0 < len(value) <= MAX_TEXT:
            self.add(field or name, f"must be 1-{MAX_TEXT} characters")
            return None
        if has_control_characters(value):
            # PostgreSQL refuses NUL in text; the rest would garble pages, CSV feeds and logs
            self.add(field or name, "must not contain control characters (NUL, newline, tab ...)")
            return None
        return value

    def integer(
        self, body: Mapping[str, Any], name: str, low: int, high: int, field: str | None = None
    ) -> int | None:
        field = field or name
        value = body.get(name)
        if value is None:
            self.add(field, "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(field, "must be a whole number")
            return None
        if not low <= value <= high:
            self.add(field, f"must be from {low} to {high}")
            return None
        return value

    def parsed(self, parse: Callable[[Any], T], value: Any, default: T) -> T:
        """``parse(value)``, or ``default`` with the fields its InvalidRequest names recorded."""
        try:
            return parse(value)
        except InvalidRequest as exc:
            self.items.extend(exc.extra["errors"])
            return default

    def time(self, body: Mapping[str, Any], name: str) -> Any:
        value = self.string(body, name)
        if value is None:
            return None
        try:
            parsed = parse_rfc3339(value)
        except ValueError as exc:
            self.add(name, f"must be an RFC 3339 time with an offset ({exc})")
            return None
        if not FIRST_YEAR <= parsed.year <= LAST_YEAR:
            self.add(name, f"must be in the years {FIRST_YEAR}-{LAST_YEAR}")
            return None
        return parsed


def has_control_characters(value: str) -> bool:
    """True if any character is a control (Unicode Cc: C0, DEL, C1) or a lone surrogate."""
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in value)


@dataclass(frozen=True, slots=True)
class ReservationRequest:
    site_id: str
    citizen_id: str
    phone: str


def parse_reservation(body: Mapping[str, Any]) -> ReservationRequest:
    citizen_id, phone, site_id = body.get("citizen_id"), body.get("phone"), body.get("site_id")
    if (
        isinstance(citizen_id, str)
        and isinstance(phone, str)
        and isinstance(site_id, str)
        and ID_PATTERN.fullmatch(site_id)
    ):  # the body of nearly every request: three good strings, checked without a collector
        try:
            return ReservationRequest(
                site_id=site_id,
                citizen_id=normalise_citizen_id(citizen_id),
                phone=validate_phone(phone),
            )
        except InvalidIdentity:
            pass  # answered below, naming every bad field
    errors = _Errors()
    citizen_id = errors.checked(body, "citizen_id", normalise_citizen_id)
    phone = errors.checked(body, "phone", validate_phone)
    site_id = errors.ident(body, "site_id")
    errors.check()
    assert site_id
    assert citizen_id
    assert phone
    return ReservationRequest(site_id=site_id, citizen_id=citizen_id, phone=phone)


def parse_sites(body: Mapping[str, Any]) -> list[Site]:
    errors = _Errors()
    raw = body.get("sites")
    if not isinstance(raw, list) or not raw:
        errors.add("sites", "must be a non-empty list")
        errors.check()
    assert isinstance(raw, list)
    if len(raw) > MAX_SITES_AT_ONCE:
        errors.add("sites", f"at most {MAX_SITES_AT_ONCE} sites at once")
        errors.check()
    sites: list[Site] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"sites[{i}]"
        if not isinstance(item, dict):
            errors.add(where, "must be an object")
            continue
        site_id = errors.ident(item, "site_id", f"{where}.site_id")
        name = errors.text(item, "name", f"{where}.name")
        address = errors.text(item, "address", f"{where}.address")
        district = errors.text(item, "district", f"{where}.district")
        if site_id in seen:
            errors.add(f"{where}.site_id", f"{site_id!r} is listed twice")
        if site_id and name and address and district:
            seen.add(site_id)
            sites.append(Site(site_id, name, address, district))
    errors.check()
    return sites


def parse_round(round_id: str, body: Mapping[str, Any]) -> Round:
    errors = _Errors()
    if not ID_PATTERN.fullmatch(round_id):
        errors.add("round_id", f"must be {ID_RULE}")
    title = errors.text(body, "title")
    opens_at = errors.time(body, "opens_at")
    closes_at = errors.time(body, "closes_at")
    pickup_start = errors.time(body, "pickup_start")
    pickup_end = errors.time(body, "pickup_end")
    per_person = errors.integer(body, "per_person", 1, MAX_PER_PERSON)
    mode = body.get("mode", MODES[0])
    if mode not in MODES:
        errors.add("mode", f"must be one of {', '.join(map(repr, MODES))}")
    source = randomness_text(errors, body, "public_randomness_source", optional=True)
    if mode == "lottery" and body.get("public_randomness_source") is None:
        errors.add("public_randomness_source", "is required for a lottery round")
    if opens_at and closes_at and not opens_at < closes_at:
        errors.add("closes_at", "must be after opens_at")
    if pickup_start and pickup_end and not pickup_start < pickup_end:
        errors.add("pickup_end", "must be after pickup_start")
    if closes_at and pickup_end and not closes_at <= pickup_end:
        errors.add("pickup_end", "must not be before closes_at")
    # entitlement (allocator/entitlement.py names each bad field)
    programme = errors.parsed(parse_programme, body.get("programme"), None)
    cooldown_days = errors.parsed(parse_cooldown_days, body.get("cooldown_days"), 0)
    eligibility = errors.parsed(Eligibility.parse, body.get("eligibility"), None)
    loss_weighting = body.get("loss_weighting", False)
    if loss_weighting is None:
        loss_weighting = False
    if not isinstance(loss_weighting, bool):
        errors.add("loss_weighting", "must be true or false")
    errors.check()
    assert title
    assert per_person
    return Round(
        round_id,
        title,
        opens_at,
        closes_at,
        per_person,
        pickup_start,
        pickup_end,
        mode=mode,
        programme=programme,
        cooldown_days=cooldown_days,
        eligibility=eligibility,
        loss_weighting=loss_weighting,
        public_randomness_source=source,
    )


def randomness_text(
    errors: _Errors, body: Mapping[str, Any], name: str, *, optional: bool = False
) -> str | None:
    """``public_randomness_source`` or ``public_randomness``: 1-256 printable characters (in
    NFC; allocator/draw.py's rule), kept exactly as given otherwise."""
    value = errors.string(body, name, optional=optional)
    if value is None:
        return None
    try:
        return check_public_randomness(value)
    except DrawInputError as exc:
        errors.add(name, str(exc).removeprefix("public_randomness "))
        return None


@dataclass(frozen=True, slots=True)
class EntryRequest:
    site_id: str
    citizen_id: str
    phone: str
    accept_district: bool


def parse_entry(body: Mapping[str, Any]) -> EntryRequest:
    errors = _Errors()
    citizen_id = errors.checked(body, "citizen_id", normalise_citizen_id)
    phone = errors.checked(body, "phone", validate_phone)
    site_id = errors.ident(body, "site_id")
    accept = body.get("accept_district", False)
    if accept is None:
        accept = False
    if not isinstance(accept, bool):
        errors.add("accept_district", "must be true or false")
    errors.check()
    assert site_id
    assert citizen_id
    assert phone
    return EntryRequest(site_id, citizen_id, phone, bool(accept))


def parse_draw(body: Mapping[str, Any]) -> str:
    """The body of POST .../draw: ``{"public_randomness": "<1-256 printable characters>"}``."""
    errors = _Errors()
    value = randomness_text(errors, body, "public_randomness")
    errors.check()
    assert value is not None
    return value


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    items: list[tuple[str, int]]  # empty for a carry-over
    carry_from: str | None = None  # a carry-over: the earlier round (no items)


def _check_items(
    rows: list[tuple[str, Any, Any]],
    errors: _Errors,
    known_sites: Container[str],
    *,
    listed: bool,
) -> list[tuple[str, int]]:
    """rows: (field prefix, site_id, quantity) as received. Every bad row is named in one pass,
    ``listed`` says whether the batch had any rows at all (well-formed or not)."""
    items: list[tuple[str, int]] = []
    seen: dict[str, str] = {}
    for where, site_id, quantity in rows:
        ok = True
        if not isinstance(site_id, str) or not ID_PATTERN.fullmatch(site_id):
            errors.add(f"{where}.site_id", f"must be {ID_RULE}")
            ok = False
        elif site_id in seen:
            errors.add(f"{where}.site_id", f"{site_id!r} is already listed at {seen[site_id]}")
            ok = False
        elif site_id not in known_sites:
            errors.add(f"{where}.site_id", f"unknown site {site_id!r} (add it with PUT sites)")
            ok = False
        if isinstance(quantity, bool) or not isinstance(quantity, int):
            errors.add(f"{where}.quantity", "must be a whole number")
            ok = False
        elif not 1 <= quantity <= MAX_BATCH_UNITS:
            errors.add(f"{where}.quantity", f"must be from 1 to {MAX_BATCH_UNITS}")
            ok = False
        if ok:
            seen[site_id] = where
            items.append((site_id, quantity))
    if not listed:
        errors.add("items", "must list at least one site")
    errors.check()
    return items


def parse_batch_json(
    body: Mapping[str, Any], known_sites: Container[str], round_id: str = ""
) -> Batch:
    errors = _Errors()
    batch_id = errors.ident(body, "batch_id")
    if body.get("carry_from") is not None:
        carry_from = errors.ident(body, "carry_from")
        if "items" in body:
            errors.add("items", "must not be given with carry_from (a carry-over takes no items)")
        if carry_from is not None and carry_from == round_id:
            errors.add("carry_from", "must name another round than this one")
        errors.check()
        assert batch_id
        assert carry_from
        return Batch(batch_id, [], carry_from)
    raw = body.get("items")
    if not isinstance(raw, list):
        errors.add("items", "must be a list of {site_id, quantity}")
        errors.check()
    assert isinstance(raw, list)
    rows = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            errors.add(f"items[{i}]", "must be an object")
            continue
        rows.append((f"items[{i}]", item.get("site_id"), item.get("quantity")))
    items = _check_items(rows, errors, known_sites, listed=bool(raw))
    assert batch_id
    return Batch(batch_id, items)


def parse_batch_csv(raw: bytes, batch_id: str | None, known_sites: Container[str]) -> Batch:
    """CSV with the header ``site_id,quantity``; rows are named by their line number."""
    errors = _Errors()
    if batch_id is None:
        errors.add("batch_id", "is required as a query parameter for CSV batches")
    elif not ID_PATTERN.fullmatch(batch_id):
        errors.add("batch_id", f"must be {ID_RULE}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        errors.add("body", "must be UTF-8 text")
        errors.check()
        raise AssertionError("unreachable") from None
    bare_cr = BARE_CR.search(text)
    if bare_cr:  # the csv module would raise; no value of ours can hold a carriage return
        line = text.count("\n", 0, bare_cr.start()) + 1
        errors.add(
            f"line {line}",
            "has a carriage return (\\r) that does not end a \\r\\n line end: save the file "
            "with \\n or \\r\\n line ends (e.g. 'CSV UTF-8' in a spreadsheet)",
        )
        errors.check()
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[str, Any, Any]] = []
    listed = False
    try:
        header = [h.strip() for h in next(reader, [])]
        if header != ["site_id", "quantity"]:
            errors.add("line 1", "the header must be exactly: site_id,quantity")
            errors.check()
        for record in reader:
            line = reader.line_num
            if not record or all(not c.strip() for c in record):
                continue
            listed = True
            if len(record) != 2:
                errors.add(f"line {line}", "must have exactly two values: site_id,quantity")
                continue
            site_id, quantity = (c.strip() for c in record)
            # ASCII digits only: str.isdigit() also accepts '²' and '①', which int() refuses
            qty: Any = int(quantity) if DIGITS.fullmatch(quantity) else quantity
            rows.append((f"line {line}", site_id, qty))
    except csv.Error as exc:  # e.g. a value over the csv module's field limit (131072)
        errors.add(f"line {max(reader.line_num, 1)}", f"cannot be read as CSV: {exc}")
        errors.check()
    items = _check_items(rows, errors, known_sites, listed=listed)
    assert batch_id
    return Batch(batch_id, items)


@dataclass(frozen=True, slots=True)
class PickupRequest:
    site_id: str
    pickup_code: str
    citizen_id: str | None
    round_id: str | None


def parse_pickup(body: Mapping[str, Any]) -> PickupRequest:
    errors = _Errors()
    site_id = errors.ident(body, "site_id")
    code = errors.string(body, "pickup_code")
    if code is not None:
        code = code.strip().upper()
        if not PICKUP_CODE.fullmatch(code):
            errors.add("pickup_code", f"must be {PICKUP_CODE_RULE}")
    citizen_id = errors.checked(body, "citizen_id", normalise_citizen_id, optional=True)
    round_id = None
    if body.get("round_id") is not None:
        round_id = errors.ident(body, "round_id")
    errors.check()
    assert site_id
    assert code
    return PickupRequest(site_id, code, citizen_id, round_id)


@dataclass(frozen=True, slots=True)
class DeskTokenRequest:
    site_id: str
    label: str


def parse_desk_token(body: Mapping[str, Any]) -> DeskTokenRequest:
    """``{"site_id", "label"}``: label 1-200 characters (trimmed), no control characters."""
    errors = _Errors()
    site_id = errors.ident(body, "site_id")
    label = errors.text(body, "label")
    errors.check()
    assert site_id
    assert label
    return DeskTokenRequest(site_id, label)
