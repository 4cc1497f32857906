"""Cohere's v2 API, the response side: answers, stream events and usage in OpenAI's shapes.

Answers: text parts are joined, citations (kept by Cohere beside the text, never inside it) and the `tool_plan`
are dropped, `thinking` parts are left out of the answer. Usage is taken from `billed_units`, what Cohere charges
for, falling back to `tokens`.

Streams: Cohere's typed SSE events (`message-start`, `content-delta`, `tool-call-start`, `tool-call-delta`,
`message-end`, ...) become OpenAI chunks. Tool calls get OpenAI indexes counted from 0 in the order they start,
since Cohere's `index` is the position of the block in the message (text and tool calls share it).
"""

from __future__ import annotations

import time
from typing import Any

from switchyard.services.workers.providers.base import CallContext, ServerEvent, StreamParser
from switchyard.services.workers.providers.openai_shape import chunk, completion, float32_base64, openai_usage
from switchyard.shared.errors import GatewayError

PROVIDER = "cohere"

FINISH_REASONS = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "ERROR_LIMIT": "length",
    "TOOL_CALL": "tool_calls",
    "ERROR_TOXIC": "content_filter",
}


class CohereStream(StreamParser):
    provider = PROVIDER

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.created = int(time.time())
        self._tools: dict[Any, int] = {}
        self._done = False

    def _chunk(self, delta: dict[str, Any] | None = None, finish_reason: str | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return chunk(self.ctx, delta, finish_reason, usage, created=self.created)

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        if event.data.strip() == "[DONE]":
            return []
        data = event.json()
        kind = data.get("type") or event.event
        delta = data.get("delta") or {}
        message = delta.get("message") or {}
        if kind == "message-start":
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind in ("content-start", "content-delta"):
            text = (message.get("content") or {}).get("text")
            return [self._chunk({"content": text})] if text else []
        if kind == "tool-call-start":
            call = _streamed_call(message)
            index = len(self._tools)
            self._tools[data.get("index", index)] = index
            fn = call.get("function") or {}
            return [self._chunk({"tool_calls": [{"index": index, "id": call.get("id"), "type": "function",
                                                 "function": {"name": fn.get("name"),
                                                              "arguments": fn.get("arguments") or ""}}]})]
        if kind == "tool-call-delta":
            arguments = (_streamed_call(message).get("function") or {}).get("arguments")
            if not arguments:
                return []
            index = self._tools.get(data.get("index"), max(0, len(self._tools) - 1))
            return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})]
        if kind == "message-end":
            self._done = True
            finish = finish_reason(delta.get("finish_reason"), delta.get("error"))
            out = [self._chunk({}, finish)]
            if delta.get("usage"):
                out.append(self._chunk(usage=usage_from_cohere(delta["usage"])))
            return out
        # tool-plan-delta, content-end, tool-call-end, citation-start/-end, debug: nothing for OpenAI.
        return []

    @property
    def done(self) -> bool:
        return self._done


def _streamed_call(message: dict[str, Any]) -> dict[str, Any]:
    """The one tool call of a `tool-call-start`/`-delta` event (an object; tolerate a one-item list)."""
    call = message.get("tool_calls") or {}
    if isinstance(call, list):
        call = call[0] if call else {}
    return call


def finish_reason(reason: str | None, error: str | None = None) -> str:
    """OpenAI's finish reason for Cohere's; a generation that failed upstream raises instead."""
    if reason == "TIMEOUT":
        raise GatewayError(504, f"cohere: generation timed out upstream{': ' + error if error else ''}",
                           code="upstream_timeout", retryable=True)
    if error or reason in ("ERROR", "USER_CANCEL"):
        raise GatewayError(502, f"cohere: generation failed ({error or reason})", code="upstream_error",
                           retryable=True)
    return FINISH_REASONS.get(reason or "", "stop")


def usage_from_cohere(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    billed = usage.get("billed_units") or {}
    tokens = usage.get("tokens") or {}

    def count(field: str) -> int:
        value = billed.get(field)
        return int(value if value is not None else tokens.get(field) or 0)

    return openai_usage(count("input_tokens"), count("output_tokens"))


def chat_completion(data: Any, ctx: CallContext) -> dict[str, Any]:
    """An OpenAI chat completion of a `/v2/chat` answer; a 502 `bad_upstream_response` when it has no message."""
    if not isinstance(data, dict) or not isinstance(data.get("message"), dict):
        raise GatewayError(502, "cohere: malformed response (no message)", code="bad_upstream_response",
                           retryable=True)
    msg = data["message"]
    parts = msg.get("content") or []
    text = parts if isinstance(parts, str) else "".join(
        p.get("text") or "" for p in parts if isinstance(p, dict) and p.get("type", "text") == "text")
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    calls = [_answered_call(c) for c in msg.get("tool_calls") or []]
    if calls:
        message["tool_calls"] = calls
    finish = finish_reason(data.get("finish_reason"))
    return completion(ctx, message, finish, usage_from_cohere(data.get("usage")))


def embeddings(data: Any, ctx: CallContext) -> dict[str, Any]:
    """OpenAI's embeddings list of a `/v2/embed` answer (float vectors, or base64 when the caller asked)."""
    embeddings = data.get("embeddings") if isinstance(data, dict) else None
    vectors = embeddings.get("float") if isinstance(embeddings, dict) else embeddings
    if not isinstance(vectors, list):
        raise GatewayError(502, "cohere: malformed embeddings response", code="bad_upstream_response",
                           retryable=True)
    as_base64 = ctx.body.get("encoding_format") == "base64"
    items = [{"object": "embedding", "index": i,
              "embedding": float32_base64(v) if as_base64 else v} for i, v in enumerate(vectors)]
    tokens = int(((data.get("meta") or {}).get("billed_units") or {}).get("input_tokens") or 0)
    return {"object": "list", "data": items, "model": ctx.deployment.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _answered_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call of Cohere's answer in OpenAI's shape (Cohere v2 writes it the same way)."""
    fn = call.get("function") or {}
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or "{}"}}
