"""Cache entries to replies and back: a hit is answered as the pipeline would have answered it.

An entry holds the completed answer (`response`, in OpenAI's shape) and, when it was produced by a stream,
that stream's chunks in their original order (usage-only chunks left out). A hit is a `ReplayPending`: the
same replies a worker would have sent (one `response`, or `chunk`s then `end`), so every route that relays
replies (chat, legacy completions, Anthropic messages, Responses) answers hits without knowing about the
cache. A stream hit replays the stored chunks (or, for an entry stored from a plain answer, chunks made from
it), adds a usage chunk when the caller asked for `stream_options.include_usage`, and ends like any stream.

`RecordingPending` sits between a miss and its caller, sees every reply, and hands the assembled answer
to `on_complete` once it ended well; an error, a timeout or a stream cut short stores nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from switchyard.services.ingress.replies import Pending
from switchyard.shared.contracts import Reply


class ReplayPending(Pending):
    """The replies of a cache hit, ready at once; `on_served` runs when the first is read (the hit is served:
    a request refused after its lookup, by a rate limit, was not)."""

    def __init__(self, replies: list[Reply]) -> None:
        super().__init__()
        for reply in replies:
            self.queue.put_nowait(reply)
        self.finished = self._done = True  # no provider call works for a hit
        self.on_served: Callable[[], None] | None = None

    async def next(self, timeout_s: float) -> Reply:
        if self.on_served is not None:
            served, self.on_served = self.on_served, None
            served()
        return await super().next(timeout_s)


class RecordingPending(Pending):
    """Relays the replies of `inner`, and gives `on_complete(answer, chunks, last)` an answer that ended well."""

    def __init__(self, inner: Pending, on_complete: Callable[[dict[str, Any], list[dict[str, Any]] | None, Reply],
                                                             None]) -> None:
        super().__init__()
        self.inner = inner
        self.on_complete = on_complete
        self.chunks: list[dict[str, Any]] = []
        self.recorded = False

    @property
    def done(self) -> bool:
        return self.inner.done

    @property
    def ready(self) -> bool:
        return self.inner.ready

    def client_gone(self) -> None:
        self.inner.client_gone()

    async def next(self, timeout_s: float) -> Reply:
        reply = await self.inner.next(timeout_s)
        if self.recorded:
            return reply
        if reply.format is not None:  # a provider's own format: entries hold OpenAI-shaped answers only
            self.recorded = True
            return reply
        self.chunks.extend(chunk for chunk in reply.pieces() if chunk.get("choices") or not chunk.get("usage"))
        if reply.type == "response":
            self.recorded = True
            if reply.status == 200 and reply.data:
                self.on_complete(reply.data, None, reply)
        elif reply.type == "end":
            self.recorded = True
            if self.chunks:
                self.on_complete(assemble(self.chunks, (reply.data or {}).get("usage")), self.chunks, reply)
        elif reply.type != "chunk":
            self.recorded = True  # an error is never cached
        return reply


def assemble(chunks: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """The `chat.completion` a stream of `chat.completion.chunk`s amounts to (content, tool calls, reasons)."""
    first = chunks[0]
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for c in chunk.get("choices") or []:
            index = int(c.get("index") or 0)
            choice = choices.setdefault(index, {"index": index, "message": {"role": "assistant", "content": None},
                                                "finish_reason": None})
            delta = c.get("delta") or {}
            message = choice["message"]
            for name in ("content", "refusal", "reasoning_content"):
                if isinstance(delta.get(name), str):
                    message[name] = (message.get(name) or "") + delta[name]
            for call in delta.get("tool_calls") or []:
                calls = message.setdefault("tool_calls", [])
                i = int(call.get("index") or 0)
                while len(calls) <= i:
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                target, fn = calls[i], call.get("function") or {}
                target["id"] = call.get("id") or target["id"]
                target["function"]["name"] += fn.get("name") or ""
                target["function"]["arguments"] += fn.get("arguments") or ""
            if c.get("finish_reason"):
                choice["finish_reason"] = c["finish_reason"]
    out = {"id": first.get("id"), "object": "chat.completion", "created": first.get("created"),
           "model": first.get("model"), "choices": [choices[i] for i in sorted(choices)]}
    if usage:
        out["usage"] = usage
    return out


def chunks_from(response: dict[str, Any]) -> list[dict[str, Any]]:
    """Stream chunks equivalent to a plain answer: the message as one delta per choice, then its finish."""
    base = {"id": response.get("id"), "object": "chat.completion.chunk", "created": response.get("created"),
            "model": response.get("model")}
    out = []
    for choice in response.get("choices") or []:
        message = dict(choice.get("message") or {})
        calls = message.pop("tool_calls", None)
        delta: dict[str, Any] = {k: v for k, v in message.items() if v is not None}
        if calls:
            delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(calls)]
        index = choice.get("index", 0)
        out.append({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        out.append({**base, "choices": [{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}]})
    return out


def replies_for(entry: dict[str, Any], request_id: str, stream: bool, include_usage: bool) -> list[Reply]:
    """The replies that answer a request from `entry`: one `response`, or a stream's `chunk`s and its `end`."""
    response: dict[str, Any] = entry["response"]
    if not stream:
        return [Reply(id=request_id, type="response", data=response)]
    chunks = list(entry.get("chunks") or chunks_from(response))
    usage = response.get("usage")
    if include_usage and usage:
        last = chunks[-1] if chunks else response
        chunks.append({"id": last.get("id"), "object": "chat.completion.chunk", "created": last.get("created"),
                       "model": last.get("model"), "choices": [], "usage": usage})
    replies = [Reply(id=request_id, type="chunk", seq=i, data=chunk) for i, chunk in enumerate(chunks)]
    replies.append(Reply(id=request_id, type="end", seq=len(chunks), data={"usage": usage} if usage else None))
    return replies
