"""The one small interface every provider adapter implements, plus the helpers they share.

An adapter translates; it never does I/O. The worker (`services/workers/calls.py`) sends
what `chat_request` builds with its pooled httpx client, turns each decoded stream
event into OpenAI chunks with the adapter's `StreamParser`, and maps error bodies
with `map_error`. Everything an adapter returns is already in OpenAI's shape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from shared.config import Deployment
from shared.contracts import Usage
from shared.errors import GatewayError

GATEWAY_FIELDS = ("fallbacks", "strict")
"""Body fields Switchyard reads itself and never forwards upstream."""


@dataclass
class CallContext:
    """What an adapter needs to translate one request. `body` is the validated OpenAI request body."""

    deployment: Deployment
    body: dict[str, Any]
    stream: bool
    api_key: str | None
    request_id: str
    strict: bool = False
    """Refuse (400) instead of dropping parameters the provider does not support."""


@dataclass
class UpstreamRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: Any | None = None
    content: bytes | None = None
    dropped_params: list[str] = field(default_factory=list)
    """OpenAI parameters this provider cannot honour; returned to the caller in a response header."""


@dataclass
class ServerEvent:
    """One decoded stream event: an SSE event (name + data) or one frame of another framing."""

    data: str
    event: str | None = None
    payload: dict[str, Any] | None = None
    """Already-decoded JSON for binary framings (Bedrock's event stream)."""

    def json(self) -> Any:
        return self.payload if self.payload is not None else orjson.loads(self.data)


class StreamParser:
    """Turns a provider's stream events into OpenAI `chat.completion.chunk` dicts.

    The final usage, if the provider reports it, is emitted as a chunk with `choices: []`
    and `usage` set, exactly like OpenAI's `stream_options.include_usage`.
    """

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        raise NotImplementedError

    def finish(self) -> list[dict[str, Any]]:
        """Called once when the upstream stream ends cleanly; may flush a last chunk."""
        return []

    @property
    def done(self) -> bool:
        """True once the provider said the stream is complete (used to spot a stream cut halfway)."""
        return True


class ProviderAdapter:
    """Translate request, (the worker calls), parse response, parse stream chunk, map error."""

    name: str = ""

    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        raise NotImplementedError

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        raise NotImplementedError

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        raise NotImplementedError

    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        raise GatewayError(400, f"provider {self.name!r} does not support embeddings", param="model")

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        raise GatewayError(400, f"provider {self.name!r} does not support embeddings", param="model")

    async def events(self, response: httpx.Response) -> AsyncIterator[ServerEvent]:
        """Decode the response body into events; SSE unless the provider frames differently."""
        async for event in iter_sse(response):
            yield event

    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        return openai_style_error(status, body, headers, provider=self.name)


# ---- shared helpers -------------------------------------------------------------------------


async def iter_sse(response: httpx.Response) -> AsyncIterator[ServerEvent]:
    """A minimal, spec-following SSE decoder (event/data fields, blank-line dispatch, comments skipped)."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield ServerEvent(data="\n".join(data), event=event)
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield ServerEvent(data="\n".join(data), event=event)


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Retry-After (seconds or HTTP date) or OpenAI's retry-after-ms, whichever the provider sent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def error_message(body: bytes) -> tuple[str, dict[str, Any]]:
    """The human message and the parsed error object of a JSON error body (or the raw text)."""
    try:
        parsed = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:500] or "upstream error", {}
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    if not isinstance(parsed, dict):
        return str(parsed)[:500], {}
    err = parsed.get("error", parsed)
    if isinstance(err, str):
        return err, parsed
    if isinstance(err, dict):
        return str(err.get("message") or parsed.get("message") or "upstream error"), err
    return str(parsed.get("message") or "upstream error"), parsed


CONTEXT_MARKERS = ("context_length_exceeded", "context length", "maximum context", "too many tokens",
                   "prompt is too long", "input is too long", "exceeds the context")
FILTER_MARKERS = ("content_filter", "content_policy", "content management policy", "safety")


def classify_status(
    status: int, message: str, code: str | None, retry_after: float | None, provider: str, param: str | None = None
) -> GatewayError:
    """Map an upstream status (+ hints in the message) onto the status and code an OpenAI client expects."""
    text = f"{code or ''} {message}".lower()
    prefix = f"{provider}: " if provider else ""
    if status == 400 or status == 413 or status == 422:
        if any(m in text for m in CONTEXT_MARKERS):
            return GatewayError(400, prefix + message, code="context_length_exceeded", param=param or "messages")
        if any(m in text for m in FILTER_MARKERS):
            return GatewayError(400, prefix + message, code="content_filter", param=param)
        return GatewayError(400, prefix + message, code=code, param=param)
    if status == 401:
        return GatewayError(401, prefix + message, code=code or "invalid_api_key")
    if status == 403:
        return GatewayError(403, prefix + message, code=code)
    if status == 404:
        return GatewayError(404, prefix + message, code=code or "model_not_found")
    if status == 408 or status == 504:
        return GatewayError(504, prefix + message, code=code or "timeout", retryable=True)
    if status == 429:
        return GatewayError(429, prefix + message, code=code or "rate_limit_exceeded", retry_after_s=retry_after)
    if status in (503, 529):
        return GatewayError(503, prefix + message, code=code or "overloaded", retryable=True,
                            retry_after_s=retry_after)
    if status >= 500:
        return GatewayError(502, prefix + message, code=code or "upstream_error", retryable=True,
                            retry_after_s=retry_after)
    return GatewayError(status if 400 <= status < 600 else 502, prefix + message, code=code)


def openai_style_error(status: int, body: bytes, headers: httpx.Headers, provider: str = "") -> GatewayError:
    message, err = error_message(body)
    code = err.get("code") if isinstance(err.get("code"), str) else None
    param = err.get("param") if isinstance(err.get("param"), str) else None
    return classify_status(status, message, code, retry_after_seconds(headers), provider, param)


def usage_from_openai(usage: dict[str, Any] | None) -> Usage:
    if not usage:
        return Usage()
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def openai_usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """Usage in OpenAI's shape, for adapters translating another provider's counts."""
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    usage["prompt_tokens_details"] = {"cached_tokens": cached}
    usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def chunk(ctx: CallContext, delta: dict[str, Any] | None = None, finish_reason: str | None = None,
          usage: dict[str, Any] | None = None, created: int | None = None) -> dict[str, Any]:
    """One OpenAI `chat.completion.chunk`; with `usage` and no delta it is the final usage chunk."""
    out: dict[str, Any] = {
        "id": completion_id(ctx.request_id),
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": ctx.deployment.model,
        "choices": [] if delta is None and finish_reason is None
        else [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def completion(ctx: CallContext, message: dict[str, Any], finish_reason: str | None,
               usage: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    """One OpenAI `chat.completion` with a single choice."""
    return {
        "id": completion_id(ctx.request_id),
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": ctx.deployment.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def image_parts(content: Any) -> list[dict[str, Any]]:
    """The `image_url` parts of an OpenAI message content (empty for plain text)."""
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]


def text_of(content: Any) -> str:
    """All text of an OpenAI message content, whether a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media_type, base64 data) of a `data:` URL, or None for a remote URL."""
    if not url.startswith("data:"):
        return None
    header, _, data = url.partition(",")
    media_type = header[5:].split(";")[0] or "application/octet-stream"
    return media_type, data
