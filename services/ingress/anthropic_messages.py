"""Anthropic messages (`system`, `messages` and their content blocks) as OpenAI chat messages, checked: a
request Switchyard cannot read is a 400 naming the parameter.

- `system` (string or text blocks) -> a leading `system` message.
- user `text`/`image`/`document` blocks -> content parts (`image_url` with a `data:` URL or the
  source URL; PDFs as a `file` part; plain-text documents as text).
- assistant `tool_use` blocks -> `tool_calls` (arguments = JSON of `input`); `thinking` blocks are dropped
  (an Anthropic deployment receives the caller's own messages, thinking blocks included).
- user `tool_result` blocks -> `role: "tool"` messages placed before the rest of that user turn;
  `is_error` becomes the prefix `TOOL_ERROR_PREFIX`; images inside a result follow in a user message.
- a block OpenAI's format cannot express (`server_tool_use`, `web_search_tool_result`, `search_result`, a
  document by URL or file id, a type newer than Switchyard) raises `Untranslatable`, or, given a `Lossy` list,
  is recorded there and left out: such a request is served only as written, by an Anthropic deployment.
"""

from __future__ import annotations

from typing import Any

import orjson

from switchyard.shared.errors import GatewayError
from switchyard.shared.formats import data_url

TOOL_ERROR_PREFIX = "[tool error] "
"""Prefixed to a `tool_result` with `is_error: true` (OpenAI tool messages have no error flag)."""


class Untranslatable(GatewayError):
    """Valid in Anthropic's format, but OpenAI's cannot express it: a 400 unless passed through as written."""


Lossy = list[Untranslatable]
"""What a translation left out, in request order (see `chat_messages`)."""


def untranslatable(message: str, param: str) -> Untranslatable:
    return Untranslatable(400, message, param=param, code="invalid_value")


def bad(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value")


def missing(param: str) -> GatewayError:
    return GatewayError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise bad("'system' must be a string or a list of text blocks.", "system")
    parts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad("Each 'system' block must be a text block with a string 'text'.", f"system[{i}]")
        parts.append(block["text"])
    return "\n\n".join(parts)


def _image_url(block: dict[str, Any], param: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise missing(f"{param}.source")
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not media_type:
            raise missing(f"{param}.source.media_type")
        if not isinstance(data, str) or not data:
            raise missing(f"{param}.source.data")
        return data_url(media_type, data)
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise missing(f"{param}.source.url")
        return url
    raise untranslatable(f"Unsupported {block.get('type')} source type {kind!r} (supported: base64, url)",
                         f"{param}.source.type")


def _document_part(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise missing(f"{param}.source")
    kind = source.get("type")
    if kind == "text":
        data = source.get("data")
        if not isinstance(data, str):
            raise missing(f"{param}.source.data")
        return {"type": "text", "text": data}
    if kind == "base64":
        file: dict[str, Any] = {"file_data": _image_url(block, param)}
        if isinstance(block.get("title"), str):
            file["filename"] = block["title"]
        return {"type": "file", "file": file}
    raise untranslatable(f"Unsupported document source type {kind!r} (supported: base64, text)",
                         f"{param}.source.type")


def _text_of(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise missing(f"{param}.text")
    return text


def _tool_result(block: dict[str, Any], param: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A `tool_result` block -> (the `tool` message, image parts that must travel in a user message)."""
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise missing(f"{param}.tool_use_id")
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
                raise bad("Each tool_result content block must be an object.", p)
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
                raise untranslatable(f"Unsupported tool_result content block type {kind!r}", f"{p}.type")
    else:
        raise bad("'content' of a tool_result must be a string or a list of blocks.", f"{param}.content")
    text = "\n".join(texts)
    if block.get("is_error"):
        text = TOOL_ERROR_PREFIX + text
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}, images


def _user_messages(content: Any, param: str, lossy: Lossy | None) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    result_images: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        p = f"{param}[{i}]"
        kind = block.get("type")
        if kind == "tool_use":
            raise bad("'tool_use' blocks may only appear in assistant messages.", f"{p}.type")
        try:
            _user_block(block, p, parts, out, result_images)
        except Untranslatable as e:
            left_out(e, lossy)
    parts = result_images + parts
    if parts:
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        out.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
    return out


def left_out(e: Untranslatable, lossy: Lossy | None) -> None:
    """Record `e` in `lossy` (the block is left out of the translation), or raise it when there is no list."""
    if lossy is None:
        raise e
    lossy.append(e)


def _user_block(block: dict[str, Any], p: str, parts: list[dict[str, Any]], out: list[dict[str, Any]],
                result_images: list[dict[str, Any]]) -> None:
    """One user content block into `parts` (content parts) or `out` (tool messages) and `result_images`."""
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
    elif kind not in ("thinking", "redacted_thinking"):
        raise untranslatable(f"Content block type {kind!r} has no OpenAI equivalent", f"{p}.type")


def _assistant_message(content: Any, param: str, lossy: Lossy | None) -> dict[str, Any] | None:
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
                raise missing(f"{p}.id")
            if not isinstance(name, str) or not name:
                raise missing(f"{p}.name")
            if not isinstance(args, dict):
                raise bad("'input' of a tool_use block must be an object.", f"{p}.input")
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": _dumps(args)}})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        elif kind == "tool_result":
            raise bad("'tool_result' blocks may only appear in user messages.", f"{p}.type")
        else:
            left_out(untranslatable(f"Content block type {kind!r} has no OpenAI equivalent", f"{p}.type"), lossy)
    if not texts and not calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(messages: Any, lossy: Lossy | None = None) -> list[dict[str, Any]]:
    """`messages` as OpenAI chat messages; a block OpenAI cannot express raises `Untranslatable`, or, given
    `lossy`, is appended there and left out."""
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list):
        raise bad("'messages' must be a list.", "messages")
    if not messages:
        raise bad("'messages' must contain at least one message.", "messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad("Each message must be an object.", param)
        role = message.get("role")
        if role is None:
            raise missing(f"{param}.role")
        if role not in ("user", "assistant"):
            raise bad(f"Invalid role {role!r}: messages take 'user' or 'assistant' (use the top-level "
                       "'system' parameter for system prompts).", f"{param}.role")
        if "content" not in message:
            raise missing(f"{param}.content")
        content = message["content"]
        if isinstance(content, list):
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise bad("Each content block must be an object with a 'type'.", f"{param}.content[{j}]")
        elif not isinstance(content, str):
            raise bad("'content' must be a string or a list of content blocks.", f"{param}.content")
        if role == "user":
            out.extend(_user_messages(content, f"{param}.content", lossy))
        else:
            assistant = _assistant_message(content, f"{param}.content", lossy)
            if assistant is not None:
                out.append(assistant)
    if not out and not lossy:  # a history only the native format expresses has no translation to check
        raise bad("'messages' must contain at least one message with content.", "messages")
    return out
