"""The citizen page, the reservation page, the operator console, their static files, the QR code
of a pickup code, and the open-data stock feed.

The pages are plain HTML rendered once per language from ``service/static/*.html``; their
scripts call the same JSON API as the mini-program. Everything ships inside the package (no CDN,
no web font): static files are read once, gzipped once, and served with an ETag and a versioned
URL that may be cached for a year.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import re
from dataclasses import dataclass
from html import escape
from importlib import resources

import orjson
import segno
from aiohttp import web

from allocator.errors import NotFound
from service.appkeys import ALLOCATOR, SITE_FEEDS
from service.feeds import FEED_TTL, Feed, render_feed
from service.shapes import site_body
from service.validation import path_id

routes = web.RouteTableDef()

LANGUAGES = ("zh-Hans", "zh-Hant", "en")
DEFAULT_LANGUAGE = "zh-Hans"
LANG_COOKIE = "allot_lang"
PAGES = ("citizen", "reservation", "admin")

CONTENT_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# Pages load nothing from elsewhere; /r/{id} URLs are the citizen's key, so no Referer leaves.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Vary": "Accept-Language, Cookie",
    "Cache-Control": "no-cache",
}
PLACEHOLDER = re.compile(r"\{\{\s*([@A-Za-z0-9_.:-]+)\s*\}\}")


# -- static files ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes | None
    content_type: str
    etag: str

    @property
    def version(self) -> str:
        return self.etag.strip('"')


@functools.cache
def assets() -> dict[str, Asset]:
    """Every file in service/static (flat), read and compressed once per process."""
    found: dict[str, Asset] = {}
    for entry in resources.files("service").joinpath("static").iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if not entry.is_file() or suffix not in CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        packed = gzip.compress(body, 9, mtime=0)
        found[name] = Asset(
            body=body,
            gzipped=packed if len(packed) < len(body) else None,
            content_type=CONTENT_TYPES[suffix],
            etag='"' + hashlib.sha256(body).hexdigest()[:16] + '"',
        )
    return found


@functools.cache
def translations() -> dict[str, dict[str, str]]:
    raw = resources.files("service").joinpath("static", "i18n.json").read_bytes()
    table: dict[str, dict[str, str]] = orjson.loads(raw)
    return table


def static_url(name: str) -> str:
    return f"/static/{name}?v={assets()[name].version}"


def _send(
    request: web.Request, body: bytes, gzipped: bytes | None, headers: dict[str, str]
) -> web.Response:
    """The gzipped form when the client takes it, else the plain one (headers name the type)."""
    if gzipped is not None:
        headers.setdefault("Vary", "Accept-Encoding")
        if "Accept-Encoding" not in headers["Vary"]:
            headers["Vary"] += ", Accept-Encoding"
        if "gzip" in request.headers.get("Accept-Encoding", "").lower():
            headers["Content-Encoding"] = "gzip"
            body = gzipped
    return web.Response(body=body, headers=headers)


@routes.get("/static/{name}")
async def static_file(request: web.Request) -> web.Response:
    asset = assets().get(request.match_info["name"])
    if asset is None:
        raise NotFound(f"Nothing is at {request.path}.")
    versioned = request.query.get("v") == asset.version
    headers = {
        "ETag": asset.etag,
        "Cache-Control": "public, max-age=31536000, immutable" if versioned else "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = asset.content_type
    return _send(request, asset.body, asset.gzipped, headers)


# -- pages ------------------------------------------------------------------------------------


def negotiate_language(request: web.Request) -> tuple[str, bool]:
    """``?lang=`` first (then remembered in a cookie), then the cookie, then Accept-Language.

    Returns the language and whether it came from ``?lang=`` (so the cookie should be set).
    """
    asked = request.query.get("lang")
    if asked in LANGUAGES:
        return asked, True
    cookie = request.cookies.get(LANG_COOKIE)
    if cookie in LANGUAGES:
        return cookie, False
    return language_from_header(request.headers.get("Accept-Language", "")), False


def language_from_header(header: str) -> str:
    """The best of our three languages for an Accept-Language header; simplified by default."""
    choices: list[tuple[float, int, str]] = []
    for index, part in enumerate(header.split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        lang = _our_language(tag.strip().lower())
        if lang is not None and quality > 0:
            choices.append((-quality, index, lang))
    return min(choices)[2] if choices else DEFAULT_LANGUAGE


def _our_language(tag: str) -> str | None:
    if tag == "zh" or tag.startswith("zh-"):
        traditional = ("zh-hant", "zh-tw", "zh-hk", "zh-mo")
        return "zh-Hant" if tag.startswith(traditional) else "zh-Hans"
    if tag == "en" or tag.startswith("en-"):
        return "en"
    return None


@dataclass(frozen=True, slots=True)
class Page:
    body: bytes
    gzipped: bytes


@functools.cache
def page_bytes(page: str, lang: str) -> Page:
    body = render_page(page, lang)
    return Page(body=body, gzipped=gzip.compress(body, 9, mtime=0))


def render_page(page: str, lang: str) -> bytes:
    """A page template with every ``{{key}}`` filled in for one language."""
    table = translations()[lang]
    template = resources.files("service").joinpath("static", f"{page}.html").read_text("utf-8")

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "@lang":
            return lang
        if key == "@i18n":
            # JSON inside <script type="application/json">: no "</" may close the element early
            return orjson.dumps(table).decode().replace("</", "<\\/")
        if key.startswith("@static:"):
            return escape(static_url(key.removeprefix("@static:")))
        if key.startswith("@lang-current:"):
            return "true" if key.removeprefix("@lang-current:") == lang else "false"
        return escape(table[key])

    return PLACEHOLDER.sub(fill, template).encode()


def page_response(request: web.Request, page: str) -> web.Response:
    lang, chosen = negotiate_language(request)
    headers = dict(PAGE_HEADERS)
    headers["Content-Language"] = lang
    if page == "reservation":
        headers["X-Robots-Tag"] = "noindex"
    headers["Content-Type"] = "text/html; charset=utf-8"
    rendered = page_bytes(page, lang)
    response = _send(request, rendered.body, rendered.gzipped, headers)
    if chosen:
        response.set_cookie(LANG_COOKIE, lang, max_age=365 * 86400, path="/", samesite="Lax")
    return response


@routes.get("/")
async def citizen_page(request: web.Request) -> web.Response:
    return page_response(request, "citizen")


@routes.get("/r/{reservation_id}")
async def reservation_page(request: web.Request) -> web.Response:
    """The same page for every id: the script asks the API, so an unknown id costs nothing here."""
    return page_response(request, "reservation")


@routes.get("/admin")
async def admin_page(request: web.Request) -> web.Response:
    return page_response(request, "admin")


# -- QR code of a pickup code (an extension of the contract) -----------------------------------


@routes.get("/api/v1/reservations/{reservation_id}/qr.svg")
async def reservation_qr(request: web.Request) -> web.Response:
    """The pickup code as a QR code, drawn on the server; a scanner at the desk types the code."""
    reservation = await request.app[ALLOCATOR].reservation(request.match_info["reservation_id"])
    return web.Response(
        body=qr_svg(reservation.pickup_code),
        content_type="image/svg+xml",
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


def qr_svg(code: str) -> bytes:
    """A scalable SVG (viewBox only) of ``code``; pickup codes fit QR's alphanumeric mode."""
    out = io.BytesIO()
    segno.make_qr(code, error="m").save(
        out,
        kind="svg",
        scale=1,
        border=4,
        xmldecl=False,
        omitsize=True,
        dark="#000",
        light="#fff",
        title=code,
    )
    return out.getvalue()


# -- open data: per-site stock as CSV ----------------------------------------------------------


@routes.get("/api/v1/rounds/{round_id}/sites.csv")
async def sites_csv(request: web.Request) -> web.Response:
    """Per-site stock of a round as CSV, rendered at most once a second per worker."""
    round_id = path_id(request, "round_id")
    allocator = request.app[ALLOCATOR]
    cache = request.app[SITE_FEEDS]

    async def load() -> Feed:
        sites = await allocator.site_list(round_id)
        body = render_feed([site_body(x) for x in sites], allocator.now())
        return Feed(
            body=body,
            gzipped=gzip.compress(body, 6, mtime=0),
            etag='"' + hashlib.sha256(body).hexdigest()[:16] + '"',
        )

    feed = await cache.get(round_id, load)
    headers = {
        "ETag": feed.etag,
        "Cache-Control": f"public, max-age={int(FEED_TTL)}",
        "Access-Control-Allow-Origin": "*",
        "Content-Disposition": f'inline; filename="{round_id}-sites.csv"',
    }
    if request.headers.get("If-None-Match") == feed.etag:
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = "text/csv; charset=utf-8; header=present"
    return _send(request, feed.body, feed.gzipped, headers)
