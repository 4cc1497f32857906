"""Fake Cohere v2 API: `/v2/chat` (JSON and typed SSE events) and `/v2/embed`, in Cohere's own wire format.

Answers like the demo provider (an echo of the last user message, the first tool called when
tools are offered), a JSON object in JSON mode, a citation on every plain answer (so tests see
citations dropped), usage with `billed_units` smaller than `tokens` (Cohere does not bill its
prompt template), errors as `{"id", "message"}`, and 401 without a Bearer token.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from switchyard.devstack.demo_provider import completion_for, count_tokens, embeddings_for, reply_text
from tests.fakes.server import FakeProvider, sse

TEMPLATE_TOKENS = 7
"""Prompt-template tokens Cohere counts in `tokens.input_tokens` but does not bill."""


def _openai_view(body: dict[str, Any]) -> dict[str, Any]:
    """The demo provider reads OpenAI bodies; Cohere's differ only in names the demo looks at."""
    choice = body.get("tool_choice")
    return {**body, "tool_choice": choice.lower() if isinstance(choice, str) else choice}


def _last_user_text(body: dict[str, Any]) -> str:
    user: dict[str, Any] = next((m for m in reversed(body.get("messages") or []) if m.get("role") == "user"), {})
    content = user.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed `/v2/chat` response for a Cohere request body."""
    view = _openai_view(body)
    done = completion_for(view)
    oa_message = done["choices"][0]["message"]
    calls = oa_message.get("tool_calls") or []
    fmt = body.get("response_format") or {}
    if calls:
        text = ""
    elif fmt.get("type") == "json_object":
        text = orjson.dumps({"echo": _last_user_text(body)}).decode()
    else:
        text = reply_text(view)
    message: dict[str, Any] = {"role": "assistant"}
    if calls:
        message["tool_plan"] = f"I will call {calls[0]['function']['name']}."
        message["tool_calls"] = calls
    else:
        message["content"] = [{"type": "text", "text": text}]
        if text.startswith("Echo:"):
            message["citations"] = [{"start": 0, "end": 4, "text": "Echo", "type": "TEXT_CONTENT",
                                     "sources": [{"type": "document", "id": "doc:0", "document": {"id": "doc:0"}}]}]
    prompt = done["usage"]["prompt_tokens"]
    output = count_tokens(text or calls[0]["function"]["arguments"])
    max_tokens = body.get("max_tokens")
    finish = "TOOL_CALL" if calls else "COMPLETE"
    if isinstance(max_tokens, int) and not calls and len(text.split(" ")) >= max_tokens:
        finish = "MAX_TOKENS"
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, orjson.dumps(body).decode())),
        "finish_reason": finish,
        "message": message,
        "usage": {"billed_units": {"input_tokens": prompt, "output_tokens": output},
                  "tokens": {"input_tokens": prompt + TEMPLATE_TOKENS, "output_tokens": output}},
    }


def stream_events(body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of a streamed `/v2/chat` answer, in Cohere's order."""
    full = answer(body)
    msg = full["message"]

    def ev(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, **fields}

    yield ev("message-start", id=full["id"], delta={"message": {"role": "assistant", "content": [], "tool_plan": "",
                                                                "tool_calls": [], "citations": []}})
    if msg.get("tool_calls"):
        for word in msg["tool_plan"].split(" "):
            yield ev("tool-plan-delta", delta={"message": {"tool_plan": word + " "}})
        for i, call in enumerate(msg["tool_calls"]):
            start = {"id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": ""}}
            yield ev("tool-call-start", index=i, delta={"message": {"tool_calls": start}})
            args = call["function"]["arguments"]
            for k in range(0, len(args), 8):
                yield ev("tool-call-delta", index=i,
                         delta={"message": {"tool_calls": {"function": {"arguments": args[k:k + 8]}}}})
            yield ev("tool-call-end", index=i)
    else:
        yield ev("content-start", index=0, delta={"message": {"content": {"type": "text", "text": ""}}})
        for i, word in enumerate(msg["content"][0]["text"].split(" ")):
            yield ev("content-delta", index=0, delta={"message": {"content": {"text": word if i == 0 else " " + word}}})
        for citation in msg.get("citations") or []:
            yield ev("citation-start", index=0, delta={"message": {"citations": citation}})
            yield ev("citation-end", index=0)
        yield ev("content-end", index=0)
    yield ev("message-end", id=full["id"], delta={"finish_reason": full["finish_reason"], "usage": full["usage"]})


class FakeCohere(FakeProvider):
    name = "cohere"

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"id": str(uuid.uuid4()), "message": message}

    def _error(self, status: int, message: str) -> Response:
        return Response(orjson.dumps(self.error_body(status, message)), status_code=status,
                        media_type="application/json")

    def _unauthorized(self, request: Request) -> Response | None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return self._error(401, "no api key supplied")
        return None

    def routes(self) -> None:
        @self.app.post("/v2/chat")
        async def chat(request: Request) -> Response:
            await self.record(request)
            denied = self._unauthorized(request)
            if denied is not None:
                return denied
            body = orjson.loads(await request.body())
            fault = self.take_fault(request)
            early = await self.fault_response(fault)
            if early is not None:
                return early
            if not body.get("model") or not body.get("messages"):
                return self._error(400, "invalid request: model and messages are required")
            if not body.get("stream"):
                return Response(orjson.dumps(answer(body)), media_type="application/json")
            cut = fault.cut_after if fault else None

            async def gen():  # type: ignore[no-untyped-def]
                for i, (kind, data) in enumerate(stream_events(body)):
                    if cut is not None and i >= cut:
                        return
                    yield sse(data, event=kind)

            return StreamingResponse(gen(), media_type="text/event-stream")

        @self.app.post("/v2/embed")
        async def embed(request: Request) -> Response:
            await self.record(request)
            denied = self._unauthorized(request)
            if denied is not None:
                return denied
            early = await self.fault_response(self.take_fault(request))
            if early is not None:
                return early
            body = orjson.loads(await request.body())
            if not body.get("input_type"):
                return self._error(400, "invalid request: input_type is required for embed models v3 and higher.")
            texts = body.get("texts") or []
            vectors = [d["embedding"] for d in embeddings_for({"input": texts})["data"]]
            dimension = body.get("output_dimension")
            if dimension is not None and (isinstance(dimension, bool) or not isinstance(dimension, int)):
                return self._error(400, "invalid request: output_dimension must be an integer.")
            if dimension:
                vectors = [v[:dimension] for v in vectors]
            types = body.get("embedding_types") or ["float"]
            return Response(orjson.dumps({
                "id": str(uuid.uuid4()),
                "embeddings": {t: vectors for t in types},
                "texts": texts,
                "meta": {"api_version": {"version": "2"},
                         "billed_units": {"input_tokens": sum(count_tokens(t) for t in texts)}},
                "response_type": "embeddings_by_type",
            }), media_type="application/json")
