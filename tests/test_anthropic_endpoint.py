"""`/v1/messages` through the whole pipeline with the official anthropic SDK, an OpenAI provider behind it."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import Fakes
from tests.stack import RunningStack

TOOL = {"name": "lookup", "description": "Look something up",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}


@pytest.fixture
def client(stack: RunningStack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key="sk-test-master", max_retries=0, timeout=60)


def test_messages_create(client: anthropic.Anthropic, fakes: Fakes) -> None:
    msg = client.messages.create(model="gpt-test", max_tokens=100, system="be brief",
                                 messages=[{"role": "user", "content": "hello claude"}])
    assert msg.content[0].type == "text" and msg.content[0].text == "Echo: hello claude"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens > 0
    sent = fakes.main.calls("/chat/completions")[0].body
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["max_tokens"] == 100


def test_messages_tools_round_trip(client: anthropic.Anthropic, fakes: Fakes) -> None:
    first = client.messages.create(model="gpt-test", max_tokens=100, tools=[TOOL],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "find cats"}])
    assert first.stop_reason == "tool_use"
    use: Any = next(b for b in first.content if b.type == "tool_use")
    assert use.name == "lookup" and use.input == {"query": "find cats"}
    second = client.messages.create(model="gpt-test", max_tokens=100, tools=[TOOL],  # type: ignore[list-item]
                                    messages=[{"role": "user", "content": "find cats"},
                                              {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
                                              {"role": "user", "content": [{"type": "tool_result",
                                                                            "tool_use_id": use.id,
                                                                            "content": "3 cats"}]}])
    assert second.stop_reason == "end_turn"
    upstream = fakes.main.calls("/chat/completions")[-1].body["messages"]
    assert upstream[-1] == {"role": "tool", "tool_call_id": use.id, "content": "3 cats"}


def test_messages_stream_text_and_usage(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="gpt-test", max_tokens=100,
                                messages=[{"role": "user", "content": "one two three"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: one two three"
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_messages_stream_tool_call(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="gpt-test", max_tokens=100, tools=[TOOL],  # type: ignore[list-item]
                                messages=[{"role": "user", "content": "a longer query to split"}]) as stream:
        final = stream.get_final_message()
    use: Any = next(b for b in final.content if b.type == "tool_use")
    assert use.input == {"query": "a longer query to split"}
    assert final.stop_reason == "tool_use"


def test_messages_errors_in_anthropic_shape(client: anthropic.Anthropic, stack: RunningStack) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="nope", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    bad = anthropic.Anthropic(base_url=stack.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="gpt-test", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    r = httpx.post(f"{stack.url}/v1/messages", headers={"x-api-key": "sk-test-master"}, timeout=30,
                   json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]


def test_provider_error_maps_to_anthropic_error(client: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.faulty.inject(status=400, message="bad upstream request")
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="faulty", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    # The provider refusing the gateway's own credentials is the operator's problem, not the caller's: a 502
    # that names no provider detail (issue 18), in Anthropic's error shape.
    fakes.faulty.inject(status=401, message="bad upstream key")
    with pytest.raises(anthropic.InternalServerError) as failed:
        client.messages.create(model="faulty", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502 and failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "bad upstream key" not in str(failed.value.body)


def test_count_tokens_is_a_marked_estimate(stack: RunningStack, client: anthropic.Anthropic) -> None:
    result = client.messages.count_tokens(model="gpt-test", messages=[{"role": "user", "content": "x" * 400}])
    assert result.input_tokens >= 100
    r = httpx.post(f"{stack.url}/v1/messages/count_tokens", headers={"x-api-key": "sk-test-master"}, timeout=30,
                   json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["x-switchyard-token-estimate"] == "true"
