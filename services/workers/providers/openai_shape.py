"""Answers in OpenAI's shape, built from what a provider sent: errors (status and code an OpenAI client
expects), usage, completions, stream chunks and embeddings.

A translating adapter builds its answers with these, so every provider's answer reads the same to a caller.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from switchyard.shared.contracts import Usage
from switchyard.shared.errors import GatewayError

if TYPE_CHECKING:
    from switchyard.services.workers.providers.base import CallContext


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


def float32_base64(vector: list[float]) -> str:
    """An embedding as OpenAI's `encoding_format: base64` sends it: little-endian float32s, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
