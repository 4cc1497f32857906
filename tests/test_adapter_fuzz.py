"""Every provider adapter, fed what ingress accepts and whatever a provider may answer, raises only `GatewayError`.

A worker process dies on any other exception (and so does every worker that inherits the partition),
so this is the property that keeps one body or one answer from taking a pool down:
- request translation (`chat_request`, `embeddings_request`) of any body ingress accepts either
  builds a JSON request or refuses it with a 400 that names the offending parameter and is not
  retryable (bodies are generated, then kept only if ingress's own pydantic model accepts them:
  hostile nested shapes, lax-typed numbers, unicode, empty lists, huge numbers);
- response reading (`parse_chat`, `parse_embeddings`, `stream_parser().feed/finish`, `map_error`)
  of any JSON either gives OpenAI-shaped dicts or a `GatewayError`;
- `switchyard.services.workers.calls.call` ends in a result or a `CallFailed`, and never swallows cancellation.

No network: upstream answers come from a handler that builds `httpx.Response`s (`MockUpstream`).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from switchyard.services.ingress.validation import ChatCompletionRequest, EmbeddingsRequest
from switchyard.services.workers.calls import CallFailed, CallResult, call, translate
from switchyard.services.workers.providers import ADAPTERS, get_adapter
from switchyard.services.workers.providers.base import (
    CallContext,
    ProviderAdapter,
    ServerEvent,
    UpstreamRequest,
    usage_from_openai,
)
from switchyard.services.workers.providers.bedrock import EventStreamDecoder
from switchyard.services.workers.providers.openai import OpenAICompatibleAdapter
from switchyard.shared.config_schema import Deployment
from switchyard.shared.errors import GatewayError

EXAMPLES = int(os.environ.get("SWITCHYARD_FUZZ_EXAMPLES", "100"))
"""Examples per test and adapter class: 100 keeps the file near half a minute; raise it for a deeper local run."""
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _families() -> dict[str, list[str]]:
    """Provider names by adapter class: every class is fuzzed, and every provider name within it."""
    out: dict[str, list[str]] = {}
    for name in sorted(ADAPTERS):
        out.setdefault(type(get_adapter(name)).__name__, []).append(name)
    return out


FAMILIES = _families()
MODELS = ["m-1", "gemini-2.5-flash", "gemini-3-pro-preview", "amazon.titan-embed-text-v2:0",
          "cohere.embed-english-v3", "anthropic.claude-3-5-sonnet"]


def context(provider: str, body: dict[str, Any], stream: bool = False, strict: bool = False,
            model: str = "m-1") -> CallContext:
    deployment = Deployment(provider=provider, model=model, id=f"{provider}-1", api_base="http://upstream.test")
    return CallContext(deployment, body, stream, "key", "req-1", strict=strict)


def accepted_by(model: type[BaseModel]) -> Callable[[dict[str, Any]], bool]:
    """Whether ingress's pydantic model accepts a body (ingress then forwards the body exactly as sent)."""
    def accepts(body: dict[str, Any]) -> bool:
        try:
            model.model_validate(body)
        except ValidationError:
            return False
        return True

    return accepts


# ---- JSON, any and hostile ---------------------------------------------------------------------

# Field names and values the adapters look for, so generated JSON reaches deep into their parsers.
VOCAB = [
    "type", "text", "content", "message", "choices", "delta", "usage", "tool_calls", "function", "name",
    "arguments", "id", "index", "role", "finish_reason", "stop_reason", "content_block", "partial_json",
    "input", "tool_use", "text_delta", "input_json_delta", "message_start", "content_block_start",
    "content_block_delta", "message_delta", "message_stop", "error", "candidates", "parts", "functionCall", "args",
    "finishReason", "usageMetadata", "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "thought",
    "thoughtSignature", "promptFeedback", "blockReason", "output", "stopReason", "toolUse", "toolUseId",
    "reasoningContent", "reasoningText", "contentBlockIndex", "start", "inputTokens", "outputTokens",
    "embeddings", "embedding", "values", "float", "data", "meta", "billed_units", "input_tokens",
    "output_tokens", "tokens", "inputTextTokenCount", "status", "code", "details", "@type", "retryDelay",
    "reason", "message-start", "content-delta", "tool-call-start", "tool-call-delta", "message-end",
    "STOP", "MAX_TOKENS", "SAFETY", "COMPLETE", "TOOL_CALL", "ERROR", "TIMEOUT", "end_turn", "json_response",
    "prompt_tokens", "completion_tokens", "prompt_tokens_details", "cached_tokens", "prompt_filter_results",
    "content_filter_results", "Message", "__type", "ValidationException", "RESOURCE_EXHAUSTED", "invalid_request_error",
    "google.rpc.RetryInfo", "API_KEY_INVALID", "[DONE]",
]
KEYS = st.sampled_from(VOCAB) | st.text(max_size=6)
TEXT = st.text(max_size=16)


def json_values(integers: st.SearchStrategy[int], max_leaves: int) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | integers | st.floats(allow_nan=False, allow_infinity=False)
               | TEXT | st.sampled_from(VOCAB))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                        max_leaves=max_leaves)


# A request body can hold integers past 64 bits (a batch envelope); its hostile slots are many, so each is small.
ANY = json_values(st.integers(), max_leaves=4)
# What orjson decodes from a provider: one answer per example, so it may be larger.
UPSTREAM_JSON = json_values(st.integers(-(1 << 63), (1 << 64) - 1), max_leaves=10)
OBJECT = st.dictionaries(KEYS, ANY, max_size=3)


def sometimes_hostile(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `valid`, sometimes any JSON at all: the nested slots ingress does not check."""
    return st.one_of(valid, valid, valid, ANY)


def lax_float(low: float, high: float) -> st.SearchStrategy[Any]:
    """A number as pydantic's lax mode accepts it: float, int, numeric string or bool."""
    number = st.floats(low, high)
    return number | st.integers(int(low), int(high)) | number.map(str) | st.booleans()


def lax_int(low: int, high: int | None = None) -> st.SearchStrategy[Any]:
    number = st.integers(low, high)
    return number | number.map(str) | st.integers(low, min(high or 1 << 53, 1 << 53)).map(float) | st.just(True)


# ---- chat bodies -----------------------------------------------------------------------------

NAMES = st.sampled_from(["lookup", "get_weather", "f"]) | TEXT
ARGUMENTS = st.sampled_from(["{}", '{"city": "Paris"}', "[1]", "{not json", "", "null"]) | TEXT
URLS = st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "https://example.com/cat.png", "ftp://x/y.png",
                        "data:application/pdf;base64,JVBERi0=", "data:,", "gs://bucket/a.mp3", ""]) | TEXT
SCHEMA = st.sampled_from([{"type": "object", "properties": {"city": {"type": "string"}}}, {}, {"type": "str"}]) | OBJECT
CALLED = st.fixed_dictionaries({"name": sometimes_hostile(NAMES)}, optional={"arguments": sometimes_hostile(ARGUMENTS)})
SIGNED = st.fixed_dictionaries({"google": sometimes_hostile(st.fixed_dictionaries(
    {"thought_signature": sometimes_hostile(TEXT)}))})
TOOL_CALL = st.fixed_dictionaries({"id": TEXT, "type": st.just("function"), "function": sometimes_hostile(CALLED)},
                                  optional={"extra_content": sometimes_hostile(SIGNED)})


def part(kind: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.just(kind), **fields}, optional={"cache_control": ANY})


PART = st.one_of(
    part("text", text=sometimes_hostile(TEXT)),
    part("image_url", image_url=sometimes_hostile(URLS | st.fixed_dictionaries({"url": sometimes_hostile(URLS)},
                                                                              optional={"detail": ANY}))),
    part("file", file=sometimes_hostile(st.fixed_dictionaries({}, optional={
        "file_data": sometimes_hostile(URLS), "filename": sometimes_hostile(TEXT), "file_id": ANY, "mime_type": ANY}))),
    part("input_audio", input_audio=sometimes_hostile(st.fixed_dictionaries(
        {"data": sometimes_hostile(TEXT), "format": sometimes_hostile(st.sampled_from(["wav", "mp3"]))}))),
    st.fixed_dictionaries({"type": ANY}, optional={"text": ANY, "refusal": ANY}),
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])},
    optional={
        "content": st.none() | TEXT | st.lists(PART, max_size=3),
        "name": TEXT,
        "tool_calls": st.none() | st.lists(st.one_of(TOOL_CALL, TOOL_CALL, TOOL_CALL, OBJECT), max_size=2),
        "tool_call_id": st.sampled_from(["c1", "lookup"]) | TEXT,
        "function_call": sometimes_hostile(CALLED),
        "refusal": ANY,
    },
)
FUNCTION = st.fixed_dictionaries({"name": sometimes_hostile(NAMES)}, optional={
    "description": sometimes_hostile(TEXT), "parameters": sometimes_hostile(SCHEMA), "strict": ANY})
TOOL = st.one_of(
    st.fixed_dictionaries({"type": st.just("function"), "function": sometimes_hostile(FUNCTION)},
                          optional={"cache_control": ANY}),
    st.sampled_from([{"googleSearch": {}}, {"type": "web_search_20250305", "name": "web_search"},
                     {"toolSpec": {"name": "x", "inputSchema": {"json": {}}}}, {"cachePoint": {"type": "default"}}]),
    st.fixed_dictionaries({"toolSpec": ANY}),
    OBJECT,
)
FORCED = st.fixed_dictionaries({"type": st.just("function"), "function": sometimes_hostile(
    st.fixed_dictionaries({"name": sometimes_hostile(NAMES)}))})
TOOL_CHOICE = st.one_of(
    st.sampled_from(["auto", "none", "required"]), TEXT, FORCED,
    st.fixed_dictionaries({"type": st.just("allowed_tools"), "allowed_tools": sometimes_hostile(st.fixed_dictionaries(
        {"mode": sometimes_hostile(st.sampled_from(["auto", "required"])),
         "tools": sometimes_hostile(st.lists(FORCED | OBJECT, max_size=2))}))}),
    OBJECT,
)
RESPONSE_FORMAT = st.fixed_dictionaries(
    {"type": sometimes_hostile(st.sampled_from(["text", "json_object", "json_schema", "xml"]))},
    optional={"json_schema": sometimes_hostile(st.fixed_dictionaries({}, optional={
        "name": sometimes_hostile(TEXT), "schema": sometimes_hostile(SCHEMA), "strict": ANY}))},
) | OBJECT
EXTRAS = st.fixed_dictionaries({}, optional={
    "reasoning_effort": sometimes_hostile(st.sampled_from(["none", "minimal", "low", "medium", "high"])),
    "thinking_config": sometimes_hostile(st.fixed_dictionaries({}, optional={
        "thinking_budget": st.integers(), "include_thoughts": st.booleans()})),
    "parallel_tool_calls": sometimes_hostile(st.booleans()),
    "logprobs": sometimes_hostile(st.booleans()),
    "strict": st.booleans(),
    **{key: ANY for key in ("top_k", "thinking", "thinkingConfig", "safety_settings", "cached_content", "documents",
                            "k", "safety_mode", "logit_bias", "store", "additionalModelRequestFields",
                            "guardrailConfig", "output_config", "service_tier")},
})
CHAT_BODY = st.builds(
    lambda extras, body: {**extras, **body},
    EXTRAS,
    st.fixed_dictionaries(
        {"model": st.text(min_size=1, max_size=8), "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
        optional={
            "stream": st.booleans(),
            "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
            "temperature": lax_float(0, 2),
            "top_p": lax_float(0, 1),
            "n": lax_int(1, 128),
            "max_tokens": lax_int(1),
            "max_completion_tokens": lax_int(1),
            "presence_penalty": lax_float(-2, 2),
            "frequency_penalty": lax_float(-2, 2),
            "stop": st.none() | TEXT | st.lists(TEXT, max_size=3),
            "seed": st.integers(),
            "tools": st.none() | st.lists(TOOL, max_size=3),
            "tool_choice": st.none() | TOOL_CHOICE,
            "response_format": st.none() | RESPONSE_FORMAT,
            "user": TEXT,
            "fallbacks": st.lists(TEXT, max_size=2),
            "metadata": st.dictionaries(TEXT, ANY, max_size=2),
        },
    ),
).filter(accepted_by(ChatCompletionRequest))

EMBEDDINGS_BODY = st.builds(
    lambda extras, body: {**extras, **body},
    st.dictionaries(st.sampled_from(["input_type", "task_type", "truncate", "normalize", "strict", "extra"]), ANY,
                    max_size=2),
    st.fixed_dictionaries(
        {"model": st.text(min_size=1, max_size=8),
         "input": TEXT | st.lists(TEXT, max_size=3) | st.lists(st.integers(), max_size=3)
         | st.lists(st.lists(st.integers(), max_size=3), max_size=2)},
        optional={"encoding_format": st.sampled_from(["float", "base64"]), "dimensions": lax_int(1),
                  "user": TEXT},
    ),
).filter(accepted_by(EmbeddingsRequest))


def assert_request_error(error: GatewayError) -> None:
    """A refused body: a 400 naming the parameter (not the catch-all for unforeseen shapes), never retried."""
    assert error.status == 400, error.message
    assert not error.retryable, error.message
    assert error.param, f"a 400 without the parameter it is about: {error.message}"


def assert_translated(adapter: ProviderAdapter, ctx: CallContext, kind: str) -> None:
    try:
        up = adapter.embeddings_request(ctx) if kind == "embeddings" else adapter.chat_request(ctx)
    except GatewayError as e:
        assert_request_error(e)
        return
    assert up.content is not None
    assert isinstance(orjson.loads(up.content), dict)


@pytest.mark.parametrize("family", FAMILIES)
@FUZZ
@given(data=st.data(), body=CHAT_BODY, stream=st.booleans(), strict=st.booleans())
def test_chat_request_builds_json_or_names_the_bad_parameter(family: str, data: st.DataObject, body: dict[str, Any],
                                                              stream: bool, strict: bool) -> None:
    provider = data.draw(st.sampled_from(FAMILIES[family]))
    ctx = context(provider, body, stream, strict, data.draw(st.sampled_from(MODELS)))
    assert_translated(get_adapter(provider), ctx, "chat")


@pytest.mark.parametrize("family", FAMILIES)
@FUZZ
@given(data=st.data(), body=EMBEDDINGS_BODY, strict=st.booleans())
def test_embeddings_request_builds_json_or_names_the_bad_parameter(family: str, data: st.DataObject,
                                                                    body: dict[str, Any], strict: bool) -> None:
    provider = data.draw(st.sampled_from(FAMILIES[family]))
    ctx = context(provider, body, False, strict, data.draw(st.sampled_from(MODELS)))
    assert_translated(get_adapter(provider), ctx, "embeddings")


# ---- reading what providers answer ----------------------------------------------------------------

# The bodies whose shape response parsing looks at (a forced JSON tool, base64 embeddings, the inputs).
PARSE_BODIES: list[dict[str, Any]] = [
    {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}],
     "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}},
    {"model": "m", "input": ["a", "b"], "encoding_format": "base64"},
    {"model": "m", "input": "a"},
]
EVENT = st.builds(
    ServerEvent,
    data=UPSTREAM_JSON.map(lambda v: orjson.dumps(v).decode()) | st.sampled_from(["[DONE]", "", "not json", "{"]),
    event=st.none() | st.sampled_from(VOCAB) | st.sampled_from(
        ["messageStart", "contentBlockStart", "contentBlockDelta", "messageStop", "metadata"]),
    payload=st.none() | st.dictionaries(KEYS, UPSTREAM_JSON, max_size=4),
)
HEADERS = st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms", "x-amzn-errortype", "content-type"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12) | st.sampled_from(
                              ["1.5", "-3", "Wed, 21 Oct 2015 07:28:00 GMT", "ThrottlingException:x", "nan"]),
                          max_size=3)
ERROR_BODY = UPSTREAM_JSON.map(orjson.dumps) | st.binary(max_size=40)


def assert_chunks(chunks: Any) -> None:
    assert isinstance(chunks, list) and all(isinstance(c, dict) for c in chunks)
    for c in chunks:
        usage_from_openai(c.get("usage"))


@pytest.mark.parametrize("family", FAMILIES)
@FUZZ
@given(data=st.data(), upstream=UPSTREAM_JSON, events=st.lists(EVENT, max_size=6), status=st.integers(0, 999),
       error_body=ERROR_BODY, headers=HEADERS)
def test_response_parsers_raise_only_gateway_errors(family: str, data: st.DataObject, upstream: Any,
                                                    events: list[ServerEvent], status: int, error_body: bytes,
                                                    headers: dict[str, str]) -> None:
    provider = data.draw(st.sampled_from(FAMILIES[family]))
    adapter = get_adapter(provider)
    ctx = context(provider, data.draw(st.sampled_from(PARSE_BODIES)), stream=True,
                  model=data.draw(st.sampled_from(MODELS)))
    for parse in (adapter.parse_chat, adapter.parse_embeddings):
        try:
            parsed = parse(upstream, ctx)
        except GatewayError:
            continue
        assert_chunks([parsed])

    parser = adapter.stream_parser(ctx)
    try:
        for event in events:
            assert_chunks(parser.feed(event))
        assert_chunks(parser.finish())
    except GatewayError:
        pass
    assert isinstance(parser.done, bool)

    try:
        error = adapter.map_error(status, error_body, httpx.Headers(headers))
    except GatewayError:
        return
    assert isinstance(error, GatewayError)


@FUZZ
@given(chunks=st.lists(st.binary(max_size=64), max_size=4))
def test_bedrock_event_stream_decoder_raises_only_gateway_errors(chunks: list[bytes]) -> None:
    decoder = EventStreamDecoder()
    try:
        for raw in chunks:
            decoder.feed(raw)
    except GatewayError as e:
        assert e.status == 502 and e.retryable


# ---- whole calls: a result or a CallFailed, never anything else -----------------------------------


class MockUpstream:
    """The worker's client interface (services/workers/upstream.py), answered by `handler` without a network."""

    def __init__(self, handler: Callable[[httpx.Request], Any]) -> None:
        self.handler = handler

    async def send(self, up: UpstreamRequest, first_byte_timeout_s: float, stream: bool = False) -> httpx.Response:
        content = orjson.dumps(up.json) if up.json is not None else up.content
        response = self.handler(httpx.Request(up.method, up.url, headers=up.headers, content=content))
        return await response if inspect.isawaitable(response) else response  # type: ignore[no-any-return]

    async def __aenter__(self) -> MockUpstream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None


def mock_client(handler: Callable[[httpx.Request], Any]) -> MockUpstream:
    return MockUpstream(handler)


def answer(status: int, content: bytes) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, content=content)


async def outcome(provider: str, ctx: CallContext, client: MockUpstream,
                  kind: str = "chat") -> CallResult | GatewayError:
    async with client:
        try:
            return await call(client, get_adapter(provider), ctx, kind=kind)
        except CallFailed as failed:
            return failed.error


SSE = st.lists(UPSTREAM_JSON.map(lambda v: b"data: " + orjson.dumps(v) + b"\n\n"), max_size=4).map(b"".join)


@pytest.mark.parametrize("family", FAMILIES)
@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(data=st.data(), status=st.sampled_from([200, 200, 200, 400, 429, 500, 503]),
       content=UPSTREAM_JSON.map(orjson.dumps) | SSE | st.binary(max_size=40), stream=st.booleans(),
       kind=st.sampled_from(["chat", "embeddings"]))
def test_a_call_ends_in_a_result_or_a_call_failed(family: str, data: st.DataObject, status: int, content: bytes,
                                                  stream: bool, kind: str) -> None:
    provider = data.draw(st.sampled_from(FAMILIES[family]))
    body = PARSE_BODIES[0] if kind == "chat" else PARSE_BODIES[2]
    ctx = context(provider, body, stream and kind == "chat", model=data.draw(st.sampled_from(MODELS)))
    result = asyncio.run(outcome(provider, ctx, mock_client(answer(status, content)), kind))
    assert isinstance(result, CallResult | GatewayError)


# ---- the shapes of issue #11, through every adapter -------------------------------------------------

USER = {"role": "user", "content": "hi"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
ISSUE_SHAPES = [
    pytest.param({"messages": [USER, {"role": "assistant", "tool_calls": [{"function": "x"}]}]},
                 "messages[1].tool_calls[0].function", id="tool-call-function-not-an-object"),
    pytest.param({"messages": [USER], "tools": [{"type": "function", "function": "x"}]},
                 "tools[0].function", id="tool-function-not-an-object"),
    pytest.param({"messages": [USER], "tools": [WEATHER], "tool_choice": {"type": "function", "function": "f"}},
                 "tool_choice.function", id="tool-choice-function-not-an-object"),
    pytest.param({"messages": [USER], "response_format": {"type": "json_schema", "json_schema": "x"}},
                 "response_format.json_schema", id="json-schema-not-an-object"),
]


@pytest.mark.parametrize("provider", sorted(ADAPTERS))
@pytest.mark.parametrize(("shape", "param"), ISSUE_SHAPES)
@pytest.mark.parametrize("stream", [False, True])
async def test_issue_shapes_are_400s_naming_the_parameter(provider: str, shape: dict[str, Any], param: str,
                                                          stream: bool) -> None:
    body = {"model": "m", **shape}
    assert accepted_by(ChatCompletionRequest)(body)
    sent: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    error = await outcome(provider, context(provider, body, stream), mock_client(upstream))
    assert isinstance(error, GatewayError)
    assert (error.status, error.param, error.retryable) == (400, param, False), error.message
    assert sent == []  # refused before any upstream call


# ---- the boundary in calls.py ------------------------------------------------------------------------


class Faulty(OpenAICompatibleAdapter):
    """An adapter with faults no adapter should have: they must still end as typed errors."""

    def chat_request(self, ctx: CallContext) -> Any:
        if ctx.body.get("fail_translation"):
            raise RuntimeError("translation bug")
        return super().chat_request(ctx)

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        raise AttributeError("parse bug")


async def test_a_translation_fault_of_any_type_is_a_non_retryable_400() -> None:
    ctx = context("openai", {**PARSE_BODIES[0], "fail_translation": True})
    with pytest.raises(GatewayError) as info:
        translate(Faulty("openai"), ctx, "chat")
    assert (info.value.status, info.value.code, info.value.retryable) == (400, "invalid_value", False)
    with pytest.raises(CallFailed) as failed:
        await call(mock_client(answer(200, b"{}")), Faulty("openai"), ctx)
    assert (failed.value.error.status, failed.value.error.retryable) == (400, False)


async def test_a_parse_fault_of_any_type_is_a_retryable_502() -> None:
    ctx = context("openai", PARSE_BODIES[0])
    with pytest.raises(CallFailed) as failed:
        await call(mock_client(answer(200, b'{"choices": []}')), Faulty("openai"), ctx)
    error = failed.value.error
    assert (error.status, error.code, error.retryable) == (502, "bad_upstream_response", True)
    assert "AttributeError" in error.message


@pytest.mark.parametrize(("content", "stream"), [
    (b'{"choices": [], "usage": [1]}', False),
    (b'{"choices": [], "usage": {"prompt_tokens": "many"}}', False),
    (b'data: [1, 2]\n\ndata: [DONE]\n\n', True),
    (b'data: {"choices": [], "usage": "none"}\n\n', True),
])
async def test_an_unreadable_openai_answer_is_a_retryable_502(content: bytes, stream: bool) -> None:
    error = await outcome("openai", context("openai", PARSE_BODIES[0], stream), mock_client(answer(200, content)))
    assert isinstance(error, GatewayError)
    assert (error.status, error.code, error.retryable) == (502, "bad_upstream_response", True)


async def test_cancellation_is_never_swallowed() -> None:
    reached = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        reached.set()
        await asyncio.sleep(30)
        return httpx.Response(200, content=b"{}")

    task = asyncio.create_task(call(mock_client(slow), get_adapter("openai"), context("openai", PARSE_BODIES[0])))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
