"""Google Gemini through the Generative Language API (`generativelanguage.googleapis.com`).

Wire format:
  chat        POST {base}/{version}/models/{model}:generateContent
  stream      POST {base}/{version}/models/{model}:streamGenerateContent?alt=sse
  embeddings  POST {base}/{version}/models/{model}:batchEmbedContents
`version` is the deployment's `api_version` (default `v1beta`). The key travels in the
`x-goog-api-key` header, never in the URL, so it cannot leak into access logs.

Decisions worth knowing:
- Tool parameters go out as `parametersJsonSchema` and `json_schema` response formats as
  `responseJsonSchema`: both take plain JSON Schema (what OpenAI callers write), while the older
  `parameters` / `responseSchema` take an OpenAPI-3.0 subset that rejects `additionalProperties`,
  `$defs`, `$ref`... that strict OpenAI schemas use.
- Usage: `completion_tokens` = `candidatesTokenCount + thoughtsTokenCount` and
  `reasoning_tokens` = `thoughtsTokenCount`, as OpenAI counts reasoning inside completion tokens
  and Google bills thinking at the output rate. `prompt_tokens` = `promptTokenCount +
  toolUsePromptTokenCount`; `cached_tokens` = `cachedContentTokenCount` (a subset of the prompt).
  So `total_tokens` equals Google's `totalTokenCount`.
- Embeddings: `batchEmbedContents` reports no token counts, so usage is an *estimate*
  (about one token per 4 characters of input) unless the response carries `usageMetadata`.
- Tool call ids: Gemini's `functionCall.id` when it sends one, else synthesized
  `call_<hash of request id>_<n>` (unique across turns). The id never goes back upstream; a `tool`
  message finds its function name through the assistant tool call with the same id.
- Thought signatures (Gemini 2.5/3 function calling) ride on the tool call as
  `extra_content.google.thought_signature`, like Google's own OpenAI-compatible endpoint, and go
  back on the `functionCall` part. For Gemini 3 histories that lost them, the first call of a
  turn gets Google's documented `skip_thought_signature_validator` so the request is not refused.
- Thought-summary parts (`thought: true`) never enter `content`; they are returned as
  `reasoning_content`.
- Callers never reach the gateway's Google project: Gemini resolves `cachedContent`, Files API names
  (`files/...`, a `file_id`) and `gs://` / googleapis.com URIs with the deployment's credentials, so a
  caller naming one would read the caches and files of every other caller. They are refused with a 400
  naming the parameter; media goes inline (data: URLs) or as a public http(s) URL (`public_media_url`).
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from services.workers.providers.base import (
    GATEWAY_FIELDS,
    CallContext,
    ProviderAdapter,
    ServerEvent,
    StreamParser,
    UpstreamRequest,
)
from services.workers.providers.openai_shape import (
    chunk,
    classify_status,
    completion_id,
    float32_base64,
    openai_usage,
    retry_after_seconds,
)
from services.workers.providers.reading import (
    as_object,
    as_text,
    called_function,
    chat_messages,
    content_parts,
    encode_json,
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
from shared.errors import GatewayError
from shared.formats import split_data_url

DEFAULT_BASE = "https://generativelanguage.googleapis.com"
DEFAULT_VERSION = "v1beta"
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

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}

# reasoning_effort -> thinkingBudget for Gemini 2.x (Gemini 3 takes the level itself as thinkingLevel).
_THINKING_BUDGETS = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}

# Google's canonical error status -> the HTTP status the gateway answers with (via classify_status).
_STATUS_HTTP = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 500,
    "CANCELLED": 500,
    "ABORTED": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_CONTEXT_RE = re.compile(r"token count.*exceed|exceeds the maximum number of tokens|too many tokens|"
                         r"input context is too long|context length", re.IGNORECASE | re.DOTALL)


def finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    if has_tool_calls:
        return "tool_calls"
    if not reason:
        return None
    return FINISH_REASONS.get(reason, "stop")


def usage_from_gemini(meta: dict[str, Any] | None) -> dict[str, Any]:
    meta = meta or {}
    prompt = int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0)
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    completion = int(meta.get("candidatesTokenCount") or 0) + thoughts
    return openai_usage(prompt, completion, cached=int(meta.get("cachedContentTokenCount") or 0),
                        reasoning=thoughts)


def parse_duration(value: Any) -> float | None:
    """A google.protobuf.Duration in JSON form ("30s", "1.5s") as seconds."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.endswith("s"):
        try:
            return float(value[:-1])
        except ValueError:
            return None
    return None


def _error_object(body: bytes) -> tuple[dict[str, Any], str]:
    """The `error` object of a Google error body (plain or wrapped in a list), and a fallback message."""
    try:
        parsed = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}, body.decode("utf-8", "replace")[:500]
    if isinstance(parsed, list):
        parsed = parsed[0] if parsed else {}
    if not isinstance(parsed, dict):
        return {}, str(parsed)[:500]
    err = parsed.get("error", parsed)
    if isinstance(err, str):
        return {"message": err}, err
    return (err if isinstance(err, dict) else {}), ""


def gemini_error(status: int, body: bytes, headers: httpx.Headers | None = None,
                 provider: str = "gemini") -> GatewayError:
    """Map a Google error (HTTP status + `{"error": {code, message, status, details}}`) to a GatewayError."""
    err, fallback = _error_object(body)
    message = str(err.get("message") or fallback or f"upstream error {status}")
    google_status = str(err.get("status") or "").upper()
    if isinstance(err.get("code"), int) and status < 400:
        status = int(err["code"])  # in-band stream errors carry their code in the body
    http = _STATUS_HTTP.get(google_status, status)
    details = [d for d in err.get("details") or [] if isinstance(d, dict)]
    reasons = {str(d.get("reason") or "") for d in details}
    retry_after = None
    for d in details:
        if str(d.get("@type", "")).endswith("google.rpc.RetryInfo"):
            retry_after = parse_duration(d.get("retryDelay"))
    if retry_after is None and headers is not None:
        retry_after = retry_after_seconds(headers)
    prefix = f"{provider}: "
    if "API_KEY_INVALID" in reasons or "api key not valid" in message.lower() or "API_KEY_EXPIRED" in reasons:
        return GatewayError(401, prefix + message, code="invalid_api_key")
    if http == 400:
        if _CONTEXT_RE.search(message):
            return GatewayError(400, prefix + message, code="context_length_exceeded", param="messages")
        return GatewayError(400, prefix + message, code=google_status.lower() or None)
    if http == 403:
        return GatewayError(403, prefix + message, code=google_status.lower() or "permission_denied")
    return classify_status(http, message, None, retry_after, provider)


def _tool_call_id(request_id: str, n: int) -> str:
    return f"call_{hashlib.sha1(request_id.encode()).hexdigest()[:12]}_{n}"


class _Ids:
    """Synthesizes tool call ids for one response (shared by every candidate)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.n = 0

    def next(self, given: Any) -> str:
        self.n += 1
        return str(given) if given else _tool_call_id(self.request_id, self.n - 1)


def _tool_call(part: dict[str, Any], call_id: str) -> dict[str, Any]:
    fc = part["functionCall"]
    call: dict[str, Any] = {"id": call_id, "type": "function",
                            "function": {"name": fc.get("name", ""),
                                         "arguments": orjson.dumps(fc.get("args") or {}).decode()}}
    if part.get("thoughtSignature"):
        call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return call


def _split_parts(cand: dict[str, Any], ids: _Ids) -> tuple[str, str, list[dict[str, Any]]]:
    """A candidate's answer text, thought-summary text and tool calls."""
    text: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in (cand.get("content") or {}).get("parts") or []:
        if "functionCall" in part:
            calls.append(_tool_call(part, ids.next(part["functionCall"].get("id"))))
        elif isinstance(part.get("text"), str):
            (thoughts if part.get("thought") else text).append(part["text"])
    return "".join(text), "".join(thoughts), calls


def _blocked(data: dict[str, Any], provider: str) -> GatewayError | None:
    feedback = data.get("promptFeedback") or {}
    if data.get("candidates") or not feedback.get("blockReason"):
        return None
    reason = feedback["blockReason"]
    extra = f" ({feedback['blockReasonMessage']})" if feedback.get("blockReasonMessage") else ""
    return GatewayError(400, f"{provider}: the prompt was blocked by Google's content filters "
                        f"(blockReason {reason}){extra}", code="content_filter", param="messages",
                        retryable=False)


class GeminiStream(StreamParser):
    """GenerateContentResponse objects (one per SSE event) -> OpenAI chunks, per candidate index."""

    def __init__(self, ctx: CallContext, provider: str) -> None:
        self.ctx = ctx
        self.provider = provider
        self.ids = _Ids(ctx.request_id)
        self.started: set[int] = set()
        self.finished: set[int] = set()
        self.tool_index: dict[int, int] = {}
        self.usage: dict[str, Any] | None = None
        self.created: int | None = None

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        out = chunk(self.ctx, delta, finish, created=self.created)
        out["choices"][0]["index"] = index
        self.created = out["created"]
        return out

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        if not event.data.strip():
            return []
        data = event.json()
        if isinstance(data, list):  # a JSON-array framing; SSE sends one object per event
            return [c for item in data for c in self._feed_one(item)]
        return self._feed_one(data)

    def _feed_one(self, data: Any) -> list[dict[str, Any]]:
        if not isinstance(data, dict):
            raise GatewayError(502, f"{self.provider}: malformed stream event", code="bad_upstream_response",
                               retryable=True)
        if "error" in data:
            raise gemini_error(200, orjson.dumps(data), provider=self.provider)
        blocked = _blocked(data, self.provider)
        if blocked is not None:
            raise blocked
        if data.get("usageMetadata"):
            self.usage = data["usageMetadata"]
        out: list[dict[str, Any]] = []
        for cand in data.get("candidates") or []:
            index = int(cand.get("index") or 0)
            if index not in self.started:
                self.started.add(index)
                out.append(self._chunk(index, {"role": "assistant", "content": ""}))
            text, thoughts, calls = _split_parts(cand, self.ids)
            if thoughts:
                out.append(self._chunk(index, {"reasoning_content": thoughts}))
            if text:
                out.append(self._chunk(index, {"content": text}))
            for call in calls:
                n = self.tool_index.get(index, 0)
                self.tool_index[index] = n + 1
                out.append(self._chunk(index, {"tool_calls": [{"index": n, **call}]}))
            if cand.get("finishReason") and index not in self.finished:
                self.finished.add(index)
                reason = finish_reason(cand["finishReason"], index in self.tool_index)
                out.append(self._chunk(index, {}, reason))
        return out

    def finish(self) -> list[dict[str, Any]]:
        if self.usage is None:
            return []
        return [chunk(self.ctx, usage=usage_from_gemini(self.usage), created=self.created)]

    @property
    def done(self) -> bool:
        return bool(self.finished) and self.started <= self.finished


class GeminiAdapter(ProviderAdapter):
    name = "gemini"

    # ---- URLs and headers ----
    def _url(self, ctx: CallContext, method: str) -> str:
        base = (ctx.deployment.api_base or DEFAULT_BASE).rstrip("/")
        version = (ctx.deployment.api_version or DEFAULT_VERSION).strip("/")
        # an api_base that already names the version ("https://host/v1beta") is used as it is
        root = base if re.search(r"/v\d+(alpha|beta)?\d*$", base) else f"{base}/{version}"
        return f"{root}/{self._resource(ctx)}:{method}"

    @staticmethod
    def _resource(ctx: CallContext) -> str:
        model = ctx.deployment.model.strip("/")
        return model if "/" in model else f"models/{model}"  # "tunedModels/x" and "models/x" stay as given

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"content-type": "application/json", **ctx.deployment.headers}
        if ctx.api_key:
            headers["x-goog-api-key"] = ctx.api_key
        return headers

    # ---- chat ----
    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        body = ctx.body
        for name in _REFUSED:
            if body.get(name) is not None:
                raise invalid(self.name, f"'{name}' is not accepted: a context cache is a resource of the gateway's "
                              "Google project, which callers cannot name; send the content itself", name,
                              code="unsupported_parameter")
        dropped = [k for k, v in body.items()
                   if v is not None and k not in _IGNORED and k not in _CHAT_HANDLED]
        system, contents = self._contents(chat_messages(body, self.name), ctx)
        if not contents:
            raise GatewayError(400, f"{self.name} needs at least one user or assistant message with content",
                               param="messages")
        out: dict[str, Any] = {"contents": contents}
        if system:
            out["systemInstruction"] = {"parts": system}
        tools, tool_dropped = self._tools(body.get("tools"))
        dropped += tool_dropped
        if tools:
            out["tools"] = tools
        tool_config = self._tool_config(body.get("tool_choice"), self.name)
        if tool_config and tools:
            out["toolConfig"] = tool_config
        gen, gen_dropped = self._generation_config(body, ctx)
        dropped += gen_dropped
        if gen:
            out["generationConfig"] = gen
        safety = body.get("safety_settings") or body.get("safetySettings")
        if safety:
            out["safetySettings"] = safety
        dropped = unsupported(ctx, dropped, self.name)
        url = self._url(ctx, "streamGenerateContent") + "?alt=sse" if ctx.stream \
            else self._url(ctx, "generateContent")
        return UpstreamRequest("POST", url, self._headers(ctx), content=encode_json(out, body, self.name),
                               dropped_params=dropped)

    def _contents(self, messages: list[dict[str, Any]],
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
                text = text_of(content, f"{where}.content", self.name)
                if text:
                    system.append({"text": text})
            elif role == "user":
                add("user", self._user_parts(content, i))
            elif role == "assistant":
                text = text_of(content, f"{where}.content", self.name)
                parts: list[dict[str, Any]] = [{"text": text}] if text else []
                calls = [(c, tool_call_function(c, f"{where}.tool_calls[{n}]", self.name),
                          self._thought_signature(c, f"{where}.tool_calls[{n}]"))
                         for n, c in enumerate(objects(msg.get("tool_calls"), f"{where}.tool_calls", self.name))]
                if msg.get("function_call"):  # the legacy single-function form
                    fc = called_function(msg["function_call"], f"{where}.function_call", self.name)
                    calls.append(({"id": fc["name"]}, fc, None))
                signed = any(signature for _, _, signature in calls)
                for n, (call, fn, signature) in enumerate(calls):
                    names[str(call.get("id"))] = fn["name"]
                    args = tool_arguments(fn, f"{where}.tool_calls[{n}]", self.name)
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
                result = _tool_result(text_of(content, f"{where}.content", self.name))
                add("user", [{"functionResponse": {"name": name, "response": result}}])
            else:
                raise GatewayError(400, f"messages[{i}]: unsupported role {role!r}", param=f"messages[{i}].role")
        return system, contents

    def _thought_signature(self, call: dict[str, Any], param: str) -> Any:
        """The thought signature a tool call carries back (`extra_content.google.thought_signature`), if any."""
        extra = as_object(call.get("extra_content"), f"{param}.extra_content", self.name)
        return as_object(extra.get("google"), f"{param}.extra_content.google", self.name).get("thought_signature")

    def _user_parts(self, content: Any, i: int) -> list[dict[str, Any]]:
        if content is None:
            return []
        if isinstance(content, str):
            return [{"text": content}] if content else []
        parts: list[dict[str, Any]] = []
        for j, p in enumerate(content_parts(content, f"messages[{i}].content", self.name)):
            kind = p.get("type")
            where = f"messages[{i}].content[{j}]"
            if kind == "text":
                text = part_text(p, where, self.name)
                if text:
                    parts.append({"text": text})
            elif kind == "image_url":
                parts.append(self._media_part(image_url(p, where, self.name), None, f"{where}.image_url.url"))
            elif kind == "input_audio":
                audio = as_object(p.get("input_audio"), f"{where}.input_audio", self.name)
                audio_format = as_text(audio.get("format"), f"{where}.input_audio.format", self.name)
                data = as_text(audio.get("data"), f"{where}.input_audio.data", self.name)
                parts.append({"inlineData": {"mimeType": f"audio/{audio_format or 'wav'}", "data": data}})
            elif kind == "file":
                f = as_object(p.get("file"), f"{where}.file", self.name)
                if f.get("file_id") is not None:
                    raise invalid(self.name, f"'{where}.file.file_id' is not accepted: it would name a file of the "
                                  "gateway's Google project; send the file as 'file_data' (a data: URL)",
                                  f"{where}.file.file_id", code="unsupported_parameter")
                ref = as_text(f.get("file_data"), f"{where}.file.file_data", self.name)
                mime = as_text(f.get("mime_type"), f"{where}.file.mime_type", self.name)
                filename = as_text(f.get("filename"), f"{where}.file.filename", self.name)
                parts.append(self._media_part(ref, mime or _guess_type(filename), f"{where}.file.file_data"))
            else:
                raise GatewayError(400, f"{self.name} does not support content parts of type {kind!r}",
                                   param=f"messages[{i}].content[{j}].type")
        return parts

    def _media_part(self, url: str, mime: str | None, param: str) -> dict[str, Any]:
        """Inline data for a data: URL; a `fileData` part only for a public http(s) URL (`public_media_url`)."""
        inline = split_data_url(url)
        if inline is not None:
            return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
        if not public_media_url(url):
            raise invalid(self.name, f"'{param}' must be a data: URL or a public http(s) URL: Gemini would read "
                          "any other file reference (files/..., gs://, googleapis.com) as the gateway's Google "
                          "project", param)
        ref: dict[str, Any] = {"fileUri": url}
        mime = mime or _guess_type(url)
        if mime:
            ref["mimeType"] = mime
        return {"fileData": ref}

    def _tools(self, tools: Any) -> tuple[list[dict[str, Any]], list[str]]:
        if not tools:
            return [], []
        declarations: list[dict[str, Any]] = []
        native: list[dict[str, Any]] = []
        dropped: list[str] = []
        for i, tool in enumerate(objects(tools, "tools", self.name)):
            fn = function_tool(tool, f"tools[{i}]", self.name)
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

    @staticmethod
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

    def _generation_config(self, body: dict[str, Any], ctx: CallContext) -> tuple[dict[str, Any], list[str]]:
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
        stops = stop_sequences(body, self.name)
        if stops:
            gen["stopSequences"] = stops
        if body.get("n") is not None and body["n"] != 1:
            gen["candidateCount"] = body["n"]
        fmt = response_format(body, self.name)
        if fmt.type == "json_object":
            gen["responseMimeType"] = "application/json"
        elif fmt.type == "json_schema":
            gen["responseMimeType"] = "application/json"
            if fmt.schema:
                gen["responseJsonSchema"] = fmt.schema
        elif fmt.type not in (None, "text"):
            dropped.append("response_format")
        key = "thinking_config" if body.get("thinking_config") else "thinkingConfig"
        thinking = as_object(body.get(key), key, self.name)
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

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise GatewayError(502, f"{self.name}: malformed response", code="bad_upstream_response", retryable=True)
        blocked = _blocked(data, self.name)
        if blocked is not None:
            raise blocked
        candidates = data.get("candidates")
        if not isinstance(candidates, list) or not candidates:
            raise GatewayError(502, f"{self.name}: malformed response (no candidates)", code="bad_upstream_response",
                               retryable=True)
        ids = _Ids(ctx.request_id)
        choices = []
        for pos, cand in enumerate(candidates):
            text, thoughts, calls = _split_parts(cand, ids)
            message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
            if thoughts:
                message["reasoning_content"] = thoughts
            if calls:
                message["tool_calls"] = calls
            reason = finish_reason(cand.get("finishReason") or "STOP", bool(calls))
            choices.append({"index": int(cand.get("index") or pos), "message": message, "finish_reason": reason,
                            "logprobs": None})
        return {"id": completion_id(ctx.request_id), "object": "chat.completion",
                "created": int(time.time()), "model": ctx.deployment.model, "choices": choices,
                "usage": usage_from_gemini(data.get("usageMetadata"))}

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return GeminiStream(ctx, self.name)

    # ---- embeddings ----
    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        body = ctx.body
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        if not items or not all(isinstance(x, str) for x in items):
            raise GatewayError(400, f"{self.name} embeddings take text input only (a string or a list of strings)",
                               param="input")
        dropped = [k for k, v in body.items() if v is not None and k not in _IGNORED and k not in _EMBED_HANDLED]
        if body.get("encoding_format") not in (None, "float", "base64"):
            dropped.append("encoding_format")
        dropped = unsupported(ctx, dropped, self.name)
        model = self._resource(ctx)
        task = body.get("task_type") or body.get("taskType")
        requests = []
        for text in items:
            req: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
            if body.get("dimensions"):
                req["outputDimensionality"] = body["dimensions"]
            if task:
                req["taskType"] = task
            requests.append(req)
        return UpstreamRequest("POST", self._url(ctx, "batchEmbedContents"), self._headers(ctx),
                               content=encode_json({"requests": requests}, body, self.name), dropped_params=dropped)

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("embeddings"), list):
            raise GatewayError(502, f"{self.name}: malformed embeddings response", code="bad_upstream_response",
                               retryable=True)
        b64 = ctx.body.get("encoding_format") == "base64"
        out = []
        for i, emb in enumerate(data["embeddings"]):
            values = [float(v) for v in emb.get("values") or []]
            vector: Any = float32_base64(values) if b64 else values
            out.append({"object": "embedding", "index": i, "embedding": vector})
        meta = data.get("usageMetadata") or {}
        if meta.get("promptTokenCount") is not None:
            tokens = int(meta["promptTokenCount"])
        else:  # estimated: batchEmbedContents reports no token counts
            inputs = ctx.body.get("input")
            tokens = sum(max(1, (len(str(x)) + 3) // 4) for x in (inputs if isinstance(inputs, list) else [inputs]))
        return {"object": "list", "data": out, "model": ctx.deployment.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ---- errors ----
    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        return gemini_error(status, body, headers, provider=self.name)


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
