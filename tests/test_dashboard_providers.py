"""The Providers page in a real browser against the real stack: each deployment's breaker state is the routers'
own (followed from llm.events, not guessed from usage rows), through open, half-open and closed again; and a
paced deployment's provider pool shows the requests waiting for it in Kafka."""

from __future__ import annotations

import io
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI
from playwright.sync_api import Page, expect

from tests.conftest import Fakes
from tests.stack import RunningStack
from tests.test_dashboard import api, browser, master_sdk, page, wait_until

__all__ = ["browser", "page"]  # fixtures shared with tests/test_dashboard.py
pytestmark = pytest.mark.timeout(300)


def deployment(stack: RunningStack, name: str) -> dict[str, Any]:
    return next(d for d in api(stack, "/v1/dashboard/providers")["deployments"] if d["deployment"] == name)


def shown_state(page: Page, name: str) -> Any:
    page.goto("/ui#providers")
    page.reload()
    return page.locator("#providers-table tr", has_text=name).locator(".state")


def test_breaker_state_is_the_routers_own_open_then_half_open_then_closed(page: Page, stack: RunningStack,
                                                                          fakes: Fakes) -> None:
    client = httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=60)
    body = {"model": "faulty", "messages": [{"role": "user", "content": "breaker"}]}
    assert deployment(stack, "faulty/0")["state"] == "closed"
    expect(shown_state(page, "faulty/0")).to_have_text("closed")
    # Earlier tests on this shared stack may have left failures on "faulty"; a success clears the count.
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    fakes.faulty.reset()

    # The provider fails every call: after SWITCHYARD_BREAKER_FAILURES (3) failures the routers open the breaker.
    fakes.faulty.inject(status=503, times=10_000)

    def opened() -> bool:
        if deployment(stack, "faulty/0")["state"] == "open":
            return True
        failed = client.post("/v1/chat/completions", json=body, headers={"x-switchyard-timeout": "5"})
        assert failed.status_code >= 500 and failed.json()["error"]["message"]
        return False

    wait_until(opened, "the breaker to open")
    assert len(fakes.faulty.calls()) >= 3
    expect(shown_state(page, "faulty/0")).to_have_text("open")

    # After the cooldown (10 s) it is half-open: the next call is a probe.
    fakes.faulty.reset()
    wait_until(lambda: deployment(stack, "faulty/0")["state"] == "half-open", "half-open", 60)
    expect(shown_state(page, "faulty/0")).to_have_text("half-open")
    # The probe succeeds: closed again.
    ok = wait_until(lambda: client.post("/v1/chat/completions", json=body).status_code == 200, "a probe", 60)
    assert ok
    wait_until(lambda: deployment(stack, "faulty/0")["state"] == "closed", "closed", 30)
    expect(shown_state(page, "faulty/0")).to_have_text("closed")
    client.close()


def test_a_paced_pool_shows_its_backlog(page: Page, stack: RunningStack) -> None:
    """1,000 batch requests for a deployment paced to 600 per minute wait in Kafka (more than a minute's worth, so a
    backlog forms whatever an earlier test left of the window); the page shows them as the
    openai pool's backlog, and the backlog drains as the batch is cancelled."""
    sdk: OpenAI = master_sdk(stack)
    lines = b"".join(orjson.dumps({"custom_id": f"b-{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "paced", "messages": [{"role": "user", "content": str(i)}]}})
                     + b"\n" for i in range(1000))
    file = sdk.files.create(file=("backlog.jsonl", io.BytesIO(lines)), purpose="batch")
    batch = sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    try:
        backlog = wait_until(lambda: (n := deployment(stack, "paced/0")["backlog"]) and n >= 20 and n,
                             "a backlog on the openai pool", 120)
        data = api(stack, "/v1/dashboard/providers")
        assert data["pools"]["workers.openai"] >= 1 and data["errors"]["backlog"] is None
        paced = next(d for d in data["deployments"] if d["deployment"] == "paced/0")
        assert paced["pool"] == "workers.openai" and paced["backlog"] == data["pools"]["workers.openai"]
        assert backlog > 0

        with page.expect_response(lambda r: r.url.endswith("/v1/dashboard/providers") and r.ok) as fetched:
            page.goto("/ui#providers")
        shown = fetched.value.json()
        row = page.locator("#providers-table tr", has_text="paced/0")
        expected = next(d for d in shown["deployments"] if d["deployment"] == "paced/0")["backlog"]
        assert expected > 0
        expect(row.locator("td").last).to_have_text(str(expected))
    finally:
        if sdk.batches.retrieve(batch.id).status not in ("completed", "failed", "expired", "cancelled"):
            sdk.batches.cancel(batch.id)  # a failure above stays the one reported
    wait_until(lambda: sdk.batches.retrieve(batch.id).status == "cancelled", "the batch cancelled", 120)
    wait_until(lambda: deployment(stack, "paced/0")["backlog"] == 0, "the backlog drained", 120)
