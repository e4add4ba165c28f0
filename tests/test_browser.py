"""The citizen page and the operator console, driven in headless Chromium by Playwright.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, installed by ``.ci/run``); Playwright
for Python drives it through its bundled driver, and nothing is downloaded. The app runs on a
real socket in the test's own event loop, against real Redis and PostgreSQL.

Screenshots (phone 390x844, desktop 1280x800) go to a temporary folder, or to the folder named
by ``ALLOT_SCREENSHOT_DIR`` (``ALLOT_SCREENSHOT_DIR=docs/screenshots`` refreshes the README's).
"""

from __future__ import annotations

import asyncio
import os
import re
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import (
    Browser,
    BrowserContext,
    Page,
    Route,
    ViewportSize,
    async_playwright,
    expect,
)
from redis.asyncio import Redis

from allocator.config import Settings
from allocator.keys import Keys
from allocator.rebuild import rebuild_round
from allocator.redistyping import awaited
from tests.helpers import (
    ADMIN,
    ADMIN_TOKEN,
    FakeClock,
    citizen_id,
    identity,
    phone,
    reserve,
    round_body,
    seed,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE: ViewportSize = {"width": 390, "height": 844}
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
WAIT_MS = 15_000

expect.set_options(timeout=WAIT_MS)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed at /usr/bin/chromium (.ci/run installs it)",
)

Client = TestClient[Any, Any]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("ALLOT_SCREENSHOT_DIR")
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def open_page(
    browser: Browser,
    client: Client,
    path: str = "/",
    *,
    size: ViewportSize = PHONE,
    locale: str = "zh-CN",
) -> tuple[BrowserContext, Page]:
    """A fresh browser context (its own storage) showing ``path``."""
    phone_like = size["width"] < 600
    context = await browser.new_context(
        viewport=size,
        locale=locale,
        is_mobile=phone_like,
        has_touch=phone_like,
        device_scale_factor=1,
    )
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    errors: list[str] = []
    SCRIPT_ERRORS[page] = errors
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(str(client.make_url(path)))
    return context, page


# Uncaught exceptions in each page's scripts; every test asserts there were none.
SCRIPT_ERRORS: weakref.WeakKeyDictionary[Page, list[str]] = weakref.WeakKeyDictionary()


def page_errors(page: Page) -> list[str]:
    return SCRIPT_ERRORS.get(page, [])


# WCAG 2.1 contrast of every visible text node against its nearest opaque background.
CONTRAST_JS = """
() => {
  const parse = (c) => {
    const m = /rgba?\\(([^)]+)\\)/.exec(c);
    if (!m) return null;
    const p = m[1].split(',').map(parseFloat);
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const lum = (c) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4));
    return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0.5) return c;
    }
    return { r: 255, g: 255, b: 255, a: 1 };
  };
  const bad = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    const el = node.parentElement;
    if (!el || !node.textContent.trim() || el.closest('svg, [hidden], noscript, option')) continue;
    const cs = getComputedStyle(el);
    if (!el.getClientRects().length || cs.visibility === 'hidden') continue;
    const fg = parse(cs.color);
    const bg = background(el);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(cs.fontSize);
    const large = size >= 24 || (parseInt(cs.fontWeight, 10) >= 700 && size >= 18.66);
    if (ratio < (large ? 3 : 4.5)) {
      bad.push(`${node.textContent.trim().slice(0, 30)}: ${ratio.toFixed(2)}`);
    }
  }
  return bad;
}
"""


async def assert_contrast(page: Page) -> None:
    """Every text on screen meets WCAG AA contrast (4.5:1, or 3:1 for large text)."""
    low: list[str] = await page.evaluate(CONTRAST_JS)
    assert low == [], f"text below WCAG AA contrast: {low}"


async def fill_form(page: Page, n: int, site: str) -> None:
    await expect(page.locator("form#reserve")).to_be_visible()
    await page.locator("select[name=site_id]").select_option(site)
    await page.locator("input[name=citizen_id]").fill(citizen_id(n))
    await page.locator("input[name=phone]").fill(phone(n))


async def reservation_by_code(client: Client, page: Page) -> dict[str, Any]:
    """The reservation behind the result card, read back through the public API."""
    link = await page.get_by_test_id("reservation-link").get_attribute("href")
    assert link is not None
    assert link.startswith("/r/")
    r = await client.get(f"/api/v1/reservations/{link.removeprefix('/r/')}")
    assert r.status == 200
    body: dict[str, Any] = await r.json()
    return body


# -- citizen page ---------------------------------------------------------------------------


async def test_citizen_reserves_on_a_phone_and_sees_the_pickup_code_and_qr(
    client: Client, browser: Browser, shots: Path
) -> None:
    """The whole point of the page: a phone, three fields, one tap, a code to show at the desk."""
    await seed(
        client,
        stock={"s1": 40, "s2": 3},
        districts={"s1": "徐汇区", "s2": "静安区"},
        per_person=2,
    )
    context, page = await open_page(browser, client)
    await expect(page.locator("html")).to_have_attribute("lang", "zh-Hans")
    for name in ("citizen_id", "phone", "site_id"):
        field = page.locator(f"[name={name}]")
        label = await page.locator(f"label[for={await field.get_attribute('id')}]").inner_text()
        assert label.strip(), f"{name} has no visible label"
    await expect(page.get_by_test_id("countdown")).to_have_text("还剩 43 件")
    await expect(page.locator("#site-groups")).to_contain_text("静安区")
    await fill_form(page, 1, "s1")
    await expect(page.locator("#site_id-hint")).to_contain_text("s1 road 1")
    await page.screenshot(path=shots / "citizen-phone.png")
    await assert_contrast(page)
    await page.get_by_role("button", name="提交预约").click()

    code = page.get_by_test_id("pickup-code")
    await expect(code).to_have_text(re.compile(r"^[2-9A-HJ-NP-Z]{8}$"))
    body = await reservation_by_code(client, page)
    await expect(code).to_have_text(body["pickup_code"])
    assert body["site_id"] == "s1"
    assert body["quantity"] == 2
    # the page reserves as the web channel
    r = await client.get("/api/v1/admin/rounds/r1/fairness", headers=ADMIN)
    channels = {
        g["group"]: g["asked"] for g in (await r.json())["groups"] if g["dimension"] == "channel"
    }
    assert channels == {"web": 1}
    result = page.locator("#result")
    await expect(result).to_contain_text("Site s1")
    await expect(result).to_contain_text("s1 road 1")
    await expect(result).to_contain_text(" 至 ")  # the pickup window
    qr = page.locator("img.qr")
    await expect(qr).to_have_attribute("src", re.compile(r"/qr\.svg$"))
    assert await qr.evaluate("img => img.complete && img.naturalWidth > 0")
    await page.screenshot(path=shots / "citizen-result-phone.png", full_page=True)
    await assert_contrast(page)

    # the reservation's own page finds it again
    await page.get_by_test_id("reservation-link").click()
    await expect(page.get_by_test_id("pickup-code")).to_have_text(body["pickup_code"])
    await expect(page.get_by_test_id("reservation-status")).to_have_text("待领取")
    assert page_errors(page) == []
    await context.close()


async def test_citizen_page_on_a_desktop_lists_sites_by_district(
    clocked_client: Client, clock: FakeClock, browser: Browser, shots: Path
) -> None:
    """Staff helping at a counter use a desktop: the same page, sites beside the form."""
    client = clocked_client
    await seed(
        client,
        stock={"a1": 120, "a2": 0, "b1": 7},
        districts={"a1": "徐汇区", "a2": "徐汇区", "b1": "浦东新区"},
    )
    # a2 had stock and lost it: it is listed, sold out, and cannot be chosen
    r = await client.post(
        "/api/v1/admin/rounds/r1/batches",
        json={"batch_id": "a2", "items": [{"site_id": "a2", "quantity": 1}]},
        headers=ADMIN,
    )
    assert r.status == 201
    assert (await reserve(client, 9, site="a2")).status == 201
    clock.advance(1.1)  # past the stock snapshot (at most 1 s old) the site list is built from
    context, page = await open_page(browser, client, size=DESKTOP)
    groups = page.locator("#site-groups h3")
    await expect(groups).to_have_text(["徐汇区", "浦东新区"])  # as the API orders them
    await expect(page.locator("#site-groups")).to_contain_text("已约满")
    assert await page.locator("option[value=a2]").is_disabled()
    await page.locator("input[name=citizen_id]").fill(citizen_id(2))
    await page.screenshot(path=shots / "citizen-desktop.png")
    await assert_contrast(page)
    assert page_errors(page) == []
    await context.close()


async def test_wrong_check_digit_is_caught_in_the_browser_before_any_request(
    client: Client, browser: Browser
) -> None:
    """A typo in an ID is the commonest mistake; it must be explained on the spot, not by a 422."""
    await seed(client)
    context, page = await open_page(browser, client)
    posts: list[str] = []
    page.on("request", lambda req: posts.append(req.url) if req.method == "POST" else None)
    good = citizen_id(3)
    wrong = good[:17] + ("0" if good[17] != "0" else "1")
    await fill_form(page, 3, "s1")
    await page.locator("input[name=citizen_id]").fill(wrong)
    await page.get_by_role("button", name="提交预约").click()
    error = page.locator("#citizen_id-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("输错")
    await expect(page.locator("input[name=citizen_id]")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("input[name=citizen_id]")).to_be_focused()
    # a date of birth that does not exist is named as such
    await page.locator("input[name=citizen_id]").fill("110101" + "19800231" + "0011")
    await page.locator("input[name=phone]").focus()
    await expect(error).to_contain_text("出生日期")
    await assert_contrast(page)
    # fixing it clears the message as the citizen types (lower-case x accepted)
    await page.locator("input[name=citizen_id]").fill(good.lower())
    await expect(error).to_be_hidden()
    assert posts == []
    assert page_errors(page) == []
    await context.close()


async def test_sold_out_offers_alternatives_and_one_tap_reserves_there(
    client: Client, browser: Browser, shots: Path
) -> None:
    """When the chosen site runs out mid-form, the citizen is one tap from a share elsewhere."""
    await seed(
        client,
        stock={"s1": 1, "s2": 5, "s3": 5},
        districts={"s1": "d1", "s2": "d1", "s3": "d2"},
    )
    context, page = await open_page(browser, client)
    await fill_form(page, 1, "s1")
    # someone else takes the last unit while this citizen is typing
    assert (await reserve(client, 2, site="s1")).status == 201
    await page.get_by_role("button", name="提交预约").click()
    outcome = page.locator("#outcome")
    await expect(outcome).to_contain_text("刚刚约满")
    choices = page.get_by_test_id("alternative")
    await expect(choices).to_have_count(2)
    assert await choices.nth(0).get_attribute("data-site-id") == "s2"  # same district first
    await page.screenshot(path=shots / "citizen-sold-out-phone.png")
    await assert_contrast(page)
    await choices.nth(0).click()
    await expect(page.get_by_test_id("pickup-code")).to_be_visible()
    body = await reservation_by_code(client, page)
    assert body["site_id"] == "s2"
    await expect(page.get_by_test_id("pickup-code")).to_have_text(body["pickup_code"])
    assert page_errors(page) == []
    await context.close()


@pytest.mark.parametrize(
    ("status", "code"), [(429, "rate-limited"), (429, "overloaded"), (503, "unavailable")]
)
async def test_page_waits_calmly_while_refused_then_succeeds_by_itself(
    client: Client, browser: Browser, shots: Path, status: int, code: str
) -> None:
    """Under a flash crowd the gate says "later": the page waits and retries, never shows it raw."""
    await seed(client)
    context, page = await open_page(browser, client)
    refused: list[float] = []

    async def gate(route: Route) -> None:
        if route.request.method == "POST" and len(refused) < 2:
            refused.append(asyncio.get_running_loop().time())
            await route.fulfill(
                status=status,
                headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
                body=(
                    f'{{"type":"urn:allot:problem:{code}","title":"Too many requests",'
                    f'"status":{status},"detail":"later","code":"{code}"}}'
                ),
            )
        else:
            await route.continue_()

    await page.route("**/api/v1/rounds/*/reservations", gate)
    await fill_form(page, 4, "s1")
    started = asyncio.get_running_loop().time()
    await page.get_by_role("button", name="提交预约").click()
    busy = page.get_by_test_id("busy")
    await expect(busy).to_be_visible()
    await expect(busy).to_contain_text(re.compile(r"当前排队人数较多，\d 秒后自动重试"))
    if code == "rate-limited":
        await page.screenshot(path=shots / "citizen-busy-phone.png")
        await assert_contrast(page)
    await expect(page.get_by_test_id("pickup-code")).to_be_visible()
    elapsed = asyncio.get_running_loop().time() - started
    assert len(refused) == 2
    assert refused[1] - refused[0] >= 1.0  # Retry-After was honoured
    assert elapsed >= 2.0
    text = await page.locator("body").inner_text()
    assert code not in text
    assert not re.search(rf"\b{status}\b", text)
    assert "Too many" not in text
    await expect(busy).to_be_hidden()
    assert page_errors(page) == []
    await context.close()


async def test_upcoming_round_counts_down_and_opens_the_form_on_time(
    client: Client, browser: Browser
) -> None:
    """At midnight people wait for the opening second; the page must count down and then work."""
    await seed(client, opens_in=4, pickup_in=0)
    context, page = await open_page(browser, client)
    countdown = page.get_by_test_id("countdown")
    await expect(countdown).to_contain_text(re.compile(r"距开始还有 \d 秒"))
    submit = page.locator("#submit")
    await expect(submit).to_be_disabled()
    await fill_form(page, 5, "s1")
    await expect(submit).to_be_enabled(timeout=10_000)
    await expect(page.locator(".badge")).to_have_text("正在预约")
    await submit.click()
    await expect(page.get_by_test_id("pickup-code")).to_be_visible()
    assert page_errors(page) == []
    await context.close()


async def test_keyboard_alone_can_reserve(client: Client, browser: Browser) -> None:
    """Assistive tech and many elderly users drive the page from the keyboard only."""
    await seed(client, stock={"s1": 5, "s2": 5})
    context, page = await open_page(browser, client, size=DESKTOP)
    await expect(page.locator("form#reserve")).to_be_visible()
    await page.locator("select[name=site_id] option[value=s2]").wait_for(state="attached")
    await page.locator("select[name=site_id]").focus()
    await page.keyboard.press("ArrowDown")
    await page.keyboard.press("ArrowDown")
    await page.keyboard.press("Tab")
    await expect(page.locator("input[name=citizen_id]")).to_be_focused()
    await page.keyboard.type(citizen_id(6))
    await page.keyboard.press("Tab")
    await expect(page.locator("input[name=phone]")).to_be_focused()
    await page.keyboard.type(phone(6))
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("pickup-code")).to_be_visible()
    body = await reservation_by_code(client, page)
    assert body["site_id"] == "s2"
    await expect(page.locator("#result-title")).to_be_focused()
    await context.close()


async def test_language_follows_accept_language_and_the_switch_keeps_what_was_typed(
    client: Client, browser: Browser
) -> None:
    """Traditional Chinese and English readers get their language; switching loses no typing."""
    await seed(client)
    context, page = await open_page(browser, client, locale="en-US")
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await expect(page.get_by_role("button", name="Reserve")).to_be_visible()
    await page.locator("input[name=citizen_id]").fill(citizen_id(7))
    await page.get_by_role("link", name="繁體").click()
    await expect(page.locator("html")).to_have_attribute("lang", "zh-Hant")
    await expect(page.get_by_role("button", name="提交預約")).to_be_visible()
    await expect(page.locator("input[name=citizen_id]")).to_have_value(citizen_id(7))
    await context.close()

    context, page = await open_page(browser, client, locale="zh-TW")
    await expect(page.locator("html")).to_have_attribute("lang", "zh-Hant")
    await context.close()


async def test_citizen_page_says_who_may_take_part_and_explains_each_refusal(
    client: Client, browser: Browser, shots: Path
) -> None:
    """The rules are on the round's card before anyone types an ID; a refusal says which rule,
    or when the citizen may come back (the cooldown's until, on the page's clock)."""
    rules = {"regions": ["11"], "min_age": 18}
    await seed(client, "a", stock={"s1": 5}, programme="masks", cooldown_days=7, eligibility=rules)
    await seed(client, "b", stock={"s1": 5}, programme="masks", cooldown_days=7)
    assert (await reserve(client, 1, round_id="b")).status == 201  # citizen 1 is in cooldown
    barred = await reserve(client, 1, round_id="a")
    until = (await barred.json())["until"]

    context, page = await open_page(browser, client, locale="en-US")
    card = page.locator("article.round").nth(0)
    await expect(card.get_by_test_id("eligibility")).to_have_text(
        "Who may take part: ID number starting with 11; aged 18 or over"
    )
    await expect(card.get_by_test_id("cooldown")).to_contain_text("for 7 days")
    await expect(page.locator("article.round").nth(1).get_by_test_id("eligibility")).to_have_count(
        0
    )

    await page.locator("select[name=site_id]").select_option("s1")
    await page.locator("input[name=citizen_id]").fill(identity(5, region="440106"))
    await page.locator("input[name=phone]").fill(phone(5))
    await page.get_by_role("button", name="Reserve").click()
    outcome = page.locator("#outcome")
    await expect(outcome).to_contain_text("This round is not open to you")
    await expect(outcome).to_contain_text("only for ID numbers starting with 11")
    await assert_contrast(page)

    await page.locator("input[name=citizen_id]").fill(citizen_id(1))
    await page.locator("input[name=phone]").fill(phone(1))
    await page.get_by_role("button", name="Reserve").click()
    shown = await page.evaluate("iso => window.Allot.fmtTime(iso)", until)
    assert re.search(r"\d", shown), shown  # a date and time, not the raw ISO text
    await expect(outcome).to_contain_text("You reserved recently in this programme")
    await expect(outcome).to_contain_text(f"You can reserve again from {shown}.")
    await page.screenshot(path=shots / "citizen-cooldown-phone.png")
    await assert_contrast(page)
    assert page_errors(page) == []
    await context.close()


async def test_reservation_page_shows_the_code_and_cancels(
    client: Client, browser: Browser
) -> None:
    """The /r/ link is the citizen's only key: it must show the code again and allow a cancel."""
    await seed(client, stock={"s1": 5})
    made = await (await reserve(client, 8)).json()
    context, page = await open_page(browser, client, f"/r/{made['reservation_id']}")
    await expect(page.get_by_test_id("pickup-code")).to_have_text(made["pickup_code"])
    await page.get_by_role("button", name="取消这个预约").click()
    await page.get_by_role("button", name="确定取消").click()
    await expect(page.get_by_test_id("reservation-status")).to_have_text("已取消")
    got = await (await client.get(f"/api/v1/reservations/{made['reservation_id']}")).json()
    assert got["status"] == "cancelled"
    await context.close()

    context, page = await open_page(browser, client, "/r/nothing-here.r1")
    await expect(page.locator("#outcome")).to_contain_text("找不到这个预约")
    await context.close()


# -- operator console -----------------------------------------------------------------------


async def login(page: Page) -> None:
    await page.locator("input[name=token]").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="进入运营台").click()
    await expect(page.locator("#console")).to_be_visible()


async def test_console_loads_a_csv_batch_and_the_stats_move(
    client: Client, browser: Browser, shots: Path
) -> None:
    """Operators load stock from a spreadsheet and watch it go out, without a terminal."""
    await seed(client, stock={"s1": 10, "s2": 10})
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await expect(page.locator("#login")).to_be_visible()
    await page.locator("input[name=token]").fill("wrong-token")
    await page.get_by_role("button", name="进入运营台").click()
    await expect(page.locator("#token-error")).to_contain_text("令牌")
    await login(page)
    loaded = page.get_by_test_id("stat-loaded")
    await expect(loaded).to_have_text("20")

    await page.locator("#batch-round").select_option("r1")
    await page.locator("#batch-id").fill("delivery-1")
    await page.locator("#batch-csv").fill("site_id,quantity\ns1,25\ns2,5\n")
    await page.get_by_role("button", name="入库", exact=True).click()
    result = page.get_by_test_id("batch-result")
    await expect(result).to_contain_text("已入库")
    await expect(result).to_contain_text("共 30 件，2 个站点")
    await expect(page.get_by_test_id("batch-id")).to_have_text("delivery-1")
    await expect(loaded).to_have_text("50", timeout=3000)

    # the same batch again is answered as already loaded, and stock does not move
    await page.get_by_role("button", name="入库", exact=True).click()
    await expect(result).to_contain_text("没有重复增加库存")
    await expect(loaded).to_have_text("50")

    # reservations show up within the two seconds the operator may wait
    for n in range(1, 4):
        assert (await reserve(client, n, site="s1")).status == 201
    await expect(page.get_by_test_id("stat-reserved")).to_have_text("3", timeout=2500)
    await expect(page.get_by_test_id("stat-remaining")).to_have_text("47")
    await expect(page.locator("#chart-units polyline")).to_have_count(3)
    await page.wait_for_timeout(1500)
    await page.screenshot(path=shots / "admin-desktop.png", full_page=True)
    await assert_contrast(page)
    await page.set_viewport_size(PHONE)
    await page.evaluate("window.scrollTo(0, 0)")
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await page.screenshot(path=shots / "admin-phone.png")
    assert page_errors(page) == []
    await context.close()

    # the token lives in the tab's session only: a new session asks again
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await expect(page.locator("#login")).to_be_visible()
    await context.close()


async def test_console_carries_over_the_leftovers_of_an_earlier_round(
    client: Client, browser: Browser
) -> None:
    """After a round's pickup window, its uncollected units go to the next round from the
    console; before it, the console says plainly that it is too early."""
    await seed(client, stock={"s1": 10}, per_person=2)
    assert (await reserve(client, 1, site="s1")).status == 201
    past = round_body(opens_in=-7200, closes_in=-120, pickup_in=-7200, pickup_for=7140)
    past["per_person"] = 2
    r = await client.put("/api/v1/admin/rounds/r1", json=past, headers=ADMIN)
    assert r.status == 200
    await seed(client, "r2", stock={"s1": 0}, title="Next")
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await login(page)
    await page.locator("#batch-round").select_option("r1")
    await page.locator("input[name=batch_mode][value=carry]").check()
    await expect(page.locator("#batch-carry-from")).to_be_visible()
    await page.locator("#batch-carry-from").select_option("r2")
    await page.locator("#batch-id").fill("too-early")
    await page.get_by_role("button", name="入库", exact=True).click()
    result = page.get_by_test_id("batch-result")
    await expect(result).to_contain_text("还在领取时间内")

    await page.locator("#batch-round").select_option("r2")
    await page.locator("#batch-carry-from").select_option("r1")
    await page.locator("#batch-id").fill("leftovers")
    await page.get_by_role("button", name="入库", exact=True).click()
    await expect(result).to_contain_text("已入库")
    await expect(result).to_contain_text("共 10 件，1 个站点")  # 8 remaining + 2 expired
    await expect(result).to_contain_text("转自轮次 r1")
    await page.locator("#stats-round").select_option("r1")
    await expect(page.get_by_test_id("stat-carried-out")).to_have_text("10", timeout=3000)
    await expect(page.get_by_test_id("stat-expired")).to_have_text("0")
    await expect(page.get_by_test_id("stat-remaining")).to_have_text("0")
    assert page_errors(page) == []
    await context.close()


async def test_pickup_desk_collects_a_code_once(client: Client, browser: Browser) -> None:
    """The counter must hand out once and say plainly why not otherwise."""
    await seed(client, stock={"s1": 10, "s2": 10})
    first = await (await reserve(client, 1, site="s1")).json()
    gone = await (await reserve(client, 2, site="s1")).json()
    r = await client.delete(f"/api/v1/reservations/{gone['reservation_id']}")
    assert r.status == 200
    context, page = await open_page(browser, client, "/admin")
    await login(page)
    desk = page.locator("#desk")
    await desk.scroll_into_view_if_needed()
    await page.locator("#desk-site").fill("s1")
    verdict = page.get_by_test_id("desk-verdict")

    async def scan(code: str, cid: str = "") -> None:
        await page.locator("input[name=pickup_code]").fill(code)
        await page.locator("#desk-cid").fill(cid)
        await page.locator("input[name=pickup_code]").press("Enter")

    await scan(first["pickup_code"], citizen_id(99))
    await expect(verdict).to_contain_text("身份证号与预约人不符")
    await scan(first["pickup_code"].lower(), citizen_id(1))
    await expect(verdict).to_contain_text("可以发放：1 件")
    await expect(page.get_by_test_id("desk-result")).to_contain_text(first["citizen_id_masked"])
    await expect(page.locator("input[name=pickup_code]")).to_be_focused()
    await scan(first["pickup_code"])
    await expect(verdict).to_contain_text("已经领取过了")
    await assert_contrast(page)
    await scan(gone["pickup_code"])
    await expect(verdict).to_contain_text("已经取消")
    await page.locator("#desk-site").fill("s2")
    await scan(first["pickup_code"])
    await expect(verdict).to_contain_text("本站点没有这个取件码")
    await expect(page.locator("#desk-log li")).to_have_count(5)
    got = await (await client.get(f"/api/v1/reservations/{first['reservation_id']}")).json()
    assert got["status"] == "collected"
    await expect(page.get_by_test_id("stat-collected")).to_have_text("1", timeout=3000)
    assert page_errors(page) == []
    await context.close()


async def test_console_uploads_sites_and_creates_a_round(client: Client, browser: Browser) -> None:
    """The morning's setup (sites from a spreadsheet, a new round) is done from the console."""
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await login(page)
    await page.locator("#sites-csv").fill(
        "site_id,name,address,district\n"
        'p1,"Pharmacy, North","1 ""Main"" St",North\n'
        "p2,漕溪药房,徐汇区漕溪北路 88 号,徐汇区\n"
    )
    await page.get_by_role("button", name="上传站点").click()
    await expect(page.locator("#sites-result")).to_contain_text("已更新 2 个站点")

    await page.locator("#rf-id").fill("morning")
    await page.locator("#rf-title").fill("早场")
    await page.get_by_role("button", name="保存轮次").click()
    await expect(page.locator("#round-result")).to_contain_text("已新建轮次 morning")
    await expect(page.locator("#round-table")).to_contain_text("早场")
    r = await client.get("/api/v1/rounds/morning")
    assert r.status == 200
    assert (await r.json())["per_person"] == 5

    # editing keeps the id and answers "updated"
    await page.get_by_role("button", name="编辑轮次 morning").click()
    await page.locator("#rf-per").fill("3")
    await page.get_by_role("button", name="保存轮次").click()
    await expect(page.locator("#round-result")).to_contain_text("已更新轮次 morning")
    assert (await (await client.get("/api/v1/rounds/morning")).json())["per_person"] == 3

    # the small form loads a batch too, and says what went wrong row by row
    await page.locator("#batch-round").select_option("morning")
    await page.locator("input[name=batch_mode][value=form]").check()
    await page.locator("#batch-rows .row-site").first.fill("p1")
    await page.locator("#batch-rows .row-qty").first.fill("12")
    await page.get_by_role("button", name="入库", exact=True).click()
    await expect(page.get_by_test_id("batch-result")).to_contain_text("共 12 件，1 个站点")
    await page.get_by_role("button", name="生成新批次号").click()
    await page.locator("#batch-rows .row-site").first.fill("nowhere")
    await page.get_by_role("button", name="入库", exact=True).click()
    await expect(page.get_by_test_id("batch-result")).to_contain_text("整批都没有入库")
    await expect(page.get_by_test_id("batch-result")).to_contain_text("nowhere")
    assert page_errors(page) == []
    await context.close()


async def test_console_says_plainly_when_redis_lost_data_of_the_round(
    client: Client, browser: Browser, redis: Redis, keys: Keys, settings: Settings
) -> None:
    """On-call sees a lost round in the console, with the command that heals it, and the
    notice goes once the round is rebuilt."""
    await seed(client, stock={"s1": 10})
    assert (await reserve(client, 1)).status == 201
    rk = keys.round("r1")
    async with asyncio.timeout(10):
        while await redis.xlen(rk.ledger):  # the ledger has the claim
            await asyncio.sleep(0.05)
    # ignore: redis-py's stub types hset's value as str, though it sends an int as its digits
    await awaited(redis.hset(rk.tally, "seq", 1))  # type: ignore[arg-type]  # as if Redis came back from before the claim

    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await login(page)
    notice = page.get_by_test_id("stat-lost")
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text("allot rebuild --round r1")
    await expect(notice).to_contain_text("Redis")
    await assert_contrast(page)

    con = await asyncpg.connect(settings.database_url)
    try:
        await rebuild_round(redis, con, keys, "r1")
    finally:
        await con.close()
    await expect(notice).to_be_hidden(timeout=3000)
    assert page_errors(page) == []
    await context.close()


# -- desk mode and desk tokens ---------------------------------------------------------------


async def new_desk_token(client: Client, site: str, label: str = "Counter 1") -> dict[str, Any]:
    r = await client.post(
        "/api/v1/admin/desk-tokens", json={"site_id": site, "label": label}, headers=ADMIN
    )
    assert r.status == 201, await r.text()
    body: dict[str, Any] = await r.json()
    return body


async def test_desk_mode_reserves_for_a_walk_in_and_collects_with_the_keyboard_alone(
    client: Client, browser: Browser, shots: Path
) -> None:
    """A pharmacy counter without the admin token: its own site only, large, scanner-friendly."""
    await seed(client, stock={"s1": 10, "s2": 10}, districts={"s1": "徐汇区", "s2": "静安区"})
    desk = await new_desk_token(client, "s1", "Counter 2")
    elsewhere = await (await reserve(client, 50, site="s2")).json()
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await page.locator("input[name=token]").fill(desk["token"])
    await page.locator("input[name=token]").press("Enter")
    await expect(page.get_by_test_id("desk-banner")).to_be_visible()
    await expect(page.get_by_test_id("dm-site")).to_have_text("Site s1")
    for hidden in ("#stats", "#batches", "#rounds", "#sites", "#desk-tokens", "#desk-site-field"):
        await expect(page.locator(hidden)).to_be_hidden()
    await expect(page.locator("#console .tabs")).to_be_hidden()
    cid = page.locator("#assist-cid")
    await expect(cid).to_be_focused()

    # an ID-card reader types the number and presses Enter; the phone is typed; Enter sends
    await page.keyboard.type(citizen_id(1))
    await page.keyboard.press("Enter")
    await expect(page.locator("#assist-phone")).to_be_focused()
    await page.keyboard.type(phone(1))
    await page.keyboard.press("Enter")
    verdict = page.get_by_test_id("assist-verdict")
    await expect(verdict).to_contain_text("已预约")
    code = (await page.get_by_test_id("assist-code").inner_text()).strip()
    await expect(page.locator("#assist-result img.assist-qr")).to_be_visible()
    await expect(cid).to_be_focused()
    await expect(cid).to_have_value("")
    r = await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)
    assert (await r.json())["sites"][0]["reserved"] == 1
    await page.screenshot(path=shots / "desk-desktop.png", full_page=True)
    await assert_contrast(page)

    # a scanner at the counter reads the code into the pickup field and presses Enter
    await page.locator("#desk-code").focus()
    await page.keyboard.type(code.lower())
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("desk-verdict")).to_contain_text("可以发放：1 件")
    # a code reserved at another site is not this counter's to hand over
    await page.keyboard.type(elsewhere["pickup_code"])
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("desk-verdict")).to_contain_text("本站点没有这个取件码")

    # the next walk-in, reserved and handed over in one go
    await cid.focus()
    await page.keyboard.type(citizen_id(2))
    await page.keyboard.press("Tab")
    await page.keyboard.type(phone(2))
    await page.keyboard.press("Enter")
    await expect(verdict).to_contain_text("已预约")
    await expect(page.get_by_test_id("assist-code")).not_to_have_text(code)  # the new one's
    await page.get_by_test_id("assist-hand-over").press("Enter")
    await expect(page.get_by_test_id("desk-verdict")).to_contain_text("可以发放：1 件")
    await expect(cid).to_be_focused()
    r = await client.get("/api/v1/admin/rounds/r1/stats", headers=ADMIN)
    figures = await r.json()
    assert figures["collected"] == 2  # both walk-ins, at s1
    assert [(s["site_id"], s["remaining"]) for s in figures["sites"]] == [("s1", 8), ("s2", 9)]
    got = await (await client.get(f"/api/v1/reservations/{elsewhere['reservation_id']}")).json()
    assert got["status"] == "confirmed"
    await page.set_viewport_size(PHONE)
    await page.evaluate("window.scrollTo(0, 0)")
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await page.screenshot(path=shots / "desk-phone.png")

    # the token is revoked: the very next action signs the counter out
    r = await client.delete(f"/api/v1/admin/desk-tokens/{desk['token_id']}", headers=ADMIN)
    assert r.status == 200
    await cid.focus()
    await page.keyboard.type(citizen_id(3))
    await page.keyboard.press("Tab")
    await page.keyboard.type(phone(3))
    await page.keyboard.press("Enter")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#token-error")).to_contain_text("令牌")
    assert page_errors(page) == []
    await context.close()


async def test_desk_mode_registers_a_walk_in_for_a_lottery_round(
    client: Client, browser: Browser
) -> None:
    """When the chosen round is a lottery, the assisted form registers instead of reserving."""
    await seed(client, stock={"s1": 10})
    r = await client.put(
        "/api/v1/admin/rounds/l1",
        json={**round_body(title="Lottery"), "mode": "lottery", "public_randomness_source": "x"},
        headers=ADMIN,
    )
    assert r.status == 201, await r.text()
    desk = await new_desk_token(client, "s1")
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await page.locator("input[name=token]").fill(desk["token"])
    await page.locator("input[name=token]").press("Enter")
    await expect(page.get_by_test_id("desk-banner")).to_be_visible()
    submit = page.locator("#assist-submit")
    await page.locator("#assist-round").select_option("l1")
    await expect(submit).to_have_text("为居民登记抽签")
    await page.locator("#assist-cid").fill(citizen_id(1))
    await page.locator("#assist-phone").fill(phone(1))
    await page.locator("#assist-phone").press("Enter")
    await expect(page.get_by_test_id("assist-verdict")).to_contain_text("已登记抽签")
    await expect(page.locator("#assist-cid")).to_be_focused()
    r = await client.get("/api/v1/admin/rounds/l1/stats", headers=ADMIN)
    assert (await r.json())["entries"] == 1
    await page.locator("#assist-round").select_option("r1")
    await expect(submit).to_have_text("为居民预约")  # an fcfs round: reserve again
    assert page_errors(page) == []
    await context.close()


async def test_console_issues_a_desk_token_once_and_revokes_it(
    client: Client, browser: Browser
) -> None:
    """The operator hands a counter its token from the console, and takes it back there."""
    await seed(client, stock={"s1": 10})
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await login(page)
    await page.locator("#dt-site").fill("s1")
    await page.locator("#dt-label").fill("Counter 3")
    await page.get_by_role("button", name="生成令牌").click()
    await expect(page.get_by_test_id("dt-result")).to_contain_text("只显示这一次")
    token = (await page.get_by_test_id("dt-token").inner_text()).strip()
    assert re.fullmatch(r"allot-desk-[A-Za-z0-9_-]{43}", token)
    me = await client.get("/api/v1/desk/me", headers={"Authorization": f"Bearer {token}"})
    assert (await me.json())["site_id"] == "s1"
    row = page.locator("#dt-table tbody tr")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("有效")
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await row.get_by_role("button", name="撤销").click()
    await expect(row).to_contain_text("已撤销")
    me = await client.get("/api/v1/desk/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status == 401
    assert page_errors(page) == []
    await context.close()


async def test_console_shows_the_fairness_report_and_marks_the_groups_left_behind(
    client: Client, browser: Browser, shots: Path
) -> None:
    """During the round, not after: a district getting far less than the best one stands out."""
    await seed(client, stock={"s1": 3, "s2": 1}, districts={"s1": "East", "s2": "West"})
    for n in (1, 2, 3):
        assert (await reserve(client, n, site="s1")).status == 201
    assert (await reserve(client, 4, site="s2")).status == 201
    for n in (5, 6, 7):
        assert (await reserve(client, n, site="s2")).status == 409  # sold out in West
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await login(page)
    west = page.locator('#fair-table tr[data-group="district:West"]')
    await expect(west).to_contain_text("25.0%")  # 1 of 4 askers got a share
    await expect(west).to_have_class(re.compile(r"\bunder\b"))
    await expect(west).to_contain_text("偏低")
    east = page.locator('#fair-table tr[data-group="district:East"]')
    await expect(east).to_contain_text("100.0%")
    await expect(east).not_to_have_class(re.compile(r"\bunder\b"))
    await page.locator("#fair-table").scroll_into_view_if_needed()
    await page.screenshot(path=shots / "admin-fairness.png")
    await assert_contrast(page)
    assert page_errors(page) == []
    await context.close()


# -- lottery rounds -------------------------------------------------------------------------


async def test_citizen_registers_for_a_lottery_and_the_console_draws_it(
    client: Client, browser: Browser, shots: Path
) -> None:
    """A lottery round is a registration (登记): the page shows the entry's receipt and status,
    the console freezes and draws it, and the page then shows the pickup code and the check."""
    from tests.test_lottery import seed_lottery, wait_for_status

    await seed_lottery(client, stock={"s1": 1, "s2": 1}, closes_in=8)
    context, page = await open_page(browser, client)
    await expect(page.locator("#form-title")).to_have_text("登记抽签")
    await expect(page.get_by_test_id("countdown")).to_contain_text("登记截止还有")
    await expect(page.locator("#accept-field")).to_be_visible()
    await fill_form(page, 1, "s1")
    await page.locator("#accept_district").check()
    await page.get_by_role("button", name="登记", exact=True).click()
    await expect(page.get_by_test_id("entry-status")).to_have_text("已登记，等待开奖")
    receipt = page.get_by_test_id("entry-receipt")
    await expect(receipt).to_contain_text(re.compile(r"[0-9a-f]{64}"))
    await page.screenshot(path=shots / "lottery-registered-phone.png", full_page=True)
    await assert_contrast(page)

    await wait_for_status(client, "frozen")
    admin_context, console = await open_page(browser, client, "/admin", size=DESKTOP)
    await login(console)
    await console.locator("#stats-round").select_option("l1")
    await expect(console.get_by_test_id("lottery-box")).to_be_visible()
    await expect(console.get_by_test_id("stat-entries")).to_have_text("1")
    frozen = "名单已冻结，等待公开随机数开奖"
    await expect(console.get_by_test_id("draw-status")).to_have_text(frozen)
    await console.locator("#draw-randomness").fill("drand 9123456: 4c0a")
    await console.get_by_role("button", name="开奖", exact=True).click()
    await expect(console.get_by_test_id("draw-result")).to_contain_text("已开奖")
    await expect(console.get_by_test_id("draw-record")).to_contain_text("drand 9123456: 4c0a")
    await console.screenshot(path=shots / "lottery-console-desktop.png", full_page=True)
    assert page_errors(console) == []
    await admin_context.close()

    await page.reload()
    await expect(page.get_by_test_id("entry-status")).to_have_text("中签")
    code = page.get_by_test_id("entry-pickup-code")
    await expect(code).to_contain_text(re.compile(r"[2-9A-HJ-NP-Z]{8}"))
    check = page.get_by_test_id("check-draw")
    record = await (await client.get("/api/v1/rounds/l1/draw")).json()
    await expect(check).to_contain_text(record["seed"])
    await expect(check).to_contain_text(record["secret"])
    await expect(check.locator("a.file")).to_have_count(3)
    await page.screenshot(path=shots / "lottery-won-phone.png", full_page=True)
    await assert_contrast(page)
    assert page_errors(page) == []
    await context.close()


async def test_console_creates_a_lottery_round_and_runs_its_freeze_draw_and_passes(
    client: Client, browser: Browser, shots: Path
) -> None:
    """An operator makes a lottery round in the console (mode, randomness source, programme,
    cooldown, eligibility), watches its entries per site and the freeze, draws it with the
    public randomness, runs a pass after a winner cancels, and finds the record's files."""
    import datetime as dt

    from tests.test_lottery import enter, wait_for_status

    sites = [
        {"site_id": s, "name": f"Site {s}", "address": "road 1", "district": "d1"}
        for s in ("s1", "s2")
    ]
    r = await client.put("/api/v1/admin/sites", json={"sites": sites}, headers=ADMIN)
    assert r.status == 200
    context, page = await open_page(browser, client, "/admin", size=DESKTOP)
    await login(page)

    now = dt.datetime.now(dt.UTC)

    def at(seconds: float) -> str:  # a datetime-local value (to the second), in UTC
        return (now + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")

    await page.locator("#rf-id").fill("lot")
    await page.locator("#rf-title").fill("口罩抽签")
    await page.locator("#rf-offset").fill("+00:00")
    await page.locator("#rf-opens").fill(at(-60))
    await page.locator("#rf-closes").fill(at(20))
    await page.locator("#rf-pstart").fill(at(-60))
    await page.locator("#rf-pend").fill(at(7 * 86400))
    await page.locator("#rf-per").fill("1")
    await expect(page.get_by_test_id("rf-lottery-box")).to_be_hidden()
    await page.get_by_label("登记抽签").check()
    await expect(page.get_by_test_id("rf-lottery-box")).to_be_visible()
    # a lottery needs its randomness source: the service's 422 names the field
    await page.get_by_role("button", name="保存轮次").click()
    await expect(page.locator("#round-result")).to_contain_text("public_randomness_source")
    assert (await client.get("/api/v1/rounds/lot")).status == 404
    await page.locator("#rf-source").fill("drand quicknet, the first round after closes_at")
    await page.locator("#rf-programme").fill("masks")
    await page.locator("#rf-cooldown").fill("7")
    await page.locator("#rf-eligibility summary").click()
    await page.locator("#rf-digits").fill("0, 1, 2")
    await page.locator("#rf-min-age").fill("18")
    await page.get_by_role("button", name="保存轮次").click()
    await expect(page.locator("#round-result")).to_contain_text("已新建轮次 lot")
    rnd = await (await client.get("/api/v1/rounds/lot")).json()
    assert rnd["mode"] == "lottery"
    assert (
        rnd["draw"]["public_randomness_source"] == "drand quicknet, the first round after closes_at"
    )
    assert re.fullmatch(r"[0-9a-f]{64}", rnd["draw"]["commitment"])
    assert (rnd["programme"], rnd["cooldown_days"]) == ("masks", 7)
    assert rnd["eligibility"] == {"birth_year_last_digit": [0, 1, 2], "min_age": 18}
    await expect(page.locator("#round-table")).to_contain_text("登记抽签")
    # the edit form reads the round back as it is
    await page.get_by_role("button", name="编辑轮次 lot").click()
    await expect(page.locator("#rf-mode-lottery")).to_be_checked()
    await expect(page.locator("#rf-source")).to_have_value(rnd["draw"]["public_randomness_source"])
    await expect(page.locator("#rf-digits")).to_have_value("0,1,2")

    r = await client.post(
        "/api/v1/admin/rounds/lot/batches",
        json={"batch_id": "b1", "items": [{"site_id": "s1", "quantity": 1}]},
        headers=ADMIN,
    )
    assert r.status == 201, await r.text()
    made = [await enter(client, n, site, "lot") for n, site in ((1, "s1"), (2, "s1"), (3, "s2"))]
    assert [m.status for m in made] == [201, 201, 201], [await m.text() for m in made]

    await page.locator("#stats-round").select_option("lot")
    await expect(page.get_by_test_id("lottery-box")).to_be_visible()
    await expect(page.get_by_test_id("stat-entries")).to_have_text("3")
    await expect(page.locator("#site-table tr", has_text="s1")).to_contain_text("2")
    await expect(page.get_by_test_id("draw-status")).to_have_text("登记中，尚未冻结名单")
    await expect(page.locator("#draw-submit")).to_be_disabled()
    files = page.get_by_test_id("draw-files")
    await expect(files.locator("a")).to_have_count(1)  # the record only, before the freeze

    await wait_for_status(client, "frozen", "lot")
    await expect(page.get_by_test_id("draw-status")).to_have_text("名单已冻结，等待公开随机数开奖")
    await expect(files.locator("a")).to_have_text(["draw.json", "entries.csv", "stock.csv"])
    await page.locator("#draw-randomness").fill("drand 9123457: 77ab")
    await page.get_by_role("button", name="开奖", exact=True).click()
    await expect(page.get_by_test_id("draw-result")).to_contain_text("已开奖")
    await expect(page.get_by_test_id("draw-status")).to_have_text("已开奖")
    await expect(files.locator("a")).to_have_text(
        ["draw.json", "entries.csv", "stock.csv", "results.csv"]
    )
    href = await files.locator("a", has_text="results.csv").get_attribute("href")
    assert href == "/api/v1/rounds/lot/draw/results.csv"
    published = await (await client.get(href)).read()
    assert published.startswith(b"rank,receipt,site_id\n")

    # the one winner cancels; a pass gives the unit to the next not-drawn entry in rank order
    winners = [
        e
        for e in [await (await client.get(f"/api/v1/entries/{(await m.json())['entry_id']}")).json()
                  for m in made]
        if e["status"] == "won"
    ]  # fmt: skip
    assert len(winners) == 1
    r = await client.delete(f"/api/v1/reservations/{winners[0]['reservation_id']}")
    assert r.status == 200
    async with asyncio.timeout(10):  # a pass counts what the ledger has
        while True:
            stats = await (await client.get("/api/v1/admin/rounds/lot/stats", headers=ADMIN)).json()
            if stats["ledger"]["lag"] == 0:
                break
            await asyncio.sleep(0.1)
    await page.get_by_role("button", name="补抽一轮").click()
    await expect(page.get_by_test_id("draw-result")).to_contain_text("已开奖")
    await expect(page.get_by_test_id("draw-record")).to_contain_text("pass 1")
    await expect(page.get_by_test_id("draw-record")).to_contain_text("s1 +1")
    await expect(files.locator("a", has_text="pass-1.csv")).to_have_attribute(
        "href", "/api/v1/rounds/lot/draw/pass-1.csv"
    )
    record = await (await client.get("/api/v1/rounds/lot/draw")).json()
    assert [p["pass"] for p in record["passes"]] == [1]
    await page.locator("#lottery-box").scroll_into_view_if_needed()
    await page.screenshot(path=shots / "admin-lottery-round.png", full_page=True)
    await assert_contrast(page)
    assert page_errors(page) == []
    await context.close()
