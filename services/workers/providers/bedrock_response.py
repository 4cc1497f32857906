"""Amazon Bedrock Converse, the answer side: answers and ConverseStream events in OpenAI's shape.

Response: text blocks are joined, `toolUse` blocks become tool calls, `reasoningContent` becomes
`reasoning_content`. Usage: Bedrock's `inputTokens` excludes cache reads and writes, so
`prompt_tokens` = inputTokens + cacheReadInputTokens + cacheWriteInputTokens and `cached_tokens`
= cacheReadInputTokens (as for Anthropic).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from switchyard.services.workers.providers.base import (
    CallContext,
    ServerEvent,
    StreamParser,
)
from switchyard.services.workers.providers.bedrock_wire import SERVICE
from switchyard.services.workers.providers.openai_shape import (
    chunk,
    completion,
    openai_usage,
)
from switchyard.shared.errors import GatewayError

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}


def usage_from_bedrock(u: dict[str, Any] | None) -> dict[str, Any]:
    u = u or {}
    cache_read = int(u.get("cacheReadInputTokens") or 0)
    prompt = int(u.get("inputTokens") or 0) + cache_read + int(u.get("cacheWriteInputTokens") or 0)
    return openai_usage(prompt, int(u.get("outputTokens") or 0), cached=cache_read)


def _finish(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "", "stop")


class BedrockStream(StreamParser):
    """ConverseStream events -> OpenAI chunks; `done` once both `messageStop` and `metadata` arrived."""

    provider = SERVICE

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.created = int(time.time())
        self.started = False
        self.tools: dict[int, int] = {}  # Converse content block index -> OpenAI tool call index
        self.stopped = False
        self.metadata = False

    def _chunk(self, delta: dict[str, Any] | None = None, finish: str | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return chunk(self.ctx, delta, finish, usage, created=self.created)

    def _start(self) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        data = event.json() or {}
        kind = event.event
        if kind == "messageStart":
            return self._start()
        if kind == "contentBlockStart":
            start = data.get("start") or {}
            if "toolUse" in start:
                tool = start["toolUse"] or {}
                index = len(self.tools)
                self.tools[int(data.get("contentBlockIndex") or 0)] = index
                call = {"index": index, "id": tool.get("toolUseId"), "type": "function",
                        "function": {"name": tool.get("name"), "arguments": ""}}
                return [*self._start(), self._chunk({"tool_calls": [call]})]
            return []
        if kind == "contentBlockDelta":
            return self._delta(int(data.get("contentBlockIndex") or 0), data.get("delta") or {})
        if kind == "messageStop":
            self.stopped = True
            return [*self._start(), self._chunk({}, _finish(data.get("stopReason")))]
        if kind == "metadata":
            self.metadata = True
            return [self._chunk(usage=usage_from_bedrock(data.get("usage")))]
        return []  # contentBlockStop, and event types added later

    def _delta(self, index: int, delta: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._start()
        if isinstance(delta.get("text"), str) and delta["text"]:
            out.append(self._chunk({"content": delta["text"]}))
        elif "toolUse" in delta:
            if index not in self.tools:
                raise GatewayError(502, "bedrock: tool input delta for a content block that never started",
                                   code="bad_upstream_response", retryable=True)
            piece = (delta["toolUse"] or {}).get("input") or ""
            if piece:
                out.append(self._chunk({"tool_calls": [{"index": self.tools[index],
                                                        "function": {"arguments": piece}}]}))
        elif "reasoningContent" in delta:
            text = (delta["reasoningContent"] or {}).get("text")
            if text:
                out.append(self._chunk({"reasoning_content": text}))
        return out

    @property
    def done(self) -> bool:
        return self.stopped and self.metadata


def openai_message(data: Any, ctx: CallContext) -> dict[str, Any]:
    """A Converse answer as an OpenAI `chat.completion`."""
    message = ((data.get("output") or {}).get("message") if isinstance(data, dict) else None) or {}
    blocks = message.get("content")
    if not isinstance(blocks, list):
        raise GatewayError(502, "bedrock: malformed response (no output.message.content)",
                           code="bad_upstream_response", retryable=True)
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif "toolUse" in block:
            tool = block["toolUse"] or {}
            calls.append({"id": tool.get("toolUseId"), "type": "function",
                          "function": {"name": tool.get("name"),
                                       "arguments": orjson.dumps(tool.get("input") or {}).decode()}})
        elif "reasoningContent" in block:
            text = ((block["reasoningContent"] or {}).get("reasoningText") or {}).get("text")
            if text:
                reasoning.append(text)
    text = "".join(texts)
    out: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return completion(ctx, out, _finish(data.get("stopReason")), usage_from_bedrock(data.get("usage")))
