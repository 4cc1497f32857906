"""Nesting depth of request bodies: one bound (MAX_JSON_DEPTH) that every stage can read, enforced by ingress.

Issue #11: a body nested 200-254 levels deep was accepted by ingress and dropped by the router (its
envelope decoder refuses > 200 levels), so the caller waited out the deadline; deeper bodies got a 503
(the envelope could not be encoded) or, inside an Anthropic `tool_use.input` / `input_schema`, a plain-text
500. Now ingress answers 400 `nesting_too_deep` before validation, and what it accepts goes all the way.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest

from switchyard.services.ingress import anthropic_api
from switchyard.services.ingress.validation import ChatCompletionRequest, parse_json, validate
from switchyard.shared import topics
from switchyard.shared.contracts import MAX_JSON_DEPTH, RequestEnvelope, json_depth_exceeds
from switchyard.shared.errors import GatewayError
from switchyard.shared.kafka_delivery import encode
from tests.stack import RunningStack

DEADLINE = {topics.HEADER_TIMEOUT: "30"}
"""A regression must fail fast, not wait out the default 300 s deadline."""

QUICK_S = 3.0
"""A refused body is answered at once: no Kafka round trip, no deadline."""


def nested(levels: int, leaf: Any = "x") -> Any:
    """`levels` objects inside one another around `leaf`: `nested(2) == {"a": {"a": "x"}}`."""
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


DEEP = "@deep"


def deep(body: dict[str, Any], levels: int) -> bytes:
    """`body` as JSON with its DEEP leaf replaced by `levels` nested objects (written as text: a JSON encoder
    refuses to write what is too deep, which is the point of these bodies)."""
    return orjson.dumps(body).replace(b'"' + DEEP.encode() + b'"', b'{"a":' * levels + b'"x"' + b"}" * levels)


def chat(levels: int) -> bytes:
    """A chat body whose unknown field `x` holds `levels` objects (the whole body is `levels + 1` deep)."""
    return deep({"model": "gpt-test", "messages": [{"role": "user", "content": "deep"}], "x": DEEP}, levels)


def messages_with_tool_input(levels: int) -> bytes:
    """An Anthropic body whose `tool_use.input` holds `levels` objects (it sits 5 levels down)."""
    return deep({"model": "gpt-test", "max_tokens": 16, "messages": [
        {"role": "user", "content": "call it"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": DEEP}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"}]},
    ]}, levels)


def count_tokens_with_schema(levels: int) -> bytes:
    """A count_tokens body whose `tools[0].input_schema` holds `levels` objects (it sits 3 levels down)."""
    return deep({"model": "gpt-test", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}],
                 "tools": [{"name": "f", "input_schema": DEEP}]}, levels)


# ---------------------------------------------------------------- the bound itself (no stack)


@pytest.mark.parametrize(("value", "depth"), [
    ("x", 0), ({}, 1), ([], 1), ({"a": [1, "b", None]}, 2), ([[[]]], 3), ({"a": [1, {"b": []}]}, 4),
    (nested(7), 7), ([{"a": 1}, {"b": nested(5)}, []], 7),
])
def test_depth_is_counted_in_levels_of_objects_and_arrays(value: Any, depth: int) -> None:
    assert not json_depth_exceeds(value, depth)
    assert json_depth_exceeds(value, depth - 1) == (depth > 0)


def test_a_very_deep_value_is_refused_without_recursion() -> None:
    assert json_depth_exceeds(nested(100_000))


def test_the_deepest_accepted_body_survives_every_stage_s_decoder() -> None:
    """What ingress accepts is what the router and the workers can read: check the raw body as ingress does,
    translate it (Anthropic's `input_schema` becomes one level deeper), encode the envelope as ingress does,
    decode it as the router does, re-encode it as the router does and decode it as a worker does."""
    for raw, translate in ((chat(MAX_JSON_DEPTH - 1), dict),
                           (count_tokens_with_schema(MAX_JSON_DEPTH - 3), anthropic_api.to_openai_request)):
        body = translate(parse_json(raw))
        validate(ChatCompletionRequest, body)
        envelope = RequestEnvelope(id="r", model="gpt-test", body=body, reply_topic=topics.REPLIES)
        routed = RequestEnvelope.model_validate_json(encode(envelope))
        assert RequestEnvelope.model_validate_json(encode(routed)).body == body


def test_one_level_deeper_is_refused_with_the_limit_named() -> None:
    parse_json(chat(MAX_JSON_DEPTH - 1))
    with pytest.raises(GatewayError) as refused:
        parse_json(chat(MAX_JSON_DEPTH))
    err = refused.value
    assert (err.status, err.code, err.param) == (400, "nesting_too_deep", "x")
    assert str(MAX_JSON_DEPTH) in err.message


# ---------------------------------------------------------------- through the real stack


def _post(stack: RunningStack, path: str, body: bytes, method: str = "POST") -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = httpx.request(method, f"{stack.url}{path}", content=body,
                      headers={**stack.headers(), **DEADLINE}, timeout=60)
    return r, time.monotonic() - started


def _assert_too_deep(r: httpx.Response, elapsed: float, anthropic_shape: bool = False) -> None:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert elapsed < QUICK_S, elapsed
    error = r.json()["error"]
    if anthropic_shape:
        assert r.json()["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", "nesting_too_deep")
    assert f"at most {MAX_JSON_DEPTH} levels" in error["message"]


def test_the_deepest_accepted_chat_body_is_answered(stack: RunningStack) -> None:
    r, _ = _post(stack, "/v1/chat/completions", chat(MAX_JSON_DEPTH - 1))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Echo: deep"


def test_the_deepest_accepted_legacy_and_embeddings_bodies_are_answered(stack: RunningStack) -> None:
    legacy = deep({"model": "gpt-test", "prompt": "deep", "metadata": DEEP}, MAX_JSON_DEPTH - 1)
    r, _ = _post(stack, "/v1/completions", legacy)
    assert r.status_code == 200, r.text
    embeddings = deep({"model": "gpt-test", "input": "deep", "x": DEEP}, MAX_JSON_DEPTH - 1)
    r, _ = _post(stack, "/v1/embeddings", embeddings)
    assert r.status_code == 200, r.text


def test_the_deepest_accepted_anthropic_bodies_are_answered(stack: RunningStack) -> None:
    r, _ = _post(stack, "/v1/messages", messages_with_tool_input(MAX_JSON_DEPTH - 5))
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message"
    r, _ = _post(stack, "/v1/messages/count_tokens", count_tokens_with_schema(MAX_JSON_DEPTH - 3))
    assert r.status_code == 200, r.text
    assert r.json()["input_tokens"] > 0


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH, 199, 254, 300, 2000])
def test_deeper_chat_bodies_are_refused_at_once(stack: RunningStack, levels: int) -> None:
    """Issue #11: 199-253 levels in `x` waited out the deadline (the router dropped the envelope), 254 and more
    got a 503 (the envelope could not be encoded); past 1024, orjson's own limit answers, with our message."""
    r, elapsed = _post(stack, "/v1/chat/completions", chat(levels))
    _assert_too_deep(r, elapsed)
    if levels <= 1000:
        assert r.json()["error"]["param"] == "x"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/completions", {"model": "gpt-test", "prompt": "x", "metadata": DEEP}),
    ("POST", "/v1/embeddings", {"model": "gpt-test", "input": "x", "x": DEEP}),
    ("POST", "/v1/keys", {"name": "deep", "metadata": DEEP}),
    ("PATCH", "/v1/keys/no-such-key", {"metadata": DEEP}),
    ("PUT", "/v1/budgets/team/deep", {"budget_usd": 1, "x": DEEP}),
], ids=lambda v: v if isinstance(v, str) and v.startswith("/") else "")
def test_every_body_reading_route_refuses_one_level_too_many(stack: RunningStack, method: str, path: str,
                                                            body: dict[str, Any]) -> None:
    r, elapsed = _post(stack, path, deep(body, MAX_JSON_DEPTH), method)
    _assert_too_deep(r, elapsed)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH - 4, 260, 300])
def test_a_deep_tool_use_input_is_a_400_not_a_plain_500(stack: RunningStack, levels: int) -> None:
    r, elapsed = _post(stack, "/v1/messages", messages_with_tool_input(levels))
    _assert_too_deep(r, elapsed, anthropic_shape=True)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH - 2, 260, 300])
def test_a_deep_input_schema_is_a_400_not_a_plain_500(stack: RunningStack, levels: int) -> None:
    r, elapsed = _post(stack, "/v1/messages/count_tokens", count_tokens_with_schema(levels))
    _assert_too_deep(r, elapsed, anthropic_shape=True)
