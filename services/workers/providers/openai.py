"""OpenAI and every OpenAI-compatible API (DeepSeek, Groq, Together, Mistral, xAI, OpenRouter,
Fireworks, vLLM, Ollama, the built-in demo provider): the same wire format at another base URL.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.workers.providers.base import (
    GATEWAY_FIELDS,
    CallContext,
    ProviderAdapter,
    ServerEvent,
    StreamParser,
    UpstreamRequest,
)
from shared.errors import GatewayError

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



class OpenAICompatibleStream(StreamParser):
    def __init__(self) -> None:
        self._done = False

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        if event.data.strip() == "[DONE]":
            self._done = True
            return []
        data = event.json()
        if isinstance(data, dict) and "error" in data:
            err = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
            raise GatewayError(502, f"upstream stream error: {err.get('message')}", code=err.get("code"),
                               retryable=True)
        return [data]

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
        body = {k: v for k, v in ctx.body.items() if k not in GATEWAY_FIELDS}
        body["model"] = ctx.deployment.model
        body["stream"] = ctx.stream
        if ctx.stream:
            # Always ask for usage so every streamed call can be priced; the worker strips the
            # usage chunk again when the caller did not ask for it.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream_options", None)
        return UpstreamRequest("POST", f"{self._base(ctx)}/chat/completions", self._headers(ctx),
                               content=orjson.dumps(body))

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise GatewayError(502, f"{self.name}: malformed response (no choices)", retryable=True)
        return data

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return OpenAICompatibleStream()

    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        body = {k: v for k, v in ctx.body.items() if k not in GATEWAY_FIELDS}
        body["model"] = ctx.deployment.model
        return UpstreamRequest("POST", f"{self._base(ctx)}/embeddings", self._headers(ctx),
                               content=orjson.dumps(body))

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise GatewayError(502, f"{self.name}: malformed embeddings response", retryable=True)
        return data
