"""Cohere's v2 API (`POST /v2/chat`, `POST /v2/embed`), translated to and from OpenAI's shapes.

The request side is cohere_request.py, the answers and stream events cohere_response.py; this module holds the
adapter: where calls go, how they authenticate, and how Cohere's errors map onto OpenAI's.
"""

from __future__ import annotations

from typing import Any

import httpx

from switchyard.services.workers.providers.base import CallContext, ProviderAdapter, StreamParser, UpstreamRequest
from switchyard.services.workers.providers.cohere_request import PROVIDER, chat_body, embed_body
from switchyard.services.workers.providers.cohere_response import CohereStream, chat_completion, embeddings
from switchyard.services.workers.providers.openai_shape import classify_status, error_message, retry_after_seconds
from switchyard.services.workers.providers.reading import encode_json
from switchyard.shared.errors import GatewayError

__all__ = ["CohereAdapter", "CohereStream"]

DEFAULT_BASE = "https://api.cohere.com"

# Cohere words an over-long prompt several ways ("too many tokens: ... cannot exceed ...",
# "... exceeds the model's context ..."); with "token" in the message any of these means context length.
_CONTEXT_HINTS = ("too many tokens", "exceeds", "exceeded", "too long")


class CohereAdapter(ProviderAdapter):
    name = "cohere"

    def _url(self, ctx: CallContext, path: str) -> str:
        return f"{(ctx.deployment.api_base or DEFAULT_BASE).rstrip('/')}{path}"

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json", **ctx.deployment.headers}
        if ctx.stream:
            headers["accept"] = "text/event-stream"
        if ctx.api_key:
            headers["authorization"] = f"Bearer {ctx.api_key}"
        return headers

    # ---- chat ----

    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        out, dropped = chat_body(ctx)
        return UpstreamRequest("POST", self._url(ctx, "/v2/chat"), self._headers(ctx),
                               content=encode_json(out, ctx.body, PROVIDER), dropped_params=dropped)

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        return chat_completion(data, ctx)

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return CohereStream(ctx)

    # ---- embeddings ----

    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        out, dropped = embed_body(ctx)
        return UpstreamRequest("POST", self._url(ctx, "/v2/embed"), self._headers(ctx),
                               content=encode_json(out, ctx.body, PROVIDER), dropped_params=dropped)

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        return embeddings(data, ctx)

    # ---- errors ----

    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        """Cohere's `{"message"}` (or `{"id", "message"}`) errors, by status, onto what an OpenAI client expects."""
        message, _ = error_message(body)
        retry_after = retry_after_seconds(headers)
        text = message.lower()
        if status in (400, 413, 422) and "token" in text and any(h in text for h in _CONTEXT_HINTS):
            return GatewayError(400, f"cohere: {message}", code="context_length_exceeded", param="messages")
        if status == 498:  # invalid token
            return GatewayError(401, f"cohere: {message}", code="invalid_api_key")
        if status == 402:  # billing: OpenAI reports an exhausted quota as 429 insufficient_quota
            return GatewayError(429, f"cohere: {message}", code="insufficient_quota", retryable=False)
        if status == 499:  # upstream saw the request cancelled; another attempt may succeed
            return GatewayError(502, f"cohere: {message}", code="upstream_error", retryable=True)
        if status == 501:
            return GatewayError(400, f"cohere: {message}", code="unsupported_value", retryable=False)
        return classify_status(status, message, None, retry_after, self.name)
