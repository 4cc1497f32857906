"""Cohere's v2 API (`POST /v2/chat`, `POST /v2/embed`), translated to and from OpenAI's shapes.

Request: OpenAI messages map almost one to one (text and `image_url` parts, tool calls, tool
results); `top_p` becomes `p` and `stop` becomes `stop_sequences`; `top_p` and the penalties
are clamped into Cohere's ranges (0.01..0.99, 0..1; a value moved is reported as not
honoured, except `top_p: 1`, which asks for no truncation at all); `response_format`
`json_schema` becomes `{type: json_object, json_schema}`, a forced function becomes
`tool_choice: REQUIRED` with only that tool offered. Cohere-only parameters (`k`,
`safety_mode`, `documents`, `citation_options`, `thinking`, `strict_tools`, `priority`) pass
through; any other parameter Cohere cannot honour is dropped and reported (or refused with
`strict`).

Response: text parts are joined, citations (kept by Cohere beside the text, never inside it)
and the `tool_plan` are dropped, `thinking` parts are left out of the answer. Usage is taken
from `billed_units`, what Cohere charges for, falling back to `tokens`.

Streams: Cohere's typed SSE events (`message-start`, `content-delta`, `tool-call-start`,
`tool-call-delta`, `message-end`, ...) become OpenAI chunks. Tool calls get OpenAI indexes
counted from 0 in the order they start, since Cohere's `index` is the position of the block in
the message (text and tool calls share it).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from switchyard.services.workers.providers.base import (
    GATEWAY_FIELDS,
    CallContext,
    ProviderAdapter,
    ServerEvent,
    StreamParser,
    UpstreamRequest,
)
from switchyard.services.workers.providers.openai_shape import (
    chunk,
    classify_status,
    completion,
    error_message,
    float32_base64,
    openai_usage,
    retry_after_seconds,
)
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

DEFAULT_BASE = "https://api.cohere.com"
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

FINISH_REASONS = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "ERROR_LIMIT": "length",
    "TOOL_CALL": "tool_calls",
    "ERROR_TOXIC": "content_filter",
}

# Cohere words an over-long prompt several ways ("too many tokens: ... cannot exceed ...",
# "... exceeds the model's context ..."); with "token" in the message any of these means context length.
_CONTEXT_HINTS = ("too many tokens", "exceeds", "exceeded", "too long")


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


class CohereAdapter(ProviderAdapter):
    name = "cohere"

    def _url(self, ctx: CallContext, path: str) -> str:
        return f"{(ctx.deployment.api_base or DEFAULT_BASE).rstrip('/')}{path}"

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json", **ctx.deployment.headers}
        if ctx.stream:
            headers["accept"] = "text/event-stream"
        if ctx.api_key:
            headers["authorization"] = f"Bearer {ctx.api_key}"
        return headers

    # ---- chat ----

    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
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
        return UpstreamRequest("POST", self._url(ctx, "/v2/chat"), self._headers(ctx),
                               content=encode_json(out, body, PROVIDER), dropped_params=dropped)

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
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

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return CohereStream(ctx)

    # ---- embeddings ----

    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
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
        return UpstreamRequest("POST", self._url(ctx, "/v2/embed"), self._headers(ctx),
                               content=encode_json(out, body, PROVIDER), dropped_params=dropped)

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
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

    # ---- errors ----

    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        """Cohere's `{"message"}` (or `{"id", "message"}`) errors, by status, onto what an OpenAI client expects."""
        message, _ = error_message(body)
        retry_after = retry_after_seconds(headers)
        text = message.lower()
        if status in (400, 413, 422) and "token" in text and any(h in text for h in _CONTEXT_HINTS):
            return GatewayError(400, f"cohere: {message}", code="context_length_exceeded", param="messages")
        if status == 498:  # invalid token
            return GatewayError(401, f"cohere: {message}", code="invalid_api_key")
        if status == 402:  # billing: OpenAI reports an exhausted quota as 429 insufficient_quota
            return GatewayError(429, f"cohere: {message}", code="insufficient_quota", retryable=False)
        if status == 499:  # upstream saw the request cancelled; another attempt may succeed
            return GatewayError(502, f"cohere: {message}", code="upstream_error", retryable=True)
        if status == 501:
            return GatewayError(400, f"cohere: {message}", code="unsupported_value", retryable=False)
        return classify_status(status, message, None, retry_after, self.name)


# ---- request translation helpers ----------------------------------------------------------------


def _answered_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call of Cohere's answer in OpenAI's shape (Cohere v2 writes it the same way)."""
    fn = call.get("function") or {}
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or "{}"}}


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
