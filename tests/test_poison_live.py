"""No message can take a pool down, on the live stack (real Apache Kafka, PostgreSQL, every service, and
one fake per provider wire format):

- the issue's poison bodies, which ingress accepts and which used to raise AttributeError in the
  adapters (and so kill every worker that inherited the partition), get a clean OpenAI-style 400 naming
  the parameter from every provider format, before anything is sent upstream; so do the other bodies an
  adapter cannot express (embeddings on Anthropic, a remote image or strict JSON mode on Bedrock);
- an upstream answer that cannot be parsed is a 502 `bad_upstream_response` (retried elsewhere first);
- after each, a normal request that lands on the same partition of the provider's topic succeeds;
- batch envelopes written straight to `llm.requests` that nest too deeply or do not validate are
  answered with a 400 on their reply topic wherever one can be read, else dead-lettered as `unreadable`;
- and no process of the stack restarts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from switchyard.shared import topics
from switchyard.shared.answers import salvage, top_level_scalars
from switchyard.shared.dead import UNREADABLE
from switchyard.shared.kafka import ensure_topics, make_producer, start_client
from switchyard.shared.kafka_delivery import send_and_wait
from tests import test_delivery_failures
from tests.conftest import Fakes
from tests.fakes.server import FakeProvider
from tests.stack import RunningStack
from tests.test_delivery_failures import read_replies, restarts, wait_dead

restarts_before = test_delivery_failures.restarts_before
"""The stack's restart counts before this module's tests (a module fixture): none may restart."""

# ---- reading what can be read of a broken envelope (no broker needed) ---------------------------------


def test_the_reply_destination_is_read_past_any_depth_and_any_breakage() -> None:
    deep = "[" * 5000 + "]" * 5000
    raw = ('{"v": 1, "id": "r-1", "body": {"x": ' + deep + ', "s": "}]{[\\""}, "reply_topic": "t.replies", '
           '"reply_partition": 0, "custom_id": "row-1", "attempt": 2}')
    found = salvage(raw.encode())
    assert (found.id, found.reply_topic, found.reply_partition, found.custom_id, found.attempt) == (
        "r-1", "t.replies", 0, "row-1", 2)
    cut = salvage(b'{"id": "r-2", "reply_topic": "t", "body": {"messages": [[[[')
    assert (cut.id, cut.reply_topic, cut.answerable) == ("r-2", "t", True)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'{"id": 7, "reply_topic": ["x"]}', b"{", b'{"id"',
                                 b'{"reply_topic": "t", "reply_partition": true}'])
def test_what_names_no_id_and_reply_topic_cannot_be_answered(raw: bytes) -> None:
    found = salvage(raw)
    assert not found.answerable and found.reply_partition is None


def test_only_top_level_scalars_are_read() -> None:
    assert top_level_scalars('{"a": 1, "b": {"id": "inner"}, "c": [1, {"d": 2}], "e": "x", "f": null}') == {
        "a": 1, "e": "x", "f": None}


# ---- poison bodies through ingress, to every provider format ---------------------------------------------

USER = {"role": "user", "content": "hi"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
POISON = [
    pytest.param({"messages": [USER, {"role": "assistant", "tool_calls": [{"function": "x"}]}]},
                 "messages[1].tool_calls[0].function", id="tool-call-function"),
    pytest.param({"messages": [USER], "tools": [{"type": "function", "function": "x"}]}, "tools[0].function",
                 id="tools-function"),
    pytest.param({"messages": [USER], "tools": [WEATHER], "tool_choice": {"type": "function", "function": "f"}},
                 "tool_choice.function", id="tool-choice-function"),
    pytest.param({"messages": [USER], "response_format": {"type": "json_schema", "json_schema": "x"}},
                 "response_format.json_schema", id="json-schema"),
]
MODELS = {"openai": "gpt-test", "azure": "azure-gpt", "anthropic": "claude", "gemini": "gemini-flash",
          "cohere": "command", "bedrock": "nova"}
"""One model group per provider wire format the stack serves (tests/conftest.py), by provider name."""


def test_every_provider_format_is_covered() -> None:
    from switchyard.services.workers.providers import ADAPTERS, get_adapter

    formats = {type(get_adapter(name)).__name__ for name in ADAPTERS}
    covered = {type(get_adapter(name)).__name__ for name in MODELS}
    assert covered == formats


def _fake(fakes: Fakes, provider: str) -> FakeProvider:
    return {"openai": fakes.main, "azure": fakes.azure, "anthropic": fakes.anthropic, "gemini": fakes.gemini,
            "cohere": fakes.cohere, "bedrock": fakes.bedrock}[provider]


_PARTITIONER = DefaultPartitioner()


def _partition(request_id: str) -> int:
    """The partition of the provider's topic the router sends a request to (it keys by request id)."""
    parts = list(range(topics.PROVIDER_PARTITIONS))
    return int(_PARTITIONER(request_id.encode(), parts, parts))


def _post(stack: RunningStack, path: str, body: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, headers={**stack.headers(), "x-switchyard-timeout": "60"},
                      timeout=timeout)


def _assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"], error
    return dict(error)


def _then_the_same_partition_serves(stack: RunningStack, provider: str, poison_id: str) -> None:
    """Normal requests until one lands on the poison's partition (about 1 in 16): it must be answered."""
    target = _partition(poison_id)
    for i in range(300):
        r = _post(stack, "/v1/chat/completions", {"model": MODELS[provider],
                                                  "messages": [{"role": "user", "content": f"after poison {i}"}]})
        assert r.status_code == 200, r.text
        if _partition(r.headers["x-request-id"]) == target:
            return
    raise AssertionError("no request landed on the poison's partition")


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_poison_bodies_get_400s_from_every_provider_format_and_the_pool_keeps_serving(
        stack: RunningStack, fakes: Fakes, provider: str, restarts_before: dict[str, int]) -> None:
    fake = _fake(fakes, provider)
    ids = []
    for case in POISON:
        shape, param = case.values
        for stream in (False, True):
            body = {"model": MODELS[provider], **shape, "stream": stream}  # type: ignore[dict-item]
            r = _post(stack, "/v1/chat/completions", body)
            error = _assert_openai_error(r, 400)
            assert (error["type"], error["param"]) == ("invalid_request_error", param), error
            ids.append(r.headers["x-request-id"])
    assert fake.calls() == []  # refused before anything was sent upstream
    for poison_id in ids[:2]:
        _then_the_same_partition_serves(stack, provider, poison_id)
    assert restarts(stack) == restarts_before


OTHER_REFUSALS = [
    pytest.param("anthropic", "/v1/embeddings", {"input": ["a"]}, "model", id="anthropic-embeddings"),
    pytest.param("bedrock", "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": [
                     {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
                 "messages[0].content[0]", id="bedrock-remote-image"),
    pytest.param("bedrock", "/v1/chat/completions",
                 {"messages": [USER], "response_format": {"type": "json_object"}, "strict": True},
                 "response_format", id="bedrock-strict-json-mode"),
]


@pytest.mark.parametrize(("provider", "path", "shape", "param"), OTHER_REFUSALS)
def test_other_bodies_an_adapter_cannot_express_are_400s(stack: RunningStack, fakes: Fakes, provider: str,
                                                         path: str, shape: dict[str, Any], param: str | None,
                                                         restarts_before: dict[str, int]) -> None:
    r = _post(stack, path, {"model": MODELS[provider], **shape})
    error = _assert_openai_error(r, 400)
    if param is not None:
        assert error["param"] == param, error
    assert _fake(fakes, provider).calls() == []
    _then_the_same_partition_serves(stack, provider, r.headers["x-request-id"])
    assert restarts(stack) == restarts_before


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_an_unparseable_answer_is_a_502_that_the_router_retries(stack: RunningStack, fakes: Fakes, provider: str,
                                                                restarts_before: dict[str, int]) -> None:
    """Every adapter's parser meets a 200 whose body is not JSON: the attempt fails with a 502
    `bad_upstream_response`, which the router retries (here on the same, now healthy, deployment)."""
    fake = _fake(fakes, provider)
    fake.inject(malformed=True)
    r = _post(stack, "/v1/chat/completions", {"model": MODELS[provider], "messages": [USER]})
    assert r.status_code == 200, r.text
    assert "attempt=1" in r.headers["x-switchyard-route"]
    assert len(fake.calls()) == 2
    _then_the_same_partition_serves(stack, provider, r.headers["x-request-id"])
    assert restarts(stack) == restarts_before


def test_an_answer_that_never_parses_ends_in_a_clean_502(stack: RunningStack, fakes: Fakes,
                                                        restarts_before: dict[str, int]) -> None:
    fakes.faulty.inject(malformed=True, times=100)
    try:
        r = httpx.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), timeout=300,
                       json={"model": "faulty", "messages": [USER]})
        error = _assert_openai_error(r, 502)
        assert error["code"] == "bad_upstream_response", error
        assert len(fakes.faulty.calls()) >= 2  # retried, then answered
    finally:
        fakes.faulty.reset()
    assert restarts(stack) == restarts_before


# ---- batch envelopes written straight to llm.requests ------------------------------------------------------


async def _produce_raw(stack: RunningStack, value: bytes) -> None:
    producer = make_producer(stack.bootstrap)
    await start_client(producer, "test-raw-envelopes")
    try:
        await send_and_wait(producer, topics.REQUESTS, value, key=uuid.uuid4().hex.encode(),
                            headers=[("traceparent", b"00-raw-01")])
    finally:
        await producer.stop()


def _nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


def _envelope(reply_topic: str, marker: str, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "id": uuid.uuid4().hex, "model": "gpt-test", "kind": "chat", "reply_topic": reply_topic,
            "reply_partition": 0, "priority": "batch", "custom_id": marker,
            "body": {"model": "gpt-test", "messages": [{"role": "user", "content": f"secret prompt {marker}"}]},
            **extra}


def _raw(envelope: dict[str, Any], deep: int = 0) -> bytes:
    """The envelope's JSON, with a member nested `deep` levels inside its body (spliced in as text: neither
    orjson nor pydantic would write past their own limits)."""
    raw = orjson.dumps(envelope)
    if deep:
        raw = raw.replace(b'"body":{', b'"body":{"deep":' + b"[" * deep + b"]" * deep + b",", 1)
    return raw


async def test_batch_envelopes_that_cannot_be_read_are_answered_on_their_reply_topic(
        stack: RunningStack, fakes: Fakes, restarts_before: dict[str, int]) -> None:
    reply_topic = f"test.unreadable.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {reply_topic: 1})
    marker = uuid.uuid4().hex[:8]
    too_deep = _envelope(reply_topic, f"deep-body {marker}")  # past ingress's limit, readable by the router
    too_deep["body"]["metadata"] = {"tree": _nested(100)}
    past_parser = _envelope(reply_topic, f"past-parser {marker}")  # past what pydantic reads (200)
    past_orjson = _envelope(reply_topic, f"past-orjson {marker}")  # past what orjson reads (1024)
    no_model = _envelope(reply_topic, f"no-model {marker}")
    del no_model["model"]
    wrong_kind = _envelope(reply_topic, f"wrong-kind {marker}", kind="images", priority=7)
    cases = [(too_deep, _raw(too_deep), "nesting_too_deep"),
             (past_parser, _raw(past_parser, deep=300), "invalid_envelope"),
             (past_orjson, _raw(past_orjson, deep=2000), "invalid_envelope"),
             (no_model, _raw(no_model), "invalid_envelope"),
             (wrong_kind, _raw(wrong_kind), "invalid_envelope")]
    for _, raw, _ in cases:
        await _produce_raw(stack, raw)

    replies = {r.id: r for r in await read_replies(stack.bootstrap, reply_topic, want=len(cases))}
    for envelope, _, code in cases:
        reply = replies.get(envelope["id"])
        assert reply is not None, f"{envelope['custom_id']}: no answer"
        assert (reply.type, reply.status, reply.custom_id) == ("error", 400, envelope["custom_id"]), reply
        assert reply.data is not None
        error = reply.data["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", code), error
        assert "secret prompt" not in error["message"]  # names fields, never values
    assert "model: Field required" in replies[no_model["id"]].data["error"]["message"]  # type: ignore[index]
    message = replies[wrong_kind["id"]].data["error"]["message"]  # type: ignore[index]
    assert "kind:" in message and "priority:" in message
    assert replies[too_deep["id"]].data["error"]["param"] == "metadata"  # type: ignore[index]
    assert not [c for c in fakes.main.calls("/chat/completions") if marker in orjson.dumps(c.body).decode()]
    assert restarts(stack) == restarts_before


async def test_batch_envelopes_with_no_readable_reply_topic_are_dead_lettered(
        stack: RunningStack, restarts_before: dict[str, int]) -> None:
    marker = uuid.uuid4().hex
    no_topic: dict[str, Any] = {"v": 1, "id": f"no-topic-{marker}", "model": "gpt-test", "body": {"messages": []}}
    missing_topic = _envelope(f"test.never-created.{marker[:8]}", marker)
    del missing_topic["body"]
    await _produce_raw(stack, orjson.dumps(no_topic))
    await _produce_raw(stack, orjson.dumps(missing_topic))
    await _produce_raw(stack, b"not an envelope " + marker.encode())

    [dead] = await asyncio.to_thread(wait_dead, stack, no_topic["id"])
    assert (dead["reason"], dead["service"], dead["topic"]) == (UNREADABLE, "router", topics.REQUESTS)
    assert "reply_topic: Field required" in dead["error"]
    [gone] = await asyncio.to_thread(wait_dead, stack, missing_topic["id"])
    assert gone["reason"] == UNREADABLE and "does not exist" in gone["error"]
    assert "body: Field required" in gone["error"]

    deadline = time.time() + 30
    listed: list[dict[str, Any]] = []
    while time.time() < deadline and not listed:
        result = stack.cli("dead", "list", "--json", "--limit", "1000")
        listed = [d for d in orjson.loads(result.stdout) if d["reason"] == UNREADABLE and d["request_id"] is None
                  and d["bytes"] == len(b"not an envelope " + marker.encode())]
        await asyncio.sleep(0.5)
    assert listed, "the bytes that are no envelope at all were not dead-lettered"
    assert restarts(stack) == restarts_before
