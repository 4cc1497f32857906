"""A client that goes away stops its provider call (issue 18): workers follow `llm.cancel`.

Against the real stack (Apache Kafka, PostgreSQL, `switchyard up`) and the fake OpenAI server: the test
plays ingress's part, producing a `CancelRequest` with a real producer once its client has gone away, and
checks what a user and an operator rely on: the provider sees the connection close, the call's usage row
ends as a cancelled call (status 499, not ok), it is not retried elsewhere, and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from sqlalchemy import text

from switchyard.services.workers.cancels import Cancels
from switchyard.shared import topics
from switchyard.shared.breaker import BreakerSettings, HealthBook
from switchyard.shared.contracts import AttemptEvent, CancelRequest
from switchyard.shared.db import make_engine
from switchyard.shared.kafka import make_producer, start_client
from switchyard.shared.kafka_delivery import encode, send_and_wait
from tests.conftest import Fakes
from tests.fakes.server import Recorded
from tests.stack import RunningStack

WORDS = 60  # the fake streams one word per chunk: a long answer, so the stream is still running when cancelled
CHUNK_GAP_MS = 400


def _prompt(marker: str) -> str:
    return " ".join([marker, *(f"w{i}" for i in range(WORDS))])


async def _produce(stack: RunningStack, *values: bytes) -> None:
    producer = make_producer(stack.bootstrap)
    await start_client(producer, "test-cancel")
    try:
        for value in values:
            await send_and_wait(producer, topics.CANCEL, value, key=b"cancel")
    finally:
        await producer.stop()


async def _rows(stack: RunningStack, sql: str, params: dict[str, Any], done: Callable[[list[dict[str, Any]]], bool],
                wait_s: float = 60.0) -> list[dict[str, Any]]:
    """Poll PostgreSQL until `done(rows)` (accounting writes in batches)."""
    engine = make_engine(stack.database_url, pool_size=1)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            async with engine.connect() as conn:
                rows = [dict(r) for r in (await conn.execute(text(sql), params)).mappings()]
            if done(rows) or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.1)
    finally:
        await engine.dispose()


async def _outcome(stack: RunningStack, request_id: str) -> list[dict[str, Any]]:
    """The request's usage rows once none is still in doubt (status 0: written before the call)."""
    return await _rows(stack, "SELECT * FROM usage WHERE request_id = :rid ORDER BY attempt, call_seq",
                       {"rid": request_id}, lambda rows: bool(rows) and all(r["status"] != 0 for r in rows))


def _called_with(fakes: Fakes, marker: str) -> list[Recorded]:
    return [r for r in fakes.main.calls("/chat/completions") if marker in orjson.dumps(r.body).decode()]


async def _until(check: Callable[[], Any], what: str, wait_s: float = 60.0) -> Any:
    deadline = time.monotonic() + wait_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return found


async def _still_serving(stack: RunningStack) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(),
                              json={"model": "gpt-test", "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Echo: still there?"


async def test_a_cancelled_stream_closes_the_provider_connection_and_is_recorded_as_499(
        stack: RunningStack, fakes: Fakes) -> None:
    marker = f"cancel-stream-{uuid.uuid4().hex[:8]}"
    fakes.main.inject(chunk_latency_ms=CHUNK_GAP_MS)
    body = {"model": "gpt-test", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": _prompt(marker)}]}
    async with httpx.AsyncClient(timeout=60) as client, client.stream(
            "POST", f"{stack.url}/v1/chat/completions", headers=stack.headers(), json=body) as response:
        assert response.status_code == 200
        request_id = response.headers[topics.HEADER_REQUEST_ID]
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # the stream is flowing; now the client goes away
    await _produce(stack, encode(CancelRequest(request_id=request_id)))

    (gone,) = await asyncio.to_thread(fakes.main.wait_for_disconnect, 30.0)
    assert marker in orjson.dumps(gone.body).decode(), "the provider saw this call's connection close"
    rows = await _outcome(stack, request_id)
    assert [(r["status"], r["ok"]) for r in rows] == [(499, False)], rows
    assert len(_called_with(fakes, marker)) == 1, "a cancelled call is not retried or failed over"
    await _still_serving(stack)


async def test_a_cancelled_non_streaming_call_closes_the_provider_connection(stack: RunningStack,
                                                                             fakes: Fakes) -> None:
    marker = f"cancel-plain-{uuid.uuid4().hex[:8]}"
    since = datetime.now(UTC)  # rows of this test only (other files on this stack cancel calls too)
    fakes.main.inject(latency_ms=120_000)  # the provider thinks for two minutes: far longer than this test
    async with httpx.AsyncClient(timeout=180) as client:
        waiting = asyncio.create_task(client.post(
            f"{stack.url}/v1/chat/completions", headers=stack.headers(),
            json={"model": "gpt-test", "messages": [{"role": "user", "content": _prompt(marker)}]}))
        await _until(lambda: _called_with(fakes, marker), "the provider call")
        waiting.cancel()  # the client goes away while the provider is still working
        await asyncio.gather(waiting, return_exceptions=True)
    # Ingress sends the cancel itself (tests/test_client_cancel.py reads it on llm.cancel); the worker follows it.
    (gone,) = await asyncio.to_thread(fakes.main.wait_for_disconnect, 30.0)
    assert marker in orjson.dumps(gone.body).decode()
    rows = await _rows(stack, "SELECT * FROM usage WHERE status = 499 AND NOT stream AND model_group = 'gpt-test' "
                              "AND ts >= :since", {"since": since}, bool)
    assert [(r["status"], r["ok"]) for r in rows] == [(499, False)], rows
    assert len(_called_with(fakes, marker)) == 1
    await _still_serving(stack)


async def test_cancels_for_calls_nobody_holds_and_unreadable_ones_change_nothing(stack: RunningStack,
                                                                                fakes: Fakes) -> None:
    await _produce(stack, encode(CancelRequest(request_id="not-a-request-anyone-holds")), b"\xff not json",
                   orjson.dumps({"request_id": ["x"]}))
    fakes.main.inject(chunk_latency_ms=50)
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), json={
            "model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "a b c"}]})
    assert r.status_code == 200 and "data: [DONE]" in r.text
    assert fakes.main.disconnects == []
    await _still_serving(stack)


# ---- units: the registry, and what routers make of a cancelled attempt ---------------------------------------


async def test_a_held_request_is_cancelled_and_others_are_not() -> None:
    cancels = Cancels()
    with cancels.holding("r1") as one, cancels.holding("r2") as two:
        cancels.apply(encode(CancelRequest(request_id="r1")))
        cancels.apply(b"{")  # unreadable: dropped
        assert one.requested and not two.requested
        assert cancels.cancel("elsewhere") == 0
    assert cancels.cancel("r1") == 0, "a request no longer held is forgotten"


def test_a_cancelled_attempt_says_nothing_about_the_deployments_health() -> None:
    health = HealthBook(BreakerSettings(failures_to_open=3, min_samples=1000))
    now_ms = int(time.time() * 1000)
    for i in range(5):
        health.apply(AttemptEvent(request_id=f"r{i}", attempt=0, deployment="d/0", provider="openai",
                                  model_group="g", ok=False, status=499, latency_ms=5.0, ts_ms=now_ms + i))
    assert health.available("d/0", now_ms / 1000 + 0.1)
