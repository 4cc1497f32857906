"""Google Gemini through the Generative Language API (`generativelanguage.googleapis.com`).

Wire format:
  chat        POST {base}/{version}/models/{model}:generateContent
  stream      POST {base}/{version}/models/{model}:streamGenerateContent?alt=sse
  embeddings  POST {base}/{version}/models/{model}:batchEmbedContents
`version` is the deployment's `api_version` (default `v1beta`). The key travels in the
`x-goog-api-key` header, never in the URL, so it cannot leak into access logs.

Request translation: gemini_request.py; answers, streams and errors: gemini_response.py.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from switchyard.services.workers.providers.base import (
    CallContext,
    ProviderAdapter,
    StreamParser,
    UpstreamRequest,
)
from switchyard.services.workers.providers.gemini_request import PROVIDER, chat_body, embeddings_body
from switchyard.services.workers.providers.gemini_request import public_media_url as public_media_url
from switchyard.services.workers.providers.gemini_response import GeminiStream, openai_embeddings, openai_message
from switchyard.services.workers.providers.gemini_response import gemini_error as gemini_error
from switchyard.services.workers.providers.reading import encode_json
from switchyard.shared.errors import GatewayError

DEFAULT_BASE = "https://generativelanguage.googleapis.com"
DEFAULT_VERSION = "v1beta"


class GeminiAdapter(ProviderAdapter):
    name = PROVIDER

    # ---- URLs and headers ----
    def _url(self, ctx: CallContext, method: str) -> str:
        base = (ctx.deployment.api_base or DEFAULT_BASE).rstrip("/")
        version = (ctx.deployment.api_version or DEFAULT_VERSION).strip("/")
        # an api_base that already names the version ("https://host/v1beta") is used as it is
        root = base if re.search(r"/v\d+(alpha|beta)?\d*$", base) else f"{base}/{version}"
        return f"{root}/{self._resource(ctx)}:{method}"

    @staticmethod
    def _resource(ctx: CallContext) -> str:
        model = ctx.deployment.model.strip("/")
        return model if "/" in model else f"models/{model}"  # "tunedModels/x" and "models/x" stay as given

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"content-type": "application/json", **ctx.deployment.headers}
        if ctx.api_key:
            headers["x-goog-api-key"] = ctx.api_key
        return headers
    # ---- chat ----
    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        out, dropped = chat_body(ctx)
        url = self._url(ctx, "streamGenerateContent") + "?alt=sse" if ctx.stream \
            else self._url(ctx, "generateContent")
        return UpstreamRequest("POST", url, self._headers(ctx), content=encode_json(out, ctx.body, self.name),
                               dropped_params=dropped)

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        return openai_message(data, ctx)

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return GeminiStream(ctx, self.name)

    # ---- embeddings ----
    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        out, dropped = embeddings_body(ctx, self._resource(ctx))
        return UpstreamRequest("POST", self._url(ctx, "batchEmbedContents"), self._headers(ctx),
                               content=encode_json(out, ctx.body, self.name), dropped_params=dropped)

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        return openai_embeddings(data, ctx)

    # ---- errors ----
    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        return gemini_error(status, body, headers, provider=self.name)
