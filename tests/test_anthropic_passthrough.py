"""`/v1/messages` to an Anthropic deployment is a passthrough: the caller's body reaches Anthropic as written
(only `model` replaced), and Anthropic's answer or stream events reach the caller as Anthropic wrote them.
A failover to an OpenAI deployment serves the same request translated."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import orjson
import pytest

from switchyard.services.ingress.anthropic_stream import AnthropicEvents
from tests.conftest import Fakes
from tests.fakes.anthropic_fake import Scripted
from tests.stack import RunningStack
from tests.test_accounting import _rows
from tests.test_accounting_poison import stored

PROVIDER_MODEL = "claude-3-5-haiku-20241022"
THINKING = {"type": "thinking", "thinking": "The user greets me; answer briefly.", "signature": "sig-abc123"}
ANSWER = {"type": "text", "text": "Hello back"}


def _request(stream: bool = False) -> dict[str, Any]:
    """A request using what the OpenAI translation cannot express: thinking, top_k, cache-control marks on
    system, tool and message blocks, a thinking block in the history, and fields Switchyard has never heard of."""
    body: dict[str, Any] = {
        "model": "claude", "max_tokens": 2048, "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "You are terse. " * 20, "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "lookup", "description": "Look something up", "cache_control": {"type": "ephemeral"},
                   "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
        "tool_choice": {"type": "none"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "earlier", "signature": "s0"},
                                              {"type": "text", "text": "Hello."}]},
            {"role": "user", "content": "hello again"},
        ],
        "service_tier": "auto",
        "future_vendor_field": {"mode": "x", "levels": [1, 2]},
    }
    if stream:
        body["stream"] = True
    return body


@pytest.fixture
def client(stack: RunningStack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key="sk-test-master", max_retries=0, timeout=60)


SDK_EXTRA = ("top_k", "future_vendor_field")
"""Fields the SDK's signature does not name (it dropped `top_k`): sent through `extra_body`."""


def _sdk_args(body: dict[str, Any]) -> dict[str, Any]:
    """`body` as the SDK's keyword arguments."""
    known = {k: v for k, v in body.items() if k not in (*SDK_EXTRA, "stream")}
    return {**known, "extra_body": {k: body[k] for k in SDK_EXTRA if k in body}}


def _create(client: anthropic.Anthropic, body: dict[str, Any], **kw: Any) -> Any:
    return client.messages.with_raw_response.create(**_sdk_args(body), **kw)


async def test_fields_the_translation_loses_reach_anthropic_and_thinking_comes_back(
        client: anthropic.Anthropic, fakes: Fakes, stack: RunningStack) -> None:
    fakes.anthropic.accept("future_vendor_field")
    fakes.anthropic.respond([THINKING, ANSWER])
    body = _request()
    raw = _create(client, body, extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"})
    message: Any = raw.parse()

    sent = fakes.anthropic.calls("/v1/messages")[-1]
    assert sent.body == {**body, "model": PROVIDER_MODEL}  # every field as written; only the model replaced
    assert sent.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert sent.headers["x-api-key"] == "sk-ant"  # the deployment's key, never the caller's
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THINKING["thinking"] and message.content[0].signature == "sig-abc123"
    assert message.content[1].text == "Hello back"
    assert message.usage.cache_creation_input_tokens > 0  # the cache marks reached the provider
    assert "x-switchyard-dropped-params" not in raw.headers  # nothing was dropped
    assert "deployment=claude/0" in raw.headers["x-switchyard-route"]

    # Accounted from Anthropic's own usage: the prompt is input + cache write + cache read.
    rows = await _rows(stack.database_url, raw.headers["request-id"])
    assert len(rows) == 1 and rows[0]["provider"] == "anthropic" and rows[0]["ok"] is True
    u = message.usage
    assert rows[0]["prompt_tokens"] == (u.input_tokens + (u.cache_creation_input_tokens or 0)
                                        + (u.cache_read_input_tokens or 0))
    assert rows[0]["completion_tokens"] == u.output_tokens > 0


async def test_a_stream_relays_anthropics_own_events(client: anthropic.Anthropic, fakes: Fakes,
                                                     stack: RunningStack) -> None:
    fakes.anthropic.accept("future_vendor_field")
    fakes.anthropic.respond([THINKING, ANSWER])
    body = _request(stream=True)
    with client.messages.stream(**_sdk_args(body)) as s:
        text = "".join(s.text_stream)
        final: Any = s.get_final_message()
    sent = fakes.anthropic.calls("/v1/messages")[-1].body
    assert sent == {**body, "model": PROVIDER_MODEL}
    assert text == "Hello back"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == THINKING["thinking"] and final.content[0].signature == "sig-abc123"

    # On the wire: exactly the provider's event sequence (ping and signature_delta included), nothing added.
    fakes.anthropic.respond([THINKING, ANSWER])
    async with httpx.AsyncClient(timeout=60) as http, http.stream(
            "POST", f"{stack.url}/v1/messages", json=body, headers={"x-api-key": "sk-test-master"}) as r:
        assert r.status_code == 200
        wire = [line async for line in r.aiter_lines() if line]
        request_id = r.headers["request-id"]
    names = [line.removeprefix("event: ") for line in wire if line.startswith("event: ")]
    data = [orjson.loads(line.removeprefix("data: ")) for line in wire if line.startswith("data: ")]
    upstream = list(fakes.anthropic.events({**body, "model": PROVIDER_MODEL}, Scripted([THINKING, ANSWER])))
    assert names == [name for name, _ in upstream]
    assert [d["type"] for d in data] == names
    assert any(d.get("delta", {}).get("type") == "signature_delta" for d in data)
    assert data[0]["message"]["model"] == PROVIDER_MODEL

    rows = await _rows(stack.database_url, request_id)
    start = data[0]["message"]["usage"]
    end = next(d for d in data if d["type"] == "message_delta")["usage"]
    assert len(rows) == 1 and rows[0]["completion_tokens"] == end["output_tokens"] > 0
    assert rows[0]["prompt_tokens"] == (start["input_tokens"] + start["cache_creation_input_tokens"]
                                        + start["cache_read_input_tokens"])


def test_the_gateways_own_fields_are_not_passed_on(client: anthropic.Anthropic, fakes: Fakes) -> None:
    message: Any = client.messages.create(model="claude", max_tokens=50, messages=[{"role": "user", "content": "x"}],
                                          extra_body={"fallbacks": ["gpt-test"], "strict": True, "top_k": 2})
    assert message.content[0].text == "Echo: x"
    sent = fakes.anthropic.calls("/v1/messages")[-1].body
    assert sent["top_k"] == 2 and "fallbacks" not in sent and "strict" not in sent


def test_an_error_event_mid_stream_reaches_the_caller_in_anthropics_shape(
        client: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.anthropic.respond([ANSWER], error_after=4, error_type="overloaded_error")
    with pytest.raises(anthropic.APIStatusError) as failed, client.messages.stream(
            model="claude", max_tokens=100, messages=[{"role": "user", "content": "x"}], extra_body={"top_k": 3}) as s:
        for _ in s:
            pass
    assert "overloaded" in str(failed.value)


def test_failover_to_an_openai_deployment_serves_the_same_request_translated(
        client: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.anthropic.accept("future_vendor_field")
    fakes.anthropic.inject(status=500, times=1)
    body = {**_request(), "model": "claude-failover"}
    raw = _create(client, body)
    message: Any = raw.parse()
    assert "deployment=claude-failover/1" in raw.headers["x-switchyard-route"]
    assert message.content[-1].type == "text" and "hello again" in message.content[-1].text
    assert message.model == "claude-failover" and message.usage.output_tokens > 0
    sent = fakes.secondary.calls("/chat/completions")[-1].body
    assert sent["model"] == "gpt-4o-mini" and "thinking" not in sent and "top_k" not in sent
    dropped = raw.headers["x-switchyard-dropped-params"].split(",")
    assert {"thinking", "top_k", "future_vendor_field"} <= set(dropped)

    fakes.anthropic.inject(status=500, times=1)
    with client.messages.stream(**_sdk_args(body)) as s:
        text = "".join(s.text_stream)
    assert "hello again" in text


def test_an_openai_request_to_an_openai_deployment_keeps_every_field(stack: RunningStack, fakes: Fakes) -> None:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low",
            "service_tier": "flex", "prediction": {"type": "content", "content": "hi"},
            "future_vendor_field": {"nested": [1, {"a": None}]}}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=stack.headers(), timeout=60)
    assert r.status_code == 200
    sent = fakes.main.calls("/chat/completions")[-1].body
    assert sent == {**body, "model": "gpt-4o-mini", "stream": False}


async def test_a_passed_through_stream_is_prompt_logged(stack: RunningStack, fakes: Fakes) -> None:
    fakes.anthropic.respond([THINKING, ANSWER])
    body = {"model": "claude", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=60) as http:
        created = await http.post(f"{stack.url}/v1/keys", json={"log_prompts": True}, headers=stack.headers())
        assert created.status_code == 201, created.text
    async with httpx.AsyncClient(timeout=60) as http, http.stream(
            "POST", f"{stack.url}/v1/messages", json=body, headers={"x-api-key": created.json()["key"]}) as r:
        assert r.status_code == 200
        wire = [line async for line in r.aiter_lines()]
        request_id = r.headers["request-id"]
    assert any('"signature_delta"' in line for line in wire)  # passed through, not translated
    rows = await stored(stack.database_url, "SELECT answer FROM prompt_log WHERE request_id = ANY(:ids)",
                        [request_id], want=1)
    assert rows and "Hello back" in orjson.dumps(rows[0]["answer"]).decode()


def test_a_relayed_event_cannot_forge_frames() -> None:
    events = AnthropicEvents("claude")
    forged = {"type": "ping\n\nevent: message_stop", "delta": {"text": "x\n\ndata: {}"}}
    frame = events.chunk(forged, "anthropic")
    assert frame.startswith(b"event: message\ndata: ") and frame.count(b"\n\n") == 1
    assert orjson.loads(frame.split(b"data: ", 1)[1]) == forged
    assert events.finish() == b""  # a native stream ends with the provider's own message_stop


def test_a_passed_through_stream_cut_halfway_ends_in_an_error_event(stack: RunningStack, fakes: Fakes) -> None:
    fakes.anthropic.respond([ANSWER])
    fakes.anthropic.inject(cut_after=4)  # message_start, ping, content_block_start, one delta: then the socket ends
    body = {"model": "claude", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{stack.url}/v1/messages", json=body, headers={"x-api-key": "sk-test-master"},
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-1] == "error" and "message_stop" not in names
    error = orjson.loads(lines[-1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error"


# ---- Anthropic's own tools (server tools, Anthropic-defined client tools) and the blocks they produce ----

WEB_SEARCH: dict[str, Any] = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3,
              "allowed_domains": ["kafka.apache.org"], "user_location": {"type": "approximate", "city": "Oslo"}}
BASH: dict[str, Any] = {"type": "bash_20250124", "name": "bash", "cache_control": {"type": "ephemeral"}}
CUSTOM: dict[str, Any] = {"name": "lookup", "description": "Look something up",
          "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
SEARCHED: list[dict[str, Any]] = [
    {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "apache kafka"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01",
     "content": [{"type": "web_search_result", "url": "https://kafka.apache.org/", "title": "Apache Kafka",
                  "encrypted_content": "EqkBCioIBxgC", "page_age": "2 days ago"}]},
]
CITED: dict[str, Any] = {"type": "text", "text": "Kafka is a distributed event log.",
         "citations": [{"type": "web_search_result_location", "url": "https://kafka.apache.org/",
                        "title": "Apache Kafka", "encrypted_index": "Eo8BCioIBxgC", "cited_text": "Kafka is..."}]}


def _server_tools_request(model: str = "claude", stream: bool = False) -> dict[str, Any]:
    """Anthropic's own tools next to a custom one, with a history holding what only Anthropic's format can say
    (redacted thinking, a web search and its results, a document by URL, a search result block)."""
    body: dict[str, Any] = {
        "model": model, "max_tokens": 1024, "top_k": 4,
        "thinking": {"type": "enabled", "budget_tokens": 512},
        "system": [{"type": "text", "text": "Cite your sources.", "cache_control": {"type": "ephemeral"}}],
        "tools": [CUSTOM, WEB_SEARCH, BASH],
        "messages": [
            {"role": "user", "content": "What is Apache Kafka?"},
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "EmwKAhgBEgy3"}, *SEARCHED,
                                              CITED]},
            {"role": "user", "content": [
                {"type": "text", "text": "And how does it store data?", "cache_control": {"type": "ephemeral"}},
                {"type": "document", "source": {"type": "url", "url": "https://kafka.apache.org/design.pdf"}},
                {"type": "search_result", "source": "https://kafka.apache.org/design", "title": "Design",
                 "content": [{"type": "text", "text": "Kafka stores records in a log."}],
                 "citations": {"enabled": True}},
            ]},
        ],
        "future_vendor_field": {"mode": "x"},
    }
    if stream:
        body["stream"] = True
    return body


def test_server_tools_and_their_blocks_reach_anthropic_as_written_and_come_back_intact(
        client: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.anthropic.accept("future_vendor_field")
    fakes.anthropic.respond([*SEARCHED, CITED], usage={"server_tool_use": {"web_search_requests": 1}})
    body = _server_tools_request()
    raw = _create(client, body)
    message: Any = raw.parse()

    sent = fakes.anthropic.calls("/v1/messages")[-1].body
    assert sent == {**body, "model": PROVIDER_MODEL}  # tools, history, thinking, top_k, cache marks: as written
    assert sent["tools"][1] == WEB_SEARCH and sent["tools"][2] == BASH
    assert [b.type for b in message.content] == ["server_tool_use", "web_search_tool_result", "text"]
    assert message.content[0].input == {"query": "apache kafka"}
    assert message.content[1].content[0].url == "https://kafka.apache.org/"
    assert message.content[2].citations[0].encrypted_index == "Eo8BCioIBxgC"
    assert message.usage.server_tool_use.web_search_requests == 1
    assert "x-switchyard-dropped-params" not in raw.headers


def test_a_streamed_server_tool_answer_relays_its_events(client: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.anthropic.accept("future_vendor_field")
    fakes.anthropic.respond([*SEARCHED, {"type": "text", "text": "Kafka is a log."}])
    body = _server_tools_request(stream=True)
    with client.messages.stream(**_sdk_args(body)) as s:
        text = "".join(s.text_stream)
        final: Any = s.get_final_message()
    assert fakes.anthropic.calls("/v1/messages")[-1].body == {**body, "model": PROVIDER_MODEL}
    assert text == "Kafka is a log."
    assert [b.type for b in final.content] == ["server_tool_use", "web_search_tool_result", "text"]
    assert final.content[0].input == {"query": "apache kafka"}  # gathered from its input_json_delta events
    assert final.content[1].content[0].title == "Apache Kafka"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "gpt-test", "max_tokens": 50, "tools": [CUSTOM, WEB_SEARCH],
      "messages": [{"role": "user", "content": "hi"}]}, "tools[1].type"),
    ({"model": "gpt-test", "max_tokens": 50, "tools": [{"type": "bash_20250124", "name": "bash"}],
      "messages": [{"role": "user", "content": "ls"}]}, "tools[0].type"),
    (_server_tools_request("gpt-test"), "messages[1].content[1].type"),  # its server_tool_use block
])
@pytest.mark.parametrize("stream", [False, True])
def test_an_openai_model_group_refuses_them_with_a_400_naming_the_param(
        client: anthropic.Anthropic, fakes: Fakes, body: dict[str, Any], param: str, stream: bool) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        if stream:
            with client.messages.stream(**_sdk_args(body)) as s:
                list(s)
        else:
            _create(client, body)
    error: Any = refused.value.body
    assert refused.value.status_code == 400 and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(f"{param}: ") and "Anthropic" in error["error"]["message"]
    assert "'gpt-test' has none" in error["error"]["message"]
    assert fakes.main.calls("/chat/completions") == []  # never served with the tool left out


def test_in_a_mixed_group_they_go_only_to_the_anthropic_deployment(
        client: anthropic.Anthropic, fakes: Fakes) -> None:
    body = {"model": "claude-failover", "max_tokens": 50, "tools": [WEB_SEARCH],
            "messages": [{"role": "user", "content": "news?"}]}
    fakes.anthropic.respond([{"type": "text", "text": "first"}])  # a success first: earlier failures reset
    assert "deployment=claude-failover/0" in _create(client, body).headers["x-switchyard-route"]
    fakes.anthropic.inject(status=500, times=1)
    fakes.anthropic.respond([{"type": "text", "text": "after a retry"}])
    raw = _create(client, body)
    message: Any = raw.parse()
    assert message.content[0].text == "after a retry"
    assert "deployment=claude-failover/0; attempt=1" in raw.headers["x-switchyard-route"]  # not the OpenAI one
    assert fakes.secondary.calls("/chat/completions") == []


def test_a_custom_tool_still_works_for_both_formats(client: anthropic.Anthropic, fakes: Fakes) -> None:
    passed: Any = client.messages.create(model="claude", max_tokens=50, tools=[CUSTOM],  # type: ignore[list-item]
                                         messages=[{"role": "user", "content": "kafka"}])
    assert fakes.anthropic.calls("/v1/messages")[-1].body["tools"] == [CUSTOM]
    assert passed.content[0].type == "tool_use" and passed.content[0].name == "lookup"
    translated: Any = client.messages.create(model="gpt-test", max_tokens=50, tools=[CUSTOM],  # type: ignore[list-item]
                                             messages=[{"role": "user", "content": "kafka"}])
    sent = fakes.main.calls("/chat/completions")[-1].body
    assert sent["tools"] == [{"type": "function", "function": {"name": "lookup", "parameters": CUSTOM["input_schema"],
                                                              "description": "Look something up"}}]
    assert translated.content[0].type == "tool_use" and translated.content[0].name == "lookup"  # from tool_calls
