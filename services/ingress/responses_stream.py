"""Chat completion chunks in, OpenAI Responses streaming events out (pure, no I/O).

Guarantees, as the openai SDK's `responses.stream` accumulator needs them:
- every event has `type` and a `sequence_number` that starts at 0 and increases by one;
- `response.created` and `response.in_progress` come first, then per output item
  `response.output_item.added`, its content events, `response.output_item.done`;
  a message item carries `response.content_part.added`, `response.output_text.delta`...
  (`response.refusal.delta` for a refusal part), the matching `.done` events and
  `response.content_part.done`; a function call carries `response.function_call_arguments.delta`...
  and `.done`;
- the stream ends with exactly one `response.completed` (status `incomplete` when the model hit
  the token limit) or `response.failed`, whose `response` is the full object; no `[DONE]`.
"""

from __future__ import annotations

from typing import Any

from switchyard.services.ingress import responses_output as out
from switchyard.shared.errors import GatewayError

Event = dict[str, Any]


class ResponseStream:
    """Feed chat chunks in order (`feed`), then call `finish()` once, or `fail(err)` on an error."""

    def __init__(self, skeleton: dict[str, Any]) -> None:
        self.response = skeleton
        self.output: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self._seq = 0
        self._started = False
        self._message: dict[str, Any] | None = None  # the open message item
        self._part: dict[str, Any] | None = None  # its open content part
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> function_call item
        self._open_call: dict[str, Any] | None = None
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _start(self) -> list[Event]:
        if self._started:
            return []
        self._started = True
        return [self._event("response.created", response=self.response),
                self._event("response.in_progress", response=self.response)]

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, x in enumerate(self.output) if x is item)

    # ---- message items and their parts

    def _close_part(self) -> list[Event]:
        part, message = self._part, self._message
        if part is None or message is None:
            return []
        self._part = None
        where = {"item_id": message["id"], "output_index": self._index(message),
                 "content_index": len(message["content"]) - 1}
        if part["type"] == "output_text":
            done = self._event("response.output_text.done", text=part["text"], logprobs=[], **where)
        else:
            done = self._event("response.refusal.done", refusal=part["refusal"], **where)
        return [done, self._event("response.content_part.done", part=part, **where)]

    def _close_message(self) -> list[Event]:
        message = self._message
        if message is None:
            return []
        events = self._close_part()
        self._message = None
        message["status"] = "completed"
        return events + [self._event("response.output_item.done", output_index=self._index(message), item=message)]

    def _text(self, kind: str, delta: str) -> list[Event]:
        events = self._close_call()
        if self._message is None:
            self._message = {"id": out.new_id("msg"), "type": "message", "status": "in_progress",
                             "role": "assistant", "content": []}
            self.output.append(self._message)
            events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                      item={**self._message, "content": []}))
        message = self._message
        if self._part is None or self._part["type"] != kind:
            events += self._close_part()
            self._part = out.text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
            message["content"].append(self._part)
            events.append(self._event("response.content_part.added", item_id=message["id"],
                                      output_index=self._index(message), content_index=len(message["content"]) - 1,
                                      part=dict(self._part)))
        field = "text" if kind == "output_text" else "refusal"
        self._part[field] += delta
        where = {"item_id": message["id"], "output_index": self._index(message),
                 "content_index": len(message["content"]) - 1}
        if kind == "output_text":
            events.append(self._event("response.output_text.delta", delta=delta, logprobs=[], **where))
        else:
            events.append(self._event("response.refusal.delta", delta=delta, **where))
        return events

    # ---- function calls

    def _close_call(self) -> list[Event]:
        call = self._open_call
        if call is None:
            return []
        self._open_call = None
        call["status"] = "completed"
        index = self._index(call)
        return [self._event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                            name=call["name"], arguments=call["arguments"]),
                self._event("response.output_item.done", output_index=index, item=call)]

    def _tool_delta(self, delta: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        index = delta.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = max(self._calls, default=-1) + (1 if delta.get("id") else 0)
        fn = delta.get("function") or {}
        call = self._calls.get(index)
        if call is None:
            events += self._close_message() + self._close_call()
            call = out.function_call_item(out.new_id("fc"), delta.get("id") or out.new_id("call"),
                                          fn.get("name") or "", "", status="in_progress")
            self._calls[index] = call
            self._open_call = call
            self.output.append(call)
            events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                      item=dict(call)))
        elif fn.get("name") and not call["name"]:
            call["name"] = fn["name"]
        arguments = fn.get("arguments")
        if arguments:
            call["arguments"] += arguments
            events.append(self._event("response.function_call_arguments.delta", item_id=call["id"],
                                      output_index=self._index(call), delta=arguments))
        return events

    # ---- the stream

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if self.final is not None:
            return []
        events = self._start()
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in (chunk.get("choices") or [])[:1]:  # the Responses API has no `n`
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text("output_text", delta["content"])
            if delta.get("refusal"):
                events += self._text("refusal", delta["refusal"])
            for call in delta.get("tool_calls") or []:
                events += self._tool_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return events

    def finish(self) -> list[Event]:
        """Close what is open and complete the response (`self.final` is the object to store)."""
        if self.final is not None:
            return []
        events = self._start() + self._close_message() + self._close_call()
        self.final = out.finished(self.response, self.output, self._usage, self._finish)
        return events + [self._event("response.completed", response=self.final)]

    def fail(self, err: GatewayError) -> list[Event]:
        """End the stream with `response.failed` carrying `err` (the output so far stays in the object)."""
        if self.final is not None:
            return []
        events = self._start()
        self.final = out.failed({**self.response, "output": self.output}, err)
        return events + [self._event("response.failed", response=self.final)]
