"""The pages, their static files, the QR code and the open-data CSV feed, over HTTP (no browser)."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
import zipfile
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import segno
from aiohttp.test_utils import TestClient

from service import feeds, pages
from tests.helpers import ADMIN, FakeClock, reserve, seed

Client = TestClient[Any, Any]
ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "service" / "static"
PAGE_PATHS = {"citizen": "/", "reservation": "/r/abc.r1", "admin": "/admin"}


class Fields(HTMLParser):
    """Collects form controls (name -> id) and labels (for -> text) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: dict[str, str] = {}
        self.labels: dict[str, str] = {}
        self._label: str | None = None
        self.html_lang: str | None = None
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.html_lang = a.get("lang")
        if tag in ("input", "select", "textarea") and a.get("name"):
            self.controls[a["name"] or ""] = a.get("id") or ""
        if tag == "label" and a.get("for"):
            self._label = a["for"]
            self.labels[self._label or ""] = ""
        for attr in ("src", "href"):
            if a.get(attr):
                self.sources.append(a[attr] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._label = None

    def handle_data(self, data: str) -> None:
        if self._label:
            self.labels[self._label] += data


def parse(html: str) -> Fields:
    fields = Fields()
    fields.feed(html)
    return fields


# -- pages and languages -------------------------------------------------------------------


async def test_citizen_page_is_simplified_chinese_with_a_labelled_field_for_each_name(
    client: Client,
) -> None:
    """Outside checks and screen readers find the form by these names and labels."""
    r = await client.get("/")
    assert r.status == 200
    assert r.content_type == "text/html"
    html = await r.text()
    page = parse(html)
    assert page.html_lang == "zh-Hans"
    for name in ("citizen_id", "phone", "site_id"):
        control_id = page.controls[name]
        assert page.labels[control_id].strip(), f"{name} has no label text"
    assert "身份证号" in html
    assert "提交预约" in html
    assert r.headers["Content-Language"] == "zh-Hans"
    assert "Accept-Language" in r.headers["Vary"]


@pytest.mark.parametrize(
    ("header", "lang"),
    [
        ("", "zh-Hans"),
        ("zh-CN,zh;q=0.9", "zh-Hans"),
        ("zh-TW,zh;q=0.9,en;q=0.8", "zh-Hant"),
        ("zh-HK", "zh-Hant"),
        ("zh-Hant-TW", "zh-Hant"),
        ("en-US,en;q=0.9", "en"),
        ("fr-FR,en;q=0.5,zh;q=0.9", "zh-Hans"),
        ("de-DE, fr;q=0.8", "zh-Hans"),
        ("en;q=0.4, zh-TW;q=0.6", "zh-Hant"),
        ("en, zh;q=0", "en"),
        ("zh-SG;q=abc, en", "en"),
    ],
)
def test_accept_language_picks_the_best_of_our_three_languages(header: str, lang: str) -> None:
    """A phone set to traditional Chinese or English gets it without looking for a switch."""
    assert pages.language_from_header(header) == lang


async def test_accept_language_sets_the_page_language(client: Client) -> None:
    """The header reaches the page: html lang, labels and the inlined dictionary all follow it."""
    r = await client.get("/", headers={"Accept-Language": "zh-TW"})
    html = await r.text()
    assert parse(html).html_lang == "zh-Hant"
    assert "身份證號" in html
    assert "提交預約" in html
    r = await client.get("/", headers={"Accept-Language": "en-GB"})
    html = await r.text()
    assert parse(html).html_lang == "en"
    assert "Citizen ID number" in html


async def test_the_language_switch_is_remembered_in_a_cookie(client: Client) -> None:
    """After one tap on 繁體 every page stays traditional, whatever the phone's language."""
    r = await client.get("/?lang=zh-Hant", headers={"Accept-Language": "en"})
    assert parse(await r.text()).html_lang == "zh-Hant"
    assert r.cookies[pages.LANG_COOKIE].value == "zh-Hant"
    r = await client.get("/admin", headers={"Accept-Language": "en"})
    assert parse(await r.text()).html_lang == "zh-Hant"
    r = await client.get("/?lang=klingon", headers={"Accept-Language": "en"})
    assert parse(await r.text()).html_lang == "zh-Hant"  # unknown values are ignored


def test_every_language_has_every_key_the_pages_and_scripts_use() -> None:
    """A missing translation would show a bare key to a citizen in the middle of the night."""
    table = pages.translations()
    assert set(table) == set(pages.LANGUAGES)
    keys = set(table["zh-Hans"])
    for lang in pages.LANGUAGES:
        assert set(table[lang]) == keys, lang
        assert all(isinstance(v, str) and v.strip() for v in table[lang].values()), lang
        for key, text in table[lang].items():
            # dates: each language picks what it needs of {y, m, mon, d, hh, mm}
            if key in ("fmt_datetime", "fmt_datetime_year"):
                assert set(re.findall(r"\{(\w+)\}", text)) <= {"y", "m", "mon", "d", "hh", "mm"}
                continue
            assert set(re.findall(r"\{(\w+)\}", text)) == set(
                re.findall(r"\{(\w+)\}", table["zh-Hans"][key])
            ), (lang, key)
    used: set[str] = set()
    for script in STATIC.glob("*.js"):
        used |= set(re.findall(r"\bt\('([a-z0-9_]+)'[,)]", script.read_text("utf-8")))
    for template in STATIC.glob("*.html"):
        used |= set(re.findall(r"\{\{\s*([a-z0-9_]+)\s*\}\}", template.read_text("utf-8")))
    assert len(used) > 150  # the patterns above still find the keys
    # keys built at run time: months, statuses, round states and the field messages
    used |= {f"month_{m}" for m in range(1, 13)}
    used |= {f"status_{s}" for s in ("confirmed", "collected", "cancelled", "expired")}
    used |= {f"round_{s}" for s in ("upcoming", "open", "closed")}
    used |= {"cid_err_empty", "cid_err_chars", "cid_err_length", "cid_err_birth"}
    used |= {"cid_err_check", "phone_err_empty", "phone_err_format", "site_err_empty"}
    assert used - keys == set()


@pytest.mark.parametrize("page", pages.PAGES)
@pytest.mark.parametrize("lang", pages.LANGUAGES)
def test_every_page_renders_in_every_language(page: str, lang: str) -> None:
    """Every placeholder is filled, and the inlined dictionary is valid JSON for the scripts."""
    html = pages.render_page(page, lang).decode()
    assert "{{" not in html
    assert "}}" not in html
    assert f'<html lang="{lang}">' in html
    inlined = re.search(r'<script type="application/json" id="i18n">(.*?)</script>', html, re.S)
    assert inlined is not None
    assert json.loads(inlined.group(1).replace("<\\/", "</")) == pages.translations()[lang]
    assert html.count('aria-current="true"') == 1


async def test_pages_load_nothing_from_elsewhere(client: Client) -> None:
    """No CDN, no web font: the page works on a network that reaches only this service."""
    for path in PAGE_PATHS.values():
        r = await client.get(path)
        assert r.status == 200
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp
        assert "script-src 'self'" in csp
        for source in parse(await r.text()).sources:
            assert source.startswith(("/", "?", "#", "data:")), (path, source)
    for file in STATIC.iterdir():
        text = file.read_text("utf-8")
        urls = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s'\"]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (file.name, urls)
        assert "@import" not in text, file.name
        assert "@font-face" not in text, file.name


async def test_reservation_page_is_served_for_any_id_and_leaks_no_referrer(
    client: Client,
) -> None:
    """The /r/ link is the citizen's key: it must not travel in a Referer or into a search index."""
    for rid in ("Zm9vYmFyYmF6cXV4cXV1eHh4.r1", "nonsense"):
        r = await client.get(f"/r/{rid}")
        assert r.status == 200
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["X-Robots-Tag"] == "noindex"
        assert "reservation.js" in await r.text()


async def test_admin_page_asks_for_the_token_and_holds_no_data(client: Client) -> None:
    """The console page itself is public; everything it shows comes through the bearer token."""
    r = await client.get("/admin")
    assert r.status == 200
    page = parse(await r.text())
    assert page.controls["token"] == "token"
    assert page.labels["token"].strip()
    assert "sessionStorage" in (STATIC / "admin.js").read_text("utf-8")
    assert "localStorage" not in (STATIC / "admin.js").read_text("utf-8")


async def test_pages_are_gzipped_for_slow_phones(client: Client) -> None:
    """On 2G every kilobyte is seconds; the page and its scripts travel compressed."""
    r = await client.get("/", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert r.headers["Content-Encoding"] == "gzip"
    html = gzip.decompress(await r.read()).decode()
    assert "citizen.js" in html
    total = len(await r.read())
    for source in parse(html).sources:
        if source.startswith("/static/"):
            s = await client.get(source, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
            assert s.status == 200
            total += len(await s.read())
    assert total < 60_000, f"the citizen page weighs {total} bytes compressed"


# -- static files --------------------------------------------------------------------------


async def test_static_files_are_versioned_cached_and_revalidated(client: Client) -> None:
    """A versioned URL may be cached for a year; an unversioned one is checked with its ETag."""
    url = pages.static_url("citizen.js")
    r = await client.get(url)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/javascript")
    assert "immutable" in r.headers["Cache-Control"]
    etag = r.headers["ETag"]
    r = await client.get("/static/citizen.js")
    assert r.headers["Cache-Control"] == "no-cache"
    r = await client.get("/static/citizen.js", headers={"If-None-Match": etag})
    assert r.status == 304
    r = await client.get("/static/style.css")
    assert r.headers["Content-Type"].startswith("text/css")


@pytest.mark.parametrize(
    "path", ["/static/nothing.js", "/static/..%2fpages.py", "/static/%2e%2e/app.py"]
)
async def test_unknown_static_files_are_404_problems(client: Client, path: str) -> None:
    """Only the packaged files are served; nothing else of the package can be read this way."""
    r = await client.get(path)
    assert r.status == 404
    assert r.content_type == "application/problem+json"


def test_static_folder_is_flat_so_the_package_data_glob_ships_it() -> None:
    """pyproject ships service/static/*; a subfolder would silently be left out of the wheel."""
    assert [p.name for p in STATIC.iterdir() if p.is_dir()] == []
    assert 'service = ["static/*"]' in (ROOT / "pyproject.toml").read_text("utf-8")
    shipped = {e.name for e in resources.files("service").joinpath("static").iterdir()}
    assert {"citizen.html", "admin.html", "reservation.html", "i18n.json"} <= shipped
    assert set(pages.assets()) == {p.name for p in STATIC.iterdir() if p.suffix != ".html"}


@pytest.mark.slow
def test_the_wheel_ships_the_pages(wheel: Path) -> None:
    """A wheel without service/static would serve 500s (well, 503s) instead of the page."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for file in STATIC.iterdir():
        assert f"service/static/{file.name}" in names


# -- QR code -------------------------------------------------------------------------------


async def test_qr_svg_is_the_reservations_pickup_code(client: Client) -> None:
    """The QR the citizen shows must scan as their own code, and be drawn without any script."""
    await seed(client)
    made = await (await reserve(client, 1)).json()
    r = await client.get(f"/api/v1/reservations/{made['reservation_id']}/qr.svg")
    assert r.status == 200
    assert r.content_type == "image/svg+xml"
    body = await r.read()
    root = ET.fromstring(body)  # noqa: S314 -- our own SVG, made by segno a moment ago
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "viewBox" in root.attrib
    assert "width" not in root.attrib
    assert body == pages.qr_svg(made["pickup_code"])
    qr = segno.make_qr(made["pickup_code"], error="m")
    assert qr.mode == "alphanumeric"
    assert qr.version == 1
    assert b"<script" not in body
    assert r.headers["Cache-Control"].startswith("private")


async def test_qr_svg_of_an_unknown_reservation_is_404(client: Client) -> None:
    """A guessed id learns nothing, as with the reservation itself."""
    await seed(client)
    for rid in ("AAAAAAAAAAAAAAAAAAAAAA.r1", "junk"):
        r = await client.get(f"/api/v1/reservations/{rid}/qr.svg")
        assert r.status == 404
        assert (await r.json())["code"] == "not-found"


# -- open data: sites.csv ------------------------------------------------------------------


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_sites_csv_lists_each_site_with_its_stock(
    clocked_client: Client, clock: FakeClock
) -> None:
    """Maps and newsrooms built on Taiwan's feed; this is ours, one row per site."""
    client = clocked_client
    await seed(
        client, stock={"s1": 10, "s2": 4}, districts={"s1": "徐汇区", "s2": "静安区"}, per_person=2
    )
    assert (await reserve(client, 1, site="s2")).status == 201
    clock.advance(1.1)  # past the allocator's stock snapshot
    r = await client.get("/api/v1/rounds/r1/sites.csv")
    assert r.status == 200
    assert r.content_type == "text/csv"
    assert r.charset == "utf-8"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    text = await r.text()
    assert text.splitlines()[0] == ",".join(feeds.FEED_COLUMNS)
    assert "\r\n" in text
    rows = read_csv(text)
    assert [(row["site_id"], row["remaining"], row["district"]) for row in rows] == [
        ("s1", "10", "徐汇区"),
        ("s2", "2", "静安区"),
    ]
    assert rows[0]["name"] == "Site s1"
    assert rows[0]["address"] == "s1 road 1"
    updated = dt.datetime.fromisoformat(rows[0]["updated_at"])
    assert abs((dt.datetime.now(dt.UTC) - updated).total_seconds()) < 5


async def test_sites_csv_is_rendered_at_most_once_a_second(
    clocked_client: Client, clock: FakeClock
) -> None:
    """Under a crowd the feed costs one rendering a second per worker, and 304s cost nothing."""
    client = clocked_client
    await seed(client, stock={"s1": 10})
    first = await client.get("/api/v1/rounds/r1/sites.csv")
    body, etag = await first.read(), first.headers["ETag"]
    assert first.headers["Cache-Control"] == "public, max-age=1"
    assert (await reserve(client, 1)).status == 201
    again = await client.get("/api/v1/rounds/r1/sites.csv")
    assert await again.read() == body  # the cached rendering
    r = await client.get("/api/v1/rounds/r1/sites.csv", headers={"If-None-Match": etag})
    assert r.status == 304
    clock.advance(0.9)  # still within the second: the same rendering
    assert await (await client.get("/api/v1/rounds/r1/sites.csv")).read() == body
    clock.advance(1.3)  # past this cache and the allocator's stock snapshot
    later = await client.get("/api/v1/rounds/r1/sites.csv")
    assert read_csv(await later.text())[0]["remaining"] == "9"
    assert later.headers["ETag"] != etag


async def test_sites_csv_is_gzipped_when_asked(client: Client) -> None:
    """Aggregators poll every few seconds; gzip keeps that cheap for both sides."""
    await seed(client, stock={f"s{i}": 5 for i in range(30)})
    r = await client.get(
        "/api/v1/rounds/r1/sites.csv", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert r.headers["Content-Encoding"] == "gzip"
    assert len(read_csv(gzip.decompress(await r.read()).decode())) == 30


async def test_sites_csv_quotes_text_and_defuses_spreadsheet_formulas(
    clocked_client: Client, clock: FakeClock
) -> None:
    """Operator-typed names reach spreadsheets; a comma must not split a cell, '=' must not run."""
    client = clocked_client
    sites = [
        {"site_id": "s1", "name": 'Pharmacy, "North"', "address": "=HYPERLINK(1)", "district": "d"}
    ]
    await seed(client, stock={"s1": 3})
    r = await client.put("/api/v1/admin/sites", json={"sites": sites}, headers=ADMIN)
    assert r.status == 200
    clock.advance(1.1)  # past the allocator's site snapshot
    [row] = read_csv(await (await client.get("/api/v1/rounds/r1/sites.csv")).text())
    assert row["name"] == 'Pharmacy, "North"'
    assert row["address"] == "'=HYPERLINK(1)"


async def test_sites_csv_of_an_unknown_round_is_a_404_problem(client: Client) -> None:
    """The feed speaks the same error language as the rest of the API."""
    for round_id in ("nope", "NOT_AN_ID"):
        r = await client.get(f"/api/v1/rounds/{round_id}/sites.csv")
        assert r.status == 404
        assert r.content_type == "application/problem+json"


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_page_checks_ids_and_phones_in_the_servers_canonical_form() -> None:
    """The citizen page refuses before sending what the server would refuse, and nothing else:
    fullwidth and math-bold digits pass, Arabic-Indic and Devanagari digits do not."""
    from allocator.identity import InvalidIdentity, normalise_citizen_id, validate_phone
    from tests.helpers import citizen_id, phone

    def forms(value: str) -> list[str]:
        return [
            value,
            value.translate(str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")),
            "".join(chr(0x1D7CE + int(c)) if c.isdigit() else c for c in value),
            value.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")),
            value.translate(str.maketrans("0123456789", "०१२३४५६७८९")),
        ]

    def server(check: Any, value: str) -> Any:
        try:
            return check(value)
        except InvalidIdentity:
            return None

    ids = forms(next(c for c in map(citizen_id, range(100, 1000)) if c.endswith("X")))
    phones = forms(phone(1))
    script = (
        "global.document = {getElementById: () => null, documentElement: {lang: 'en'}};"
        "global.window = global; global.navigator = {};\n"
        + (STATIC / "common.js").read_text()
        + ";\nprocess.stdout.write(JSON.stringify(["
        + f"{json.dumps(ids)}.map(v => [Allot.citizenIdProblem(v), Allot.normaliseCitizenId(v)]),"
        + f"{json.dumps(phones)}.map(v => [Allot.phoneProblem(v), Allot.normalisePhone(v)])]))"
    )
    assert NODE is not None
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, check=True)
    page_ids, page_phones = json.loads(out.stdout)
    for value, (problem, sent) in zip(ids, page_ids, strict=True):
        expected = server(normalise_citizen_id, value)
        assert (problem is None) == (expected is not None), (value, problem)
        if expected is not None:
            assert sent == expected
    for value, (problem, sent) in zip(phones, page_phones, strict=True):
        expected = server(validate_phone, value)
        assert (problem is None) == (expected is not None), (value, problem)
        if expected is not None:
            assert sent == expected
    assert [p is None for p, _ in page_ids] == [True, True, True, False, False]
