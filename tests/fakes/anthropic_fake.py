"""Fake Anthropic Messages API (`POST /v1/messages`): Anthropic's request checks, answers, SSE events and errors.

It refuses what the real API refuses in the ways an adapter can get wrong (no `x-api-key`,
no `anthropic-version`, no `max_tokens`, empty `messages`, roles that do not alternate, a
`system` role inside `messages`, OpenAI-only fields, tool results that answer no tool call),
with Anthropic's error body. It answers deterministically: an echo of the last user turn, or
a `tool_use` block for the first offered tool (the named one under `tool_choice: tool`) unless
the last turn carries tool results. `respond(...)` scripts the next answers' exact content.

Prompt caching is modelled: system/tool/message blocks up to the last `cache_control` mark
are written to the cache on first sight (`cache_creation_input_tokens`) and read from it after
(`cache_read_input_tokens`).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from switchyard.devstack.demo_provider import count_tokens
from tests.fakes.server import FakeProvider, sse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}

_FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p", "top_k",
           "tools", "tool_choice", "metadata", "thinking", "service_tier", "container", "mcp_servers",
           "context_management", "output_config"}


@dataclass
class Scripted:
    """One scripted answer: Anthropic content blocks, a stop reason, and optionally an error event mid-stream."""

    content: list[dict[str, Any]]
    stop_reason: str = "end_turn"
    stop_sequence: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    error_after: int | None = None
    """Streams only: after this many events, send an `error` event (of `error_type`) and stop."""
    error_type: str = "overloaded_error"


def _text(content: Any) -> str:
    """All text of Anthropic content, tool results included."""
    if isinstance(content, str):
        return content
    out = []
    for block in content or []:
        if block.get("type") == "text":
            out.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            out.append(_text(block.get("content")))
    return " ".join(x for x in out if x)


class FakeAnthropic(FakeProvider):
    name = "anthropic"

    def __init__(self) -> None:
        self.scripted: deque[Scripted] = deque()
        self.cache: set[str] = set()
        self.accepted: set[str] = set()
        """Request fields accepted beyond today's (`accept`): a newer API version's."""
        super().__init__()

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}

    def respond(self, content: list[dict[str, Any]], **kw: Any) -> None:
        """Answer the next request with exactly these content blocks (and stop reason, usage, stream error)."""
        with self._lock:
            self.scripted.append(Scripted(content, **kw))

    def accept(self, *fields: str) -> None:
        """Accept these request fields too until `reset`, as a newer API version would."""
        with self._lock:
            self.accepted.update(fields)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.scripted.clear()
            self.cache.clear()
            self.accepted.clear()

    # ---- the real API's checks ----
    def problem(self, headers: dict[str, str], body: Any) -> tuple[int, str] | None:
        if not headers.get("x-api-key") and not headers.get("authorization", "").startswith("Bearer "):
            return 401, "x-api-key header is required"  # newer official SDKs send the key as a bearer token
        if not headers.get("anthropic-version"):
            return 400, "anthropic-version: header is required"
        if not isinstance(body, dict):
            return 400, "body: invalid JSON"
        extra = sorted(set(body) - _FIELDS - self.accepted)
        if extra:
            return 400, f"{extra[0]}: Extra inputs are not permitted"
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return 400, "max_tokens: Field required"
        if not isinstance(body.get("model"), str):
            return 400, "model: Field required"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, "messages: at least one message is required"
        tool_ids: set[str] = set()
        for i, m in enumerate(messages):
            if m.get("role") not in ("user", "assistant"):
                return 400, f"messages.{i}.role: Input should be 'user' or 'assistant'"
            if i and m["role"] == messages[i - 1]["role"]:
                return 400, "messages: roles must alternate between \"user\" and \"assistant\""
            content = m.get("content")
            if not content:
                return 400, f"messages.{i}: all messages must have non-empty content"
            blocks = [] if isinstance(content, str) else content
            for j, b in enumerate(blocks):
                if b.get("type") == "text" and not b.get("text"):
                    return 400, f"messages.{i}.content.{j}.text: text content blocks must be non-empty"
                if b.get("type") == "tool_result" and b.get("tool_use_id") not in tool_ids:
                    return 400, f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks"
                if b.get("type") == "image" and b.get("source", {}).get("type") not in ("base64", "url"):
                    return 400, f"messages.{i}.content.{j}.source: invalid image source"
            tool_ids = {b["id"] for b in blocks if b.get("type") == "tool_use"}
        for t in body.get("tools") or []:
            if "input_schema" not in t and "type" not in t:
                return 400, "tools.0.input_schema: Field required"
        return None

    # ---- answers ----
    def _usage(self, body: dict[str, Any], output: str) -> dict[str, Any]:
        parts = [body.get("system") or "", *(body.get("tools") or []), *body["messages"]]
        texts = [p if isinstance(p, str) else orjson.dumps(p).decode() for p in parts]
        total = count_tokens(" ".join(texts))
        marked = [i for i, p in enumerate(parts) if "cache_control" in orjson.dumps(p).decode()]
        read = created = 0
        if marked:
            prefix = " ".join(texts[: marked[-1] + 1])
            key = hashlib.sha1(prefix.encode()).hexdigest()
            with self._lock:
                hit = key in self.cache
                self.cache.add(key)
            read, created = (count_tokens(prefix), 0) if hit else (0, count_tokens(prefix))
        return {"input_tokens": max(1, total - read - created), "cache_creation_input_tokens": created,
                "cache_read_input_tokens": read, "output_tokens": count_tokens(output)}

    def answer(self, body: dict[str, Any]) -> Scripted:
        with self._lock:
            if self.scripted:
                return self.scripted.popleft()
        last = body["messages"][-1]
        answering_tools = isinstance(last["content"], list) and any(
            b.get("type") == "tool_result" for b in last["content"])
        choice = body.get("tool_choice") or {}
        user_text = _text(next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), ""))
        if body.get("tools") and not answering_tools and choice.get("type") != "none":
            tool = next((t for t in body["tools"] if t.get("name") == choice.get("name")), body["tools"][0])
            tool_id = "toolu_" + hashlib.sha1(user_text.encode()).hexdigest()[:20]
            block = {"type": "tool_use", "id": tool_id, "name": tool.get("name"), "input": {"query": user_text}}
            return Scripted([block], "tool_use")
        images = sum(1 for m in body["messages"] if isinstance(m["content"], list)
                     for b in m["content"] if b.get("type") == "image")
        text = f"Echo: {user_text}" + (f" [{images} image(s)]" if images else "")
        words = text.split(" ")  # one word, one token: whichever limit comes first ends the message
        limited = " ".join(words[: body["max_tokens"]])
        for stop in body.get("stop_sequences") or []:
            if stop in limited:
                return Scripted([{"type": "text", "text": limited[: limited.index(stop)]}], "stop_sequence", stop)
        return Scripted([{"type": "text", "text": limited}], "max_tokens" if limited != text else "end_turn")

    def message(self, body: dict[str, Any], reply: Scripted) -> dict[str, Any]:
        output = " ".join(b.get("text") or orjson.dumps(b.get("input", {})).decode() for b in reply.content)
        return {
            "id": "msg_" + hashlib.sha1(orjson.dumps(body)).hexdigest()[:24],
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": reply.content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": {**self._usage(body, output), **reply.usage},
        }

    def events(self, body: dict[str, Any], reply: Scripted) -> Iterator[tuple[str, dict[str, Any]]]:
        """The real event sequence of a streamed message, as (event name, data)."""
        full = self.message(body, reply)
        usage = full["usage"]
        start = {**full, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**usage, "output_tokens": 1}}
        yield "message_start", {"type": "message_start", "message": start}
        yield "ping", {"type": "ping"}
        for i, block in enumerate(reply.content):
            kind = block["type"]
            if kind == "text":
                yield "content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {"type": "text", "text": ""}}
                words = block["text"].split(" ")
                for n, word in enumerate(words):
                    delta = {"type": "text_delta", "text": word if n == 0 else " " + word}
                    yield "content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}
            elif kind in ("tool_use", "server_tool_use"):  # the input arrives as JSON deltas
                yield "content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {**block, "input": {}}}
                args = orjson.dumps(block.get("input", {})).decode()
                for n in range(0, len(args), 8):
                    delta = {"type": "input_json_delta", "partial_json": args[n:n + 8]}
                    yield "content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}
            elif kind == "thinking":
                yield "content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {"type": "thinking", "thinking": "", "signature": ""}}
                for delta in ({"type": "thinking_delta", "thinking": block.get("thinking", "")},
                              {"type": "signature_delta", "signature": block.get("signature", "sig")}):
                    yield "content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}
            else:
                yield "content_block_start", {"type": "content_block_start", "index": i, "content_block": block}
            yield "content_block_stop", {"type": "content_block_stop", "index": i}
        yield "message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
                                "usage": {"output_tokens": usage["output_tokens"]}}
        yield "message_stop", {"type": "message_stop"}

    def routes(self) -> None:
        @self.app.post("/v1/messages")
        async def messages(request: Request) -> Response:
            rec = await self.record(request)
            fault = self.take_fault(request)
            problem = self.problem(rec.headers, rec.body)
            if problem is not None:
                return Response(orjson.dumps(self.error_body(*problem)), status_code=problem[0],
                                media_type="application/json")
            early = await self.fault_response(fault)
            if early is not None:
                return early
            body = rec.body
            reply = self.answer(body)
            if not body.get("stream"):
                return Response(orjson.dumps(self.message(body, reply)), media_type="application/json")
            cut = fault.cut_after if fault else None

            async def gen():  # type: ignore[no-untyped-def]
                for i, (name, data) in enumerate(self.events(body, reply)):
                    if cut is not None and i >= cut:
                        return
                    if reply.error_after is not None and i >= reply.error_after:
                        error = {"type": "error",
                                 "error": {"type": reply.error_type, "message": reply.error_type.replace("_", " ")}}
                        yield sse(error, event="error")
                        return
                    yield sse(data, event=name)

            return StreamingResponse(gen(), media_type="text/event-stream")
