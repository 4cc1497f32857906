"""Amazon Bedrock Converse, the request side: an OpenAI chat body as a Converse body.

Request: system/developer messages become `system` text blocks; consecutive turns of one role are
merged (Converse wants alternating roles), a `tool` message becomes a `toolResult` block in a user
turn, assistant tool calls `toolUse` blocks. Images must be `data:` URLs (png, jpeg, gif, webp):
Converse takes image bytes (or S3 locations) only, so a remote image URL is a 400 on
`messages[i].content[j]` rather than silently dropped, which would be a wrong answer. `file` parts
with a `data:` URL become `document` blocks. A part's (or tool's) `cache_control` adds a
`cachePoint` after it. `max_tokens`, `temperature`, `top_p`, `stop` go into `inferenceConfig`.
Converse-native fields (`additionalModelRequestFields`, `guardrailConfig`, `performanceConfig`,
...) pass through. `tool_choice: "none"` has no Converse equivalent: tools are then not offered,
unless the history holds tool blocks (Converse then requires `toolConfig`), in which case
`tool_choice` is reported as not honoured. A history with tool blocks and no `tools` gets
open-schema tool specs for the names it uses, for the same reason.

Not supported, reported in `dropped_params` (or refused with a 400 when the call is strict):
`response_format` json_object / json_schema (Converse has no JSON mode), `n` > 1, `seed`,
penalties, `logprobs`, `logit_bias`, `parallel_tool_calls: false`, `reasoning_effort`, `top_k`
(model-specific: send it in `additionalModelRequestFields`).
"""

from __future__ import annotations

import re
from typing import Any

from switchyard.services.workers.providers.base import (
    GATEWAY_FIELDS,
    CallContext,
)
from switchyard.services.workers.providers.bedrock_wire import SERVICE
from switchyard.services.workers.providers.reading import (
    as_object,
    as_text,
    chat_messages,
    content_parts,
    forced_function,
    function_tool,
    image_url,
    inline_media,
    invalid,
    name_of,
    objects,
    part_text,
    response_format,
    stop_sequences,
    tool_arguments,
    tool_call_function,
    unsupported,
)
from switchyard.shared.errors import GatewayError

# Parameters this adapter translates or that Switchyard reads itself; never forwarded as they are.
_HANDLED = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                      "stop", "temperature", "top_p", "tools", "tool_choice", "response_format", "user",
                      "metadata", *GATEWAY_FIELDS})
# Converse's own request fields, passed through when a caller sends them.
_NATIVE = frozenset({"additionalModelRequestFields", "additionalModelResponseFieldPaths", "guardrailConfig",
                     "performanceConfig", "promptVariables", "requestMetadata"})
# Values of unsupported parameters that ask for nothing, so leaving them out loses nothing.
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "store": (False,), "logit_bias": ({},), "parallel_tool_calls": (True,),
}

IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                 "image/webp": "webp"}
DOCUMENT_FORMATS = {"application/pdf": "pdf", "text/csv": "csv", "application/msword": "doc",
                    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
                    "application/vnd.ms-excel": "xls",
                    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
                    "text/html": "html", "text/plain": "txt", "text/markdown": "md"}
CACHE_POINT = {"cachePoint": {"type": "default"}}


def _bad(message: str, param: str, code: str = "invalid_value") -> GatewayError:
    return invalid(SERVICE, message, param, code)


def _image(url: str, param: str) -> dict[str, Any]:
    media_type, data = inline_media(url, param, SERVICE, "images must be data: URLs (base64 png, jpeg, gif or "
                                    "webp); Bedrock Converse does not fetch image URLs")
    fmt = IMAGE_FORMATS.get(media_type.lower())
    if fmt is None:
        raise _bad(f"image type {media_type!r} is not supported (png, jpeg, gif, webp)", param)
    return {"image": {"format": fmt, "source": {"bytes": data}}}


def _document_name(filename: str | None, n: int) -> str:
    """Bedrock document names allow letters, digits, whitespace (never two in a row), -()[]."""
    stem = (filename or "").rsplit(".", 1)[0]
    name = re.sub(r"\s+", " ", re.sub(r"[^A-Za-z0-9\s\-()\[\]]", "-", stem)).strip()
    return name or f"document-{n}"


def _document(part: dict[str, Any], param: str, n: int) -> dict[str, Any]:
    f = as_object(part.get("file"), f"{param}.file", SERVICE)
    media_type, data = inline_media(as_text(f.get("file_data"), f"{param}.file.file_data", SERVICE), param, SERVICE,
                                    "file parts need file_data as a data: URL (file ids are not supported)")
    fmt = DOCUMENT_FORMATS.get(media_type.lower())
    if fmt is None:
        raise _bad(f"document type {media_type!r} is not supported", param)
    name = _document_name(as_text(f.get("filename"), f"{param}.file.filename", SERVICE), n)
    return {"document": {"format": fmt, "name": name, "source": {"bytes": data}}}


def _blocks(content: Any, param: str, *, allow_media: bool = True) -> list[dict[str, Any]]:
    """OpenAI message content as Converse content blocks; empty text is left out (Converse refuses it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content_parts(content, param, SERVICE)):
        where = f"{param}[{j}]"
        kind = part.get("type")
        if kind == "text":
            text = part_text(part, where, SERVICE)
            if not text:
                continue
            out.append({"text": text})
        elif kind == "image_url" and allow_media:
            out.append(_image(image_url(part, where, SERVICE), where))
        elif kind == "file" and allow_media:
            out.append(_document(part, where, sum(1 for b in out if "document" in b) + 1))
        else:
            raise _bad(f"content part type {kind!r} is not supported here", where, "unsupported_parameter")
        if part.get("cache_control"):
            out.append(dict(CACHE_POINT))
    return out


def _tool_use(call: dict[str, Any], param: str) -> dict[str, Any]:
    fn = tool_call_function(call, param, SERVICE)
    return {"toolUse": {"toolUseId": str(call.get("id") or ""), "name": fn["name"],
                        "input": tool_arguments(fn, param, SERVICE)}}


def _tool_result(m: dict[str, Any], param: str) -> dict[str, Any]:
    content = m.get("content")
    blocks = [{"text": content}] if isinstance(content, str) and content \
        else [b for b in _blocks(content, f"{param}.content") if "cachePoint" not in b]
    return {"toolResult": {"toolUseId": str(m.get("tool_call_id") or ""), "content": blocks}}


def _messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(system blocks, Converse messages with alternating roles, tool names the history uses)."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    used: list[str] = []
    for i, m in enumerate(messages):
        role, param = m.get("role"), f"messages[{i}]"
        if role in ("system", "developer"):
            system.extend(_blocks(m.get("content"), f"{param}.content", allow_media=False))
            continue
        if role == "user":
            blocks = _blocks(m.get("content"), f"{param}.content")
        elif role == "assistant":
            blocks = _blocks(m.get("content"), f"{param}.content", allow_media=False)
            for j, call in enumerate(objects(m.get("tool_calls"), f"{param}.tool_calls", SERVICE)):
                blocks.append(_tool_use(call, f"{param}.tool_calls[{j}]"))
                used.append(blocks[-1]["toolUse"]["name"])
        elif role == "tool":
            role, blocks = "user", [_tool_result(m, param)]
        else:
            raise _bad(f"messages with role {role!r} are not supported; use tools and tool messages",
                       f"{param}.role")
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for turn in out:  # tool results lead their user turn, as the models behind Converse expect
        if turn["role"] == "user":
            turn["content"].sort(key=lambda b: "toolResult" not in b)
    # A last assistant turn is a prefill, and Bedrock refuses one that ends in whitespace.
    if out and out[-1]["role"] == "assistant" and "text" in out[-1]["content"][-1]:
        last = out[-1]["content"]
        last[-1]["text"] = last[-1]["text"].rstrip()
        if not last[-1]["text"]:
            last.pop()
            if not last:
                out.pop()
    return system, out, used


def _tool_spec(tool: dict[str, Any], i: int) -> list[dict[str, Any]]:
    fn = function_tool(tool, f"tools[{i}]", SERVICE)
    if fn is None:
        if "toolSpec" in tool:  # already in Converse's shape; its name must be readable, to match tool blocks
            given = as_object(tool["toolSpec"], f"tools[{i}].toolSpec", SERVICE, required=True)
            name_of(given.get("name"), f"tools[{i}].toolSpec.name", SERVICE)
            return [tool]
        if set(tool) & {"cachePoint", "systemTool"}:
            return [tool]
        raise _bad(f"tool type {tool.get('type')!r} is not supported", f"tools[{i}]", "unsupported_parameter")
    spec: dict[str, Any] = {"name": fn["name"],
                            "inputSchema": {"json": fn.get("parameters") or {"type": "object", "properties": {}}}}
    if fn.get("description"):
        spec["description"] = fn["description"]
    out = [{"toolSpec": spec}]
    if tool.get("cache_control"):
        out.append(dict(CACHE_POINT))
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    """A `tool_choice` other than auto/none (Converse's default is auto, and it has no none)."""
    if choice == "required":
        return {"any": {}}
    name = forced_function(choice, SERVICE)
    if name is not None:
        return {"tool": {"name": name}}
    raise _bad(f"tool_choice {choice!r} is not supported", "tool_choice", "unsupported_parameter")


def _unsupported(body: dict[str, Any]) -> list[str]:
    """The parameters of `body` that ask Bedrock for something it cannot do, in body order."""
    out = []
    for key, value in body.items():
        if key in _HANDLED or key in _NATIVE or value is None or value in _HARMLESS.get(key, ()):
            continue
        out.append(key)
    if response_format(body, SERVICE).type not in (None, "text"):
        out.append("response_format")
    return out


def build_body(ctx: CallContext) -> tuple[dict[str, Any], list[str]]:
    """The Converse request body for an OpenAI chat body, and the parameters not honoured."""
    body = ctx.body
    dropped = unsupported(ctx, _unsupported(body), SERVICE)
    system, messages, used = _messages(chat_messages(body, SERVICE))
    if not messages:
        raise _bad("at least one user or assistant message with content is required", "messages")
    out: dict[str, Any] = {"messages": messages}
    if system:
        out["system"] = system
    config: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        config["maxTokens"] = max_tokens
    if body.get("temperature") is not None:
        config["temperature"] = body["temperature"]
    if body.get("top_p") is not None:
        config["topP"] = body["top_p"]
    stops = stop_sequences(body, SERVICE)
    if stops:
        config["stopSequences"] = stops
    if config:
        out["inferenceConfig"] = config

    tools = [s for i, t in enumerate(objects(body.get("tools"), "tools", SERVICE)) for s in _tool_spec(t, i)]
    choice = body.get("tool_choice")
    if choice == "none":
        if used:  # Converse needs toolConfig to read a history with tool blocks, and cannot forbid calls
            if ctx.strict:
                raise _bad("tool_choice 'none' cannot be honoured on a conversation with tool calls",
                           "tool_choice", "unsupported_parameter")
            dropped.append("tool_choice")
        else:
            tools = []  # tools not offered: the model cannot call one
    offered = {t["toolSpec"]["name"] for t in tools if "toolSpec" in t}
    for name in dict.fromkeys(used):
        if name not in offered:  # Converse refuses tool blocks for tools it was not told about
            tools.append({"toolSpec": {"name": name, "inputSchema": {"json": {"type": "object"}}}})
            offered.add(name)
    if tools:
        tool_config: dict[str, Any] = {"tools": tools}
        if body.get("tools") and choice not in (None, "auto", "none"):
            tool_config["toolChoice"] = _tool_choice(choice)
        out["toolConfig"] = tool_config
    elif choice not in (None, "auto", "none"):
        _tool_choice(choice)  # still validated
    out.update((k, v) for k, v in body.items() if k in _NATIVE and v is not None)
    return out, dropped
