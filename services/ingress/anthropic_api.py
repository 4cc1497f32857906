"""The request side of the Anthropic Messages API: `POST /v1/messages` bodies as OpenAI chat bodies.

`to_openai_request` validates a body (400s name the parameter) and translates it, so any provider can
serve it; an Anthropic deployment is sent the caller's own body instead (`native_request`: passthrough,
nothing lost). Answers go back through anthropic_response.py (messages, errors) and anthropic_stream.py
(SSE events); their public names are importable from here too. `estimate_tokens` answers
`/v1/messages/count_tokens` with an estimate (characters / 4), not a tokenizer count.

Mapping notes (what has no OpenAI equivalent is dropped; `dropped_params` names those fields):
- `system` and `messages`: anthropic_messages.py.
- `tools` -> function tools; `tool_choice` auto/any/tool/none -> auto/required/{function}/none,
  `disable_parallel_tool_use` -> `parallel_tool_calls: false`.
- `stop_sequences` -> `stop`; `metadata.user_id` -> `user`; `top_k`, `thinking` and the other
  Anthropic-only fields are dropped; streaming always asks for the final usage chunk.
- Anthropic's own tools (`web_search_20250305`, `bash_20250124`, any `type` but `custom`, `mcp_servers`), blocks
  OpenAI cannot express are left out of the translation and recorded (`Lossy`): `native_request` marks the
  envelope so that only an Anthropic deployment serves it, as written (shared/native.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from switchyard.services.ingress.anthropic_messages import TOOL_ERROR_PREFIX as TOOL_ERROR_PREFIX
from switchyard.services.ingress.anthropic_messages import Lossy as Lossy
from switchyard.services.ingress.anthropic_messages import (
    bad,
    chat_messages,
    left_out,
    missing,
    system_text,
    untranslatable,
)
from switchyard.services.ingress.anthropic_response import error_body as error_body
from switchyard.services.ingress.anthropic_response import error_event as error_event
from switchyard.services.ingress.anthropic_response import error_type as error_type
from switchyard.services.ingress.anthropic_response import from_openai_response as from_openai_response
from switchyard.services.ingress.anthropic_response import message_id as message_id
from switchyard.services.ingress.anthropic_stream import AnthropicEvents as AnthropicEvents
from switchyard.services.ingress.anthropic_stream import StreamTranslator as StreamTranslator
from switchyard.services.ingress.anthropic_stream import format_sse as format_sse
from switchyard.shared.contracts import LossyPart, NativeRequest
from switchyard.shared.native import native_required

IMAGE_TOKEN_ESTIMATE = 1600
"""`estimate_tokens` counts each image or PDF as this many tokens (the size of a ~1.15 MP image)."""

ESTIMATE_HEADER = "x-switchyard-token-estimate"
"""Header the count_tokens endpoint sets to `true`: the count is characters / 4, not a tokenizer's."""

_KNOWN_FIELDS = frozenset({
    "model", "max_tokens", "messages", "system", "metadata", "stop_sequences", "stream", "temperature",
    "top_p", "top_k", "tools", "tool_choice", "thinking",
})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------- request


def _tools(tools: Any, lossy: Lossy | None) -> list[dict[str, Any]]:
    """Client (custom) tools as function tools; Anthropic's own tool types go to `lossy` (raised without it)."""
    if not isinstance(tools, list):
        raise bad("'tools' must be a list.", "tools")
    out = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad("Each tool must be an object.", param)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            if not isinstance(kind, str) or not kind:
                raise bad("A tool's 'type' must be a non-empty string.", f"{param}.type")
            left_out(untranslatable(f"Tool type {kind!r} is Anthropic's own (a server tool or an Anthropic-defined "
                                    "client tool), with no OpenAI equivalent", f"{param}.type"), lossy)
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise missing(f"{param}.name")
        schema = tool.get("input_schema")
        if schema is None:
            raise missing(f"{param}.input_schema")
        if not isinstance(schema, dict):
            raise bad("'input_schema' must be a JSON Schema object.", f"{param}.input_schema")
        fn: dict[str, Any] = {"name": name, "parameters": schema}
        description = tool.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise bad("'description' must be a string.", f"{param}.description")
            fn["description"] = description
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise bad("'tool_choice' must be an object with a 'type'.", "tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise missing("tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise bad(f"Invalid tool_choice type {kind!r} (expected auto, any, tool or none).", "tool_choice.type")
    if choice.get("disable_parallel_tool_use") and kind != "none":
        out["parallel_tool_calls"] = False


def _common(body: dict[str, Any], lossy: Lossy | None) -> dict[str, Any]:
    """Validate and translate the fields shared by /v1/messages and /v1/messages/count_tokens."""
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", None)
    model = body.get("model")
    if model is None:
        raise missing("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string.", "model")
    messages = chat_messages(body.get("messages"), lossy)
    system = body.get("system")
    if system is not None:
        text = system_text(system)
        if text:
            messages.insert(0, {"role": "system", "content": text})
    out: dict[str, Any] = {"model": model, "messages": messages}
    if body.get("tools") is not None:
        tools = _tools(body["tools"], lossy)
        if tools:
            out["tools"] = tools
    if body.get("mcp_servers"):  # Anthropic's MCP connector: tools only Anthropic calls
        left_out(untranslatable("MCP servers are Anthropic's own connector, with no OpenAI equivalent",
                                "mcp_servers"), lossy)
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], out)
    if "tools" not in out:
        if lossy:  # the tools it names may be Anthropic's own: only an Anthropic deployment serves it anyway
            out.pop("tool_choice", None)
            out.pop("parallel_tool_calls", None)
        elif out.get("tool_choice") == "required" or isinstance(out.get("tool_choice"), dict):
            raise bad("A 'tool_choice' of type 'any' or 'tool' needs 'tools'.", "tool_choice")
        out.pop("tool_choice", None)  # auto / none without tools: nothing to choose from
        out.pop("parallel_tool_calls", None)
    return out


def to_openai_request(body: dict[str, Any], lossy: Lossy | None = None) -> dict[str, Any]:
    """An Anthropic Messages request -> an OpenAI chat completions body.

    Raises GatewayError(400, ..., param=<the offending parameter>) for an invalid request, and for a valid one
    OpenAI cannot express (an Anthropic server tool) unless `lossy` is given: then that part is left out
    and recorded there, for `native_request`.
    """
    out = _common(body, lossy)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise missing("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise bad("'max_tokens' must be an integer of at least 1.", "max_tokens")
    out["max_tokens"] = max_tokens
    for name, high in (("temperature", 1.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is not None:
            if not _is_number(value) or not 0 <= value <= high:
                raise bad(f"'{name}' must be a number between 0 and {high:g}.", name)
            out[name] = value
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise bad("'top_k' must be a non-negative integer.", "top_k")
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("'stop_sequences' must be a list of strings.", "stop_sequences")
        if stops:
            out["stop"] = stops
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be a boolean.", "stream")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise bad("'metadata' must be an object.", "metadata")
        user_id = metadata.get("user_id")
        if user_id is not None:
            if not isinstance(user_id, str):
                raise bad("'metadata.user_id' must be a string.", "metadata.user_id")
            out["user"] = user_id
    return out


NATIVE_HEADERS = ("anthropic-beta",)
"""Request headers that shape an Anthropic answer: sent on to an Anthropic deployment with the body."""

NATIVE_MAX_BYTES = 4 << 20
"""A body larger than this (as JSON) is not carried twice in its envelope: it is served translated."""


def native_request(body: dict[str, Any], headers: Mapping[str, str],
                   lossy: Lossy | None = None) -> NativeRequest | None:
    """The caller's body as written, for an Anthropic deployment to receive unchanged (passthrough); None
    when it is too large to travel next to its translation (NATIVE_MAX_BYTES). With `lossy` (what the
    translation left out) it is marked so that no other deployment serves it, and too large is a 400."""
    first = LossyPart(param=lossy[0].param or "", message=lossy[0].message) if lossy else None
    try:
        too_large = len(orjson.dumps(body)) > NATIVE_MAX_BYTES
    except orjson.JSONEncodeError:  # a value JSON cannot carry: the translation's checks answer it
        too_large = True
    if too_large:
        if first is not None:
            raise native_required(first, "anthropic", f"a request is passed through only up to "
                                                      f"{NATIVE_MAX_BYTES >> 20} MiB")
        return None
    kept = {name: headers[name] for name in NATIVE_HEADERS if headers.get(name)}
    return NativeRequest(format="anthropic", body=body, headers=kept, lossy=first)


def dropped_params(body: dict[str, Any]) -> list[str]:
    """Top-level request fields with no OpenAI equivalent that `to_openai_request` leaves out, sorted
    (for the `x-switchyard-dropped-params` header). `top_k` and `thinking` are always dropped."""
    if not isinstance(body, dict):
        return []
    dropped = {k for k in body if k not in _KNOWN_FIELDS}
    dropped |= {k for k in ("top_k", "thinking") if body.get(k) is not None}
    return sorted(dropped)


# ---------------------------------------------------------------- count_tokens


def estimate_tokens(body: dict[str, Any]) -> dict[str, int]:
    """`/v1/messages/count_tokens`: an ESTIMATE, ceil(characters / 4) over all text (system, message text,
    tool_use inputs and tool_result text as JSON/text, tool names, descriptions and input schemas as JSON)
    plus IMAGE_TOKEN_ESTIMATE per image or PDF. Validates like `to_openai_request` (without max_tokens)."""
    oa = _common(body, [])  # Anthropic's own tools and blocks are not counted
    chars = 0
    media = 0
    for message in oa["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if part["type"] == "text":
                    chars += len(part["text"])
                else:
                    media += 1
        for call in message.get("tool_calls") or []:
            chars += len(call["function"]["name"]) + len(call["function"]["arguments"])
    for tool in oa.get("tools") or []:
        chars += len(orjson.dumps(tool["function"]))
    tokens = math.ceil(chars / 4) + media * IMAGE_TOKEN_ESTIMATE
    return {"input_tokens": max(1, tokens)}
