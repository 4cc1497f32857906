"""The answer side of the Responses API: `response` objects and their output items, built from chat
completions (pure, no I/O). Shapes follow the openai SDK's models (`openai.types.responses`), which
tests/test_responses_api.py validates them against.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from switchyard.shared.errors import GatewayError


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_id(request_id: str) -> str:
    """The response's id, `resp_<the gateway request id>`: logs and `x-request-id` lead to it."""
    return "resp_" + request_id


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Response output items -> the assistant chat message they amount to (none when empty)."""
    text = "".join(part.get("text") or part.get("refusal") or "" for item in output if item["type"] == "message"
                   for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                     "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    if not text and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


# ---------------------------------------------------------------- answer: chat completion -> response


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage -> Responses usage (`input_tokens` include cached ones, as OpenAI counts them)."""
    if not chat_usage:
        return None
    details = chat_usage.get("prompt_tokens_details") or {}
    out_details = chat_usage.get("completion_tokens_details") or {}
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(details.get("cached_tokens") or 0),
                                 "cache_write_tokens": int(chat_usage.get("cache_creation_input_tokens") or 0)},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(out_details.get("reasoning_tokens") or 0)},
        "total_tokens": int(chat_usage.get("total_tokens") or prompt + completion),
    }


def message_item(item_id: str, text: str, status: str = "completed", refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or not refusal:
        content.append(text_part(text))
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def incomplete_reason(finish_reason: str | None) -> str | None:
    return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason or "")


def skeleton(rid: str, body: dict[str, Any], created_at: int | None = None) -> dict[str, Any]:
    """A response object before any output: what `response.created` carries, and what the answer fills in."""
    text = body.get("text") if isinstance(body.get("text"), dict) else None
    tool_choice = body.get("tool_choice", "auto")
    return {
        "id": rid, "object": "response", "created_at": created_at or int(time.time()), "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": body.get("model"), "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
        "store": body.get("store", True) is not False, "temperature": body.get("temperature", 1.0),
        "text": {"format": (text or {}).get("format") or {"type": "text"}},
        "tool_choice": tool_choice, "tools": [{"strict": None, **t} for t in body.get("tools") or []],
        "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": None, "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def finished(response: dict[str, Any], output: list[dict[str, Any]], chat_usage: dict[str, Any] | None,
             finish_reason: str | None) -> dict[str, Any]:
    """`response` completed (or incomplete, when the model hit max_output_tokens or a content filter)."""
    reason = incomplete_reason(finish_reason)
    return {**response, "status": "incomplete" if reason else "completed", "output": output,
            "incomplete_details": {"reason": reason} if reason else None, "usage": usage(chat_usage)}


def from_chat_completion(completion: dict[str, Any], body: dict[str, Any], rid: str) -> dict[str, Any]:
    """A chat completion -> the `response` object for the Responses request `body`, with id `rid`."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    text, refusal = message.get("content") or "", message.get("refusal")
    if text or refusal:
        output.append(message_item(new_id("msg"), text, refusal=refusal))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        output.append(function_call_item(new_id("fc"), call.get("id") or new_id("call"), fn.get("name") or "",
                                         fn.get("arguments") or ""))
    return finished(skeleton(rid, body, completion.get("created")), output, completion.get("usage"),
                    choice.get("finish_reason"))


def failed(response: dict[str, Any], err: GatewayError) -> dict[str, Any]:
    """`response` failed with `err`: the object `response.failed` carries."""
    code = "rate_limit_exceeded" if err.status == 429 else err.code or "server_error"
    return {**response, "status": "failed", "error": {"code": code, "message": err.message}}
