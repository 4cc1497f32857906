"""OpenAI and every OpenAI-compatible API (DeepSeek, Groq, Together, Mistral, xAI, OpenRouter,
Fireworks, vLLM, Ollama, the built-in demo provider): the same wire format at another base URL.
"""

from __future__ import annotations

from typing import Any

from switchyard.services.workers.providers.base import (
    GATEWAY_FIELDS,
    CallContext,
    ProviderAdapter,
    ServerEvent,
    StreamParser,
    UpstreamRequest,
)
from switchyard.services.workers.providers.openai_shape import usage_from_openai
from switchyard.services.workers.providers.reading import (
    as_object,
    chat_messages,
    encode_json,
    forced_function,
    function_tool,
    objects,
    response_format,
    tool_call_function,
)
from switchyard.shared.errors import GatewayError

PRESETS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "groq": "https://api.groq.com/openai/v1",
    "together": "https://api.together.xyz/v1",
    "mistral": "https://api.mistral.ai/v1",
    "xai": "https://api.x.ai/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "vllm": "http://127.0.0.1:8000/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "demo": "",
}


def check_shapes(body: dict[str, Any], provider: str) -> None:
    """Refuse, before they cost an upstream call, the nested shapes OpenAI's API never accepts and
    translating adapters read: tool calls, tool definitions, a forced tool_choice and a json_schema
    response format whose objects are not objects (the same checks, and 400s, as every adapter's).
    Everything else is forwarded for the upstream to judge."""
    for i, message in enumerate(chat_messages(body, provider)):
        for j, call in enumerate(objects(message.get("tool_calls"), f"messages[{i}].tool_calls", provider)):
            tool_call_function(call, f"messages[{i}].tool_calls[{j}]", provider)
    for i, tool in enumerate(objects(body.get("tools"), "tools", provider)):
        function_tool(tool, f"tools[{i}]", provider)
    forced_function(body.get("tool_choice"), provider)
    response_format(body, provider)


def _checked(data: Any, provider: str, what: str) -> dict[str, Any]:
    """An upstream completion or chunk, passed on as it is: an object whose `usage`, if any, is readable."""
    if not isinstance(data, dict):
        raise GatewayError(502, f"{provider}: malformed {what} (not an object)", code="bad_upstream_response",
                           retryable=True)
    if data.get("usage"):  # most stream chunks have none: no Usage built for them
        usage_from_openai(data["usage"])
    return data


class OpenAICompatibleStream(StreamParser):
    def __init__(self, provider: str = "openai") -> None:
        self.provider = provider
        self._done = False

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        if event.data.strip() == "[DONE]":
            self._done = True
            return []
        data = event.json()
        if isinstance(data, dict) and "error" in data:
            err = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
            code = err.get("code")
            raise GatewayError(502, f"upstream stream error: {err.get('message')}",
                               code=code if isinstance(code, str) else None, retryable=True)
        return [_checked(data, self.provider, "stream chunk")]

    @property
    def done(self) -> bool:
        return self._done


class OpenAICompatibleAdapter(ProviderAdapter):
    def __init__(self, name: str = "openai") -> None:
        self.name = name
        self.default_base = PRESETS.get(name, "")

    def _base(self, ctx: CallContext) -> str:
        base = (ctx.deployment.api_base or self.default_base).rstrip("/")
        if not base:
            raise GatewayError(500, f"deployment {ctx.deployment.id} of provider {self.name!r} needs api_base",
                               retryable=False)
        return base

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"content-type": "application/json", **ctx.deployment.headers}
        if ctx.api_key:
            headers["authorization"] = f"Bearer {ctx.api_key}"
        return headers

    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        check_shapes(ctx.body, self.name)
        body = {k: v for k, v in ctx.body.items() if k not in GATEWAY_FIELDS}
        body["model"] = ctx.deployment.model
        body["stream"] = ctx.stream
        if ctx.stream:
            # Always ask for usage so every streamed call can be priced; the worker strips the
            # usage chunk again when the caller did not ask for it.
            options = as_object(body.get("stream_options"), "stream_options", self.name)
            body["stream_options"] = {**options, "include_usage": True}
        else:
            body.pop("stream_options", None)
        return UpstreamRequest("POST", f"{self._base(ctx)}/chat/completions", self._headers(ctx),
                               content=encode_json(body, ctx.body, self.name))

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise GatewayError(502, f"{self.name}: malformed response (no choices)", code="bad_upstream_response",
                               retryable=True)
        return _checked(data, self.name, "response")

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return OpenAICompatibleStream(self.name)

    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        body = {k: v for k, v in ctx.body.items() if k not in GATEWAY_FIELDS}
        body["model"] = ctx.deployment.model
        return UpstreamRequest("POST", f"{self._base(ctx)}/embeddings", self._headers(ctx),
                               content=encode_json(body, ctx.body, self.name))

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise GatewayError(502, f"{self.name}: malformed embeddings response", code="bad_upstream_response",
                               retryable=True)
        return _checked(data, self.name, "embeddings response")
