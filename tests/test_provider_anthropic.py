"""The Anthropic adapter against a real HTTP fake speaking the Messages API (JSON and named SSE events)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from switchyard.services.workers.calls import CallFailed, CallResult, call, make_client
from switchyard.services.workers.providers.anthropic import AnthropicAdapter
from switchyard.services.workers.providers.base import CallContext
from switchyard.shared.config_schema import Deployment
from switchyard.shared.errors import GatewayError
from tests.fakes.anthropic_fake import FakeAnthropic

MODEL = "claude-sonnet-4-20250514"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean(fake: FakeAnthropic) -> None:
    fake.reset()


def ctx(fake: FakeAnthropic, body: dict[str, Any], stream: bool = False, strict: bool = False,
        api_base: str | None = None) -> CallContext:
    dep = Deployment(provider="anthropic", model=MODEL, api_base=api_base or fake.url, api_key="sk-ant-upstream",
                     first_byte_timeout_s=5.0, id="claude/0")
    return CallContext(deployment=dep, body={"model": "my-group", **body}, stream=stream, api_key="sk-ant-upstream",
                       request_id="r1", strict=strict)


def user(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


async def run(fake: FakeAnthropic, body: dict[str, Any], **kw: Any) -> CallResult:
    async with make_client() as client:
        return await call(client, AnthropicAdapter(), ctx(fake, body, **kw))


async def run_stream(fake: FakeAnthropic, body: dict[str, Any], **kw: Any) -> tuple[CallResult, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        result = await call(client, AnthropicAdapter(), ctx(fake, body, stream=True, **kw), on_chunk=sink)
    return result, got


async def fails(fake: FakeAnthropic, body: dict[str, Any], stream: bool = False,
                **kw: Any) -> tuple[CallFailed, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        with pytest.raises(CallFailed) as info:
            await call(client, AnthropicAdapter(), ctx(fake, body, stream=stream, **kw), on_chunk=sink)
    return info.value, got


def refused(fake: FakeAnthropic, body: dict[str, Any], **kw: Any) -> GatewayError:
    """The 400 the adapter raises while building the request, so nothing goes upstream."""
    with pytest.raises(GatewayError) as info:
        AnthropicAdapter().chat_request(ctx(fake, body, **kw))
    return info.value


def sent(fake: FakeAnthropic) -> dict[str, Any]:
    calls = fake.calls("/v1/messages")
    assert len(calls) == 1
    body = calls[0].body
    assert isinstance(body, dict)
    return body


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


# ---- request translation, asserted on what the fake received ------------------------------


async def test_request_url_headers_model_and_default_max_tokens(fake: FakeAnthropic) -> None:
    result = await run(fake, user("hello there"))
    rec = fake.calls()[0]
    assert (rec.method, rec.path) == ("POST", "/v1/messages")
    assert rec.headers["x-api-key"] == "sk-ant-upstream"
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["content-type"] == "application/json"
    assert "authorization" not in rec.headers
    assert rec.body == {"model": MODEL, "max_tokens": 4096,
                        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}
    assert result.dropped_params == []


async def test_api_base_with_v1_suffix_is_not_doubled(fake: FakeAnthropic) -> None:
    await run(fake, user("hi"), api_base=f"{fake.url}/v1/")
    assert fake.calls()[0].path == "/v1/messages"


async def test_fake_refuses_a_request_without_max_tokens_or_messages(fake: FakeAnthropic) -> None:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient() as client:
        no_max = await client.post(f"{fake.url}/v1/messages", headers=headers,
                                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        empty = await client.post(f"{fake.url}/v1/messages", headers=headers,
                                  json={"model": MODEL, "max_tokens": 10, "messages": []})
    assert no_max.status_code == 400 and empty.status_code == 400
    assert no_max.json() == {"type": "error",
                             "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
    assert "messages" in empty.json()["error"]["message"]


async def test_max_tokens_stop_temperature_top_p_and_user(fake: FakeAnthropic) -> None:
    body = {**user("one two three four five"), "max_completion_tokens": 3, "stop": "four", "temperature": 0.3,
            "top_p": 0.9, "user": "u-42"}
    result = await run(fake, body)
    got = sent(fake)
    assert got["max_tokens"] == 3
    assert got["stop_sequences"] == ["four"]
    assert (got["temperature"], got["top_p"]) == (0.3, 0.9)
    assert got["metadata"] == {"user_id": "u-42"}
    assert result.response is not None
    assert result.response["choices"][0]["finish_reason"] == "length"  # the fake cut "Echo: one two three ..." at 3
    await run(fake, {**user("one two"), "max_tokens": 50, "stop": ["", "two"]})
    assert fake.calls()[-1].body["max_tokens"] == 50
    assert fake.calls()[-1].body["stop_sequences"] == ["two"]


async def test_system_and_developer_messages_split_out_and_same_roles_merged(fake: FakeAnthropic) -> None:
    body = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first"},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "assistant", "content": "and more  "},
    ]}
    await run(fake, body)
    got = sent(fake)
    assert got["system"] == "You are terse.\n\nAnswer in English."
    assert got["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "and more"}]},
    ]


async def test_cache_control_is_kept_and_system_becomes_blocks(fake: FakeAnthropic) -> None:
    system = {"role": "system", "content": [{"type": "text", "text": "long policy " * 50,
                                             "cache_control": {"type": "ephemeral"}}]}
    await run(fake, {"messages": [system, {"role": "user", "content": "hi"}]})
    got = sent(fake)
    assert got["system"] == [{"type": "text", "text": "long policy " * 50, "cache_control": {"type": "ephemeral"}}]


async def test_tools_and_tool_results_round_trip(fake: FakeAnthropic) -> None:
    body = {"tools": [WEATHER, TIME], "messages": [
        {"role": "user", "content": "weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
    ]}
    result = await run(fake, body)
    got = sent(fake)
    assert got["tools"] == [
        {"name": "get_weather", "description": "Weather for a city",
         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "description": "", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in got
    assert got["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
    ]}
    assert got["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
    ]}
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Echo: sunny noon"
    assert result.response["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "get_time"}}, None, {"type": "tool", "name": "get_time"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ],
)
async def test_tool_choice_mapping(fake: FakeAnthropic, choice: Any, parallel: bool | None,
                                   expected: dict[str, Any]) -> None:
    body = {**user("what time is it"), "tools": [WEATHER, TIME], "tool_choice": choice,
            "parallel_tool_calls": parallel}
    result = await run(fake, body)
    assert sent(fake)["tool_choice"] == expected
    assert result.response is not None
    message = result.response["choices"][0]["message"]
    if choice == "none":
        assert message["content"] == "Echo: what time is it" and "tool_calls" not in message
    else:
        name = "get_time" if isinstance(choice, dict) else "get_weather"
        assert message["tool_calls"][0]["function"]["name"] == name


async def test_images_become_base64_and_url_blocks(fake: FakeAnthropic) -> None:
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}]}
    result = await run(fake, body)
    assert sent(fake)["messages"][0]["content"] == [
        {"type": "text", "text": "compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Echo: compare [2 image(s)]"


async def test_bad_input_is_refused_before_any_upstream_call(fake: FakeAnthropic) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
         "messages[0].content[0].image_url"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
    ]
    for body, param in cases:
        err = refused(fake, body)
        assert (err.status, err.param, err.retryable) == (400, param, False)


# ---- unsupported parameters: dropped, or refused when strict ------------------------------


async def test_unsupported_params_are_dropped_and_named(fake: FakeAnthropic) -> None:
    body = {**user("hi"), "seed": 7, "n": 1, "logprobs": False, "presence_penalty": 0.5, "logit_bias": {"1": 2},
            "temperature": 1.5, "metadata": {"team": "a"}, "top_k": 5}
    result = await run(fake, body)
    got = sent(fake)
    assert result.dropped_params == ["seed", "presence_penalty", "logit_bias", "temperature"]
    assert got["temperature"] == 1.0 and got["top_k"] == 5
    for key in ("seed", "n", "logprobs", "presence_penalty", "logit_bias"):
        assert key not in got
    assert "metadata" not in got  # Switchyard's routing metadata, not Anthropic's


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"seed": 7}, "seed"), ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"temperature": 1.7}, "temperature"),
     ({"response_format": {"type": "xml"}}, "response_format")],
)
async def test_strict_refuses_unsupported_params(fake: FakeAnthropic, extra: dict[str, Any], param: str) -> None:
    err = refused(fake, {**user("hi"), **extra}, strict=True)
    assert (err.status, err.param, err.retryable) == (400, param, False)


async def test_json_schema_is_emulated_with_a_forced_tool(fake: FakeAnthropic) -> None:
    schema = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
    body = {**user("capital of France"),
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}
    result = await run(fake, body, strict=True)
    got = sent(fake)
    assert got["tools"][0]["name"] == "answer" and got["tools"][0]["input_schema"] == schema
    assert got["tool_choice"] == {"type": "tool", "name": "answer"}
    assert result.response is not None
    choice = result.response["choices"][0]
    assert orjson.loads(choice["message"]["content"]) == {"query": "capital of France"}
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    assert result.dropped_params == []

    fake.reset()
    _, chunks = await run_stream(fake, body)
    content = "".join(d.get("content") or "" for d in deltas(chunks))
    assert orjson.loads(content) == {"query": "capital of France"}
    assert not any("tool_calls" in d for d in deltas(chunks))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_json_object_is_emulated_with_a_system_instruction(fake: FakeAnthropic) -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}}
    result = await run(fake, body)
    got = sent(fake)
    assert got["system"].startswith("Be brief.\n\n") and "JSON" in got["system"]
    assert "tools" not in got and result.dropped_params == []


# ---- responses ------------------------------------------------------------------------------


async def test_text_completion_and_usage(fake: FakeAnthropic) -> None:
    result = await run(fake, user("hello there"))
    assert result.response is not None
    assert result.response["object"] == "chat.completion"
    assert result.response["model"] == MODEL
    choice = result.response["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Echo: hello there", "refusal": None}
    assert choice["finish_reason"] == "stop"
    usage = result.response["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result.usage.prompt_tokens == usage["prompt_tokens"]


async def test_tool_use_becomes_tool_calls_with_json_string_arguments(fake: FakeAnthropic) -> None:
    result = await run(fake, {**user("weather in Oslo"), "tools": [WEATHER]})
    assert result.response is not None
    choice = result.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["id"].startswith("toolu_") and tool_call["type"] == "function"
    assert tool_call["function"]["name"] == "get_weather"
    assert orjson.loads(tool_call["function"]["arguments"]) == {"query": "weather in Oslo"}


async def test_thinking_is_dropped_and_text_blocks_joined(fake: FakeAnthropic) -> None:
    fake.respond([{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "Hello, "},
                  {"type": "redacted_thinking", "data": "xyz"}, {"type": "text", "text": "world"}],
                 usage={"output_tokens": 40, "output_tokens_details": {"thinking_tokens": 30}})
    result = await run(fake, user("hi"))
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Hello, world"
    assert result.usage.reasoning_tokens == 30 and result.usage.completion_tokens == 40


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "content_filter"), ("pause_turn", "stop")],
)
async def test_stop_reasons_map_to_finish_reasons(fake: FakeAnthropic, stop_reason: str, finish: str) -> None:
    fake.respond([{"type": "text", "text": "x"}], stop_reason=stop_reason)
    fake.respond([{"type": "text", "text": "x"}], stop_reason=stop_reason)
    result = await run(fake, user("hi"))
    assert result.response is not None and result.response["choices"][0]["finish_reason"] == finish
    _, chunks = await run_stream(fake, user("hi"))
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [finish]


async def test_stop_sequence_from_the_fake(fake: FakeAnthropic) -> None:
    result = await run(fake, {**user("alpha beta gamma"), "stop": ["gamma"]})
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Echo: alpha beta "
    assert result.response["choices"][0]["finish_reason"] == "stop"


async def test_cached_tokens_count_in_prompt_tokens(fake: FakeAnthropic) -> None:
    system = {"role": "system", "content": [{"type": "text", "text": "policy " * 400,
                                             "cache_control": {"type": "ephemeral"}}]}
    body = {"messages": [system, {"role": "user", "content": "hi"}]}
    first = await run(fake, body)
    second = await run(fake, body)
    streamed, _ = await run_stream(fake, body)
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens > 0
    assert second.usage.prompt_tokens == first.usage.prompt_tokens  # cache writes and reads both count as prompt
    assert second.usage.cached_tokens < second.usage.prompt_tokens
    assert second.response is not None
    assert second.response["usage"]["prompt_tokens_details"]["cached_tokens"] == second.usage.cached_tokens
    assert streamed.usage == second.usage


# ---- streaming ------------------------------------------------------------------------------


async def test_stream_text_role_first_and_usage_chunk_last(fake: FakeAnthropic) -> None:
    result, chunks = await run_stream(fake, user("hello there friend"))
    ds = deltas(chunks)
    assert ds[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in ds) == "Echo: hello there friend"
    assert len([d for d in ds if d.get("content")]) == 4  # word by word, as the fake streamed it
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r1" for c in chunks)
    assert result.chunks_sent == len(chunks)
    assert result.usage_chunk is not None and result.usage_chunk["choices"] == []
    non_stream = await run(fake, user("hello there friend"))
    assert result.usage == non_stream.usage and result.usage.completion_tokens > 0


async def test_stream_tool_call_argument_deltas_in_order_with_index(fake: FakeAnthropic) -> None:
    fake.respond([
        {"type": "thinking", "thinking": "let me see", "signature": "sig"},
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}},
        {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {"tz": "Europe/Paris"}},
    ], stop_reason="tool_use")
    _, chunks = await run_stream(fake, {**user("weather and time"), "tools": [WEATHER, TIME]})
    ds = deltas(chunks)
    assert "".join(d.get("content") or "" for d in ds) == "Checking both."
    tool_deltas = [tc for d in ds for tc in d.get("tool_calls", [])]
    starts = [tc for tc in tool_deltas if "id" in tc]
    assert [(tc["index"], tc["id"], tc["function"]["name"]) for tc in starts] == [
        (0, "toolu_a", "get_weather"), (1, "toolu_b", "get_time")]
    args = {0: "", 1: ""}
    for tc in tool_deltas:
        args[tc["index"]] += tc["function"]["arguments"]
    assert orjson.loads(args[0]) == {"city": "Paris", "unit": "celsius"}
    assert orjson.loads(args[1]) == {"tz": "Europe/Paris"}
    # every delta of the first call comes before the second call starts
    order = [tc["index"] for tc in tool_deltas]
    assert order == sorted(order) and len([i for i in order if i == 0]) > 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_stream_cut_halfway_is_a_retryable_error_after_chunks(fake: FakeAnthropic) -> None:
    fake.inject(cut_after=5)  # message_start, ping, block start, two text deltas; no message_stop
    failure, got = await fails(fake, user("one two three four five"), stream=True)
    assert (failure.error.status, failure.error.code, failure.error.retryable) == (502, "stream_interrupted", True)
    assert failure.chunks_sent == len(got) == 3  # role chunk + two words


async def test_stream_error_event_maps_to_overloaded(fake: FakeAnthropic) -> None:
    fake.respond([{"type": "text", "text": "a b c d"}], error_after=4)
    failure, got = await fails(fake, user("hi"), stream=True)
    assert (failure.error.status, failure.error.code, failure.error.retryable) == (503, "overloaded", True)
    assert failure.chunks_sent == len(got) == 2


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code", "retryable"),
    [
        ({"status": 400}, 400, None, False),
        ({"status": 400, "message": "prompt is too long: 210000 tokens > 200000 maximum"}, 400,
         "context_length_exceeded", False),
        ({"status": 401}, 401, "invalid_api_key", False),
        ({"status": 402}, 402, "insufficient_quota", False),
        ({"status": 403}, 403, "permission_denied", False),
        ({"status": 404}, 404, "model_not_found", False),
        ({"status": 413}, 400, "request_too_large", False),
        ({"status": 429, "retry_after": 7}, 429, "rate_limit_exceeded", True),
        ({"status": 500}, 502, "upstream_error", True),
        ({"status": 529, "retry_after": 2}, 503, "overloaded", True),
        ({"malformed": True}, 502, "bad_upstream_response", True),
        ({"silent": True}, 504, "upstream_timeout", True),
    ],
)
async def test_errors_map_to_openai_statuses(fake: FakeAnthropic, fault: dict[str, Any], status: int,
                                             code: str | None, retryable: bool) -> None:
    fake.inject(**fault)
    failure, _ = await fails(fake, user("hi"))
    err = failure.error
    assert (err.status, err.code, err.retryable) == (status, code, retryable)
    assert err.retry_after_s == fault.get("retry_after")
    if code == "context_length_exceeded":
        assert err.param == "messages" and "prompt is too long" in err.message
    assert failure.chunks_sent == 0


async def test_streamed_call_answered_with_an_error_status(fake: FakeAnthropic) -> None:
    fake.inject(status=529)
    failure, got = await fails(fake, user("hi"), stream=True)
    assert (failure.error.status, failure.error.code, failure.chunks_sent, got) == (503, "overloaded", 0, [])


def test_embeddings_are_not_supported(fake: FakeAnthropic) -> None:
    with pytest.raises(GatewayError) as info:
        AnthropicAdapter().embeddings_request(ctx(fake, {"input": "x"}))
    assert (info.value.status, info.value.param) == (400, "model")


# ---- the fake speaks the real wire format ---------------------------------------------------


async def test_official_sdk_reads_the_fake(fake: FakeAnthropic) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=fake.url, api_key="k", max_retries=0)
    message = await sdk.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text" and message.content[0].text == "Echo: hi"
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    async with sdk.messages.stream(model=MODEL, max_tokens=50, tools=tools,  # type: ignore[arg-type]
                                   messages=[{"role": "user", "content": "rain?"}]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == {"query": "rain?"}
    fake.inject(status=529)
    with pytest.raises(anthropic.InternalServerError) as info:
        await sdk.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 529
    await sdk.close()
