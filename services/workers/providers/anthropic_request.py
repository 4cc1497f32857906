"""Anthropic's Messages API, the request side: an OpenAI chat body as an Anthropic Messages body.

System/developer messages become `system`; tool calls become `tool_use` blocks and `tool` messages
`tool_result` blocks in a user turn; consecutive turns of one role are merged, as Anthropic wants
alternating roles; `max_tokens` is required there, so it defaults to 4096.

Parameters Anthropic cannot honour (seed, n>1, logprobs, penalties, logit_bias, ...) are dropped and
named in `dropped_params`, or refused with a 400 naming the parameter when the call is strict.
`response_format` is emulated, since Anthropic has no JSON mode: `json_schema` becomes a forced tool
whose input schema is the caller's schema, and the tool's input comes back as the message content
(finish_reason "stop"); `json_object`, or `json_schema` next to the caller's own tools, becomes a
system instruction to answer in JSON.

A caller who wrote Anthropic's format (`CallContext.native`) is not translated at all: `native_body`
sends the body as written, with only `model` replaced by the deployment's.
"""

from __future__ import annotations

from typing import Any

from switchyard.services.workers.providers.base import GATEWAY_FIELDS, CallContext
from switchyard.services.workers.providers.reading import (
    as_object,
    as_text,
    chat_messages,
    content_parts,
    encode_json,
    forced_function,
    function_tool,
    image_url,
    inline_media,
    invalid,
    number,
    objects,
    part_text,
    response_format,
    stop_sequences,
    tool_arguments,
    tool_call_function,
    unsupported,
)
from switchyard.shared.errors import GatewayError
from switchyard.shared.formats import split_data_url

PROVIDER = "anthropic"
DEFAULT_BASE = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

# OpenAI parameters this adapter translates, or that Switchyard reads itself (`metadata` feeds the
# router's rules); never forwarded as they are.
_HANDLED = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "stop",
    "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls", "response_format", "user",
    "metadata", *GATEWAY_FIELDS,
})
# Anthropic's own request fields, passed through when a caller sends them.
_NATIVE = frozenset({"top_k", "thinking", "output_config", "context_management", "mcp_servers", "container"})
# Values of unsupported parameters that ask for nothing, so dropping them loses nothing.
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "store": (False,), "logit_bias": ({},),
}

_JSON_INSTRUCTION = "Respond only with a single valid JSON object: no prose, no markdown code fences."


def _bad(message: str, param: str) -> GatewayError:
    return invalid(PROVIDER, message, param, code="unsupported_parameter")


def json_tool(body: dict[str, Any]) -> str | None:
    """The name of the forced tool that emulates `response_format: json_schema`, when emulated that way."""
    rf = response_format(body, PROVIDER)
    if rf.type != "json_schema" or body.get("tools") or body.get("thinking"):
        return None
    return rf.name or "json_response"


def _image(url: str, param: str) -> dict[str, Any]:
    data_url = split_data_url(url)
    if data_url is not None:
        media_type, data = data_url
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad("image_url must be a data: URL or an http(s) URL", param)


def _blocks(content: Any, param: str) -> list[dict[str, Any]]:
    """OpenAI message content (a string or parts) as Anthropic content blocks; empty text is left out."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content_parts(content, param, PROVIDER)):
        kind = part.get("type")
        if kind == "text":
            text = part_text(part, f"{param}[{j}]", PROVIDER)
            if not text:
                continue
            block: dict[str, Any] = {"type": "text", "text": text}
        elif kind == "image_url":
            block = _image(image_url(part, f"{param}[{j}]", PROVIDER), f"{param}[{j}].image_url")
        elif kind == "file":
            file = as_object(part.get("file"), f"{param}[{j}].file", PROVIDER)
            file_data = as_text(file.get("file_data"), f"{param}[{j}].file.file_data", PROVIDER)
            media_type, data = inline_media(file_data, f"{param}[{j}].file", PROVIDER,
                                            "file parts need `file_data` as a data: URL")
            block = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
        else:
            raise _bad(f"content part type {kind!r} is not supported", f"{param}[{j}]")
        if part.get("cache_control"):
            block["cache_control"] = part["cache_control"]
        out.append(block)
    return out


def _tool_use(call: dict[str, Any], param: str) -> dict[str, Any]:
    fn = tool_call_function(call, param, PROVIDER)
    return {"type": "tool_use", "id": call.get("id"), "name": fn["name"], "input": tool_arguments(fn, param, PROVIDER)}


def _messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, Anthropic messages with strictly alternating roles)."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role, param = m.get("role"), f"messages[{i}]"
        if role in ("system", "developer"):
            blocks = _blocks(m.get("content"), f"{param}.content")
            if any(b["type"] != "text" for b in blocks):
                raise _bad("system and developer messages can hold only text", f"{param}.content")
            system.extend(blocks)
            continue
        if role == "user":
            blocks = _blocks(m.get("content"), f"{param}.content")
        elif role == "assistant":
            blocks = _blocks(m.get("content"), f"{param}.content")
            calls = objects(m.get("tool_calls"), f"{param}.tool_calls", PROVIDER)
            blocks += [_tool_use(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls)]
        elif role == "tool":
            role = "user"
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.get("tool_call_id")}
            content = m.get("content")
            if content:
                result["content"] = content if isinstance(content, str) else _blocks(content, f"{param}.content")
            blocks = [result]
        else:
            raise _bad(f"messages with role {role!r} are not supported; use tools and tool messages", param)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
            # Anthropic wants a user turn's tool results before anything else in it.
            out[-1]["content"].sort(key=lambda b: b["type"] != "tool_result")
        else:
            out.append({"role": role, "content": blocks})
    # A last assistant turn is a prefill, and Anthropic refuses one that ends in whitespace.
    if out and out[-1]["role"] == "assistant" and out[-1]["content"][-1]["type"] == "text":
        last = out[-1]["content"]
        last[-1]["text"] = last[-1]["text"].rstrip()
        if not last[-1]["text"]:
            last.pop()
            if not last:
                out.pop()
    return system, out


def _tool(tool: dict[str, Any], param: str) -> dict[str, Any]:
    fn = function_tool(tool, param, PROVIDER)
    if fn is None:
        return tool  # an Anthropic server tool (web search, ...) as Anthropic spells it
    out = {"name": fn["name"], "description": fn.get("description") or "",
           "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if tool.get("cache_control"):
        out["cache_control"] = tool["cache_control"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None and parallel is not False:
        return None
    if choice in (None, "auto", "none"):
        out: dict[str, Any] = {"type": choice or "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif (name := forced_function(choice, PROVIDER)) is not None:
        out = {"type": "tool", "name": name}
    else:
        raise _bad(f"tool_choice {choice!r} is not supported", "tool_choice")
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _unsupported(body: dict[str, Any]) -> list[str]:
    """The parameters of `body` that ask Anthropic for something it cannot do, in body order."""
    out = []
    for key, value in body.items():
        if key in _HANDLED or key in _NATIVE or value is None or value in _HARMLESS.get(key, ()):
            continue
        out.append(key)
    if response_format(body, PROVIDER).type not in (None, "text", "json_object", "json_schema"):
        out.append("response_format")
    return out


def build_body(ctx: CallContext) -> tuple[dict[str, Any], list[str]]:
    """The Anthropic request body for an OpenAI chat body, and the parameters left out."""
    body = ctx.body
    dropped = unsupported(ctx, _unsupported(body), PROVIDER)
    temperature = number(body, "temperature", PROVIDER)
    if temperature is not None and temperature > 1:
        if ctx.strict:
            raise _bad("temperature must be at most 1 for this provider", "temperature")
        dropped.append("temperature")  # not honoured as asked: clamped to Anthropic's maximum of 1 below

    system, messages = _messages(chat_messages(body, PROVIDER))
    if not messages:
        raise GatewayError(400, "anthropic: at least one user or assistant message is required", param="messages",
                           code="invalid_value")
    out: dict[str, Any] = {
        "model": ctx.deployment.model,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    rf = response_format(body, PROVIDER)
    forced = json_tool(body)
    if rf.type == "json_object" or (rf.type == "json_schema" and forced is None):
        schema = rf.schema
        hint = _JSON_INSTRUCTION + (f" It must match this JSON schema: {encode_json(schema, body, PROVIDER).decode()}"
                                    if schema else "")
        system.append({"type": "text", "text": hint})
    if system:
        cached = any("cache_control" in b for b in system)
        out["system"] = system if cached else "\n\n".join(b["text"] for b in system)
    if temperature is not None:
        out["temperature"] = min(temperature, 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stops = [s for s in stop_sequences(body, PROVIDER) if s.strip()]
    if stops:
        out["stop_sequences"] = stops
    if body.get("tools"):
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(objects(body["tools"], "tools", PROVIDER))]
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    elif forced is not None:
        out["tools"] = [{"name": forced, "description": "Give the answer as this tool's input.",
                         "input_schema": rf.schema or {"type": "object"}}]
        out["tool_choice"] = {"type": "tool", "name": forced}
    if body.get("user"):
        out["metadata"] = {"user_id": str(body["user"])}
    out.update((k, v) for k, v in body.items() if k in _NATIVE and v is not None)
    if ctx.stream:
        out["stream"] = True
    return out, dropped


def native_body(ctx: CallContext) -> dict[str, Any]:
    """The caller's own Anthropic body, every field kept, with the deployment's model and the call's `stream`
    (the gateway's own `fallbacks` and `strict`, which Anthropic does not know, left out)."""
    assert ctx.native is not None
    body = {k: v for k, v in ctx.native.body.items() if k not in GATEWAY_FIELDS}
    body["model"] = ctx.deployment.model
    if ctx.stream:
        body["stream"] = True
    else:
        body.pop("stream", None)
    return body
