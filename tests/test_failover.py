"""A failed attempt goes back to the router, which tries the next deployment of the chain."""

from __future__ import annotations

import httpx
import orjson

from tests.conftest import Fakes
from tests.stack import RunningStack


def test_primary_down_secondary_answers(stack: RunningStack, fakes: Fakes) -> None:
    fakes.primary.inject(status=503, times=1)
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": "failover", "messages": [
        {"role": "user", "content": "hi"}]}, headers=stack.headers(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Echo: hi"
    assert len(fakes.primary.calls()) == 1
    assert len(fakes.secondary.calls()) == 1
    assert r.headers["x-switchyard-route"] == "group=failover; deployment=failover/1; attempt=1"


def test_stream_failing_before_first_chunk_fails_over(stack: RunningStack, fakes: Fakes) -> None:
    fakes.primary.inject(status=500, times=1)
    body = {"model": "failover", "messages": [{"role": "user", "content": "x y"}], "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers=stack.headers(),
                      timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "Echo: x y"
    assert len(fakes.secondary.calls()) == 1
