"""The Azure OpenAI adapter against a real HTTP fake serving Azure's deployment URLs and content-filter annotations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from switchyard.services.workers.calls import CallFailed, CallResult, call, make_client
from switchyard.services.workers.providers.azure import DEFAULT_API_VERSION, AzureOpenAIAdapter, strip_annotations
from switchyard.services.workers.providers.base import CallContext
from switchyard.shared.config_schema import Deployment
from tests.fakes.azure_fake import FILTER_TRIGGER, FakeAzureOpenAI

DEPLOYMENT = "chat-prod"
TOOL = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}}}}}
BODY = {"model": "my-group", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0.2}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAzureOpenAI]:
    server = FakeAzureOpenAI(deployments={DEPLOYMENT, "embed-prod"}).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean(fake: FakeAzureOpenAI) -> None:
    fake.reset()


def ctx(fake: FakeAzureOpenAI, body: dict[str, Any], stream: bool = False, deployment: str = DEPLOYMENT,
        api_key: str | None = "az-key", **dep: Any) -> CallContext:
    dep_ = Deployment(provider="azure", model=deployment, api_base=dep.pop("api_base", fake.url), api_key=api_key,
                      first_byte_timeout_s=5.0, id="a/0", **dep)
    return CallContext(deployment=dep_, body=body, stream=stream, api_key=api_key, request_id="r1")


async def run(context: CallContext, kind: str = "chat") -> CallResult:
    async with make_client() as client:
        return await call(client, AzureOpenAIAdapter(), context, kind=kind)


async def run_stream(context: CallContext,
                     got: list[dict[str, Any]] | None = None) -> tuple[CallResult, list[dict[str, Any]]]:
    """Stream a call, collecting its chunks in `got` (pass a list to keep them when the call fails)."""
    got = [] if got is None else got

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        result = await call(client, AzureOpenAIAdapter(), context, on_chunk=sink)
    return result, got


def no_filter_fields(data: Any) -> bool:
    text = orjson.dumps(data).decode()
    return "filter_results" not in text and "content_filter_offsets" not in text


async def test_chat_uses_deployment_url_api_version_and_api_key(fake: FakeAzureOpenAI) -> None:
    result = await run(ctx(fake, {**BODY, "fallbacks": ["x"]}))
    sent = fake.calls()[0]
    assert sent.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert sent.query == {"api-version": DEFAULT_API_VERSION}
    assert sent.headers["api-key"] == "az-key" and "authorization" not in sent.headers
    assert sent.body == {"messages": BODY["messages"], "temperature": 0.2, "stream": False}  # no model, no gateway
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Echo: hello there"
    assert result.response["choices"][0]["finish_reason"] == "stop"
    assert no_filter_fields(result.response)
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


async def test_api_version_and_base_with_openai_suffix(fake: FakeAzureOpenAI) -> None:
    await run(ctx(fake, BODY, api_version="2025-04-01-preview", api_base=f"{fake.url}/openai/"))
    sent = fake.calls()[0]
    assert sent.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert sent.query == {"api-version": "2025-04-01-preview"}


async def test_entra_id_bearer_token_replaces_api_key(fake: FakeAzureOpenAI) -> None:
    result = await run(ctx(fake, BODY, headers={"Authorization": "Bearer aad-token"}))
    sent = fake.calls()[0]
    assert sent.headers["authorization"] == "Bearer aad-token" and "api-key" not in sent.headers
    assert result.response is not None


async def test_missing_key_is_401(fake: FakeAzureOpenAI) -> None:
    with pytest.raises(CallFailed) as info:
        await run(ctx(fake, BODY, api_key=None))
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (401, "invalid_api_key", False)
    assert err.message.startswith("azure: Access denied")


async def test_unknown_deployment_is_404_model_not_found(fake: FakeAzureOpenAI) -> None:
    with pytest.raises(CallFailed) as info:
        await run(ctx(fake, BODY, deployment="nope"))
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (404, "model_not_found", False)
    assert "deployment for this resource does not exist" in err.message


async def test_tool_call_and_image_pass_through(fake: FakeAzureOpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    body = {**BODY, "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, image]}],
            "tools": [TOOL], "tool_choice": "auto"}
    result = await run(ctx(fake, body))
    sent = fake.calls()[0].body
    assert sent["messages"][0]["content"][1] == image and sent["tools"] == [TOOL]
    assert result.response is not None
    choice = result.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert orjson.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"query": "look"}


async def test_json_mode_is_forwarded(fake: FakeAzureOpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}
    await run(ctx(fake, {**BODY, "response_format": fmt}))
    assert fake.calls()[0].body["response_format"] == fmt


async def test_content_filter_finish_reason_is_kept(fake: FakeAzureOpenAI) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": f"tell me about {FILTER_TRIGGER}"}]}
    result = await run(ctx(fake, body))
    assert result.response is not None
    assert result.response["choices"][0]["finish_reason"] == "content_filter"
    _, got = await run_stream(ctx(fake, body, stream=True))
    assert [c["choices"][0]["finish_reason"] for c in got if c["choices"][0]["finish_reason"]] == ["content_filter"]
    assert no_filter_fields(got)


async def test_stream_drops_annotations_and_captures_usage(fake: FakeAzureOpenAI) -> None:
    result, got = await run_stream(ctx(fake, BODY, stream=True))
    assert fake.calls()[0].body["stream_options"] == {"include_usage": True}
    assert all(c["choices"] for c in got)  # neither the prompt_filter_results chunk nor the usage chunk
    assert all("delta" in c["choices"][0] for c in got)
    assert no_filter_fields(got)
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in got) == "Echo: hello there"
    assert got[-1]["choices"][0]["finish_reason"] == "stop"
    assert result.usage_chunk is not None and result.usage_chunk["choices"] == []
    assert result.usage.completion_tokens > 0
    assert result.chunks_sent == len(got)


async def test_stream_tool_call_argument_deltas_with_index(fake: FakeAzureOpenAI) -> None:
    _, got = await run_stream(ctx(fake, {**BODY, "tools": [TOOL]}, stream=True))
    calls = [tc for c in got for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert len(calls) > 2 and all(tc["index"] == 0 for tc in calls)
    assert calls[0]["function"]["name"] == "search" and calls[0]["id"].startswith("call_")
    assert orjson.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"query": "hello there"}
    assert got[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_annotation_chunks_are_dropped_and_final_choice_kept() -> None:
    assert strip_annotations({"id": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]}) is None
    assert strip_annotations({"choices": [{"index": 0, "finish_reason": None,
                                           "content_filter_offsets": {"check_offset": 1}}]}) is None
    assert strip_annotations({"choices": [{"index": 0, "delta": {}, "finish_reason": None,
                                           "content_filter_results": {}}]}) is None
    kept = strip_annotations({"choices": [{"index": 0, "finish_reason": "stop", "content_filter_results": {}}]})
    assert kept == {"choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 1}}
    assert strip_annotations(dict(usage)) == usage


async def test_stream_cut_halfway_is_a_retryable_error_after_chunks(fake: FakeAzureOpenAI) -> None:
    fake.inject(cut_after=4)  # the prompt-filter chunk, the role chunk, two words
    got: list[dict[str, Any]] = []
    with pytest.raises(CallFailed) as info:
        await run_stream(ctx(fake, BODY, stream=True), got)
    assert info.value.error.code == "stream_interrupted" and info.value.error.retryable
    assert info.value.chunks_sent == len(got) == 3


@pytest.mark.parametrize(
    ("fault", "status", "code", "retryable"),
    [
        ({"status": 400, "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
                                    "management policy."}, 400, "content_filter", False),
        ({"status": 400, "message": "This model's maximum context length is 128000 tokens."}, 400,
         "context_length_exceeded", False),
        ({"status": 400, "message": "Invalid value for 'temperature'"}, 400, None, False),
        ({"status": 401, "message": "Access denied"}, 401, "invalid_api_key", False),
        ({"status": 404, "message": "The API deployment for this resource does not exist."}, 404, "model_not_found",
         False),
        ({"status": 429, "retry_after": 3, "message": "Requests have exceeded token rate limit. Please retry after "
                                                      "3 seconds."}, 429, "rate_limit_exceeded", True),
        ({"status": 500, "message": "The server had an error"}, 502, "upstream_error", True),
        ({"status": 503, "message": "The service is temporarily unable to process your request."}, 503, "overloaded",
         True),
        ({"malformed": True}, 502, "bad_upstream_response", True),
        ({"silent": True}, 504, "upstream_timeout", True),
    ],
)
async def test_errors_map_to_openai_statuses(fake: FakeAzureOpenAI, fault: dict[str, Any], status: int,
                                             code: str | None, retryable: bool) -> None:
    fake.inject(**fault)
    with pytest.raises(CallFailed) as info:
        await run(ctx(fake, BODY))
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (status, code, retryable)
    if fault.get("status") == 400 and code == "content_filter":
        assert err.param == "prompt"
    if fault.get("retry_after"):
        assert err.retry_after_s == 3


async def test_embeddings(fake: FakeAzureOpenAI) -> None:
    body = {"model": "emb", "input": ["a", "b"], "dimensions": 16, "encoding_format": "float"}
    result = await run(ctx(fake, body, deployment="embed-prod"), kind="embeddings")
    sent = fake.calls()[0]
    assert sent.path == "/openai/deployments/embed-prod/embeddings"
    assert sent.query == {"api-version": DEFAULT_API_VERSION} and sent.headers["api-key"] == "az-key"
    assert sent.body == {"input": ["a", "b"], "dimensions": 16, "encoding_format": "float"}
    assert result.response is not None and len(result.response["data"]) == 2
    assert result.usage.prompt_tokens == 2


async def test_missing_api_version_is_refused_by_the_fake(fake: FakeAzureOpenAI) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{fake.url}/openai/deployments/{DEPLOYMENT}/chat/completions",
                                     headers={"api-key": "k"}, json=BODY)
    assert response.status_code == 404
