"""Cohere's v2 API, the request side: an OpenAI chat or embeddings body as a `/v2/chat` or `/v2/embed` body.

OpenAI messages map almost one to one (text and `image_url` parts, tool calls, tool results); `top_p` becomes
`p` and `stop` becomes `stop_sequences`; `top_p` and the penalties are clamped into Cohere's ranges (0.01..0.99,
0..1; a value moved is reported as not honoured, except `top_p: 1`, which asks for no truncation at all);
`response_format` `json_schema` becomes `{type: json_object, json_schema}`, a forced function becomes
`tool_choice: REQUIRED` with only that tool offered. Cohere-only parameters (`k`, `safety_mode`, `documents`,
`citation_options`, `thinking`, `strict_tools`, `priority`) pass through; any other parameter Cohere cannot
honour is dropped and reported (or refused with `strict`).
"""

from __future__ import annotations

from typing import Any

from switchyard.services.workers.providers.base import GATEWAY_FIELDS, CallContext
from switchyard.services.workers.providers.reading import (
    as_list,
    as_object,
    as_text,
    chat_messages,
    content_parts,
    encode_json,
    forced_function,
    function_tool,
    number,
    objects,
    part_text,
    response_format,
    stop_sequences,
    text_of,
    tool_call_function,
    unsupported,
)
from switchyard.shared.errors import GatewayError

PROVIDER = "cohere"

# OpenAI fields this adapter translates (or that never go upstream).
_HANDLED = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "stop", "frequency_penalty", "presence_penalty", "tools", "tool_choice", "response_format", "user",
    "metadata", *GATEWAY_FIELDS,
})
# Values of unsupported parameters that ask for nothing, so leaving them out loses nothing.
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "store": (False,), "logit_bias": ({},), "parallel_tool_calls": (True,),
}
# Cohere-native chat parameters a caller may send as extra body fields; forwarded unchanged.
_NATIVE_CHAT = ("k", "safety_mode", "documents", "citation_options", "thinking", "strict_tools", "priority")
# Cohere-native embed parameters forwarded unchanged (`input_type` overrides the default below).
_NATIVE_EMBED = ("input_type", "truncate", "max_tokens")
# OpenAI's embeddings API has no query/document distinction and is mostly used to index
# documents, so that is the default; send `input_type: "search_query"` (or `classification`,
# `clustering`) as an extra body field to embed queries.
DEFAULT_INPUT_TYPE = "search_document"


def chat_body(ctx: CallContext) -> tuple[dict[str, Any], list[str]]:
    """The `/v2/chat` body of an OpenAI chat body, and the parameters not honoured as asked (already checked
    against `strict`: a strict call that asks for one is refused with a 400 naming it)."""
    body = ctx.body
    out: dict[str, Any] = {"model": ctx.deployment.model, "messages": _messages(chat_messages(body, PROVIDER)),
                           "stream": ctx.stream}
    dropped = [k for k, v in body.items()
               if k not in _HANDLED and k not in _NATIVE_CHAT and v is not None and v not in _HARMLESS.get(k, ())]

    def clamped(name: str, target: str, low: float, high: float, exact: tuple[float, ...] = ()) -> None:
        """Send `name` as `target` within Cohere's range; a value moved (other than `exact` ones) is reported."""
        value = number(body, name, PROVIDER)
        if value is None:
            return
        out[target] = min(high, max(low, value))
        if out[target] != value and value not in exact:
            dropped.append(name)  # not honoured as asked

    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if body.get("temperature") is not None:
        out["temperature"] = body["temperature"]
    clamped("top_p", "p", 0.01, 0.99, exact=(1,))  # top_p 1 asks for no truncation: Cohere's least is 0.99
    if body.get("seed") is not None:
        out["seed"] = body["seed"]
    clamped("frequency_penalty", "frequency_penalty", 0.0, 1.0)
    clamped("presence_penalty", "presence_penalty", 0.0, 1.0)
    stops = stop_sequences(body, PROVIDER)
    if stops:
        out["stop_sequences"] = stops
    functions, other_tools = _functions(body.get("tools"))
    dropped += other_tools
    choice = body.get("tool_choice")
    if functions:
        if isinstance(choice, dict):
            wanted = forced_function(choice, PROVIDER)
            functions = [fn for fn in functions if fn["name"] == wanted] or functions
            out["tool_choice"] = "REQUIRED"
        elif choice == "required":
            out["tool_choice"] = "REQUIRED"
        elif choice == "none":
            out["tool_choice"] = "NONE"
        out["tools"] = [{"type": "function", "function": {k: v for k, v in fn.items() if k != "strict"}}
                        for fn in functions]
        if any(fn.get("strict") for fn in functions):
            out["strict_tools"] = True
    fmt = response_format(body, PROVIDER)
    if fmt.type == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        out["response_format"] = {"type": "json_object", **({"json_schema": fmt.schema} if fmt.schema else {})}
    elif fmt.type not in (None, "text"):
        dropped.append("response_format")
    for name in _NATIVE_CHAT:
        if name in body:
            out[name] = body[name]
    unsupported(ctx, dropped, PROVIDER)
    return out, dropped


def embed_body(ctx: CallContext) -> tuple[dict[str, Any], list[str]]:
    """The `/v2/embed` body of an OpenAI embeddings body (text input only), and the parameters dropped."""
    body = ctx.body
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else as_list(raw, "input", PROVIDER)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise GatewayError(400, "cohere embeddings take text input only (a string or a list of strings)",
                           param="input", code="invalid_value")
    out: dict[str, Any] = {"model": ctx.deployment.model, "texts": texts, "input_type": DEFAULT_INPUT_TYPE,
                           "embedding_types": ["float"]}
    if body.get("dimensions") is not None:
        out["output_dimension"] = body["dimensions"]
    for name in _NATIVE_EMBED:
        if name in body:
            out[name] = body[name]
    handled = {"model", "input", "dimensions", "encoding_format", "user", "metadata", *_NATIVE_EMBED,
               *GATEWAY_FIELDS}
    dropped = [k for k, v in body.items() if k not in handled and v is not None]
    unsupported(ctx, dropped, PROVIDER)
    return out, dropped


def _tool_call(call: dict[str, Any], param: str) -> dict[str, Any]:
    """An assistant tool call of the request as Cohere v2 takes it (arguments a JSON string)."""
    fn = tool_call_function(call, param, PROVIDER)
    args = fn.get("arguments") or "{}"
    text = args if isinstance(args, str) else encode_json(args, args, PROVIDER, f"{param}.function.arguments").decode()
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": text}}


def _user_content(content: Any, where: str) -> Any:
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content_parts(content, f"{where}.content", PROVIDER)):
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": part_text(part, f"{where}.content[{j}]", PROVIDER)})
        elif kind == "image_url":
            image = part.get("image_url")
            image = ({"url": image} if isinstance(image, str)
                     else as_object(image, f"{where}.content[{j}].image_url", PROVIDER))
            parts.append({"type": "image_url",
                          "image_url": {k: image[k] for k in ("url", "detail") if image.get(k) is not None}})
        else:
            raise GatewayError(400, f"cohere does not support content parts of type {kind!r}",
                               param=f"{where}.content[{j}]", code="unsupported_value")
    return parts


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            out.append({"role": "system", "content": text_of(m.get("content"), f"{where}.content", PROVIDER)})
        elif role == "user":
            out.append({"role": "user", "content": _user_content(m.get("content"), where)})
        elif role == "assistant":
            text = _assistant_text(m.get("content"), f"{where}.content")
            msg: dict[str, Any] = {"role": "assistant"}
            calls = objects(m.get("tool_calls"), f"{where}.tool_calls", PROVIDER)
            if calls:
                msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
                if text:  # the words beside a tool call are, in Cohere's terms, the tool plan
                    msg["tool_plan"] = text
            else:
                msg["content"] = text
            out.append(msg)
        elif role == "tool":
            out.append({"role": "tool", "tool_call_id": m.get("tool_call_id") or "",
                        "content": text_of(m.get("content"), f"{where}.content", PROVIDER)})
        else:
            raise GatewayError(400, f"cohere does not support messages with role {role!r}", param=f"{where}.role",
                               code="unsupported_value")
    return out


def _assistant_text(content: Any, param: str) -> str:
    """An assistant message's words: its text and refusal parts (Cohere has no separate refusal)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(as_text(p.get("text") or p.get("refusal"), f"{param}[{j}].text", PROVIDER)
                   for j, p in enumerate(content_parts(content, param, PROVIDER)))


def _functions(tools: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The function definitions among `tools`, and the tools of other types (Cohere has only functions)."""
    functions: list[dict[str, Any]] = []
    others: list[str] = []
    for i, tool in enumerate(objects(tools, "tools", PROVIDER)):
        fn = function_tool(tool, f"tools[{i}]", PROVIDER)
        if fn is None:
            others.append(f"tools[{i}]")
        else:
            functions.append(fn)
    return functions, others
