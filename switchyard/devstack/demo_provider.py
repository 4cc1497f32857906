"""The built-in fake provider behind the `demo` model: a real HTTP server speaking OpenAI's wire format.

It answers deterministically (an echo of the last user message), streams word by word,
calls the first tool when tools are offered, and reports usage, so the gateway works
offline and tests can check every byte. Run: `python -m switchyard.devstack.demo_provider --port N`.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def count_tokens(text: str) -> int:
    """A stable stand-in for a tokenizer: about one token per 4 characters."""
    return max(1, (len(text) + 3) // 4)


def reply_text(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    images = sum(1 for m in messages if isinstance(m.get("content"), list)
                 for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    text = f"Echo: {_text(last_user.get('content')) if last_user else ''}"
    if images:
        text += f" [{images} image(s)]"
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(max_tokens, int):
        text = " ".join(text.split(" ")[:max_tokens])
    return text


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    messages = body.get("messages") or []
    if not tools or body.get("tool_choice") == "none" or (messages and messages[-1].get("role") == "tool"):
        return None
    fn = tools[0].get("function", {})
    last_user: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    args = orjson.dumps({"query": _text(last_user.get("content"))}).decode()
    call_id = "call_" + hashlib.sha1(args.encode()).hexdigest()[:12]
    return {"id": call_id, "type": "function", "function": {"name": fn.get("name", "tool"), "arguments": args}}


def usage_for(body: dict[str, Any], completion: str) -> dict[str, Any]:
    prompt = count_tokens(" ".join(_text(m.get("content")) for m in body.get("messages") or []))
    out = count_tokens(completion)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def completion_for(body: dict[str, Any]) -> dict[str, Any]:
    call = _tool_call(body)
    text = "" if call else reply_text(body)
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    if call:
        message["tool_calls"] = [call]
    return {
        "id": "chatcmpl-demo" + hashlib.sha1(orjson.dumps(body)).hexdigest()[:16],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "demo-1"),
        "system_fingerprint": "fp_demo",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if call else "stop",
                     "logprobs": None}],
        "usage": usage_for(body, text or (call or {}).get("function", {}).get("arguments", "")),
    }


def stream_events(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed completion, in order (without the final `[DONE]`)."""
    full = completion_for(body)
    base = {"id": full["id"], "object": "chat.completion.chunk", "created": full["created"],
            "model": full["model"], "system_fingerprint": "fp_demo"}
    message = full["choices"][0]["message"]

    def c(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    yield c({"role": "assistant", "content": ""})
    if message.get("tool_calls"):
        call = message["tool_calls"][0]
        yield c({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                 "function": {"name": call["function"]["name"], "arguments": ""}}]})
        args = call["function"]["arguments"]
        for i in range(0, len(args), 8):
            yield c({"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 8]}}]})
    else:
        words = (message["content"] or "").split(" ")
        for i, word in enumerate(words):
            yield c({"content": word if i == 0 else " " + word})
    yield c({}, full["choices"][0]["finish_reason"])
    if (body.get("stream_options") or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": full["usage"]}


def embeddings_for(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, item in enumerate(items):
        digest = hashlib.sha256(str(item).encode()).digest()
        data.append({"object": "embedding", "index": i, "embedding": [b / 255.0 for b in digest[:16]]})
    tokens = sum(count_tokens(str(x)) for x in items)
    return {"object": "list", "data": data, "model": body.get("model", "demo-embed"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def sse_body(body: dict[str, Any]) -> Iterator[bytes]:
    for event in stream_events(body):
        yield b"data: " + orjson.dumps(event) + b"\n\n"
    yield b"data: [DONE]\n\n"


def create_app() -> FastAPI:
    app = FastAPI(title="switchyard demo provider")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        if body.get("stream"):
            return StreamingResponse(sse_body(body), media_type="text/event-stream")
        return Response(orjson.dumps(completion_for(body)), media_type="application/json")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return Response(orjson.dumps(embeddings_for(orjson.loads(await request.body()))),
                        media_type="application/json")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "demo-1", "object": "model", "owned_by": "switchyard"}]}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
