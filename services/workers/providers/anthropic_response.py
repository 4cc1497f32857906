"""Anthropic's Messages API, the answer side: messages, stream events and errors in OpenAI's shape.

Usage: Anthropic's `input_tokens` leave out cached tokens, OpenAI's `prompt_tokens` count them, so the
prompt is input + cache read + cache write, and `cached_tokens` the cache read. Thinking blocks are not
part of an OpenAI answer and are left out. A passthrough call (`CallContext.native`) returns the message,
and relays the stream events, exactly as Anthropic wrote them; only their usage is read.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson

from switchyard.services.workers.providers.anthropic_request import PROVIDER, json_tool
from switchyard.services.workers.providers.base import CallContext, ServerEvent, StreamParser
from switchyard.services.workers.providers.openai_shape import (
    chunk,
    classify_status,
    completion,
    openai_usage,
    retry_after_seconds,
)
from switchyard.shared.errors import GatewayError

# Anthropic error type -> (the HTTP status it comes with, the OpenAI error code a client expects).
# The status matters for error events inside a stream, which carry only the type.
ERROR_TYPES: dict[str, tuple[int, str | None]] = {
    "invalid_request_error": (400, None),
    "authentication_error": (401, "invalid_api_key"),
    "billing_error": (402, "insufficient_quota"),
    "permission_error": (403, "permission_denied"),
    "not_found_error": (404, "model_not_found"),
    "request_too_large": (413, "request_too_large"),
    "rate_limit_error": (429, "rate_limit_exceeded"),
    "api_error": (500, "upstream_error"),
    "timeout_error": (504, "timeout"),
    "overloaded_error": (529, "overloaded"),
}

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def anthropic_usage(u: dict[str, Any]) -> dict[str, Any]:
    cache_read = int(u.get("cache_read_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + cache_read + int(u.get("cache_creation_input_tokens") or 0)
    reasoning = int((u.get("output_tokens_details") or {}).get("thinking_tokens") or 0)
    return openai_usage(prompt, int(u.get("output_tokens") or 0), cached=cache_read, reasoning=reasoning)


def _finish(stop_reason: str | None, json_tool: str | None) -> str:
    if stop_reason == "tool_use" and json_tool is not None:
        return "stop"
    return FINISH_REASONS.get(stop_reason or "", "stop")


def anthropic_error(err: Any, status: int | None = None, headers: httpx.Headers | None = None) -> GatewayError:
    err = err if isinstance(err, dict) else {"message": str(err)}
    kind = str(err.get("type") or "")
    known_status, code = ERROR_TYPES.get(kind, (None, None))
    message = str(err.get("message") or kind or "upstream error")
    retry_after = retry_after_seconds(headers) if headers is not None else None
    return classify_status(status or known_status or 502, message, code, retry_after, "anthropic")


def malformed(what: str) -> GatewayError:
    return GatewayError(502, f"anthropic: malformed {what}", code="bad_upstream_response", retryable=True)


def checked_message(data: Any) -> dict[str, Any]:
    """An Anthropic message answer: an `error` answer raises its mapping, anything without content a 502."""
    if isinstance(data, dict) and data.get("type") == "error":
        raise anthropic_error(data.get("error"))
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        raise malformed("response (no content)")
    return data


def openai_message(data: Any, ctx: CallContext) -> dict[str, Any]:
    """An Anthropic message as an OpenAI `chat.completion`."""
    data = checked_message(data)
    tool = json_tool(ctx.body)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data["content"]:
        if block.get("type") == "text":
            texts.append(block.get("text") or "")
        elif block.get("type") == "tool_use" and block.get("name") == tool:
            texts.append(orjson.dumps(block.get("input") or {}).decode())
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    text = "".join(texts)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return completion(ctx, message, _finish(data.get("stop_reason"), tool), anthropic_usage(data.get("usage") or {}))


class AnthropicStream(StreamParser):
    """Anthropic's named SSE events -> OpenAI chunks; `done` only after `message_stop`."""

    provider = PROVIDER

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.created = int(time.time())
        self.json_tool = json_tool(ctx.body)
        self.blocks: dict[int, tuple[str, int]] = {}  # Anthropic block index -> (kind, OpenAI tool-call index)
        self.tool_calls = 0
        self.usage: dict[str, Any] = {}
        self._done = False

    def _chunk(self, delta: dict[str, Any] | None = None, finish: str | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return chunk(self.ctx, delta, finish, usage, created=self.created)

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        data = event.json()
        if not isinstance(data, dict):
            raise malformed("stream event")
        kind = data.get("type") or event.event
        if kind == "message_start":
            self.usage.update((data.get("message") or {}).get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(int(data["index"]), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(int(data["index"]), data.get("delta") or {})
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
            reason = (data.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, _finish(reason, self.json_tool))] if reason else []
        if kind == "message_stop":
            self._done = True
            return [self._chunk(usage=anthropic_usage(self.usage))]
        if kind == "error":
            raise anthropic_error(data.get("error"))
        return []  # ping, content_block_stop, and event types added later

    def _block_start(self, index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
        kind = block.get("type")
        if kind == "tool_use" and block.get("name") == self.json_tool:
            self.blocks[index] = ("json", 0)
        elif kind == "tool_use":
            self.blocks[index] = ("tool", self.tool_calls)
            self.tool_calls += 1
            call = {"index": self.blocks[index][1], "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        elif kind == "text":
            self.blocks[index] = ("text", 0)
            if block.get("text"):
                return [self._chunk({"content": block["text"]})]
        return []  # thinking, redacted_thinking and server-tool blocks are not part of OpenAI's answer

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[dict[str, Any]]:
        kind, tool_index = self.blocks.get(index, ("", 0))
        if kind == "text" and delta.get("type") == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            if kind == "json":
                return [self._chunk({"content": delta["partial_json"]})]
            if kind == "tool":
                return [self._chunk({"tool_calls": [{"index": tool_index,
                                                     "function": {"arguments": delta["partial_json"]}}]})]
        return []

    @property
    def done(self) -> bool:
        return self._done


class AnthropicPassthrough(StreamParser):
    """Anthropic's stream events relayed as they are (each event's data, whose `type` names the event);
    their usage is gathered from `message_start` and `message_delta`. `done` only after `message_stop`,
    and an `error` event raises its mapping like a translated stream's."""

    provider = PROVIDER
    native = True

    def __init__(self) -> None:
        self._usage: dict[str, Any] = {}
        self._done = False

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        data = event.json()
        if not isinstance(data, dict) or not isinstance(data.get("type") or event.event, str):
            raise malformed("stream event")
        data.setdefault("type", event.event)
        kind = data["type"]
        if kind == "error":
            raise anthropic_error(data.get("error"))
        if kind == "message_start":
            self._usage.update((data.get("message") or {}).get("usage") or {})
        elif kind == "message_delta":
            self._usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
        elif kind == "message_stop":
            self._done = True
            self.usage = anthropic_usage(self._usage)
        return [data]

    @property
    def done(self) -> bool:
        return self._done
