"""The dashboard under bad input and bad days, in a real browser against real processes: a bad budget, a key
revoked behind the page's back and PostgreSQL down each give a clear message and leave nothing half-done; the
charting library missing degrades to a message; and a 400 px window stays usable (no sideways scrolling of the
page, wide tables scroll inside their own box)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from switchyard.devstack.postgres import EmbeddedPostgres
from switchyard.shared.db import upgrade_blocking
from tests.fakes.server import free_port
from tests.stack import MASTER_KEY, RunningStack
from tests.test_dashboard import api, browser, page, sign_in, wait_until
from tests.test_ingress_without_database import Spawn, spawn

__all__ = ["browser", "page", "spawn"]  # fixtures from tests/test_dashboard.py and test_ingress_without_database.py
pytestmark = pytest.mark.timeout(300)
TABLE_BOXES = """s => [...document.querySelectorAll(`#${s} table:not(.u-legend)`)].filter(t => t.offsetParent)
    .map(t => ({right: t.getBoundingClientRect().right, scroll: t.scrollWidth, client: t.clientWidth,
                overflow: getComputedStyle(t).overflowX}))"""


def keys_named(stack: RunningStack, name: str) -> list[dict[str, Any]]:
    return [k for k in api(stack, "/v1/keys")["data"] if k["name"] == name]


def test_a_bad_budget_creates_no_key(page: Page, stack: RunningStack) -> None:
    page.goto("/ui#keys")
    page.click("#create-key-box summary")
    for budget, message in (("1e20", "budget_usd"), ("-3", "non-negative"), ("lots", "non-negative")):
        name = f"bad-budget-{budget}"
        page.fill("#create-key input[name=name]", name)
        page.fill("#create-key input[name=budget_usd]", budget)
        page.click("#create-key button[type=submit]")
        expect(page.locator("#keys-error")).to_contain_text(message)
        expect(page.locator("#new-key")).to_be_hidden()
        assert keys_named(stack, name) == []  # refused before anything was stored
    # Once corrected, the same form creates the key (the page kept working).
    page.fill("#create-key input[name=budget_usd]", "20")
    page.click("#create-key button[type=submit]")
    expect(page.locator("#new-key")).to_be_visible()
    expect(page.locator("#keys-error")).to_be_empty()
    assert [k["budget_usd"] for k in keys_named(stack, "bad-budget-lots")] == [20.0]


def test_a_key_revoked_behind_the_page_cannot_be_edited(page: Page, stack: RunningStack) -> None:
    created = httpx.post(f"{stack.url}/v1/keys", headers=stack.headers(), json={"name": "revoked-behind", "rpm": 10},
                         timeout=30).json()
    page.goto("/ui#keys")
    row = page.locator("#keys-table tr", has_text=created["key_id"])
    expect(row.locator(".state")).to_have_text("active")
    # Another admin (the CLI, a script) revokes it while the page still shows it active.
    first = httpx.post(f"{stack.url}/v1/keys/{created['key_id']}/revoke", headers=stack.headers(), timeout=30).json()
    row.get_by_role("button", name="Edit limits").click()
    page.fill("#edit-key input[name=rpm]", "5000")
    page.click("#edit-key button[type=submit]")
    expect(page.locator("#keys-error")).to_contain_text("is revoked")
    after = api(stack, f"/v1/keys/{created['key_id']}")
    assert after["status"] == "revoked" and after["rpm"] == 10  # nothing changed
    # Revoking it again from the stale row is harmless: still revoked, at its first revocation time.
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row.locator(".state")).to_have_text("revoked")
    assert api(stack, f"/v1/keys/{created['key_id']}")["revoked_at"] == first["revoked_at"]
    r = httpx.patch(f"{stack.url}/v1/keys/{created['key_id']}", headers=stack.headers(), json={"rpm": 1}, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["code"] == "key_revoked"


def test_with_the_database_down_every_page_says_so_nothing_is_created_and_it_recovers(
        browser: Browser, spawn: Spawn, tmp_path: Path) -> None:
    pg_server = EmbeddedPostgres(tmp_path / "pg", free_port())
    pg_server.start()
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    try:
        with ThreadPoolExecutor(1) as pool:  # its own event loop: Playwright's sync API runs one in this thread
            pool.submit(upgrade_blocking, pg_server.url).result()
        ingress = spawn(pg_server.url)
        master = {"authorization": f"Bearer {MASTER_KEY}"}
        pg = context.new_page()
        pg.goto(f"{ingress.url}/ui")
        pg.fill("#master-key", MASTER_KEY)
        pg.click("#login-form button[type=submit]")
        expect(pg.locator("#overview-cards [data-testid=requests-1h] .value")).to_have_text("0")
        expect(pg.locator("#flash")).to_be_hidden()

        pg_server.stop()
        pg.reload()
        expect(pg.locator("#nav")).to_be_visible()  # still signed in: the session needs no database
        expect(pg.locator("#flash")).to_contain_text("PostgreSQL")
        for name in ("spend", "providers", "keys", "requests"):
            pg.goto(f"{ingress.url}/ui#{name}")
            expect(pg.locator(f"#{name}")).to_be_visible()
            expect(pg.locator("#flash")).to_contain_text("unreachable right now")
        pg.goto(f"{ingress.url}/ui#keys")
        expect(pg.locator("#keys")).to_be_visible()
        pg.click("#create-key-box summary")
        pg.fill("#create-key input[name=name]", "while-down")
        pg.click("#create-key button[type=submit]")
        expect(pg.locator("#keys-error")).to_contain_text("PostgreSQL")
        expect(pg.locator("#new-key")).to_be_hidden()
        assert ingress.proc.poll() is None  # still serving
        r = httpx.get(f"{ingress.url}/v1/dashboard/overview", headers=master, timeout=30)
        assert r.status_code == 503 and r.headers.get("retry-after") and r.json()["error"]["message"]

        pg_server.start()  # back: the same page works again, and the key refused meanwhile does not exist
        pg.goto(f"{ingress.url}/ui#keys")
        wait_until(lambda: httpx.get(f"{ingress.url}/v1/dashboard/keys", headers=master, timeout=30).status_code
                   == 200, "the admin API to answer again")
        pg.reload()
        expect(pg.locator("#flash")).to_be_hidden()
        expect(pg.locator("#keys-table")).to_be_visible()
        keys = httpx.get(f"{ingress.url}/v1/keys", headers=master, timeout=30).json()["data"]
        assert [k for k in keys if k["name"] == "while-down"] == []
    finally:
        context.close()
        pg_server.stop(quiet=True)


def test_without_the_charting_library_the_charts_say_how_to_get_it(page: Page, stack: RunningStack) -> None:
    def missing(route: Route) -> None:
        route.fulfill(status=404, content_type="application/json", body='{"error": {"message": "not installed"}}')

    page.route("**/ui/vendor/**", missing)
    page.reload()  # a fresh page, whose import of the library now fails
    expect(page.locator("#overview-cards [data-testid=requests-1h] .value")).not_to_be_empty()
    for chart in ("requests-1h", "spend-month"):
        expect(page.locator(f"#chart-{chart}")).to_contain_text("Charts unavailable: run `switchyard ui install`")
    # Ingress serves only the library's own files from its install folder.
    assert httpx.get(f"{stack.url}/ui/vendor/..%2F..%2Fetc%2Fpasswd", timeout=30).status_code == 404
    for name in ("package.json", "uPlot.cjs.js"):
        r = httpx.get(f"{stack.url}/ui/vendor/{name}", timeout=30)
        assert r.status_code == 404 and "switchyard ui install" in r.json()["error"]["message"]


@pytest.mark.parametrize("section", ["overview", "spend", "providers", "keys", "batches", "requests"])
def test_a_narrow_window_has_no_sideways_scroll(browser: Browser, stack: RunningStack, section: str) -> None:
    context = browser.new_context(base_url=stack.url, viewport={"width": 400, "height": 800})
    pg = context.new_page()
    sign_in(pg)
    expect(pg.locator("#overview")).to_be_visible()
    pg.goto(f"/ui#{section}")
    expect(pg.locator(f"#{section}")).to_be_visible()
    expect(pg.locator(f"#{section} table, #{section} .cards").first).to_be_visible()
    page_width = pg.evaluate("document.documentElement.scrollWidth")
    assert page_width <= 400, f"the {section} page scrolls sideways ({page_width}px)"
    # Every table fits the window; one wider than it scrolls inside its own box.
    boxes = pg.evaluate(TABLE_BOXES, section)
    if section == "providers":  # ten columns: wider than 400 px, so this one must scroll
        assert any(b["scroll"] > b["client"] for b in boxes)
    for box in boxes:
        assert box["right"] <= 400
        if box["scroll"] > box["client"]:
            assert box["overflow"] in ("auto", "scroll")
    context.close()
