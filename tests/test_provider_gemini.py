"""The Gemini adapter against a real HTTP fake speaking the Generative Language API's wire format."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from switchyard.services.workers.calls import CallFailed, CallResult, call, make_client
from switchyard.services.workers.providers.base import CallContext
from switchyard.services.workers.providers.gemini import GeminiAdapter, gemini_error
from switchyard.shared.config_schema import Deployment
from tests.fakes.gemini_fake import SIGNATURE, FakeGemini


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    server = FakeGemini().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean(fake: FakeGemini) -> None:
    fake.reset()


MODEL = "gemini-2.5-flash"
BODY = {"model": "my-group", "messages": [{"role": "user", "content": "hello there"}]}
TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": "lookup", "description": "Look something up",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
                   "additionalProperties": False}}}]
PNG = "data:image/png;base64,iVBORw0KGgo="


def ctx(fake: FakeGemini, body: dict[str, Any], stream: bool = False, key: str = "g-key", model: str = MODEL,
        strict: bool = False) -> CallContext:
    dep = Deployment(provider="gemini", model=model, api_base=fake.url, api_key=key, first_byte_timeout_s=5.0,
                     id="g/0")
    return CallContext(deployment=dep, body=body, stream=stream, api_key=key, request_id="r1", strict=strict)


async def run(fake: FakeGemini, body: dict[str, Any], **kw: Any) -> CallResult:
    kind = kw.pop("kind", "chat")
    async with make_client() as client:
        return await call(client, GeminiAdapter(), ctx(fake, body, **kw), kind=kind)


async def run_stream(fake: FakeGemini, body: dict[str, Any], **kw: Any) -> tuple[CallResult, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        result = await call(client, GeminiAdapter(), ctx(fake, body, stream=True, **kw), on_chunk=sink)
    return result, got


# ---- request translation -------------------------------------------------------------------


async def test_request_translation(fake: FakeGemini) -> None:
    body = {
        "model": "g",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "what is in these?"},
                {"type": "image_url", "image_url": {"url": PNG}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "a"}'},
                 "extra_content": {"google": {"thought_signature": SIGNATURE}}},
                {"id": "call_b", "type": "function", "function": {"name": "fetch", "arguments": '{"url": "b"}'}},
            ]},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"answer": 42}'},
            {"role": "tool", "tool_call_id": "call_b", "content": "plain text result"},
        ],
        "tools": TOOLS,
        "tool_choice": "auto",
        "temperature": 0.3, "top_p": 0.9, "max_completion_tokens": 50, "stop": "END", "seed": 7, "n": 2,
        "presence_penalty": 0.5, "user": "u-1",
    }
    result = await run(fake, body)
    sent = fake.calls(":generateContent")[0]
    assert sent.path == f"/v1beta/models/{MODEL}:generateContent"
    assert sent.headers["x-goog-api-key"] == "g-key"
    assert "key" not in sent.query and "g-key" not in sent.path
    b = sent.body
    assert b["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Use tools."}]}
    assert [c["role"] for c in b["contents"]] == ["user", "model", "user"]
    user, model, tool = b["contents"]
    assert user["parts"] == [
        {"text": "what is in these?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"fileUri": "https://example.com/cat.jpg", "mimeType": "image/jpeg"}},
    ]
    assert model["parts"] == [
        {"text": "Let me check."},
        {"functionCall": {"name": "lookup", "args": {"query": "a"}}, "thoughtSignature": SIGNATURE},
        {"functionCall": {"name": "fetch", "args": {"url": "b"}}},
    ]
    # both parallel results in one turn, names resolved from the tool call ids
    assert tool["parts"] == [
        {"functionResponse": {"name": "lookup", "response": {"answer": 42}}},
        {"functionResponse": {"name": "fetch", "response": {"output": "plain text result"}}},
    ]
    assert b["tools"] == [{"functionDeclarations": [{
        "name": "lookup", "description": "Look something up",
        "parametersJsonSchema": TOOLS[0]["function"]["parameters"]}]}]
    assert b["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert b["generationConfig"] == {"temperature": 0.3, "topP": 0.9, "maxOutputTokens": 50, "stopSequences": ["END"],
                                     "seed": 7, "candidateCount": 2, "presencePenalty": 0.5}
    assert result.dropped_params == []
    # the last turn is a functionResponse: the fake answers with text, once per candidate
    assert result.response is not None
    assert [c["index"] for c in result.response["choices"]] == [0, 1]
    assert result.response["choices"][0]["message"]["content"].startswith("Echo: what is in these?")


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        ({"type": "function", "function": {"name": "lookup"}}, {"mode": "ANY", "allowedFunctionNames": ["lookup"]}),
    ],
)
async def test_tool_choice(fake: FakeGemini, choice: Any, config: dict[str, Any]) -> None:
    await run(fake, {**BODY, "tools": TOOLS, "tool_choice": choice})
    assert fake.calls()[0].body["toolConfig"] == {"functionCallingConfig": config}


async def test_json_modes(fake: FakeGemini) -> None:
    await run(fake, {**BODY, "response_format": {"type": "json_object"}, "max_tokens": 9})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    await run(fake, {**BODY, "response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "x", "strict": True, "schema": schema}}})
    first, second = (r.body["generationConfig"] for r in fake.calls())
    assert first == {"responseMimeType": "application/json", "maxOutputTokens": 9}
    assert second == {"responseMimeType": "application/json", "responseJsonSchema": schema}


async def test_reasoning_effort_and_gemini_passthrough(fake: FakeGemini) -> None:
    await run(fake, {**BODY, "reasoning_effort": "low", "top_k": 5,
                     "safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]})
    await run(fake, {**BODY, "reasoning_effort": "high"}, model="gemini-3-pro-preview")
    first, second = (r.body for r in fake.calls())
    assert first["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 1024}, "topK": 5}
    assert first["safetySettings"][0]["threshold"] == "BLOCK_NONE"
    assert second["generationConfig"] == {"thinkingConfig": {"thinkingLevel": "high"}}


async def test_gemini3_history_without_signature_gets_the_skip_sentinel(fake: FakeGemini) -> None:
    body = {**BODY, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
    ]}
    await run(fake, body, model="gemini-3-flash-preview")
    await run(fake, body)
    g3, g25 = (r.body["contents"][1]["parts"] for r in fake.calls())
    assert g3[0]["thoughtSignature"] == "skip_thought_signature_validator" and "thoughtSignature" not in g3[1]
    assert all("thoughtSignature" not in p for p in g25)
    assert fake.calls()[0].body["contents"][2]["parts"][0]["functionResponse"]["response"] == {"output": 1}


async def test_unsupported_params_are_dropped_or_refused_when_strict(fake: FakeGemini) -> None:
    body = {**BODY, "logit_bias": {"1": 2}, "parallel_tool_calls": False, "logprobs": None}
    result = await run(fake, body)
    assert sorted(result.dropped_params) == ["logit_bias", "parallel_tool_calls"]
    assert "logit_bias" not in orjson.dumps(fake.calls()[0].body).decode()
    # translation errors fail the call before anything is sent
    with pytest.raises(CallFailed) as info:
        await run(fake, body, strict=True)
    assert info.value.error.status == 400 and info.value.error.param == "logit_bias"
    assert len(fake.calls()) == 1  # refused before any upstream call


async def test_untranslatable_messages_are_a_clear_400(fake: FakeGemini) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": "x"},
                                 {"role": "tool", "tool_call_id": "nope", "content": "1"}]}
    with pytest.raises(CallFailed) as info:
        await run(fake, body)
    assert info.value.error.status == 400 and info.value.error.param == "messages[1].tool_call_id"
    with pytest.raises(CallFailed) as info:
        await run(fake, {**BODY, "messages": [{"role": "system", "content": "only a system prompt"}]})
    assert info.value.error.status == 400 and info.value.error.param == "messages"


# ---- responses -----------------------------------------------------------------------------


async def test_text_completion(fake: FakeGemini) -> None:
    result = await run(fake, BODY)
    assert result.response is not None
    choice = result.response["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Echo: hello there", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert result.response["object"] == "chat.completion" and result.response["model"] == MODEL
    assert result.usage.prompt_tokens == 3 and result.usage.completion_tokens == 5


async def test_max_tokens_finish_is_length(fake: FakeGemini) -> None:
    result = await run(fake, {**BODY, "max_tokens": 2})
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Echo: hello"
    assert result.response["choices"][0]["finish_reason"] == "length"


async def test_tool_call_completion(fake: FakeGemini) -> None:
    result = await run(fake, {**BODY, "tools": TOOLS})
    assert result.response is not None
    choice = result.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (tc,) = choice["message"]["tool_calls"]
    assert tc["id"].startswith("call_") and tc["type"] == "function"
    assert tc["function"] == {"name": "lookup", "arguments": '{"query":"hello there"}'}
    assert tc["extra_content"] == {"google": {"thought_signature": SIGNATURE}}


async def test_usage_with_cached_and_reasoning_tokens(fake: FakeGemini) -> None:
    fake.implicit_cache = True  # Gemini's implicit caching: cachedContentTokenCount with no cachedContent sent
    body = {**BODY, "thinking_config": {"thinking_budget": 512, "include_thoughts": True}}
    result = await run(fake, body)
    sent = fake.calls()[0].body
    assert sent["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 512, "includeThoughts": True}
    assert result.response is not None
    usage = result.response["usage"]
    # completion_tokens includes the thoughts, as OpenAI counts reasoning inside completion tokens
    assert usage == {"prompt_tokens": 3, "completion_tokens": 5 + 7, "total_tokens": 15,
                     "prompt_tokens_details": {"cached_tokens": 3},
                     "completion_tokens_details": {"reasoning_tokens": 7}}
    assert (result.usage.cached_tokens, result.usage.reasoning_tokens) == (3, 7)
    message = result.response["choices"][0]["message"]
    assert message["content"] == "Echo: hello there" and message["reasoning_content"] == "Thinking about it."


async def test_safety_finish_is_content_filter(fake: FakeGemini) -> None:
    result = await run(fake, {**BODY, "messages": [{"role": "user", "content": "[[unsafe]] do it"}]})
    assert result.response is not None
    assert result.response["choices"][0]["finish_reason"] == "content_filter"
    assert result.response["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize("stream", [False, True])
async def test_blocked_prompt_is_a_400_content_filter(fake: FakeGemini, stream: bool) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": "[[block]]"}]}
    with pytest.raises(CallFailed) as info:
        if stream:
            await run_stream(fake, body)
        else:
            await run(fake, body)
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (400, "content_filter", False)
    assert "blockReason SAFETY" in err.message and info.value.chunks_sent == 0


# ---- streaming -----------------------------------------------------------------------------


async def test_stream_text(fake: FakeGemini) -> None:
    result, got = await run_stream(fake, BODY)
    sent = fake.calls()[0]
    assert sent.path == f"/v1beta/models/{MODEL}:streamGenerateContent" and sent.query == {"alt": "sse"}
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r1" for c in got)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got)
    assert text == "Echo: hello there"
    assert [c["choices"][0]["finish_reason"] for c in got].count("stop") == 1
    assert got[-1]["choices"][0]["finish_reason"] == "stop"
    # usage from the last usageMetadata (earlier events carried only a partial count)
    assert result.usage_chunk is not None and result.usage_chunk["choices"] == []
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 5)


async def test_stream_tool_call(fake: FakeGemini) -> None:
    result, got = await run_stream(fake, {**BODY, "tools": TOOLS})
    deltas = [c["choices"][0]["delta"] for c in got]
    calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert len(calls) == 1
    (tc,) = calls[0]
    assert tc["index"] == 0 and tc["id"].startswith("call_") and tc["type"] == "function"
    assert tc["function"] == {"name": "lookup", "arguments": '{"query":"hello there"}'}
    assert got[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert result.usage.completion_tokens > 0


async def test_stream_reasoning_and_usage(fake: FakeGemini) -> None:
    result, got = await run_stream(fake, {**BODY, "thinking_config": {"includeThoughts": True}})
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in got)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got)
    assert (reasoning, text) == ("Thinking about it.", "Echo: hello there")
    assert result.usage.reasoning_tokens == 7 and result.usage.completion_tokens == 12


async def test_stream_safety_finish(fake: FakeGemini) -> None:
    _, got = await run_stream(fake, {**BODY, "messages": [{"role": "user", "content": "[[unsafe]]"}]})
    assert got[-1]["choices"][0]["finish_reason"] == "content_filter"


async def test_stream_cut_halfway_is_a_retryable_error_after_chunks(fake: FakeGemini) -> None:
    fake.inject(cut_after=2)
    got: list[dict[str, Any]] = []

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        with pytest.raises(CallFailed) as info:
            await call(client, GeminiAdapter(), ctx(fake, BODY, stream=True), on_chunk=sink)
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (502, "stream_interrupted", True)
    assert info.value.chunks_sent == len(got) == 3  # role chunk + two words


async def test_stream_in_band_error(fake: FakeGemini) -> None:
    with pytest.raises(CallFailed) as info:
        await run_stream(fake, {**BODY, "messages": [{"role": "user", "content": "[[stream-error]] x"}]})
    err = info.value.error
    assert (err.status, err.retryable) == (502, True) and "internal error" in err.message
    assert info.value.chunks_sent == 2


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code", "retryable"),
    [
        ({"status": 400, "message": "Invalid value at 'generation_config.temperature'"}, 400, "invalid_argument",
         False),
        ({"status": 400, "message": "The input token count (1200000) exceeds the maximum number of tokens allowed "
                                    "(1048576)."}, 400, "context_length_exceeded", False),
        ({"status": 401}, 401, "invalid_api_key", False),
        ({"status": 403}, 403, "permission_denied", False),
        ({"status": 404, "message": "models/gemini-9 is not found for API version v1beta"}, 404, "model_not_found",
         False),
        ({"status": 429, "retry_after": 3}, 429, "rate_limit_exceeded", True),
        ({"status": 500}, 502, "upstream_error", True),
        ({"status": 503, "message": "The model is overloaded. Please try again later."}, 503, "overloaded", True),
        ({"status": 504}, 504, "timeout", True),
        ({"malformed": True}, 502, "bad_upstream_response", True),
        ({"silent": True}, 504, "upstream_timeout", True),
    ],
)
async def test_errors_map_to_openai_statuses(fake: FakeGemini, fault: dict[str, Any], status: int, code: str,
                                             retryable: bool) -> None:
    fake.inject(**fault)
    with pytest.raises(CallFailed) as info:
        await run(fake, BODY)
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (status, code, retryable)
    if fault.get("retry_after"):
        assert err.retry_after_s == 3


async def test_429_retry_delay_from_retry_info_details(fake: FakeGemini) -> None:
    fake.retry_delay_in_body = True
    fake.inject(status=429, retry_after=17)
    with pytest.raises(CallFailed) as info:
        await run(fake, BODY)
    err = info.value.error
    assert (err.status, err.retry_after_s) == (429, 17.0)
    assert err.response_headers()["retry-after"] == "17"


async def test_error_body_as_a_list(fake: FakeGemini) -> None:
    fake.error_as_list = True
    fake.inject(status=503, message="UNAVAILABLE right now")
    with pytest.raises(CallFailed) as info:
        await run(fake, BODY)
    assert (info.value.error.status, info.value.error.message) == (503, "gemini: UNAVAILABLE right now")


async def test_invalid_api_key_400_becomes_401(fake: FakeGemini) -> None:
    with pytest.raises(CallFailed) as info:
        await run(fake, BODY, key="bad-key")
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (401, "invalid_api_key", False)
    assert "bad-key" not in err.message


def test_error_table_by_google_status() -> None:
    def status_of(google: str, http: int = 400) -> int:
        body = orjson.dumps({"error": {"code": http, "message": "m", "status": google}})
        return gemini_error(http, body, httpx.Headers()).status

    assert status_of("FAILED_PRECONDITION") == 400
    assert status_of("UNAUTHENTICATED", 401) == 401
    assert status_of("INTERNAL", 500) == 502
    assert status_of("DEADLINE_EXCEEDED", 504) == 504
    assert status_of("UNAVAILABLE", 503) == 503
    assert status_of("RESOURCE_EXHAUSTED", 429) == 429
    header = gemini_error(429, b'{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "q"}}',
                          httpx.Headers({"retry-after": "4"}))
    assert header.retry_after_s == 4.0
    garbage = gemini_error(502, b"<html>Bad Gateway</html>", httpx.Headers())
    assert garbage.status == 502 and "Bad Gateway" in garbage.message


# ---- embeddings ----------------------------------------------------------------------------


async def test_embeddings(fake: FakeGemini) -> None:
    body = {"model": "emb", "input": ["alpha", "beta gamma"], "dimensions": 8}
    result = await run(fake, body, kind="embeddings", model="gemini-embedding-001")
    sent = fake.calls()[0]
    assert sent.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert sent.headers["x-goog-api-key"] == "g-key"
    assert sent.body == {"requests": [
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "alpha"}]}, "outputDimensionality": 8},
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "beta gamma"}]},
         "outputDimensionality": 8}]}
    assert result.response is not None
    data = result.response["data"]
    assert [d["index"] for d in data] == [0, 1] and all(len(d["embedding"]) == 8 for d in data)
    assert data[0]["object"] == "embedding" and result.response["object"] == "list"
    # estimated: ~1 token per 4 characters, as batchEmbedContents reports no counts
    assert result.response["usage"] == {"prompt_tokens": 2 + 3, "total_tokens": 5}
    assert result.usage.prompt_tokens == 5


async def test_embeddings_base64_and_token_input(fake: FakeGemini) -> None:
    result = await run(fake, {"model": "e", "input": "one", "encoding_format": "base64"}, kind="embeddings",
                       model="text-embedding-004")
    assert result.response is not None
    raw = base64.b64decode(result.response["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(floats) == 16 and all(0.0 <= f <= 1.0 for f in floats)
    with pytest.raises(CallFailed) as info:
        await run(fake, {"model": "e", "input": [[1, 2, 3]]}, kind="embeddings")
    assert info.value.error.status == 400 and info.value.error.param == "input"
