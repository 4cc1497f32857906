"""The stream side of the Anthropic Messages API: Anthropic SSE events for a stream's replies.

A reply in Anthropic's own format (the provider was Anthropic and the caller's request was passed
through) is relayed as the provider's event; an OpenAI chunk is translated (`StreamTranslator`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from switchyard.services.ingress.anthropic_response import anthropic_usage, message_id, stop_reason, tool_use_id

# ---------------------------------------------------------------- streaming


def format_sse(event: str, data: dict[str, Any]) -> bytes:
    """One Anthropic SSE frame: `event: <name>` then `data: <json>` (the SDK ignores frames without `event:`)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def ping_event() -> tuple[str, dict[str, Any]]:
    """A keep-alive the endpoint may send while waiting (Anthropic sends one after message_start)."""
    return "ping", {"type": "ping"}


class StreamTranslator:
    """OpenAI `chat.completion.chunk` dicts in, Anthropic SSE events `(event, data)` out.

    Call `feed(chunk)` for each chunk in order, then `finish()` once the stream ends (`[DONE]`, or
    the pipeline's end marker). Events: message_start (on the first chunk), then per content block
    content_block_start / content_block_delta* / content_block_stop (text blocks and one tool_use
    block per OpenAI tool-call `index`), then message_delta (stop_reason, usage) and message_stop.
    Usage arrives after the finish_reason chunk, so message_delta is emitted when the usage chunk
    comes (after a finish_reason), else by `finish()`. `finish()` is idempotent; after the stream is
    complete `feed` returns nothing.
    """

    def __init__(self, requested_model: str, message_id: str | None = None) -> None:
        self.model = requested_model
        self.message_id = message_id
        self.started = False
        self.done = False
        self._next_index = 0
        self._open: int | None = None  # Anthropic index of the open block
        self._open_kind: str | None = None
        self._tools: dict[int, int] = {}  # OpenAI tool-call index -> Anthropic block index
        self._tool_ids: set[str] = set()
        self._last_tool: int | None = None
        self._finish: str | None = None
        self._refused = False
        self._usage: dict[str, Any] | None = None

    def _start(self, chunk: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
        self.started = True
        if self.message_id is None:
            self.message_id = message_id((chunk or {}).get("id"))
        usage = anthropic_usage(self._usage)
        message: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [("message_start", {"type": "message_start", "message": message})]

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        index, self._open, self._open_kind = self._open, None, None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        index = self._next_index
        self._next_index += 1
        self._open, self._open_kind = index, kind
        events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return events

    def _text(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        events = [] if self._open_kind == "text" else self._open_block("text", {"type": "text", "text": ""})
        assert self._open is not None
        events.append(("content_block_delta", {"type": "content_block_delta", "index": self._open,
                                               "delta": {"type": "text_delta", "text": text}}))
        return events

    def _tool_delta(self, call: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        fn = call.get("function") or {}
        if isinstance(call.get("index"), int) and not isinstance(call.get("index"), bool):
            oa_index = call["index"]
        elif call.get("id") and call["id"] not in self._tool_ids:  # no index: a new id starts a new call
            oa_index = max(self._tools, default=-1) + 1
        else:  # no index, no new id: more of the latest call
            oa_index = self._last_tool if self._last_tool is not None else 0
        self._last_tool = oa_index
        if call.get("id"):
            self._tool_ids.add(call["id"])
        if oa_index not in self._tools:
            block: dict[str, Any] = {"type": "tool_use", "id": tool_use_id(call.get("id")),
                                     "name": fn.get("name") or "", "input": {}}
            events += self._open_block(f"tool:{oa_index}", block)
            self._tools[oa_index] = self._next_index - 1
        arguments = fn.get("arguments")
        if arguments:
            # Providers stream calls one after another; a late fragment for an earlier call still
            # carries its own block index, which is how the SDK accumulates it.
            events.append(("content_block_delta", {
                "type": "content_block_delta", "index": self._tools[oa_index],
                "delta": {"type": "input_json_delta", "partial_json": arguments}}))
        return events

    def _end(self) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        reason = stop_reason(self._finish)
        if self._refused and reason == "end_turn":
            reason = "refusal"
        if self._tools and reason == "end_turn":
            reason = "tool_use"
        usage = anthropic_usage(self._usage)
        # message_start went out before the usage was known: every count here is the final total
        # (the SDK overwrites its snapshot with each count present on message_delta).
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": None},
                                         "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        self.done = True
        return events

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if self.done:
            return []
        events: list[tuple[str, dict[str, Any]]] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if not self.started:
            events += self._start(chunk)
        choices = chunk.get("choices") or []
        for choice in choices[:1]:  # Anthropic has no `n`: the first choice is the message
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                events += self._text(text)
            refusal = delta.get("refusal")
            if refusal:
                self._refused = True
                events += self._text(refusal)
            for call in delta.get("tool_calls") or []:
                events += self._tool_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                events += self._close()
        if not choices and chunk.get("usage") and self._finish is not None:
            events += self._end()
        return events

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        if self.done:
            return []
        events = [] if self.started else self._start(None)
        return events + self._end()


_EVENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""What a relayed event's name may be: anything else (a line break would forge frames) is sent as `message`."""


class AnthropicEvents:
    """The SSE frames a `/v1/messages` stream sends for its replies, whichever attempt served it.

    A `chunk` reply in Anthropic's format is the provider's own event and leaves as it came; an OpenAI
    chunk (another provider, or a failover to one) is translated. `finish` closes a translated stream
    (message_delta, message_stop); a native one has already relayed Anthropic's own `message_stop`.
    """

    def __init__(self, requested_model: str) -> None:
        self.translator = StreamTranslator(requested_model)
        self.native = False

    def chunk(self, data: dict[str, Any], format: str | None) -> bytes:
        """One stream chunk as Anthropic's events: relayed as it is when it is already one (`format`)."""
        if format == "anthropic":
            self.native = True
            name = data.get("type")
            return format_sse(name if isinstance(name, str) and _EVENT_NAME.fullmatch(name) else "message", data)
        return b"".join(format_sse(event, body) for event, body in self.translator.feed(data))

    def finish(self) -> bytes:
        if self.native:
            return b""
        return b"".join(format_sse(event, body) for event, body in self.translator.finish())
