"""Every native adapter behind the whole pipeline: the OpenAI SDK sees OpenAI, whatever the provider."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import Fakes
from tests.stack import RunningStack

GROUPS = {"claude": "anthropic", "gemini-flash": "gemini", "command": "cohere", "azure-gpt": "azure",
          "nova": "bedrock"}
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look something up", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


@pytest.fixture
def client(stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-test-master", max_retries=0, timeout=60)


@pytest.mark.parametrize("model", list(GROUPS))
def test_chat_and_stream(client: openai.OpenAI, fakes: Fakes, model: str) -> None:
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello there"}])
    text = resp.choices[0].message.content or ""
    assert "hello there" in text
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.prompt_tokens > 0
    fake = getattr(fakes, GROUPS[model])
    assert len(fake.calls()) == 1  # the provider's own endpoint was called, in its own wire format
    chunks: list[Any] = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello there"}], stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("model", list(GROUPS))
def test_tool_calls(client: openai.OpenAI, model: str) -> None:
    resp = client.chat.completions.create(model=model, tools=[TOOL],  # type: ignore[list-item]
                                          messages=[{"role": "user", "content": "find cats"}])
    calls = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls"
    assert calls and calls[0].function.name == "lookup"  # type: ignore[union-attr]
