"""The dashboard at /ui in a real browser (Debian's Chromium, driven headless by Playwright), against the real
stack: figures that came from real requests, spend grouping and CSV export, keys created, limited and revoked
in the page and used with the openai SDK, providers and failovers, a batch cancelled, sign-in and sign-out,
and the session's guards (no key in URL or storage, cross-site requests refused)."""

from __future__ import annotations

import csv
import decimal
import io
import math
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import OpenAI
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.conftest import Fakes
from tests.stack import MASTER_KEY, RunningStack

pytestmark = pytest.mark.timeout(300)

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
PRICE_IN, PRICE_OUT = 0.15, 0.60  # openai gpt-4o-mini, USD per million tokens (shared/pricing.json)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "install Debian's chromium (apt-get install -y chromium); .ci/run does"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def new_context(browser: Browser, stack: RunningStack) -> BrowserContext:
    context = browser.new_context(base_url=stack.url, viewport={"width": 1366, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack.url)
    return context


def sign_in(page: Page, key: str = MASTER_KEY) -> None:
    page.goto("/ui")
    page.fill("#master-key", key)
    page.click("#login-form button[type=submit]")


@pytest.fixture
def page(browser: Browser, stack: RunningStack) -> Iterator[Page]:
    context = new_context(browser, stack)
    pg = context.new_page()
    sign_in(pg)
    expect(pg.locator("#overview")).to_be_visible()
    yield pg
    context.close()


def master_sdk(stack: RunningStack, key: str = MASTER_KEY) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=60)


def api(stack: RunningStack, path: str) -> Any:
    r = httpx.get(f"{stack.url}{path}", headers=stack.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_until(check: Any, what: str, timeout_s: float = 60) -> Any:
    deadline = time.time() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def spend_of_key(stack: RunningStack, key_id: str) -> dict[str, Any] | None:
    rows = api(stack, "/v1/dashboard/spend?by=key&since=1h")["data"]
    return next((r for r in rows if r["key"] == key_id), None)


@pytest.fixture(scope="module")
def traffic(stack: RunningStack, fakes: Fakes) -> dict[str, Any]:
    """Five real requests through the stack with a fresh key (two of them slowed to 700 ms at the provider),
    and their expected cost from the tokens the answers reported; waits until accounting has all five."""
    team = f"team-{uuid.uuid4().hex[:8]}"
    created = httpx.post(f"{stack.url}/v1/keys", headers=stack.headers(),
                         json={"name": "dash-traffic", "team": team}, timeout=30).json()
    sdk = master_sdk(stack, created["key"])
    cost, request_ids = 0.0, []
    fakes.main.inject(latency_ms=700, times=2)
    for i in range(5):
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": f"dashboard figure {i}"}])
        answer = raw.parse()
        assert answer.usage is not None
        cost += (answer.usage.prompt_tokens * PRICE_IN + answer.usage.completion_tokens * PRICE_OUT) / 1e6
        request_ids.append(raw.headers["x-request-id"])
    wait_until(lambda: (spend_of_key(stack, created["key_id"]) or {}).get("requests") == 5, "usage rows")
    return {"key_id": created["key_id"], "team": team, "cost": cost, "request_ids": request_ids}


def test_a_wrong_master_key_is_refused(browser: Browser, stack: RunningStack) -> None:
    context = new_context(browser, stack)
    pg = context.new_page()
    sign_in(pg, "sk-not-the-master-key")
    expect(pg.locator("#login-error")).to_have_text("That is not the master key.")
    expect(pg.locator("#nav")).to_be_hidden()
    assert context.cookies() == []
    r = httpx.get(f"{stack.url}/v1/dashboard/overview", timeout=30)  # and nothing without a session or key
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    context.close()


def js_round(value: float) -> int:
    """JavaScript's Math.round, as the page rounds: halves go up (Python's round takes 74.5 to 74)."""
    return math.floor(value + 0.5)


def js_to_fixed(value: float, digits: int) -> str:
    """JavaScript's Number.prototype.toFixed, as the page formats: the exact value of the double, a tie rounded
    away from zero (toFixed(1) of 0.25 is "0.3"; Python's format gives "0.2")."""
    exact = decimal.Decimal(value).quantize(decimal.Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_UP)
    return f"{exact:.{digits}f}"


def test_overview_shows_the_figures_of_real_requests(page: Page, stack: RunningStack,
                                                     traffic: dict[str, Any]) -> None:
    # The figures the page drew are those of the overview it fetched (read from that very answer: other tests'
    # requests may land between two separate reads).
    with page.expect_response(lambda r: r.url.endswith("/v1/dashboard/overview") and r.ok) as fetched:
        page.reload()
    expect(page.locator("#overview")).to_be_visible()
    data = fetched.value.json()
    hour, day = data["windows"]["1h"], data["windows"]["24h"]
    assert hour["requests"] >= 5 and hour["p99_ms"] >= hour["p95_ms"] >= hour["p50_ms"] > 0
    assert data["spend"]["today"] >= traffic["cost"] - 1e-9
    cards = page.locator("#overview-cards")
    expect(cards.locator("[data-testid=requests-1h] .value")).to_have_text(str(hour["requests"]))
    expect(cards.locator("[data-testid=requests-24h] .value")).to_have_text(str(day["requests"]))
    expect(cards.locator("[data-testid=p50-1h] .value")).to_have_text(f"{js_round(hour['p50_ms'])} ms")
    expect(cards.locator("[data-testid=p99-24h] .value")).to_have_text(f"{js_round(day['p99_ms'])} ms")
    error_rate = js_to_fixed(100 * hour["error_rate"], 1)
    expect(cards.locator("[data-testid=error-rate-1h] .value")).to_have_text(f"{error_rate}%")
    # Drawn by uPlot (a canvas per chart), with the real series named in each chart's legend.
    for chart, names in (("requests-1h", ["requests", "errors"]), ("latency-24h", ["p50", "p95", "p99"]),
                         ("errors-24h", ["error %"]), ("spend-month", ["USD per day"])):
        expect(page.locator(f"#chart-{chart} .uplot canvas")).to_be_visible()
        expect(page.locator(f"#chart-{chart} .u-legend .u-series .u-label")).to_contain_text(names)
    DOCS.mkdir(exist_ok=True)  # the README shows this picture; every run takes it again
    page.screenshot(path=str(DOCS / "dashboard-overview.png"), full_page=True)

    # The requests page: this key's five, two of them slow at the provider (700 ms injected).
    page.goto("/ui#requests")
    page.fill("#requests-form input[name=key]", traffic["key_id"])
    page.click("#requests-form button[type=submit]")
    expect(page.locator("#flash")).to_be_hidden()
    rows = page.locator("#requests-table tr.clickable")
    expect(rows).to_have_count(5)
    detail = api(stack, f"/v1/dashboard/requests/{traffic['request_ids'][0]}")
    assert detail["attempts"][0]["latency_ms"] >= 700 and detail["attempts"][0]["deployment"] == "gpt-test/0"
    page.locator("#requests-table tr.clickable", has_text=traffic["request_ids"][0]).click()
    expect(page.locator("#attempts-table")).to_contain_text("gpt-test/0")


def test_spend_by_key_and_team_with_csv_export(page: Page, stack: RunningStack, traffic: dict[str, Any]) -> None:
    page.goto("/ui#spend")
    page.select_option("#spend-by", "team")
    page.fill("#spend-since", "1h")
    page.click("#spend-form button[type=submit]")
    row = page.locator("#spend-table tr", has_text=traffic["team"])
    expect(row).to_contain_text(f"${traffic['cost']:.6f}")
    expect(row.locator("td").nth(1)).to_have_text("5")
    expect(page.locator("#chart-spend .uplot canvas")).to_be_visible()
    expect(page.locator("#chart-spend .u-legend .u-series .u-label")).to_contain_text(["USD"])

    page.select_option("#spend-by", "key")
    page.click("#spend-form button[type=submit]")
    expect(page.locator("#spend-table tr", has_text=traffic["key_id"])).to_be_visible()
    with page.expect_download() as download:
        page.click("#spend-csv")
    text = Path(download.value.path()).read_text()
    table = list(csv.DictReader(io.StringIO(text)))
    mine = next(r for r in table if r["key"] == traffic["key_id"])
    assert int(mine["requests"]) == 5 and int(mine["errors"]) == 0
    assert abs(float(mine["cost_usd"]) - traffic["cost"]) < 1e-9
    assert download.value.suggested_filename.startswith("spend-by-key-")


def test_create_a_key_use_it_limit_it_and_revoke_it(page: Page, stack: RunningStack) -> None:
    name = f"dash-{uuid.uuid4().hex[:8]}"
    page.goto("/ui#keys")
    page.click("#create-key-box summary")
    page.fill("#create-key input[name=name]", name)
    page.fill("#create-key input[name=rpm]", "50")
    page.click("#create-key button[type=submit]")
    expect(page.locator("#new-key")).to_be_visible()
    token = page.locator("#new-key-value").inner_text()
    assert token.startswith("sk-")
    page.click("#copy-key")
    expect(page.locator("#copy-key")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == token
    answer = master_sdk(stack, token).chat.completions.create(model="gpt-test",
                                                               messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content

    page.click("#dismiss-key")
    page.reload()  # shown once: the token is nowhere on the page any more
    expect(page.locator("#keys-table")).to_contain_text(name)
    assert token not in page.content()
    row = page.locator("#keys-table tr", has_text=name)

    # A bad budget is refused by the admin API with a clear message, and changes nothing.
    row.get_by_role("button", name="Edit limits").click()
    page.fill("#edit-key input[name=budget_usd]", "1e20")
    page.click("#edit-key button[type=submit]")
    expect(page.locator("#keys-error")).not_to_be_empty()
    key_id = row.locator("td").nth(1).inner_text()
    assert api(stack, f"/v1/keys/{key_id}")["budget_usd"] is None

    page.fill("#edit-key input[name=rpm]", "7")
    page.fill("#edit-key input[name=budget_usd]", "12.5")
    page.click("#edit-key button[type=submit]")
    expect(page.locator("#edit-key")).to_be_hidden()
    expect(row).to_contain_text("$12.50 per month")
    after = api(stack, f"/v1/keys/{key_id}")
    assert after["rpm"] == 7 and after["budget_usd"] == 12.5

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row.locator(".state")).to_have_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        master_sdk(stack, token).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])


def test_providers_page_shows_states_and_a_failover(page: Page, stack: RunningStack, fakes: Fakes) -> None:
    fakes.primary.inject(status=503)
    raw = master_sdk(stack).chat.completions.with_raw_response.create(
        model="failover", messages=[{"role": "user", "content": "fail over"}])
    assert "deployment=failover/1" in raw.headers["x-switchyard-route"]
    request_id = raw.headers["x-request-id"]
    wait_until(lambda: any(f["request_id"] == request_id for f in api(stack, "/v1/dashboard/providers")["failovers"]),
               "the failover in accounting")
    page.goto("/ui#providers")
    row = page.locator("#providers-table tr", has_text="gpt-test/0")
    expect(row.locator(".state")).to_have_text("closed")
    failover = page.locator("#failovers-table tr", has_text=request_id)
    expect(failover).to_contain_text("failover/0")
    expect(failover).to_contain_text("failover/1")


def test_batches_page_shows_progress_and_cancels(page: Page, stack: RunningStack) -> None:
    sdk = master_sdk(stack)
    lines = b"".join(orjson.dumps({"custom_id": f"d-{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "paced", "messages": [{"role": "user", "content": str(i)}]}})
                     + b"\n" for i in range(300))
    file = sdk.files.create(file=("dash.jsonl", io.BytesIO(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: sdk.batches.retrieve(batch.id).status == "in_progress", "the batch to start")
    page.goto("/ui#batches")
    row = page.locator("#batches-table tr", has_text=batch.id)
    expect(row).to_contain_text("of 300")
    row.get_by_role("button", name="Cancel").click()
    final = wait_until(lambda: (b := sdk.batches.retrieve(batch.id)).status == "cancelled" and b, "cancelled", 120)
    assert final.request_counts is not None and final.request_counts.completed < 300
    page.reload()
    expect(page.locator("#batches-table tr", has_text=batch.id).locator(".state")).to_have_text("cancelled")


def test_session_cookie_is_httponly_strict_and_no_key_is_kept(page: Page, stack: RunningStack) -> None:
    cookies = page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("switchyard_session", True, "Strict")]
    assert MASTER_KEY not in cookies[0]["value"]
    assert MASTER_KEY not in page.url and page.evaluate("document.cookie") == ""
    storage = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert MASTER_KEY not in storage

    # Sign out: the page asks for the key again, and the old cookie no longer works even if kept.
    old = cookies[0]["value"]
    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    assert page.context.cookies() == []
    r = httpx.get(f"{stack.url}/v1/dashboard/overview", cookies={"switchyard_session": old}, timeout=30)
    assert r.status_code == 401
    assert old not in stack.log()


class _Attacker(BaseHTTPRequestHandler):
    """Serves a page (on another origin of the same host) that auto-posts a form to the gateway."""

    target = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = (f'<form id="f" method="post" action="{self.target}"><input name="name" value="csrf"></form>'
                '<script>document.getElementById("f").submit()</script>').encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_cross_site_form_post_is_refused(page: Page, stack: RunningStack) -> None:
    """A page on another port of the same host is the same *site* to the browser, so even SameSite=Strict
    sends the cookie: the Origin check is what refuses it."""
    before = len(api(stack, "/v1/keys")["data"])
    handler = type("Attacker", (_Attacker,), {"target": f"{stack.url}/v1/keys"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with page.expect_response(f"{stack.url}/v1/keys") as response:
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        assert response.value.status == 403
        assert response.value.json()["error"]["code"] == "cross_site_request"
    finally:
        server.shutdown()
    assert len(api(stack, "/v1/keys")["data"]) == before
    # A fetch from the page itself (same origin) still works with the same cookie.
    page.goto("/ui#keys")
    expect(page.locator("#keys-table")).to_be_visible()
