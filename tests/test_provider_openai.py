"""The OpenAI-compatible adapter against a real HTTP fake speaking OpenAI's wire format."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from switchyard.services.workers.calls import CallFailed, call, make_client
from switchyard.services.workers.providers import get_adapter
from switchyard.services.workers.providers.base import CallContext
from switchyard.shared.config_schema import Deployment
from tests.fakes.openai_fake import FakeOpenAI


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean(fake: FakeOpenAI) -> None:
    fake.reset()


def ctx(fake: FakeOpenAI, body: dict[str, Any], stream: bool = False, provider: str = "openai") -> CallContext:
    dep = Deployment(provider=provider, model="gpt-4o-mini", api_base=f"{fake.url}/v1", api_key="sk-upstream",
                     first_byte_timeout_s=5.0, id="g/0")
    return CallContext(deployment=dep, body=body, stream=stream, api_key="sk-upstream", request_id="r1")


BODY = {"model": "my-group", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0.2}


async def test_chat_sends_provider_model_and_key_and_returns_completion(fake: FakeOpenAI) -> None:
    async with make_client() as client:
        result = await call(client, get_adapter("openai"), ctx(fake, BODY))
    sent = fake.calls("/chat/completions")[0]
    assert sent.body["model"] == "gpt-4o-mini"
    assert sent.body["temperature"] == 0.2
    assert sent.headers["authorization"] == "Bearer sk-upstream"
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Echo: hello there"
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


async def test_stream_delivers_chunks_in_order_and_captures_usage(fake: FakeOpenAI) -> None:
    got: list[dict[str, Any]] = []

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        result = await call(client, get_adapter("openai"), ctx(fake, BODY, stream=True), on_chunk=sink)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got)
    assert text == "Echo: hello there"
    assert fake.calls()[0].body["stream_options"] == {"include_usage": True}
    assert result.usage.completion_tokens > 0
    assert result.usage_chunk is not None and result.usage_chunk["choices"] == []


@pytest.mark.parametrize(
    ("fault", "status", "code", "retryable"),
    [
        ({"status": 401}, 401, "invalid_api_key", False),
        ({"status": 404}, 404, "model_not_found", False),
        ({"status": 400, "message": "This model's maximum context length is 8192 tokens"}, 400,
         "context_length_exceeded", False),
        ({"status": 429, "retry_after": 3}, 429, "rate_limit_exceeded", True),
        ({"status": 500}, 502, "upstream_error", True),
        ({"status": 503}, 503, "overloaded", True),
        ({"malformed": True}, 502, "bad_upstream_response", True),
        ({"silent": True}, 504, "upstream_timeout", True),
    ],
)
async def test_errors_map_to_openai_statuses(fake: FakeOpenAI, fault: dict[str, Any], status: int, code: str,
                                             retryable: bool) -> None:
    fake.inject(**fault)
    async with make_client() as client:
        with pytest.raises(CallFailed) as info:
            await call(client, get_adapter("openai"), ctx(fake, BODY))
    err = info.value.error
    assert (err.status, err.code, err.retryable) == (status, code, retryable)
    if fault.get("retry_after"):
        assert err.retry_after_s == 3


async def test_stream_cut_halfway_is_a_retryable_error_after_chunks(fake: FakeOpenAI) -> None:
    fake.inject(cut_after=3)
    got: list[dict[str, Any]] = []

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        with pytest.raises(CallFailed) as info:
            await call(client, get_adapter("openai"), ctx(fake, BODY, stream=True), on_chunk=sink)
    assert info.value.error.code == "stream_interrupted"
    assert info.value.chunks_sent == len(got) == 3


async def test_embeddings(fake: FakeOpenAI) -> None:
    body = {"model": "emb", "input": ["a", "b"]}
    async with make_client() as client:
        result = await call(client, get_adapter("openai"), ctx(fake, body), kind="embeddings")
    assert result.response is not None and len(result.response["data"]) == 2
    assert fake.calls("/embeddings")[0].body["model"] == "gpt-4o-mini"


def test_presets_have_base_urls() -> None:
    for name in ["openai", "deepseek", "groq", "together", "mistral", "xai", "openrouter", "fireworks", "vllm",
                 "ollama"]:
        adapter = get_adapter(name)
        assert adapter.name == name
