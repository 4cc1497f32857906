"""The answer side of the Anthropic Messages API: OpenAI completions as Anthropic Messages, errors in
Anthropic's shape.

OpenAI `prompt_tokens` include cached tokens; Anthropic's `input_tokens` do not, so
`input_tokens = prompt_tokens - cached_tokens` and `cache_read_input_tokens = cached_tokens`.
"""

from __future__ import annotations

import uuid
from typing import Any

from switchyard.shared.errors import GatewayError
from switchyard.shared.formats import json_object

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def message_id(openai_id: str | None) -> str:
    """An Anthropic-style id (`msg_...`) derived from the OpenAI completion id, or a fresh one."""
    if openai_id:
        core = openai_id.removeprefix("chatcmpl-").removeprefix("msg_")
        if core:
            return "msg_" + core
    return "msg_" + uuid.uuid4().hex


def tool_use_id(openai_id: str | None) -> str:
    # Kept as the provider sent it: the client echoes it back as `tool_use_id` and the provider
    # must recognise it as its own `tool_call_id` on the next turn.
    return openai_id or "toolu_" + uuid.uuid4().hex[:24]


def stop_reason(finish_reason: str | None) -> str:
    """OpenAI `finish_reason` -> Anthropic `stop_reason` (OpenAI does not say which stop sequence hit)."""
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    cached = min(cached, prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": int(usage.get("cache_creation_input_tokens") or 0),
    }


# ---------------------------------------------------------------- response


def _tool_input(arguments: Any) -> dict[str, Any]:
    """OpenAI `arguments` (a JSON string) -> Anthropic `input` (an object).

    Arguments that are not a JSON object are kept as `{"_raw_arguments": <the string>}`, never lost."""
    parsed = json_object(arguments)
    return parsed if parsed is not None else {"_raw_arguments": str(arguments)}


def from_openai_response(completion: dict[str, Any], requested_model: str) -> dict[str, Any]:
    """An OpenAI `chat.completion` -> an Anthropic Message (`model` is the name the client asked for)."""
    choices = completion.get("choices") or []
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    refusal = message.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    elif refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": tool_use_id(call.get("id")), "name": fn.get("name", ""),
                        "input": _tool_input(fn.get("arguments"))})
    finish = choice.get("finish_reason")
    reason = stop_reason(finish)
    if refusal and not text and finish in (None, "stop"):
        reason = "refusal"
    if message.get("tool_calls") and reason == "end_turn":
        reason = "tool_use"
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": anthropic_usage(completion.get("usage")),
    }


# ---------------------------------------------------------------- errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error `type` for an HTTP status (other 4xx: invalid_request_error; other 5xx: api_error)."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(err: GatewayError, request_id: str | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}` (+ `request_id` when given), as Anthropic answers."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}
    if request_id:
        body["request_id"] = request_id
    return body


def error_event(err: GatewayError, request_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """The `error` SSE event for a failure after the stream started (the SDK raises APIStatusError)."""
    return "error", error_body(err, request_id)
