"""OpenAI Responses API on top of the chat pipeline: pure translation, no I/O.

`POST /v1/responses` bodies become chat completions bodies (`to_chat_request`), so every configured
provider serves them through the usual routing, failover, limits, budgets and accounting; a chat
completion comes back as a `response` object (`from_chat_completion`, responses_output.py), and a chunk stream as the
Responses SSE events (services/ingress/responses_stream.py). The batch path imports the same two
functions to serve `/v1/responses` lines.

Mapping (what the chat path cannot honour is refused with a 400 naming the parameter, never dropped
silently, except the purely advisory fields listed in `_IGNORED`):
- `instructions` -> a leading `system` message (not carried over by `previous_response_id`, as OpenAI).
- `input` string -> one user message; items: messages (`input_text`, `input_image`, `input_file`,
  `output_text`, `refusal` parts), `function_call` -> an assistant `tool_calls` entry,
  `function_call_output` -> a `tool` message; `reasoning` items are dropped.
- `max_output_tokens` -> `max_completion_tokens`; `temperature`, `top_p`, `parallel_tool_calls`,
  `user` as they are; `reasoning.effort` -> `reasoning_effort`.
- `tools` (type `function`) -> chat function tools; `tool_choice` auto/none/required/{function}.
- `text.format` text / json_object / json_schema -> `response_format`.
- `metadata`, `store` and `previous_response_id` stay in the gateway (stored, echoed back).
- usage: `prompt_tokens` -> `input_tokens`, `completion_tokens` -> `output_tokens`, with details.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from switchyard.services.ingress.responses_output import from_chat_completion, new_id, output_messages
from switchyard.services.ingress.validation import validate
from switchyard.shared.errors import GatewayError, invalid_request

__all__ = ["from_chat_completion", "to_chat_request"]
"""What the batch path imports for `/v1/responses` lines (the answer side lives in responses_output.py)."""

_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user", "fallbacks")
"""Fields that mean the same in both APIs (`fallbacks` is the gateway's own extension)."""

_IGNORED = frozenset({"include", "truncation", "service_tier", "prompt_cache_key", "safety_identifier",
                      "top_logprobs", "stream_options", "prompt_cache_retention", "max_tool_calls"})
"""Advisory fields accepted and not forwarded: they change no answer the gateway can give."""

_KNOWN = frozenset({"model", "input", "instructions", "max_output_tokens", "tools", "tool_choice", "text",
                    "metadata", "store", "previous_response_id", "stream", "reasoning", *_PASSED, *_IGNORED})

MAX_METADATA_PAIRS = 16
"""OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, values up to 512."""


class ResponsesCreateRequest(BaseModel):
    """The types and ranges of a `POST /v1/responses` body (the items inside are checked by translation)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    stream: StrictBool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1)
    user: str | None = None


# ---------------------------------------------------------------- helpers


def _bad(message: str, param: str | None) -> GatewayError:
    return invalid_request(message, param, "invalid_value")


def _missing(param: str) -> GatewayError:
    return invalid_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _unsupported(message: str, param: str) -> GatewayError:
    return invalid_request(message, param, "unsupported_parameter")


def _string(value: Any, param: str, *, required: bool = True) -> str:
    if value is None and required:
        raise _missing(param)
    if not isinstance(value, str) or (required and not value):
        raise _bad(f"'{param}' must be a non-empty string.", param)
    return value


# ---------------------------------------------------------------- request: input items -> chat messages


def _part(part: Any, param: str, role: str) -> dict[str, Any]:
    """One input content part -> a chat content part."""
    if not isinstance(part, dict):
        raise _bad("Each content part must be an object with a 'type'.", param)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _string(part.get("text"), f"{param}.text", required=False)}
    if kind == "refusal":
        return {"type": "text", "text": _string(part.get("refusal"), f"{param}.refusal", required=False)}
    if role == "assistant":
        raise _bad(f"Assistant messages take output_text or refusal parts, not {kind!r}.", f"{param}.type")
    if kind == "input_image":
        if part.get("file_id") is not None:
            raise _unsupported("Images by 'file_id' are not supported; send 'image_url' (a URL or a data: URL).",
                               f"{param}.file_id")
        image: dict[str, Any] = {"url": _string(part.get("image_url"), f"{param}.image_url")}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        if part.get("file_data") is None:
            raise _unsupported("Files are supported inline only: send 'file_data' (a data: URL) and 'filename'.",
                               f"{param}.file_data")
        file = {"file_data": _string(part.get("file_data"), f"{param}.file_data")}
        if isinstance(part.get("filename"), str):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    raise _bad(f"Unsupported content part type {kind!r}.", f"{param}.type")


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    if role is None:
        raise _missing(f"{param}.role")
    if role not in ("user", "assistant", "system", "developer"):
        raise _bad(f"Invalid role {role!r} (expected user, assistant, system or developer).", f"{param}.role")
    content = item.get("content")
    if content is None:
        raise _missing(f"{param}.content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _bad("'content' must be a string or a list of content parts.", f"{param}.content")
    parts = [_part(p, f"{param}.content[{i}]", role) for i, p in enumerate(content)]
    if role != "user" or all(p["type"] == "text" for p in parts):
        # only user messages take images and files; the rest (and text-only user turns) as plain text
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _function_call(item: dict[str, Any], param: str) -> dict[str, Any]:
    arguments = item.get("arguments")
    if not isinstance(arguments, str):
        raise _bad("'arguments' of a function_call must be a JSON string.", f"{param}.arguments")
    return {"id": _string(item.get("call_id"), f"{param}.call_id"), "type": "function",
            "function": {"name": _string(item.get("name"), f"{param}.name"), "arguments": arguments}}


def _tool_output(item: dict[str, Any], param: str) -> dict[str, Any]:
    output = item.get("output")
    if isinstance(output, list):
        texts = [_part(p, f"{param}.output[{i}]", "tool") for i, p in enumerate(output)]
        if any(p["type"] != "text" for p in texts):
            raise _unsupported("function_call_output takes text only here.", f"{param}.output")
        output = "".join(p["text"] for p in texts)
    if not isinstance(output, str):
        raise _bad("'output' of a function_call_output must be a string.", f"{param}.output")
    return {"role": "tool", "tool_call_id": _string(item.get("call_id"), f"{param}.call_id"), "content": output}


def input_messages(value: Any, param: str = "input") -> list[dict[str, Any]]:
    """`input` (a string or a list of items) -> chat messages, in order.

    Consecutive `function_call` items join the assistant message before them (one chat turn may carry
    several tool calls), so each run of `function_call_output` items follows the calls it answers.
    """
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad("'input' must be a string or a list of input items.", param)
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        p = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise _bad("Each input item must be an object.", p)
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, p))
        elif kind == "function_call":
            call = _function_call(item, p)
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(_tool_output(item, p))
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _unsupported("'item_reference' items are not supported; use previous_response_id.", f"{p}.type")
        else:
            raise _bad(f"Unsupported input item type {kind!r}.", f"{p}.type")
    if not out:
        raise _bad("'input' must contain at least one item.", param)
    return out


# ---------------------------------------------------------------- request: the rest


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list.", "tools")
    out = []
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad("Each tool must be an object.", p)
        if tool.get("type") != "function":
            raise _unsupported(f"Tool type {tool.get('type')!r} is not supported: the gateway serves function "
                               "tools only.", f"{p}.type")
        fn: dict[str, Any] = {"name": _string(tool.get("name"), f"{p}.name")}
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise _bad("'parameters' must be a JSON Schema object.", f"{p}.parameters")
            fn["parameters"] = parameters
        if tool.get("description") is not None:
            fn["description"] = _string(tool["description"], f"{p}.description", required=False)
        if isinstance(tool.get("strict"), bool):
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> str | dict[str, Any]:
    if choice in ("auto", "none", "required"):
        return str(choice)
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": _string(choice.get("name"), "tool_choice.name")}}
    raise _bad("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": ...}.",
               "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        raise _bad("'text' must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("'text.format' must be an object with a 'type'.", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise _missing("text.format.schema")
        spec: dict[str, Any] = {"name": _string(fmt.get("name"), "text.format.name"), "schema": schema}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                spec[key] = fmt[key]
        return {"type": "json_schema", "json_schema": spec}
    raise _bad(f"Invalid text.format type {kind!r} (expected text, json_object or json_schema).",
               "text.format.type")


def check_metadata(metadata: Any) -> dict[str, str]:
    """`metadata` as OpenAI accepts it: up to 16 string pairs (keys <= 64, values <= 512 characters)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise _bad(f"'metadata' must be an object of at most {MAX_METADATA_PAIRS} string pairs.", "metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise _bad("'metadata' keys are strings of at most 64 characters and values strings of at most "
                       "512.", f"metadata.{key[:64]}")
    return dict(metadata)


def check_request(body: dict[str, Any]) -> None:
    """The checks that do not need the previous response: model, flags, fields the gateway cannot serve."""
    validate(ResponsesCreateRequest, body)
    if body.get("background") is not None and not isinstance(body["background"], bool):
        raise _bad("'background' must be a boolean.", "background")
    if body.get("background"):
        raise _unsupported("'background' responses are not supported; use stream, or the Batch API.", "background")
    if body.get("conversation") is not None:
        raise _unsupported("'conversation' is not supported; use previous_response_id.", "conversation")
    if body.get("prompt") is not None:
        raise _unsupported("Stored prompts ('prompt') are not supported; send 'instructions' and 'input'.",
                           "prompt")
    check_metadata(body.get("metadata"))


def to_chat_request(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Responses request -> a chat completions body, its conversation continuing `history` (the chat
    messages of the previous response, see `conversation`). Raises GatewayError(400) naming the parameter.
    The result still goes through the chat validator (ranges of temperature, max tokens, ...)."""
    check_request(body)
    messages = [*(history or []), *input_messages(body["input"])]
    if body.get("instructions"):
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    out: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("max_output_tokens") is not None:
        out["max_completion_tokens"] = body["max_output_tokens"]
    for name in _PASSED:
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        choice = _tool_choice(body["tool_choice"])
        if "tools" in out:
            out["tool_choice"] = choice
        elif choice != "auto" and choice != "none":
            raise _bad("A 'tool_choice' of required or a function needs 'tools'.", "tool_choice")
    if body.get("text") is not None:
        fmt = _response_format(body["text"])
        if fmt is not None:
            out["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        out["reasoning_effort"] = reasoning["effort"]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def dropped_params(body: dict[str, Any]) -> list[str]:
    """Top-level fields neither translated nor advisory: not forwarded (named in the dropped-params header)."""
    return sorted(k for k in body if k not in _KNOWN and k not in ("background", "conversation", "prompt"))


def conversation(body: dict[str, Any], history: list[dict[str, Any]] | None,
                 output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a later `previous_response_id` continues: the earlier turns, this request's input and the
    answer as one assistant message; the instructions are left out (OpenAI does not carry them over)."""
    return [*(history or []), *input_messages(body["input"]), *output_messages(output)]


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`input` as the input_items list shows it: every item an object with an id, strings as one message."""
    value = body.get("input")
    items: list[dict[str, Any]] = ([{"type": "message", "role": "user", "content": value}]
                                   if isinstance(value, str) else list(value or []))
    out = []
    for original in items:
        item = dict(original)
        item.setdefault("type", "message")
        if item["type"] == "message":
            if isinstance(item.get("content"), str):
                kind = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": kind, "text": item["content"]}]
            item.setdefault("status", "completed")
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(item["type"], "item")
        item.setdefault("id", new_id(prefix))
        out.append(item)
    return out
