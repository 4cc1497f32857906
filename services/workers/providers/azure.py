"""Azure OpenAI: OpenAI's wire format behind a deployment URL, an `api-version` query and an `api-key` header.

`api_base` is the resource endpoint (`https://<resource>.openai.azure.com`, with or without a
trailing `/openai`); the deployment's `model` is the Azure *deployment name*. With an
`Authorization` header in the deployment's `headers` (an Azure AD / Entra ID bearer token) no
`api-key` is sent.

Azure adds content-filter annotations: a first stream chunk with empty `choices` and
`prompt_filter_results`, `content_filter_results` (and, with asynchronous filtering,
`content_filter_offsets`) on choices, and annotation-only chunks whose choices carry no
`delta`. Those are removed so callers see OpenAI's shapes; `finish_reason: "content_filter"`
is kept. Filtered prompts come back as 400 `content_filter`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import orjson

from switchyard.services.workers.providers.base import CallContext, ServerEvent, StreamParser, UpstreamRequest
from switchyard.services.workers.providers.openai import OpenAICompatibleAdapter, OpenAICompatibleStream
from switchyard.services.workers.providers.openai_shape import classify_status, error_message, retry_after_seconds
from switchyard.shared.errors import GatewayError

DEFAULT_API_VERSION = "2024-10-21"  # the latest GA data-plane version; set `api_version` per deployment to change
_FILTER_FIELDS = ("content_filter_results", "content_filter_offsets", "content_filter_raw")


def strip_annotations(data: dict[str, Any]) -> dict[str, Any] | None:
    """A stream chunk in OpenAI's shape, or None when it carried nothing but Azure's filter annotations."""
    data.pop("prompt_filter_results", None)
    choices = []
    for choice in data.get("choices") or []:
        for name in _FILTER_FIELDS:
            choice.pop(name, None)
        if not choice.get("delta") and choice.get("finish_reason") is None:
            continue  # an annotation-only choice: nothing for the caller
        choice.setdefault("delta", {})
        choices.append(choice)
    if not choices and not data.get("usage"):
        return None
    data["choices"] = choices
    return data


class AzureStream(OpenAICompatibleStream):
    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        return [c for c in (strip_annotations(c) for c in super().feed(event)) if c is not None]


class AzureOpenAIAdapter(OpenAICompatibleAdapter):
    def __init__(self) -> None:
        super().__init__("azure")

    def _base(self, ctx: CallContext) -> str:
        resource = super()._base(ctx).removesuffix("/openai")
        return f"{resource}/openai/deployments/{quote(ctx.deployment.model, safe='')}"

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"content-type": "application/json", **ctx.deployment.headers}
        if ctx.api_key and not any(k.lower() == "authorization" for k in headers):
            headers["api-key"] = ctx.api_key
        return headers

    def _for_azure(self, up: UpstreamRequest, ctx: CallContext) -> UpstreamRequest:
        # The deployment in the URL names the model; the body goes without `model`.
        body = orjson.loads(up.content or b"{}")
        body.pop("model", None)
        up.content = orjson.dumps(body)
        up.url += f"?api-version={quote(ctx.deployment.api_version or DEFAULT_API_VERSION, safe='')}"
        return up

    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        return self._for_azure(super().chat_request(ctx), ctx)

    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        return self._for_azure(super().embeddings_request(ctx), ctx)

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        parsed = super().parse_chat(data, ctx)
        parsed.pop("prompt_filter_results", None)
        for choice in parsed["choices"]:
            for name in _FILTER_FIELDS:
                choice.pop(name, None)
        return parsed

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return AzureStream(self.name)

    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        """Azure puts the HTTP status (`"429"`) or its own names (`DeploymentNotFound`) in `error.code`."""
        message, err = error_message(body)
        code = err.get("code") if isinstance(err.get("code"), str) else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
        inner = err.get("innererror")
        inner_code = inner.get("code") if isinstance(inner, dict) else None
        if code == "content_filter" or inner_code == "ResponsibleAIPolicyViolation":
            return GatewayError(400, f"azure: {message}", code="content_filter", param=param)
        if status == 404 or code == "DeploymentNotFound":
            return GatewayError(404, f"azure: {message}", code="model_not_found")
        if code and (code.isdigit() or code[:1].isupper()):
            code = None  # "429", "401", "InternalServerError": let the status pick OpenAI's code
        return classify_status(status, message, code, retry_after_seconds(headers), self.name, param)
