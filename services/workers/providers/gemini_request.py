"""Google Gemini, the request side: OpenAI chat and embeddings bodies as generateContent and
batchEmbedContents bodies.

- Tool parameters go out as `parametersJsonSchema` and `json_schema` response formats as
  `responseJsonSchema`: both take plain JSON Schema (what OpenAI callers write), while the older
  `parameters` / `responseSchema` take an OpenAPI-3.0 subset that rejects `additionalProperties`,
  `$defs`, `$ref`... that strict OpenAI schemas use.
- Thought signatures (Gemini 2.5/3 function calling) ride on the tool call as
  `extra_content.google.thought_signature`, like Google's own OpenAI-compatible endpoint, and go
  back on the `functionCall` part. For Gemini 3 histories that lost them, the first call of a
  turn gets Google's documented `skip_thought_signature_validator` so the request is not refused.
- Callers never reach the gateway's Google project: Gemini resolves `cachedContent`, Files API names
  (`files/...`, a `file_id`) and `gs://` / googleapis.com URIs with the deployment's credentials, so a
  caller naming one would read the caches and files of every other caller. They are refused with a 400
  naming the parameter; media goes inline (data: URLs) or as a public http(s) URL (`public_media_url`).
"""

from __future__ import annotations

import mimetypes
from typing import Any
from urllib.parse import urlsplit

import orjson

from switchyard.services.workers.providers.base import (
    GATEWAY_FIELDS,
    CallContext,
)
from switchyard.services.workers.providers.reading import (
    as_object,
    as_text,
    called_function,
    chat_messages,
    content_parts,
    forced_function,
    function_tool,
    image_url,
    invalid,
    objects,
    part_text,
    response_format,
    stop_sequences,
    text_of,
    tool_arguments,
    tool_call_function,
    unsupported,
)
from switchyard.shared.errors import GatewayError
from switchyard.shared.formats import split_data_url

PROVIDER = "gemini"
SKIP_SIGNATURE = "skip_thought_signature_validator"

# Never forwarded and never reported as dropped: gateway controls and caller-side bookkeeping.
_IGNORED = frozenset({"model", "messages", "stream", "stream_options", "user", "metadata", "store",
                      *GATEWAY_FIELDS})

_CHAT_HANDLED = frozenset({"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n",
                           "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
                           "reasoning_effort", "top_k", "safety_settings", "safetySettings",
                           "thinking_config", "thinkingConfig"})
# Names of a context cache in the gateway's own Google project: never taken from a caller (refused).
_REFUSED = ("cached_content", "cachedContent")
# Hosts whose URLs Gemini reads with the deployment's credentials (Files API, Cloud Storage), not publicly.
_PROJECT_HOSTS = ("googleapis.com", "storage.cloud.google.com")
_EMBED_HANDLED = frozenset({"input", "encoding_format", "dimensions", "task_type", "taskType"})

# Gemini-native tools a caller may pass through in `tools` next to OpenAI function tools.
_NATIVE_TOOLS = frozenset({"googleSearch", "google_search", "googleSearchRetrieval", "google_search_retrieval",
                           "codeExecution", "code_execution", "urlContext", "url_context"})
_THINKING_BUDGETS = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}

# Google's canonical error status -> the HTTP status the gateway answers with (via classify_status).


def chat_body(ctx: CallContext) -> tuple[dict[str, Any], list[str]]:
    """The generateContent body for an OpenAI chat body, and the parameters dropped (refused when strict)."""
    body = ctx.body
    for name in _REFUSED:
        if body.get(name) is not None:
            raise invalid(PROVIDER, f"'{name}' is not accepted: a context cache is a resource of the gateway's "
                          "Google project, which callers cannot name; send the content itself", name,
                          code="unsupported_parameter")
    dropped = [k for k, v in body.items()
               if v is not None and k not in _IGNORED and k not in _CHAT_HANDLED]
    system, contents = _contents(chat_messages(body, PROVIDER), ctx)
    if not contents:
        raise GatewayError(400, f"{PROVIDER} needs at least one user or assistant message with content",
                           param="messages")
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools, tool_dropped = _tools(body.get("tools"))
    dropped += tool_dropped
    if tools:
        out["tools"] = tools
    tool_config = _tool_config(body.get("tool_choice"), PROVIDER)
    if tool_config and tools:
        out["toolConfig"] = tool_config
    gen, gen_dropped = _generation_config(body, ctx)
    dropped += gen_dropped
    if gen:
        out["generationConfig"] = gen
    safety = body.get("safety_settings") or body.get("safetySettings")
    if safety:
        out["safetySettings"] = safety
    dropped = unsupported(ctx, dropped, PROVIDER)
    return out, dropped


def _contents(messages: list[dict[str, Any]],
              ctx: CallContext) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name
    gemini3 = "gemini-3" in ctx.deployment.model

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)  # parallel tool results belong in one turn
        else:
            contents.append({"role": role, "parts": parts})

    for i, msg in enumerate(messages):
        role = msg.get("role")
        content = msg.get("content")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            text = text_of(content, f"{where}.content", PROVIDER)
            if text:
                system.append({"text": text})
        elif role == "user":
            add("user", _user_parts(content, i))
        elif role == "assistant":
            text = text_of(content, f"{where}.content", PROVIDER)
            parts: list[dict[str, Any]] = [{"text": text}] if text else []
            calls = [(c, tool_call_function(c, f"{where}.tool_calls[{n}]", PROVIDER),
                      _thought_signature(c, f"{where}.tool_calls[{n}]"))
                     for n, c in enumerate(objects(msg.get("tool_calls"), f"{where}.tool_calls", PROVIDER))]
            if msg.get("function_call"):  # the legacy single-function form
                fc = called_function(msg["function_call"], f"{where}.function_call", PROVIDER)
                calls.append(({"id": fc["name"]}, fc, None))
            signed = any(signature for _, _, signature in calls)
            for n, (call, fn, signature) in enumerate(calls):
                names[str(call.get("id"))] = fn["name"]
                args = tool_arguments(fn, f"{where}.tool_calls[{n}]", PROVIDER)
                part: dict[str, Any] = {"functionCall": {"name": fn["name"], "args": args}}
                if signature:
                    part["thoughtSignature"] = signature
                elif gemini3 and not signed and n == 0:
                    part["thoughtSignature"] = SKIP_SIGNATURE
                parts.append(part)
            add("model", parts)
        elif role in ("tool", "function"):
            call_id = msg.get("tool_call_id")
            name = names.get(str(call_id)) if role == "tool" else msg.get("name")
            if not name:
                name = msg.get("name")
            if not name:
                raise GatewayError(400, f"messages[{i}]: tool_call_id {call_id!r} does not match any earlier "
                                   "assistant tool call", param=f"messages[{i}].tool_call_id")
            result = _tool_result(text_of(content, f"{where}.content", PROVIDER))
            add("user", [{"functionResponse": {"name": name, "response": result}}])
        else:
            raise GatewayError(400, f"messages[{i}]: unsupported role {role!r}", param=f"messages[{i}].role")
    return system, contents

def _thought_signature(call: dict[str, Any], param: str) -> Any:
    """The thought signature a tool call carries back (`extra_content.google.thought_signature`), if any."""
    extra = as_object(call.get("extra_content"), f"{param}.extra_content", PROVIDER)
    return as_object(extra.get("google"), f"{param}.extra_content.google", PROVIDER).get("thought_signature")

def _user_parts(content: Any, i: int) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content_parts(content, f"messages[{i}].content", PROVIDER)):
        kind = p.get("type")
        where = f"messages[{i}].content[{j}]"
        if kind == "text":
            text = part_text(p, where, PROVIDER)
            if text:
                parts.append({"text": text})
        elif kind == "image_url":
            parts.append(_media_part(image_url(p, where, PROVIDER), None, f"{where}.image_url.url"))
        elif kind == "input_audio":
            audio = as_object(p.get("input_audio"), f"{where}.input_audio", PROVIDER)
            audio_format = as_text(audio.get("format"), f"{where}.input_audio.format", PROVIDER)
            data = as_text(audio.get("data"), f"{where}.input_audio.data", PROVIDER)
            parts.append({"inlineData": {"mimeType": f"audio/{audio_format or 'wav'}", "data": data}})
        elif kind == "file":
            f = as_object(p.get("file"), f"{where}.file", PROVIDER)
            if f.get("file_id") is not None:
                raise invalid(PROVIDER, f"'{where}.file.file_id' is not accepted: it would name a file of the "
                              "gateway's Google project; send the file as 'file_data' (a data: URL)",
                              f"{where}.file.file_id", code="unsupported_parameter")
            ref = as_text(f.get("file_data"), f"{where}.file.file_data", PROVIDER)
            mime = as_text(f.get("mime_type"), f"{where}.file.mime_type", PROVIDER)
            filename = as_text(f.get("filename"), f"{where}.file.filename", PROVIDER)
            parts.append(_media_part(ref, mime or _guess_type(filename), f"{where}.file.file_data"))
        else:
            raise GatewayError(400, f"{PROVIDER} does not support content parts of type {kind!r}",
                               param=f"messages[{i}].content[{j}].type")
    return parts

def _media_part(url: str, mime: str | None, param: str) -> dict[str, Any]:
    """Inline data for a data: URL; a `fileData` part only for a public http(s) URL (`public_media_url`)."""
    inline = split_data_url(url)
    if inline is not None:
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    if not public_media_url(url):
        raise invalid(PROVIDER, f"'{param}' must be a data: URL or a public http(s) URL: Gemini would read "
                      "any other file reference (files/..., gs://, googleapis.com) as the gateway's Google "
                      "project", param)
    ref: dict[str, Any] = {"fileUri": url}
    mime = mime or _guess_type(url)
    if mime:
        ref["mimeType"] = mime
    return {"fileData": ref}

def _tools(tools: Any) -> tuple[list[dict[str, Any]], list[str]]:
    if not tools:
        return [], []
    declarations: list[dict[str, Any]] = []
    native: list[dict[str, Any]] = []
    dropped: list[str] = []
    for i, tool in enumerate(objects(tools, "tools", PROVIDER)):
        fn = function_tool(tool, f"tools[{i}]", PROVIDER)
        if fn is not None:
            decl: dict[str, Any] = {"name": fn["name"]}
            if fn.get("description"):
                decl["description"] = fn["description"]
            params = fn.get("parameters")
            if params and (params.get("properties") or params.get("type") != "object"):
                decl["parametersJsonSchema"] = params
            declarations.append(decl)
        elif set(tool) & _NATIVE_TOOLS:
            native.append({_camel(k): v for k, v in tool.items() if k in _NATIVE_TOOLS})
        else:
            dropped.append(f"tools[{i}]")
    out = [{"functionDeclarations": declarations}] if declarations else []
    return out + native, dropped

def _tool_config(choice: Any, provider: str) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}.get(choice)
        if mode is None:
            raise GatewayError(400, f"Invalid value for 'tool_choice': {choice!r}", param="tool_choice")
        return {"functionCallingConfig": {"mode": mode}}
    name = forced_function(choice, provider)
    if name is not None:
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = as_object(choice.get("allowed_tools"), "tool_choice.allowed_tools", provider) or choice
        if allowed.get("mode") != "required":
            return {"functionCallingConfig": {"mode": "AUTO"}}
        where = "tool_choice.allowed_tools.tools"
        names = [as_object(t.get("function"), f"{where}[{n}].function", provider).get("name")
                 for n, t in enumerate(objects(allowed.get("tools"), where, provider))]
        return {"functionCallingConfig": {"mode": "ANY",
                                          "allowedFunctionNames": [n for n in names if isinstance(n, str) and n]}}
    raise GatewayError(400, "Invalid value for 'tool_choice'", param="tool_choice")

def _generation_config(body: dict[str, Any], ctx: CallContext) -> tuple[dict[str, Any], list[str]]:
    gen: dict[str, Any] = {}
    dropped: list[str] = []
    simple = {"temperature": "temperature", "top_p": "topP", "seed": "seed", "top_k": "topK",
              "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty"}
    for key, target in simple.items():
        if body.get(key) is not None:
            gen[target] = body[key]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        gen["maxOutputTokens"] = max_tokens
    stops = stop_sequences(body, PROVIDER)
    if stops:
        gen["stopSequences"] = stops
    if body.get("n") is not None and body["n"] != 1:
        gen["candidateCount"] = body["n"]
    fmt = response_format(body, PROVIDER)
    if fmt.type == "json_object":
        gen["responseMimeType"] = "application/json"
    elif fmt.type == "json_schema":
        gen["responseMimeType"] = "application/json"
        if fmt.schema:
            gen["responseJsonSchema"] = fmt.schema
    elif fmt.type not in (None, "text"):
        dropped.append("response_format")
    key = "thinking_config" if body.get("thinking_config") else "thinkingConfig"
    thinking = as_object(body.get(key), key, PROVIDER)
    if thinking:
        gen["thinkingConfig"] = {_camel(k): v for k, v in thinking.items()}
    elif body.get("reasoning_effort") is not None:
        effort = str(body["reasoning_effort"])
        if "gemini-3" in ctx.deployment.model:
            gen["thinkingConfig"] = {"thinkingLevel": "minimal" if effort == "none" else effort}
        elif effort in _THINKING_BUDGETS:
            gen["thinkingConfig"] = {"thinkingBudget": _THINKING_BUDGETS[effort]}
        else:
            raise GatewayError(400, f"Invalid value for 'reasoning_effort': {effort!r}", param="reasoning_effort")
    return gen, dropped


def embeddings_body(ctx: CallContext, model: str) -> tuple[dict[str, Any], list[str]]:
    """The batchEmbedContents body for an OpenAI embeddings body (`model`: the resource name), and the
    parameters dropped."""
    body = ctx.body
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items or not all(isinstance(x, str) for x in items):
        raise GatewayError(400, f"{PROVIDER} embeddings take text input only (a string or a list of strings)",
                           param="input")
    dropped = [k for k, v in body.items() if v is not None and k not in _IGNORED and k not in _EMBED_HANDLED]
    if body.get("encoding_format") not in (None, "float", "base64"):
        dropped.append("encoding_format")
    dropped = unsupported(ctx, dropped, PROVIDER)
    task = body.get("task_type") or body.get("taskType")
    requests = []
    for text in items:
        req: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
        if body.get("dimensions"):
            req["outputDimensionality"] = body["dimensions"]
        if task:
            req["taskType"] = task
        requests.append(req)
    return {"requests": requests}, dropped


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _guess_type(name: str | None) -> str | None:
    if not name:
        return None
    return mimetypes.guess_type(name.split("?")[0])[0]


def public_media_url(url: str) -> bool:
    """Whether Gemini would fetch `url` as anyone could: an http(s) URL whose host is not one that Gemini reads
    with the deployment's credentials (the Files API and Cloud Storage under googleapis.com)."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    return not any(host == h or host.endswith("." + h) for h in _PROJECT_HOSTS)


def _tool_result(text: str) -> dict[str, Any]:
    """A tool message's text as a FunctionResponse `response` object (JSON objects pass as they are)."""
    try:
        parsed = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    return {"output": parsed if parsed is not None and not isinstance(parsed, str) else text}
