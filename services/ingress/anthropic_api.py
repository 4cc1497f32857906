"""Anthropic Messages API on top of the OpenAI-shaped pipeline: pure translation, no I/O.

`POST /v1/messages` bodies become OpenAI chat bodies (`to_openai_request`), so any provider
can serve them; OpenAI completions and chunk streams come back as Anthropic Messages
(`from_openai_response`) and Anthropic SSE events (`StreamTranslator`); gateway errors take
Anthropic's error shape (`error_body`, `error_event`). `estimate_tokens` answers
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
- OpenAI `prompt_tokens` include cached tokens; Anthropic's `input_tokens` do not, so
  `input_tokens = prompt_tokens - cached_tokens` and `cache_read_input_tokens = cached_tokens`.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import orjson

from shared.errors import GatewayError

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

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


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


def message_id(openai_id: str | None) -> str:
    """An Anthropic-style id (`msg_...`) derived from the OpenAI completion id, or a fresh one."""
    if openai_id:
        core = openai_id.removeprefix("chatcmpl-").removeprefix("msg_")
        if core:
            return "msg_" + core
    return "msg_" + uuid.uuid4().hex


def _tool_use_id(openai_id: str | None) -> str:
    # Kept as the provider sent it: the client echoes it back as `tool_use_id` and the provider
    # must recognise it as its own `tool_call_id` on the next turn.
    return openai_id or "toolu_" + uuid.uuid4().hex[:24]


def stop_reason(finish_reason: str | None) -> str:
    """OpenAI `finish_reason` -> Anthropic `stop_reason` (OpenAI does not say which stop sequence hit)."""
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    cached = min(cached, prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": int(usage.get("cache_creation_input_tokens") or 0),
    }


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
        return f"data:{media_type};base64,{data}"
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


def dropped_params(body: dict[str, Any]) -> list[str]:
    """Top-level request fields with no OpenAI equivalent that `to_openai_request` leaves out, sorted
    (for the `x-switchyard-dropped-params` header). `top_k` and `thinking` are always dropped."""
    if not isinstance(body, dict):
        return []
    dropped = {k for k in body if k not in _KNOWN_FIELDS}
    dropped |= {k for k in ("top_k", "thinking") if body.get(k) is not None}
    return sorted(dropped)


# ---------------------------------------------------------------- response


def _tool_input(arguments: Any) -> dict[str, Any]:
    """OpenAI `arguments` (a JSON string) -> Anthropic `input` (an object).

    Arguments that are not a JSON object are kept as `{"_raw_arguments": <the string>}`, never lost."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": str(arguments)}


def from_openai_response(completion: dict[str, Any], requested_model: str) -> dict[str, Any]:
    """An OpenAI `chat.completion` -> an Anthropic Message (`model` is the name the client asked for)."""
    choices = completion.get("choices") or []
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    refusal = message.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    elif refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": _tool_use_id(call.get("id")), "name": fn.get("name", ""),
                        "input": _tool_input(fn.get("arguments"))})
    finish = choice.get("finish_reason")
    reason = stop_reason(finish)
    if refusal and not text and finish in (None, "stop"):
        reason = "refusal"
    if message.get("tool_calls") and reason == "end_turn":
        reason = "tool_use"
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": anthropic_usage(completion.get("usage")),
    }


# ---------------------------------------------------------------- streaming


def format_sse(event: str, data: dict[str, Any]) -> bytes:
    """One Anthropic SSE frame: `event: <name>` then `data: <json>` (the SDK ignores frames without `event:`)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def ping_event() -> tuple[str, dict[str, Any]]:
    """A keep-alive the endpoint may send while waiting (Anthropic sends one after message_start)."""
    return "ping", {"type": "ping"}


class StreamTranslator:
    """OpenAI `chat.completion.chunk` dicts in, Anthropic SSE events `(event, data)` out.

    Call `feed(chunk)` for each chunk in order, then `finish()` once the stream ends (`[DONE]`, or
    the pipeline's end marker). Events: message_start (on the first chunk), then per content block
    content_block_start / content_block_delta* / content_block_stop (text blocks and one tool_use
    block per OpenAI tool-call `index`), then message_delta (stop_reason, usage) and message_stop.
    Usage arrives after the finish_reason chunk, so message_delta is emitted when the usage chunk
    comes (after a finish_reason), else by `finish()`. `finish()` is idempotent; after the stream is
    complete `feed` returns nothing.
    """

    def __init__(self, requested_model: str, message_id: str | None = None) -> None:
        self.model = requested_model
        self.message_id = message_id
        self.started = False
        self.done = False
        self._next_index = 0
        self._open: int | None = None  # Anthropic index of the open block
        self._open_kind: str | None = None
        self._tools: dict[int, int] = {}  # OpenAI tool-call index -> Anthropic block index
        self._tool_ids: set[str] = set()
        self._last_tool: int | None = None
        self._finish: str | None = None
        self._refused = False
        self._usage: dict[str, Any] | None = None

    def _start(self, chunk: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
        self.started = True
        if self.message_id is None:
            self.message_id = message_id((chunk or {}).get("id"))
        usage = anthropic_usage(self._usage)
        message: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [("message_start", {"type": "message_start", "message": message})]

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        index, self._open, self._open_kind = self._open, None, None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        index = self._next_index
        self._next_index += 1
        self._open, self._open_kind = index, kind
        events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return events

    def _text(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        events = [] if self._open_kind == "text" else self._open_block("text", {"type": "text", "text": ""})
        assert self._open is not None
        events.append(("content_block_delta", {"type": "content_block_delta", "index": self._open,
                                               "delta": {"type": "text_delta", "text": text}}))
        return events

    def _tool_delta(self, call: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        fn = call.get("function") or {}
        if _is_int(call.get("index")):
            oa_index = call["index"]
        elif call.get("id") and call["id"] not in self._tool_ids:  # no index: a new id starts a new call
            oa_index = max(self._tools, default=-1) + 1
        else:  # no index, no new id: more of the latest call
            oa_index = self._last_tool if self._last_tool is not None else 0
        self._last_tool = oa_index
        if call.get("id"):
            self._tool_ids.add(call["id"])
        if oa_index not in self._tools:
            block: dict[str, Any] = {"type": "tool_use", "id": _tool_use_id(call.get("id")),
                                     "name": fn.get("name") or "", "input": {}}
            events += self._open_block(f"tool:{oa_index}", block)
            self._tools[oa_index] = self._next_index - 1
        arguments = fn.get("arguments")
        if arguments:
            # Providers stream calls one after another; a late fragment for an earlier call still
            # carries its own block index, which is how the SDK accumulates it.
            events.append(("content_block_delta", {
                "type": "content_block_delta", "index": self._tools[oa_index],
                "delta": {"type": "input_json_delta", "partial_json": arguments}}))
        return events

    def _end(self) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        reason = stop_reason(self._finish)
        if self._refused and reason == "end_turn":
            reason = "refusal"
        if self._tools and reason == "end_turn":
            reason = "tool_use"
        usage = anthropic_usage(self._usage)
        # message_start went out before the usage was known: every count here is the final total
        # (the SDK overwrites its snapshot with each count present on message_delta).
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": None},
                                         "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        self.done = True
        return events

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if self.done:
            return []
        events: list[tuple[str, dict[str, Any]]] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if not self.started:
            events += self._start(chunk)
        choices = chunk.get("choices") or []
        for choice in choices[:1]:  # Anthropic has no `n`: the first choice is the message
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                events += self._text(text)
            refusal = delta.get("refusal")
            if refusal:
                self._refused = True
                events += self._text(refusal)
            for call in delta.get("tool_calls") or []:
                events += self._tool_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                events += self._close()
        if not choices and chunk.get("usage") and self._finish is not None:
            events += self._end()
        return events

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        if self.done:
            return []
        events = [] if self.started else self._start(None)
        return events + self._end()


# ---------------------------------------------------------------- errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error `type` for an HTTP status (other 4xx: invalid_request_error; other 5xx: api_error)."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(err: GatewayError, request_id: str | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}` (+ `request_id` when given), as Anthropic answers."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}
    if request_id:
        body["request_id"] = request_id
    return body


def error_event(err: GatewayError, request_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """The `error` SSE event for a failure after the stream started (the SDK raises APIStatusError)."""
    return "error", error_body(err, request_id)


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
