"""The Cohere v2 adapter against a real HTTP fake speaking Cohere's wire format (JSON and typed SSE)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from switchyard.devstack.demo_provider import count_tokens
from switchyard.services.workers.calls import CallFailed, CallResult, call, make_client
from switchyard.services.workers.providers.base import CallContext, ServerEvent
from switchyard.services.workers.providers.cohere import CohereAdapter, CohereStream
from switchyard.shared.config_schema import Deployment
from switchyard.shared.errors import GatewayError
from tests.fakes.cohere_fake import TEMPLATE_TOKENS, FakeCohere

PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
         "AAAABJRU5ErkJggg==")
TOOL: dict[str, Any] = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                         "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                        "required": ["query"]}}}
BODY = {"model": "my-group", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0.2}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeCohere]:
    server = FakeCohere().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean(fake: FakeCohere) -> None:
    fake.reset()


def ctx(fake: FakeCohere, body: dict[str, Any], stream: bool = False, strict: bool = False,
        api_key: str | None = "co-upstream") -> CallContext:
    dep = Deployment(provider="cohere", model="command-a-03-2025", api_base=fake.url, api_key=api_key,
                     first_byte_timeout_s=5.0, id="c/0")
    return CallContext(deployment=dep, body=body, stream=stream, api_key=api_key, request_id="r1", strict=strict)


async def run(fake: FakeCohere, body: dict[str, Any], **kw: Any) -> CallResult:
    kind = kw.pop("kind", "chat")
    async with make_client() as client:
        return await call(client, CohereAdapter(), ctx(fake, body, **kw), kind=kind)


def refused(info: pytest.ExceptionInfo[Exception]) -> GatewayError:
    """The error of a request refused while being translated: `call` may raise it bare or as CallFailed."""
    e = info.value
    return e.error if isinstance(e, CallFailed) else e  # type: ignore[return-value]


async def run_stream(fake: FakeCohere, body: dict[str, Any],
                     got: list[dict[str, Any]] | None = None) -> tuple[CallResult, list[dict[str, Any]]]:
    """Stream a call, collecting its chunks in `got` (pass a list to keep them when the call fails)."""
    got = [] if got is None else got

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        result = await call(client, CohereAdapter(), ctx(fake, body, stream=True), on_chunk=sink)
    return result, got


# ---- request translation ----------------------------------------------------------------------


async def test_request_translation_to_cohere_v2(fake: FakeCohere) -> None:
    body = {
        "model": "my-group",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"query":"p"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                         {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}}]},
        ],
        "max_completion_tokens": 50, "temperature": 0.3, "top_p": 1.0, "seed": 7, "stop": "END",
        "frequency_penalty": 1.5, "presence_penalty": -0.5,
        "tools": [{**TOOL, "function": {**TOOL["function"], "strict": True}}], "tool_choice": "required",
        "k": 40, "safety_mode": "STRICT", "user": "u-1", "stream_options": {"include_usage": True},
    }
    result = await run(fake, body)
    sent = fake.calls("/v2/chat")[0]
    assert sent.path == "/v2/chat"
    assert sent.headers["authorization"] == "Bearer co-upstream"
    assert sent.body == {
        "model": "command-a-03-2025",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "tool_plan": "Let me look.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"query":"p"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                         {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}}]},
        ],
        "stream": False, "max_tokens": 50, "temperature": 0.3, "p": 0.99, "seed": 7,
        "frequency_penalty": 1.0, "presence_penalty": 0.0, "stop_sequences": ["END"],
        "tool_choice": "REQUIRED", "tools": [TOOL], "strict_tools": True, "k": 40, "safety_mode": "STRICT",
    }
    assert result.dropped_params == ["frequency_penalty", "presence_penalty"]  # clamped: not honoured as asked


async def test_forced_function_offers_only_that_tool(fake: FakeCohere) -> None:
    other = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    body = {**BODY, "tools": [TOOL, other], "tool_choice": {"type": "function", "function": {"name": "lookup"}}}
    result = await run(fake, body)
    sent = fake.calls("/v2/chat")[0].body
    assert sent["tool_choice"] == "REQUIRED" and [t["function"]["name"] for t in sent["tools"]] == ["lookup"]
    assert result.response is not None
    assert result.response["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"


async def test_tool_choice_none_and_auto(fake: FakeCohere) -> None:
    await run(fake, {**BODY, "tools": [TOOL], "tool_choice": "none"})
    await run(fake, {**BODY, "tools": [TOOL], "tool_choice": "auto"})
    none_sent, auto_sent = (r.body for r in fake.calls("/v2/chat"))
    assert none_sent["tool_choice"] == "NONE"
    assert "tool_choice" not in auto_sent and auto_sent["tools"] == [TOOL]


async def test_unsupported_params_are_dropped_and_reported(fake: FakeCohere) -> None:
    body = {**BODY, "logprobs": True, "logit_bias": {"1": 2}, "n": 2, "parallel_tool_calls": False, "store": True}
    result = await run(fake, body)
    assert sorted(result.dropped_params) == ["logit_bias", "logprobs", "n", "parallel_tool_calls", "store"]
    sent = fake.calls("/v2/chat")[0].body
    assert not {"logprobs", "logit_bias", "n", "parallel_tool_calls", "store"} & set(sent)
    harmless = {**BODY, "n": 1, "logprobs": False, "parallel_tool_calls": True, "logit_bias": {}, "top_p": 1,
                "presence_penalty": 0, "response_format": {"type": "text"}, "stop": None}
    assert (await run(fake, harmless)).dropped_params == []
    odd = await run(fake, {**BODY, "response_format": {"type": "grammar"}, "top_p": 0.001})
    assert odd.dropped_params == ["top_p", "response_format"]


async def test_strict_refuses_unsupported_params_before_calling(fake: FakeCohere) -> None:
    with pytest.raises((CallFailed, GatewayError)) as info:
        await run(fake, {**BODY, "logit_bias": {"1": 2}}, strict=True)
    err = refused(info)
    assert (err.status, err.code, err.param) == (400, "unsupported_parameter", "logit_bias")
    assert fake.calls() == []


async def test_unsupported_content_part_is_a_400_naming_it(fake: FakeCohere) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}
    with pytest.raises((CallFailed, GatewayError)) as info:
        await run(fake, body)
    assert (refused(info).status, refused(info).param) == (400, "messages[0].content[1]")
    assert fake.calls() == []


# ---- responses --------------------------------------------------------------------------------


async def test_chat_returns_openai_completion_with_billed_usage(fake: FakeCohere) -> None:
    result = await run(fake, BODY)
    assert result.response is not None
    choice = result.response["choices"][0]
    assert result.response["object"] == "chat.completion"
    assert result.response["model"] == "command-a-03-2025"
    assert choice["message"] == {"role": "assistant", "content": "Echo: hello there", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert "citations" not in orjson.dumps(result.response).decode()
    usage = result.response["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # billed_units, not tokens (which also count Cohere's unbilled prompt template)
    assert result.usage.prompt_tokens == usage["prompt_tokens"] == count_tokens("hello there")
    assert result.usage.completion_tokens == count_tokens("Echo: hello there")
    assert TEMPLATE_TOKENS > 0


async def test_tool_call_response(fake: FakeCohere) -> None:
    result = await run(fake, {**BODY, "tools": [TOOL]})
    assert result.response is not None
    choice = result.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None  # the tool plan is not the answer
    call_ = choice["message"]["tool_calls"][0]
    assert call_["type"] == "function" and call_["id"].startswith("call_")
    assert call_["function"]["name"] == "search"
    assert orjson.loads(call_["function"]["arguments"]) == {"query": "hello there"}


async def test_images_reach_cohere_as_image_url_parts(fake: FakeCohere) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": PIXEL}}]}]}
    result = await run(fake, body)
    sent = fake.calls("/v2/chat")[0].body["messages"][0]["content"]
    assert sent[1] == {"type": "image_url", "image_url": {"url": PIXEL}}
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Echo: what is this [1 image(s)]"


async def test_json_mode_with_schema(fake: FakeCohere) -> None:
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}
    body = {**BODY, "response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": schema,
                                                                               "strict": True}}}
    result = await run(fake, body)
    assert fake.calls("/v2/chat")[0].body["response_format"] == {"type": "json_object", "json_schema": schema}
    assert result.response is not None
    assert orjson.loads(result.response["choices"][0]["message"]["content"]) == {"echo": "hello there"}
    await run(fake, {**BODY, "response_format": {"type": "json_object"}})
    await run(fake, {**BODY, "response_format": {"type": "text"}})
    assert fake.calls("/v2/chat")[1].body["response_format"] == {"type": "json_object"}
    assert "response_format" not in fake.calls("/v2/chat")[2].body


async def test_max_tokens_finish_is_length(fake: FakeCohere) -> None:
    result = await run(fake, {**BODY, "max_tokens": 2})
    assert result.response is not None
    assert result.response["choices"][0]["finish_reason"] == "length"
    assert result.response["choices"][0]["message"]["content"] == "Echo: hello"


# ---- streams ----------------------------------------------------------------------------------


async def test_stream_text_chunks_and_usage(fake: FakeCohere) -> None:
    result, got = await run_stream(fake, BODY)
    assert fake.calls()[0].body["stream"] is True
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r1" for c in got)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got)
    assert text == "Echo: hello there"
    assert [c["choices"][0]["finish_reason"] for c in got if c["choices"][0]["finish_reason"]] == ["stop"]
    assert "citation" not in orjson.dumps(got).decode()
    assert result.usage_chunk is not None and result.usage_chunk["choices"] == []
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.chunks_sent == len(got)


async def test_stream_tool_call_argument_deltas_with_index(fake: FakeCohere) -> None:
    result, got = await run_stream(fake, {**BODY, "tools": [TOOL]})
    calls = [tc for c in got for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls and all(tc["index"] == 0 for tc in calls)
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "search"
    assert len(calls) > 2  # arguments arrive in fragments
    args = "".join(tc["function"].get("arguments") or "" for tc in calls)
    assert orjson.loads(args) == {"query": "hello there"}
    assert "will call" not in orjson.dumps(got).decode()  # tool-plan-delta is not content
    assert got[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert result.usage.completion_tokens > 0


def test_stream_tool_indexes_count_from_zero_whatever_cohere_numbers_blocks() -> None:
    dep = Deployment(provider="cohere", model="command-a-03-2025")
    parser = CohereStream(CallContext(deployment=dep, body={}, stream=True, api_key=None, request_id="r9"))

    def ev(kind: str, **fields: Any) -> ServerEvent:
        return ServerEvent(data=orjson.dumps({"type": kind, **fields}).decode(), event=kind)

    def tc(i: int, **call_: Any) -> ServerEvent:
        kind = "tool-call-start" if "id" in call_ else "tool-call-delta"
        return ev(kind, index=i, delta={"message": {"tool_calls": call_}})

    events = [
        ev("message-start", id="m"), ev("content-start", index=0, delta={"message": {"content": {"text": ""}}}),
        ev("content-delta", index=0, delta={"message": {"content": {"text": "Checking."}}}),
        ev("content-end", index=0),
        tc(1, id="a", type="function", function={"name": "f", "arguments": ""}),
        tc(1, function={"arguments": '{"x":1}'}), ev("tool-call-end", index=1),
        tc(2, id="b", type="function", function={"name": "g", "arguments": ""}),
        tc(2, function={"arguments": "{}"}), ev("tool-call-end", index=2),
        ev("message-end", delta={"finish_reason": "TOOL_CALL",
                                 "usage": {"billed_units": {"input_tokens": 10, "output_tokens": 20},
                                           "tokens": {"input_tokens": 12, "output_tokens": 25}}}),
    ]
    out = [c for e in events for c in parser.feed(e)]
    indexes = [tc["index"] for c in out if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert indexes == [0, 0, 1, 1]
    assert parser.done
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[-1]["usage"]["prompt_tokens"] == 10 and out[-1]["usage"]["completion_tokens"] == 20


def test_stream_error_at_message_end_raises() -> None:
    parser = CohereStream(CallContext(deployment=Deployment(provider="cohere", model="m"), body={}, stream=True,
                                      api_key=None, request_id="r"))
    end = {"type": "message-end", "delta": {"finish_reason": "ERROR", "error": "internal failure"}}
    with pytest.raises(GatewayError) as info:
        parser.feed(ServerEvent(data=orjson.dumps(end).decode(), event="message-end"))
    assert (info.value.status, info.value.retryable) == (502, True)


async def test_stream_cut_halfway_is_a_retryable_error_after_chunks(fake: FakeCohere) -> None:
    fake.inject(cut_after=4)  # message-start, content-start, two content-deltas
    got: list[dict[str, Any]] = []
    with pytest.raises(CallFailed) as info:
        await run_stream(fake, BODY, got)
    assert info.value.error.code == "stream_interrupted" and info.value.error.retryable
    assert info.value.chunks_sent == len(got) == 3


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code", "retryable"),
    [
        ({"status": 400, "message": "too many tokens: total number of tokens in the prompt cannot exceed 4081 - "
                                    "received 4492. Try using a shorter prompt"},
         400, "context_length_exceeded", False),
        ({"status": 400, "message": "invalid request: prompt exceeds the model's 128000 token limit"}, 400,
         "context_length_exceeded", False),
        ({"status": 400, "message": "invalid request: temperature must be positive"}, 400, None, False),
        ({"status": 401, "message": "invalid api token"}, 401, "invalid_api_key", False),
        ({"status": 402, "message": "Please add a payment method"}, 429, "insufficient_quota", False),
        ({"status": 404, "message": "model 'x' not found"}, 404, "model_not_found", False),
        ({"status": 422, "message": "invalid request: messages must not be empty"}, 400, None, False),
        ({"status": 429, "retry_after": 3, "message": "You are using a Trial key"}, 429, "rate_limit_exceeded", True),
        ({"status": 498, "message": "invalid token"}, 401, "invalid_api_key", False),
        ({"status": 499, "message": "request cancelled"}, 502, "upstream_error", True),
        ({"status": 500, "message": "internal server error"}, 502, "upstream_error", True),
        ({"status": 503, "message": "service unavailable"}, 503, "overloaded", True),
        ({"malformed": True}, 502, "bad_upstream_response", True),
        ({"silent": True}, 504, "upstream_timeout", True),
    ],
)
async def test_errors_map_to_openai_statuses(fake: FakeCohere, fault: dict[str, Any], status: int, code: str | None,
                                             retryable: bool) -> None:
    fake.inject(**fault)
    with pytest.raises(CallFailed) as info:
        await run(fake, BODY)
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (status, code, retryable)
    if fault.get("message"):
        assert err.message == f"cohere: {fault['message']}"
    if fault.get("retry_after"):
        assert err.retry_after_s == 3


async def test_missing_key_is_401(fake: FakeCohere) -> None:
    with pytest.raises(CallFailed) as info:
        await run(fake, BODY, api_key=None)
    assert (info.value.error.status, info.value.error.code) == (401, "invalid_api_key")
    assert "authorization" not in fake.calls()[0].headers


# ---- embeddings -------------------------------------------------------------------------------


async def test_embeddings_translate_both_ways(fake: FakeCohere) -> None:
    result = await run(fake, {"model": "emb", "input": ["a", "bb"], "dimensions": 8}, kind="embeddings")
    sent = fake.calls("/v2/embed")[0]
    assert sent.headers["authorization"] == "Bearer co-upstream"
    assert sent.body == {"model": "command-a-03-2025", "texts": ["a", "bb"], "input_type": "search_document",
                         "embedding_types": ["float"], "output_dimension": 8}
    assert result.response is not None
    assert result.response["object"] == "list" and result.response["model"] == "command-a-03-2025"
    data = result.response["data"]
    assert [d["index"] for d in data] == [0, 1] and all(d["object"] == "embedding" for d in data)
    assert all(len(d["embedding"]) == 8 and isinstance(d["embedding"][0], float) for d in data)
    assert result.response["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert result.usage.prompt_tokens == 2


async def test_embeddings_input_type_override_and_base64(fake: FakeCohere) -> None:
    plain = await run(fake, {"model": "emb", "input": "query text", "input_type": "search_query"}, kind="embeddings")
    packed = await run(fake, {"model": "emb", "input": "query text", "input_type": "search_query",
                              "encoding_format": "base64"}, kind="embeddings")
    assert fake.calls("/v2/embed")[0].body["input_type"] == "search_query"
    assert plain.response is not None and packed.response is not None
    vector = plain.response["data"][0]["embedding"]
    raw = base64.b64decode(packed.response["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(vector)}f", raw)) == pytest.approx(vector)


async def test_embeddings_refuse_token_input(fake: FakeCohere) -> None:
    with pytest.raises((CallFailed, GatewayError)) as info:
        await run(fake, {"model": "emb", "input": [1, 2, 3]}, kind="embeddings")
    assert (refused(info).status, refused(info).param) == (400, "input")
    assert fake.calls() == []


async def test_embeddings_error_uses_cohere_body(fake: FakeCohere) -> None:
    fake.inject(status=429, retry_after=1, message="rate limit")
    with pytest.raises(CallFailed) as info:
        await run(fake, {"model": "emb", "input": "x"}, kind="embeddings")
    assert (info.value.error.status, info.value.error.message) == (429, "cohere: rate limit")
