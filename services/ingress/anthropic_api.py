"""The request side of the Anthropic Messages API: `POST /v1/messages` bodies as OpenAI chat bodies.

`to_openai_request` validates a body (400s name the parameter) and translates it, so any provider can
serve it; an Anthropic deployment is sent the caller's own body instead (`native_request`: passthrough,
nothing lost). Answers go back through anthropic_response.py (messages, errors) and anthropic_stream.py
(SSE events); their public names are importable from here too. `estimate_tokens` answers
`/v1/messages/count_tokens` with an estimate (characters / 4), not a tokenizer count.

Mapping notes (what has no OpenAI equivalent is dropped; `dropped_params` names those fields):
- `system` (string or text blocks) -> a leading `system` message.
- user `text`/`image`/`document` blocks -> content parts (`image_url` with a `data:` URL or the
  source URL; PDFs as a `file` part; plain-text documents as text).
- assistant `tool_use` blocks -> `tool_calls` (arguments = JSON of `input`); `thinking` blocks are dropped.
- user `tool_result` blocks -> `role: "tool"` messages placed before the rest of that user turn;
  `is_error` becomes the prefix `TOOL_ERROR_PREFIX`; images inside a result follow in a user message.
- `tools` -> function tools; `tool_choice` auto/any/tool/none -> auto/required/{function}/none,
  `disable_parallel_tool_use` -> `parallel_tool_calls: false`.
- `stop_sequences` -> `stop`; `metadata.user_id` -> `user`; `top_k`, `thinking` and the other
  Anthropic-only fields are dropped; streaming always asks for the final usage chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from services.ingress.anthropic_response import error_body as error_body
from services.ingress.anthropic_response import error_event as error_event
from services.ingress.anthropic_response import error_type as error_type
from services.ingress.anthropic_response import from_openai_response as from_openai_response
from services.ingress.anthropic_response import message_id as message_id
from services.ingress.anthropic_stream import AnthropicEvents as AnthropicEvents
from services.ingress.anthropic_stream import StreamTranslator as StreamTranslator
from services.ingress.anthropic_stream import format_sse as format_sse
from shared.contracts import NativeRequest
from shared.errors import GatewayError
from shared.formats import data_url

TOOL_ERROR_PREFIX = "[tool error] "
"""Prefixed to a `tool_result` with `is_error: true` (OpenAI tool messages have no error flag)."""

IMAGE_TOKEN_ESTIMATE = 1600
"""`estimate_tokens` counts each image or PDF as this many tokens (the size of a ~1.15 MP image)."""

ESTIMATE_HEADER = "x-switchyard-token-estimate"
"""Header the count_tokens endpoint sets to `true`: the count is characters / 4, not a tokenizer's."""

_KNOWN_FIELDS = frozenset({
    "model", "max_tokens", "messages", "system", "metadata", "stop_sequences", "stream", "temperature",
    "top_p", "top_k", "tools", "tool_choice", "thinking",
})


# ---------------------------------------------------------------- helpers


def _bad(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value")


def _missing(param: str) -> GatewayError:
    return GatewayError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# ---------------------------------------------------------------- request


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _bad("'system' must be a string or a list of text blocks.", "system")
    parts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad("Each 'system' block must be a text block with a string 'text'.", f"system[{i}]")
        parts.append(block["text"])
    return "\n\n".join(parts)


def _image_url(block: dict[str, Any], param: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _missing(f"{param}.source")
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not media_type:
            raise _missing(f"{param}.source.media_type")
        if not isinstance(data, str) or not data:
            raise _missing(f"{param}.source.data")
        return data_url(media_type, data)
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise _missing(f"{param}.source.url")
        return url
    raise _bad(f"Unsupported {block.get('type')} source type {kind!r} (supported: base64, url).",
               f"{param}.source.type")


def _document_part(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _missing(f"{param}.source")
    kind = source.get("type")
    if kind == "text":
        data = source.get("data")
        if not isinstance(data, str):
            raise _missing(f"{param}.source.data")
        return {"type": "text", "text": data}
    if kind == "base64":
        file: dict[str, Any] = {"file_data": _image_url(block, param)}
        if isinstance(block.get("title"), str):
            file["filename"] = block["title"]
        return {"type": "file", "file": file}
    raise _bad(f"Unsupported document source type {kind!r} (supported: base64, text).", f"{param}.source.type")


def _text_of(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _missing(f"{param}.text")
    return text


def _tool_result(block: dict[str, Any], param: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A `tool_result` block -> (the `tool` message, image parts that must travel in a user message)."""
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise _missing(f"{param}.tool_use_id")
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if content is None:
        pass
    elif isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            p = f"{param}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad("Each tool_result content block must be an object.", p)
            kind = part.get("type")
            if kind == "text":
                texts.append(_text_of(part, p))
            elif kind == "image":
                images.append({"type": "image_url", "image_url": {"url": _image_url(part, p)}})
            elif kind == "document":
                doc = _document_part(part, p)
                if doc["type"] == "text":
                    texts.append(doc["text"])
                else:
                    images.append(doc)
            else:
                raise _bad(f"Unsupported tool_result content block type {kind!r}.", f"{p}.type")
    else:
        raise _bad("'content' of a tool_result must be a string or a list of blocks.", f"{param}.content")
    text = "\n".join(texts)
    if block.get("is_error"):
        text = TOOL_ERROR_PREFIX + text
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}, images


def _user_messages(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    result_images: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        p = f"{param}[{i}]"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text_of(block, p)})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, p)}})
        elif kind == "document":
            parts.append(_document_part(block, p))
        elif kind == "tool_result":
            tool_message, images = _tool_result(block, p)
            out.append(tool_message)
            result_images.extend(images)
        elif kind in ("thinking", "redacted_thinking"):
            continue
        elif kind == "tool_use":
            raise _bad("'tool_use' blocks may only appear in assistant messages.", f"{p}.type")
        else:
            raise _bad(f"Unsupported content block type {kind!r}.", f"{p}.type")
    parts = result_images + parts
    if parts:
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        out.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
    return out


def _assistant_message(content: Any, param: str) -> dict[str, Any] | None:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        p = f"{param}[{i}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text_of(block, p))
        elif kind == "tool_use":
            call_id, name, args = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not call_id:
                raise _missing(f"{p}.id")
            if not isinstance(name, str) or not name:
                raise _missing(f"{p}.name")
            if not isinstance(args, dict):
                raise _bad("'input' of a tool_use block must be an object.", f"{p}.input")
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": _dumps(args)}})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        elif kind == "tool_result":
            raise _bad("'tool_result' blocks may only appear in user messages.", f"{p}.type")
        else:
            raise _bad(f"Unsupported content block type {kind!r}.", f"{p}.type")
    if not texts and not calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list.", "messages")
    if not messages:
        raise _bad("'messages' must contain at least one message.", "messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad("Each message must be an object.", param)
        role = message.get("role")
        if role is None:
            raise _missing(f"{param}.role")
        if role not in ("user", "assistant"):
            raise _bad(f"Invalid role {role!r}: messages take 'user' or 'assistant' (use the top-level "
                       "'system' parameter for system prompts).", f"{param}.role")
        if "content" not in message:
            raise _missing(f"{param}.content")
        content = message["content"]
        if isinstance(content, list):
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise _bad("Each content block must be an object with a 'type'.", f"{param}.content[{j}]")
        elif not isinstance(content, str):
            raise _bad("'content' must be a string or a list of content blocks.", f"{param}.content")
        if role == "user":
            out.extend(_user_messages(content, f"{param}.content"))
        else:
            assistant = _assistant_message(content, f"{param}.content")
            if assistant is not None:
                out.append(assistant)
    if not out:
        raise _bad("'messages' must contain at least one message with content.", "messages")
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list.", "tools")
    out = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad("Each tool must be an object.", param)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _bad(f"Unsupported tool type {kind!r}: only client (custom) tools with an input_schema "
                       "are supported.", f"{param}.type")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _missing(f"{param}.name")
        schema = tool.get("input_schema")
        if schema is None:
            raise _missing(f"{param}.input_schema")
        if not isinstance(schema, dict):
            raise _bad("'input_schema' must be a JSON Schema object.", f"{param}.input_schema")
        fn: dict[str, Any] = {"name": name, "parameters": schema}
        description = tool.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise _bad("'description' must be a string.", f"{param}.description")
            fn["description"] = description
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise _bad("'tool_choice' must be an object with a 'type'.", "tool_choice")
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
            raise _missing("tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise _bad(f"Invalid tool_choice type {kind!r} (expected auto, any, tool or none).", "tool_choice.type")
    if choice.get("disable_parallel_tool_use") and kind != "none":
        out["parallel_tool_calls"] = False


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """Validate and translate the fields shared by /v1/messages and /v1/messages/count_tokens."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None)
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string.", "model")
    messages = _messages(body.get("messages"))
    system = body.get("system")
    if system is not None:
        text = _system_text(system)
        if text:
            messages.insert(0, {"role": "system", "content": text})
    out: dict[str, Any] = {"model": model, "messages": messages}
    if body.get("tools") is not None:
        tools = _tools(body["tools"])
        if tools:
            out["tools"] = tools
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], out)
    if "tools" not in out:
        if out.get("tool_choice") == "required" or isinstance(out.get("tool_choice"), dict):
            raise _bad("A 'tool_choice' of type 'any' or 'tool' needs 'tools'.", "tool_choice")
        out.pop("tool_choice", None)  # auto / none without tools: nothing to choose from
        out.pop("parallel_tool_calls", None)
    return out


def to_openai_request(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request -> an OpenAI chat completions body.

    Raises GatewayError(400, ..., param=<the offending parameter>) for an invalid request.
    """
    out = _common(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _missing("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad("'max_tokens' must be an integer of at least 1.", "max_tokens")
    out["max_tokens"] = max_tokens
    for name, high in (("temperature", 1.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is not None:
            if not _is_number(value) or not 0 <= value <= high:
                raise _bad(f"'{name}' must be a number between 0 and {high:g}.", name)
            out[name] = value
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise _bad("'top_k' must be a non-negative integer.", "top_k")
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("'stop_sequences' must be a list of strings.", "stop_sequences")
        if stops:
            out["stop"] = stops
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean.", "stream")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("'metadata' must be an object.", "metadata")
        user_id = metadata.get("user_id")
        if user_id is not None:
            if not isinstance(user_id, str):
                raise _bad("'metadata.user_id' must be a string.", "metadata.user_id")
            out["user"] = user_id
    return out


NATIVE_HEADERS = ("anthropic-beta",)
"""Request headers that shape an Anthropic answer: sent on to an Anthropic deployment with the body."""

NATIVE_MAX_BYTES = 4 << 20
"""A body larger than this (as JSON) is not carried twice in its envelope: it is served translated."""


def native_request(body: dict[str, Any], headers: Mapping[str, str]) -> NativeRequest | None:
    """The caller's body as written, for an Anthropic deployment to receive unchanged (passthrough); None
    when it is too large to travel next to its translation (NATIVE_MAX_BYTES)."""
    try:
        if len(orjson.dumps(body)) > NATIVE_MAX_BYTES:
            return None
    except orjson.JSONEncodeError:  # a value JSON cannot carry: the translation's checks answer it
        return None
    kept = {name: headers[name] for name in NATIVE_HEADERS if headers.get(name)}
    return NativeRequest(format="anthropic", body=body, headers=kept)


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
    oa = _common(body)
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
        chars += len(_dumps(tool["function"]))
    tokens = math.ceil(chars / 4) + media * IMAGE_TOKEN_ESTIMATE
    return {"input_tokens": max(1, tokens)}
