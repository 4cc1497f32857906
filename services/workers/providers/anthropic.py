"""Anthropic's Messages API (`POST /v1/messages`): the adapter.

An OpenAI chat request is translated (anthropic_request.py) and its answer translated back
(anthropic_response.py); a request the caller wrote in Anthropic's own format
(`CallContext.native`) is passed through: sent as written, answered as Anthropic answered.
"""

from __future__ import annotations

from typing import Any

import httpx

from switchyard.services.workers.providers.anthropic_request import (
    API_VERSION,
    DEFAULT_BASE,
    PROVIDER,
    build_body,
    native_body,
)
from switchyard.services.workers.providers.anthropic_response import (
    AnthropicPassthrough,
    AnthropicStream,
    anthropic_error,
    anthropic_usage,
    checked_message,
    openai_message,
)
from switchyard.services.workers.providers.base import CallContext, ProviderAdapter, StreamParser, UpstreamRequest
from switchyard.services.workers.providers.openai_shape import error_message, usage_from_openai
from switchyard.services.workers.providers.reading import encode_json
from switchyard.shared.contracts import Usage
from switchyard.shared.errors import GatewayError


class AnthropicAdapter(ProviderAdapter):
    name = PROVIDER
    native_format = "anthropic"

    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        body, dropped = (native_body(ctx), []) if ctx.native is not None else build_body(ctx)
        base = (ctx.deployment.api_base or DEFAULT_BASE).rstrip("/")
        url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"
        headers = {"content-type": "application/json", "anthropic-version": ctx.deployment.api_version or API_VERSION}
        if ctx.native is not None:
            headers.update(ctx.native.headers)
        if ctx.api_key:
            headers["x-api-key"] = ctx.api_key
        headers.update(ctx.deployment.headers)
        source = ctx.native.body if ctx.native is not None else ctx.body
        return UpstreamRequest("POST", url, headers, content=encode_json(body, source, PROVIDER),
                               dropped_params=dropped)

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        return checked_message(data) if ctx.native is not None else openai_message(data, ctx)

    def usage_of(self, response: dict[str, Any], ctx: CallContext) -> Usage:
        if ctx.native is not None:
            return usage_from_openai(anthropic_usage(response.get("usage") or {}))
        return usage_from_openai(response.get("usage"))

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return AnthropicPassthrough() if ctx.native is not None else AnthropicStream(ctx)

    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        message, err = error_message(body)
        return anthropic_error({"type": err.get("type"), "message": message}, status, headers)
