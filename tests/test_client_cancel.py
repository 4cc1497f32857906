"""A client that goes away before its answer cancels the provider call: ingress publishes a `CancelRequest` for
its request id on `llm.cancel` (read here with a real consumer from the real broker), for a stream dropped
midway and for a non-streaming request dropped while its answer is being generated. A request answered in full
publishes none. The workers' side of the cancel (stopping the call) is tested with the workers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson
from pydantic import ValidationError

from switchyard.shared import topics
from switchyard.shared.contracts import CancelRequest, RequestEnvelope
from tests.conftest import Fakes
from tests.stack import RunningStack, read_topic_until

WAIT_S = 60.0


def _cancelled_ids(messages: list[bytes]) -> list[str]:
    """The request ids of the cancels among `messages` (other tests on this stack write unreadable ones too)."""
    ids = []
    for message in messages:
        try:
            ids.append(CancelRequest.model_validate_json(message).request_id)
        except ValidationError:
            continue
    return ids


def _cancels_until(stack: RunningStack, request_id: str) -> list[str]:
    """The request ids cancelled so far, once `request_id` is among them."""
    messages = asyncio.run(read_topic_until(stack.bootstrap, topics.CANCEL,
                                       lambda ms: request_id in _cancelled_ids(ms)))
    return _cancelled_ids(messages)


def _request_id_of(stack: RunningStack, nonce: str) -> str:
    """The id ingress gave the request whose prompt holds `nonce` (from its envelope on the openai provider topic,
    where ingress routes the first attempt)."""
    def ids(messages: list[bytes]) -> list[str]:
        return [RequestEnvelope.model_validate_json(m).id for m in messages if nonce.encode() in m]

    topic = topics.provider_topic("openai")
    return ids(asyncio.run(read_topic_until(stack.bootstrap, topic, lambda ms: bool(ids(ms)))))[0]


def _body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **extra}


def test_a_stream_dropped_midway_is_cancelled_and_a_finished_one_is_not(stack: RunningStack, fakes: Fakes) -> None:
    done = httpx.post(f"{stack.url}/v1/chat/completions", json=_body("answered in full", stream=True),
                      headers=stack.headers(), timeout=60)
    assert done.status_code == 200 and done.text.rstrip().endswith("data: [DONE]")
    finished_id = done.headers["x-request-id"]

    fakes.main.inject(chunk_latency_ms=1000)  # about a second per word: the stream is still going when we leave
    words = " ".join(f"word{i}" for i in range(30))
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=_body(words, stream=True),
                      headers=stack.headers(), timeout=60) as r:
        assert r.status_code == 200
        dropped_id = r.headers["x-request-id"]
        first = next(line for line in r.iter_lines() if line)
        assert first.startswith("data: {")
    # The connection is closed here, long before the provider's last word.
    cancelled = _cancels_until(stack, dropped_id)
    assert cancelled.count(dropped_id) == 1
    assert finished_id not in cancelled  # published before the dropped one's, had it been: the topic is ordered


def test_a_non_streaming_request_dropped_while_waiting_is_cancelled(stack: RunningStack, fakes: Fakes) -> None:
    fakes.main.inject(latency_ms=30_000)  # the provider takes its time before answering
    nonce = uuid.uuid4().hex

    async def call_and_leave() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            request = asyncio.ensure_future(client.post(f"{stack.url}/v1/chat/completions",
                                                        json=_body(f"wait for me {nonce}"), headers=stack.headers()))
            deadline = time.monotonic() + WAIT_S
            while not any(nonce in orjson.dumps(c.body).decode() for c in fakes.main.calls("/chat/completions")):
                assert time.monotonic() < deadline, "the provider was never called"
                await asyncio.sleep(0.05)
            request.cancel()  # the client gives up: its connection closes while ingress waits for the answer
            await asyncio.gather(request, return_exceptions=True)

    asyncio.run(call_and_leave())
    request_id = _request_id_of(stack, nonce)
    assert request_id in _cancels_until(stack, request_id)
    # Ingress released what the request held: it serves the next one at once.
    fakes.main.reset()
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=_body("next"), headers=stack.headers(), timeout=60)
    assert r.status_code == 200, r.text
    health = httpx.get(f"{stack.url}/health", timeout=10).json()
    assert health["waiting"] == 0
