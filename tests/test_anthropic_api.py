"""The Anthropic Messages translation layer: every mapping as a unit, then the official `anthropic` SDK
against a small real HTTP app (translator + the built-in OpenAI-format demo provider)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from switchyard.devstack import demo_provider
from switchyard.services.ingress.anthropic_api import (
    ESTIMATE_HEADER,
    IMAGE_TOKEN_ESTIMATE,
    TOOL_ERROR_PREFIX,
    StreamTranslator,
    dropped_params,
    error_body,
    error_event,
    error_type,
    estimate_tokens,
    format_sse,
    from_openai_response,
    message_id,
    to_openai_request,
)
from switchyard.services.ingress.validation import ChatCompletionRequest, validate
from switchyard.shared.errors import GatewayError
from tests.fakes.server import free_port

Events = list[tuple[str, dict[str, Any]]]


def req(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "demo", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    body.update(over)
    return body


def bad(body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        to_openai_request(body)
    assert info.value.status == 400
    return info.value


TOOL = {"name": "get_weather", "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


# ------------------------------------------------------------------ request mapping


def test_minimal_request_maps_and_passes_the_openai_validator() -> None:
    out = to_openai_request(req(temperature=0.5, top_p=0.9))
    assert out == {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
                   "temperature": 0.5, "top_p": 0.9}
    validate(ChatCompletionRequest, out)


def test_system_string_and_text_blocks_become_a_leading_system_message() -> None:
    assert to_openai_request(req(system="be brief"))["messages"][0] == {"role": "system", "content": "be brief"}
    blocks = [{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "two"}]
    assert to_openai_request(req(system=blocks))["messages"][0] == {"role": "system", "content": "one\n\ntwo"}
    assert bad(req(system=[{"type": "image"}])).param == "system[0]"
    assert bad(req(system=5)).param == "system"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    (req(max_tokens=0), "max_tokens"),
    (req(max_tokens="10"), "max_tokens"),
    (req(max_tokens=True), "max_tokens"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    (req(model=""), "model"),
    (req(messages=[]), "messages"),
    (req(messages="hi"), "messages"),
    (req(messages=[{"role": "user", "content": []}]), "messages"),
    ({"model": "demo", "max_tokens": 5}, "messages"),
    (req(messages=[{"role": "system", "content": "x"}]), "messages[0].role"),
    (req(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}]), "messages[1].role"),
    (req(messages=[{"content": "x"}]), "messages[0].role"),
    (req(messages=[{"role": "user"}]), "messages[0].content"),
    (req(messages=[{"role": "user", "content": 7}]), "messages[0].content"),
    (req(messages=[{"role": "user", "content": [{"text": "no type"}]}]), "messages[0].content[0]"),
    (req(messages=[{"role": "user", "content": [{"type": "video"}]}]), "messages[0].content[0].type"),
    (req(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text"),
    (req(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]),
     "messages[0].content[0].source.type"),
    (req(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}]}]),
     "messages[0].content[0].source.media_type"),
    (req(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]),
     "messages[0].content[0].type"),
    (req(messages=[{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
     "messages[0].content[0].type"),
    (req(messages=[{"role": "assistant", "content": [{"type": "tool_use", "name": "n", "input": {}}]}]),
     "messages[0].content[0].id"),
    (req(messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": []}]}]),
     "messages[0].content[0].input"),
    (req(messages=[{"role": "user", "content": [{"type": "tool_result"}]}]), "messages[0].content[0].tool_use_id"),
    (req(temperature=1.5), "temperature"),
    (req(top_p=-0.1), "top_p"),
    (req(top_k=-1), "top_k"),
    (req(stop_sequences="END"), "stop_sequences"),
    (req(stream="yes"), "stream"),
    (req(metadata={"user_id": 5}), "metadata.user_id"),
    (req(tools=[{"name": "t"}]), "tools[0].input_schema"),
    (req(tools=[{"input_schema": {}}]), "tools[0].name"),
    (req(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type"),
    (req(tools=[TOOL], tool_choice={"type": "tool"}), "tool_choice.name"),
    (req(tools=[TOOL], tool_choice={"type": "sometimes"}), "tool_choice.type"),
    (req(tools=[TOOL], tool_choice="auto"), "tool_choice"),
    (req(tool_choice={"type": "any"}), "tool_choice"),
])
def test_invalid_requests_are_400s_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    err = bad(body)
    assert err.param == param, err.message
    assert error_body(err)["error"]["type"] == "invalid_request_error"


def test_missing_max_tokens_says_required() -> None:
    err = bad({"model": "demo", "messages": [{"role": "user", "content": "x"}]})
    assert err.code == "missing_required_parameter" and "max_tokens" in err.message


def test_images_base64_and_url_become_image_url_parts() -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    out = to_openai_request(req(messages=[{"role": "user", "content": content}]))
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}]
    validate(ChatCompletionRequest, out)


def test_documents_become_file_or_text_parts() -> None:
    content = [
        {"type": "document", "title": "a.pdf", "source": {"type": "base64", "media_type": "application/pdf",
                                                          "data": "JVBERi0="}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain words"}},
    ]
    out = to_openai_request(req(messages=[{"role": "user", "content": content}]))
    assert out["messages"][0]["content"] == [
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
        {"type": "text", "text": "plain words"},
    ]


def test_single_text_block_collapses_to_a_string_and_thinking_blocks_are_dropped() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
        {"role": "assistant", "content": "prefill"},
    ]
    out = to_openai_request(req(messages=messages))
    assert out["messages"] == [{"role": "user", "content": "hello"},
                               {"role": "assistant", "content": "Hi there"},
                               {"role": "assistant", "content": "prefill"}]


def test_tool_use_and_tool_result_round_trip_messages() -> None:
    messages = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "call_2", "is_error": True,
             "content": [{"type": "text", "text": "station"}, {"type": "text", "text": "offline"}]},
            {"type": "text", "text": "thanks"},
        ]},
    ]
    out = to_openai_request(req(messages=messages, tools=[TOOL]))
    assert out["messages"] == [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": TOOL_ERROR_PREFIX + "station\noffline"},
        {"role": "user", "content": "thanks"},
    ]
    validate(ChatCompletionRequest, out)


def test_assistant_with_only_tool_use_has_null_content_and_empty_tool_result_is_empty_text() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "run", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c"}]},
    ]
    out = to_openai_request(req(messages=messages))
    assert out["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "run", "arguments": "{}"}}]}
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "c", "content": ""}


def test_images_inside_a_tool_result_follow_in_a_user_message() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "abc"}}
    messages = [
        {"role": "user", "content": "shot?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c",
                                      "content": [{"type": "text", "text": "here"}, image]}]},
    ]
    out = to_openai_request(req(messages=messages))
    assert out["messages"][2:] == [
        {"role": "tool", "tool_call_id": "c", "content": "here"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,abc"}}]},
    ]


def test_tools_and_tool_choice() -> None:
    out = to_openai_request(req(tools=[TOOL, {"name": "noop", "input_schema": {"type": "object"}, "type": "custom"}]))
    assert out["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                          "parameters": TOOL["input_schema"]}},
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}},
    ]
    assert "tool_choice" not in out
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ]
    for choice, expected in cases:
        assert to_openai_request(req(tools=[TOOL], tool_choice=choice))["tool_choice"] == expected
    out = to_openai_request(req(tools=[TOOL], tool_choice={"type": "auto", "disable_parallel_tool_use": True}))
    assert out["parallel_tool_calls"] is False
    validate(ChatCompletionRequest, out)
    # auto/none without tools: nothing to choose from, so nothing is sent
    assert "tool_choice" not in to_openai_request(req(tool_choice={"type": "auto"}))


def test_stop_stream_metadata_and_dropped_fields() -> None:
    body = req(stop_sequences=["END", "STOP"], stream=True, metadata={"user_id": "u-42"}, top_k=5,
               thinking={"type": "enabled", "budget_tokens": 1024}, service_tier="auto")
    out = to_openai_request(body)
    assert out["stop"] == ["END", "STOP"]
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert out["user"] == "u-42"
    for gone in ("top_k", "thinking", "service_tier", "metadata", "stop_sequences"):
        assert gone not in out
    assert dropped_params(body) == ["service_tier", "thinking", "top_k"]
    assert dropped_params(req()) == []
    assert "stream" not in to_openai_request(req(stream=False))
    assert "stop" not in to_openai_request(req(stop_sequences=[]))
    validate(ChatCompletionRequest, out)


# ------------------------------------------------------------------ response mapping


def completion(message: dict[str, Any], finish: str | None = "stop", usage: dict[str, Any] | None = None,
               cid: str = "chatcmpl-abc123") -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": 1, "model": "provider-model",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}


def test_text_response() -> None:
    out = from_openai_response(completion({"content": "Hello!"}), "claude-alias")
    assert out == {"id": "msg_abc123", "type": "message", "role": "assistant", "model": "claude-alias",
                   "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 0,
                             "cache_creation_input_tokens": 0}}


def test_tool_call_response_parses_arguments() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": ""}},
             {"id": "call_3", "type": "function", "function": {"name": "broken", "arguments": "{not json"}}]
    out = from_openai_response(completion({"content": "Checking.", "tool_calls": calls}, "tool_calls"), "m")
    assert out["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "noop", "input": {}},
        {"type": "tool_use", "id": "call_3", "name": "broken", "input": {"_raw_arguments": "{not json"}},
    ]
    assert out["stop_reason"] == "tool_use"
    # a provider that says "stop" while calling tools still means tool_use to Anthropic clients
    assert from_openai_response(completion({"content": None, "tool_calls": calls[:1]}, "stop"), "m")[
        "stop_reason"] == "tool_use"


@pytest.mark.parametrize(("finish", "reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("function_call", "tool_use"),
    ("content_filter", "refusal"), (None, "end_turn"), ("something_new", "end_turn"),
])
def test_finish_reasons(finish: str | None, reason: str) -> None:
    assert from_openai_response(completion({"content": "x"}, finish), "m")["stop_reason"] == reason


def test_usage_splits_cached_tokens_out_of_input_tokens() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 60}}
    out = from_openai_response(completion({"content": "x"}, usage=usage), "m")
    assert out["usage"] == {"input_tokens": 40, "output_tokens": 7, "cache_read_input_tokens": 60,
                            "cache_creation_input_tokens": 0}


def test_refusal_and_empty_responses() -> None:
    out = from_openai_response(completion({"content": None, "refusal": "I can't help with that."}), "m")
    assert out["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert out["stop_reason"] == "refusal"
    empty = from_openai_response({"id": "chatcmpl-x", "choices": []}, "m")
    assert empty["content"] == [] and empty["stop_reason"] == "end_turn"
    assert empty["usage"]["input_tokens"] == 0
    assert from_openai_response({"choices": []}, "m")["id"].startswith("msg_")
    assert message_id("chatcmpl-xyz") == "msg_xyz" and message_id(None).startswith("msg_")


# ------------------------------------------------------------------ streaming


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "model": "pm",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}


def usage_chunk(prompt: int = 12, completion_tokens: int = 5, cached: int = 2) -> dict[str, Any]:
    return {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "model": "pm", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                      "total_tokens": prompt + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}}


def run(translator: StreamTranslator, chunks: list[dict[str, Any]]) -> Events:
    events: Events = []
    for c in chunks:
        events += translator.feed(c)
    return events + translator.finish()


def test_text_stream_exact_event_sequence() -> None:
    events = run(StreamTranslator("claude-alias"), [
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk({}, "stop"), usage_chunk(),
    ])
    assert events == [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_s1", "type": "message", "role": "assistant", "model": "claude-alias", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                      "cache_creation_input_tokens": 0}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hel"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "lo"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2,
                                     "cache_creation_input_tokens": 0}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def test_message_delta_waits_for_the_usage_chunk_then_finish_adds_nothing() -> None:
    t = StreamTranslator("m")
    t.feed(chunk({"content": "x"}))
    after_finish_reason = t.feed(chunk({}, "length"))
    assert [e for e, _ in after_finish_reason] == ["content_block_stop"]
    at_usage = t.feed(usage_chunk(prompt=3, completion_tokens=1, cached=0))
    assert [e for e, _ in at_usage] == ["message_delta", "message_stop"]
    assert at_usage[0][1]["delta"]["stop_reason"] == "max_tokens"
    assert at_usage[0][1]["usage"]["output_tokens"] == 1
    assert t.done and t.finish() == [] and t.feed(chunk({"content": "late"})) == []


def test_stream_without_usage_is_completed_by_finish() -> None:
    t = StreamTranslator("m", message_id="msg_fixed")
    events = run(t, [chunk({"content": "a"}), chunk({}, "stop")])
    assert events[0][1]["message"]["id"] == "msg_fixed"
    assert [e for e, _ in events][-2:] == ["message_delta", "message_stop"]
    assert events[-2][1]["usage"]["output_tokens"] == 0
    assert t.finish() == []


def test_empty_stream_still_produces_a_complete_message() -> None:
    events = StreamTranslator("m").finish()
    assert [e for e, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert events[1][1]["delta"]["stop_reason"] == "end_turn"


def test_text_then_several_tool_calls_by_index() -> None:
    events = run(StreamTranslator("m"), [
        chunk({"role": "assistant", "content": "Checking"}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]}),
        chunk({}, "tool_calls"), usage_chunk(),
    ])
    compact = [(e, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type")) for e, d in events]
    assert compact == [
        ("message_start", None, None),
        ("content_block_start", 0, "text"), ("content_block_delta", 0, "text_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"), ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("message_delta", None, None), ("message_stop", None, None),
    ]
    assert events[4][1]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}
    assert events[5][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":'}
    assert events[8][1]["content_block"]["id"] == "call_b"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_tool_call_fragments_without_index_follow_their_id() -> None:
    events = run(StreamTranslator("m"), [
        chunk({"tool_calls": [{"id": "c1", "function": {"name": "a", "arguments": "{"}}]}),
        chunk({"tool_calls": [{"function": {"arguments": "}"}}]}),
        chunk({"tool_calls": [{"id": "c2", "function": {"name": "b", "arguments": "{}"}}]}),
        chunk({}, "stop"),
    ])
    starts = [d["content_block"]["id"] for e, d in events if e == "content_block_start"]
    assert starts == ["c1", "c2"]
    deltas = [(d["index"], d["delta"]["partial_json"]) for e, d in events if e == "content_block_delta"]
    assert deltas == [(0, "{"), (0, "}"), (1, "{}")]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"  # tools called, provider said "stop"


def test_demo_provider_stream_translates_to_a_consistent_message() -> None:
    body = to_openai_request(req(stream=True, messages=[{"role": "user", "content": "one two three"}]))
    events = run(StreamTranslator("demo"), list(demo_provider.stream_events(body)))
    text = "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta")
    assert text == "Echo: one two three"
    full = demo_provider.completion_for(body)
    assert events[-2][1]["usage"]["output_tokens"] == full["usage"]["completion_tokens"]
    assert events[-2][1]["usage"]["input_tokens"] == full["usage"]["prompt_tokens"]


def test_sse_framing_and_error_event() -> None:
    assert format_sse("message_stop", {"type": "message_stop"}) == \
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    name, data = error_event(GatewayError(503, "upstream overloaded"))
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "overloaded_error", "message": "upstream overloaded"}}


# ------------------------------------------------------------------ errors and count_tokens


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (422, "invalid_request_error"), (409, "invalid_request_error"),
    (401, "authentication_error"), (402, "billing_error"), (403, "permission_error"), (404, "not_found_error"),
    (408, "timeout_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
    (502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"), (529, "overloaded_error"),
])
def test_error_types_by_status(status: int, kind: str) -> None:
    assert error_type(status) == kind
    body = error_body(GatewayError(status, "boom"), request_id="req_1")
    assert body == {"type": "error", "error": {"type": kind, "message": "boom"}, "request_id": "req_1"}


def test_estimate_tokens_counts_all_text_schemas_and_images() -> None:
    text = "x" * 40
    body = {"model": "demo", "system": "s" * 8, "messages": [{"role": "user", "content": text}]}
    assert estimate_tokens(body) == {"input_tokens": 12}  # (8 + 40) / 4
    with_tools = {**body, "tools": [TOOL]}
    fn_chars = len(orjson.dumps({"name": TOOL["name"], "parameters": TOOL["input_schema"],
                                 "description": TOOL["description"]}))
    assert estimate_tokens(with_tools)["input_tokens"] == -(-(48 + fn_chars) // 4)
    image = {"type": "image", "source": {"type": "url", "url": "https://e.x/a.png"}}
    with_image = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": text}, image]}]}
    assert estimate_tokens(with_image)["input_tokens"] == 12 + IMAGE_TOKEN_ESTIMATE
    assert estimate_tokens({"model": "m", "messages": [{"role": "user", "content": ""}]}) == {"input_tokens": 1}
    with pytest.raises(GatewayError) as info:
        estimate_tokens({"model": "demo", "messages": []})
    assert info.value.param == "messages"


# ------------------------------------------------------------------ the official SDK against a live app

SEEN: list[dict[str, Any]] = []


def _sdk_app() -> FastAPI:
    app = FastAPI()

    def anthropic_error(err: GatewayError, request_id: str) -> Response:
        headers = {**err.response_headers(), "request-id": request_id}
        return Response(orjson.dumps(error_body(err, request_id)), status_code=err.status, headers=headers,
                        media_type="application/json")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        request_id = "req_" + uuid.uuid4().hex
        body = orjson.loads(await request.body())
        user = (body.get("metadata") or {}).get("user_id")
        try:
            if user == "rate-limited":
                raise GatewayError(429, "Rate limit reached for this key.", retry_after_s=7)
            oa = to_openai_request(body)
        except GatewayError as e:
            return anthropic_error(e, request_id)
        SEEN.append(oa)
        headers = {"request-id": request_id}
        if not oa.get("stream"):
            return Response(orjson.dumps(from_openai_response(demo_provider.completion_for(oa), body["model"])),
                            media_type="application/json", headers=headers)
        translator = StreamTranslator(body["model"])

        def sse() -> Iterator[bytes]:
            for n, c in enumerate(demo_provider.stream_events(oa)):
                if user == "mid-stream-failure" and n == 3:
                    yield format_sse(*error_event(GatewayError(529, "Provider overloaded."), request_id))
                    return
                for event, data in translator.feed(c):
                    yield format_sse(event, data)
            for event, data in translator.finish():
                yield format_sse(event, data)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        request_id = "req_" + uuid.uuid4().hex
        try:
            counted = estimate_tokens(orjson.loads(await request.body()))
        except GatewayError as e:
            return anthropic_error(e, request_id)
        return Response(orjson.dumps(counted), media_type="application/json",
                        headers={"request-id": request_id, ESTIMATE_HEADER: "true"})

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[anthropic.Anthropic]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_sdk_app(), host="127.0.0.1", port=port, log_level="warning",
                                          lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "test server did not start"
        time.sleep(0.01)
    sdk = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="sk-switchyard-test", max_retries=0,
                              timeout=10)
    yield sdk
    sdk.close()
    server.should_exit = True
    thread.join(timeout=5)


def test_sdk_create_text(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="demo", max_tokens=100, system="be brief",
                                     messages=[{"role": "user", "content": "hello there"}])
    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].type == "text" and message.content[0].text == "Echo: hello there"
    assert message.stop_reason == "end_turn" and message.model == "demo" and message.id.startswith("msg_")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.usage.cache_read_input_tokens == 0
    assert message._request_id is not None and message._request_id.startswith("req_")
    assert SEEN[-1]["messages"][0] == {"role": "system", "content": "be brief"}


def test_sdk_image_block(client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "describe"}, image]}]
    message = client.messages.create(model="demo", max_tokens=100, messages=messages)
    assert message.content[0].type == "text" and message.content[0].text == "Echo: describe [1 image(s)]"


def test_sdk_tools_tool_use_then_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model="demo", max_tokens=100, tools=[TOOL],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "weather in Paris"}])
    assert first.stop_reason == "tool_use"
    block = first.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"query": "weather in Paris"}
    second = client.messages.create(model="demo", max_tokens=100, tools=[TOOL], messages=[  # type: ignore[list-item]
        {"role": "user", "content": "weather in Paris"},
        {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "18C, sunny"}]},
    ])
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text" and second.content[0].text == "Echo: weather in Paris"
    sent = SEEN[-1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == block.id
    assert sent[2] == {"role": "tool", "tool_call_id": block.id, "content": "18C, sunny"}


def test_sdk_stream_text_deltas_and_final_usage(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="demo", max_tokens=100,
                                messages=[{"role": "user", "content": "one two three four"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) == 5 and "".join(pieces) == "Echo: one two three four"
    assert final.content[0].type == "text" and final.content[0].text == "Echo: one two three four"
    assert final.stop_reason == "end_turn"
    expected = demo_provider.completion_for(SEEN[-1])["usage"]
    assert final.usage.input_tokens == expected["prompt_tokens"]
    assert final.usage.output_tokens == expected["completion_tokens"]
    assert SEEN[-1]["stream_options"] == {"include_usage": True}


def test_sdk_stream_tool_use_input_json_deltas(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="demo", max_tokens=100, tools=[TOOL],  # type: ignore[list-item]
                                messages=[{"role": "user", "content": "weather in Rome please"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    json_parts = [e.partial_json for e in events if e.type == "input_json"]
    assert len(json_parts) > 1 and "".join(json_parts) == '{"query":"weather in Rome please"}'
    block = final.content[0]
    assert block.type == "tool_use" and block.input == {"query": "weather in Rome please"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens > 0


def test_sdk_raw_stream_event_types(client: anthropic.Anthropic) -> None:
    stream = client.messages.create(model="demo", max_tokens=100, stream=True,
                                    messages=[{"role": "user", "content": "hi"}])
    types = [event.type for event in stream]
    assert types == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]


def test_sdk_rate_limit_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="demo", max_tokens=10, metadata={"user_id": "rate-limited"},
                               messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.status_code == 429
    assert isinstance(err.body, dict) and err.body["error"] == {"type": "rate_limit_error",
                                                                "message": "Rate limit reached for this key."}
    assert err.response.headers["retry-after"] == "7"
    assert err.request_id is not None and err.request_id.startswith("req_")


def test_sdk_validation_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="demo", max_tokens=10, messages=[])
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "invalid_request_error"
    assert "messages" in info.value.body["error"]["message"]


def test_sdk_mid_stream_error_raises(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as info, client.messages.stream(
            model="demo", max_tokens=100, metadata={"user_id": "mid-stream-failure"},
            messages=[{"role": "user", "content": "one two three four"}]) as stream:
        for _ in stream.text_stream:
            pass
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"] == {"type": "overloaded_error", "message": "Provider overloaded."}


def test_sdk_count_tokens_is_an_estimate(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.count_tokens(
        model="demo", system="s" * 8, messages=[{"role": "user", "content": "x" * 40}])
    assert raw.headers[ESTIMATE_HEADER] == "true"
    assert raw.parse().input_tokens == 12
