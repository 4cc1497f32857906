"""Amazon Bedrock through the Converse API, translated to and from OpenAI's chat format.

Wire format:
  chat        POST {base}/model/{modelId}/converse
  stream      POST {base}/model/{modelId}/converse-stream   (AWS binary event stream)
  embeddings  POST {base}/model/{modelId}/invoke            (Titan or Cohere embed bodies)
`base` is the deployment's `api_base`, else `https://bedrock-runtime.{region}.amazonaws.com`; the
model id (a model id, an inference profile id or an ARN) is URI-encoded into one path segment.

Auth, first that applies:
  1. the deployment's `aws_access_key_id` / `aws_secret_access_key` (+ `aws_session_token`):
     SigV4 for service `bedrock` in `region` (`services/workers/providers/sigv4.py`);
  2. the deployment's `api_key` (rotated by the pacer like any key): a Bedrock API key, sent as
     `Authorization: Bearer`;
  3. the worker's environment, as the AWS SDKs read it: `AWS_ACCESS_KEY_ID` /
     `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, then `AWS_BEARER_TOKEN_BEDROCK`.
  Instance-profile, IRSA and SSO credentials are not fetched (an adapter does no I/O): give them
  to the worker through those variables. Region: `region`, else the one in an AWS `api_base`
  host, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.

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

Response: text blocks are joined, `toolUse` blocks become tool calls, `reasoningContent` becomes
`reasoning_content`. Usage: Bedrock's `inputTokens` excludes cache reads and writes, so
`prompt_tokens` = inputTokens + cacheReadInputTokens + cacheWriteInputTokens and `cached_tokens`
= cacheReadInputTokens (as for Anthropic).

Stream: frames of the event stream are decoded with both CRCs verified (a mismatch is a 502);
`messageStart` / `contentBlockStart` / `contentBlockDelta` / `messageStop` / `metadata` become
OpenAI chunks; tool calls get OpenAI indexes from 0 in the order they start. An `exception` frame
(`throttlingException`, ...) is mapped like the same HTTP error. The stream counts as complete only
after `messageStop` and `metadata` (Bedrock always sends the usage last); anything less is
`stream_interrupted`.

Embeddings by model id: Titan (`amazon.titan-embed-*`) takes one text per call, so a list of more
than one input is a 400 naming `input` (use a Cohere model for batches); Cohere
(`cohere.embed-*`) takes lists. Titan reports `inputTextTokenCount`; Cohere's body has no token
count, so its usage is an estimate (about one token per 4 characters).
"""

from __future__ import annotations

import os
import re
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson

from services.workers.providers import sigv4
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
    completion,
    error_message,
    float32_base64,
    openai_usage,
    retry_after_seconds,
)
from services.workers.providers.reading import (
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
    name_of,
    objects,
    part_text,
    response_format,
    stop_sequences,
    tool_arguments,
    tool_call_function,
    unsupported,
)
from shared.config import Deployment
from shared.errors import GatewayError

SERVICE = "bedrock"
DEFAULT_REGION = "us-east-1"
EVENT_STREAM = "application/vnd.amazon.eventstream"
MAX_FRAME = 16 * 1024 * 1024  # AWS caps an event-stream message far below this; protects the buffer

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

# Bedrock error type (x-amzn-ErrorType, or an in-stream :exception-type) ->
# (the HTTP status the gateway answers with, OpenAI error code, retryable).
ERROR_TYPES: dict[str, tuple[int, str | None, bool]] = {
    "ValidationException": (400, None, False),
    "AccessDeniedException": (403, "permission_denied", False),
    "UnrecognizedClientException": (401, "invalid_api_key", False),
    "InvalidSignatureException": (401, "invalid_api_key", False),
    "IncompleteSignatureException": (401, "invalid_api_key", False),
    "MissingAuthenticationTokenException": (401, "invalid_api_key", False),
    "ExpiredTokenException": (401, "invalid_api_key", False),
    "ResourceNotFoundException": (404, "model_not_found", False),
    "ThrottlingException": (429, "rate_limit_exceeded", True),
    "ServiceQuotaExceededException": (429, "rate_limit_exceeded", True),
    "TooManyRequestsException": (429, "rate_limit_exceeded", True),
    "ModelNotReadyException": (503, "overloaded", True),
    "ModelTimeoutException": (504, "timeout", True),
    "InternalServerException": (502, "upstream_error", True),
    "InternalFailure": (502, "upstream_error", True),
    "ModelErrorException": (502, "upstream_error", True),
    "ModelStreamErrorException": (502, "upstream_error", True),
    "ServiceUnavailableException": (503, "overloaded", True),
    "ServiceUnavailable": (503, "overloaded", True),
}
# How Bedrock and the models behind it word an over-long prompt in a ValidationException: "Input is too
# long for requested model.", "prompt is too long: 210000 tokens > 200000 maximum", "Input tokens exceed the
# configured limit of 272000 tokens", "... exceeds the model's maximum context length ...".
_CONTEXT_RE = re.compile(r"too long|too many (input )?tokens|input tokens exceed|context (length|window)|"
                         r"maximum context", re.IGNORECASE)

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


# ---- errors ----------------------------------------------------------------------------------


def _error_type(raw: str | None) -> str:
    """`ValidationException` from `ValidationException:http://internal...`, a `__type` like
    `com.amazon.coral.validate#ValidationException`, or an in-stream `validationException`."""
    name = (raw or "").split(":")[0].split("#")[-1].strip()
    return name[:1].upper() + name[1:]


def bedrock_error(status: int | None, kind: str | None, message: str, retry_after: float | None = None) -> GatewayError:
    """Map a Bedrock error (its type first, the HTTP status when the type is unknown) to a GatewayError."""
    name = _error_type(kind)
    prefix = "bedrock: "
    known = ERROR_TYPES.get(name)
    if known is None:
        return classify_status(status or 502, message, None, retry_after, SERVICE)
    http, code, retryable = known
    if http == 400:
        if _CONTEXT_RE.search(message):
            return GatewayError(400, prefix + message, code="context_length_exceeded", param="messages")
        return GatewayError(400, prefix + message, code=code)
    return GatewayError(http, prefix + message, code=code, retryable=retryable,
                        retry_after_s=retry_after if http in (429, 503) else None)


# ---- event stream ----------------------------------------------------------------------------


def _frame_error(what: str) -> GatewayError:
    return GatewayError(502, f"bedrock: corrupt event stream ({what})", code="bad_upstream_response", retryable=True)


def _decode_headers(raw: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    pos = 0
    try:
        while pos < len(raw):
            name_len = raw[pos]
            name = raw[pos + 1:pos + 1 + name_len].decode("utf-8")
            pos += 1 + name_len
            kind = raw[pos]
            pos += 1
            value: Any
            if kind in (0, 1):
                value = kind == 0
            elif kind == 2:
                value = struct.unpack_from(">b", raw, pos)[0]
                pos += 1
            elif kind == 3:
                value = struct.unpack_from(">h", raw, pos)[0]
                pos += 2
            elif kind == 4:
                value = struct.unpack_from(">i", raw, pos)[0]
                pos += 4
            elif kind in (5, 8):
                value = struct.unpack_from(">q", raw, pos)[0]
                pos += 8
            elif kind in (6, 7):
                (length,) = struct.unpack_from(">H", raw, pos)
                data = raw[pos + 2:pos + 2 + length]
                if len(data) != length:
                    raise _frame_error("header value overruns the headers")
                value = data.decode("utf-8") if kind == 7 else data
                pos += 2 + length
            elif kind == 9:
                value = raw[pos:pos + 16]
                pos += 16
            else:
                raise _frame_error(f"unknown header type {kind}")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError):
        raise _frame_error("malformed headers") from None
    if pos != len(raw):
        raise _frame_error("header value overruns the headers")
    return headers


class EventStreamDecoder:
    """Incremental decoder of `application/vnd.amazon.eventstream` frames:
    prelude (total length, headers length, prelude CRC32), headers, payload, message CRC32."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        self._buf += data
        out: list[tuple[dict[str, Any], bytes]] = []
        while len(self._buf) >= 12:
            total, headers_len, prelude_crc = struct.unpack_from(">III", self._buf, 0)
            if zlib.crc32(self._buf[:8]) != prelude_crc:
                raise _frame_error("prelude checksum mismatch")
            if total < 16 or total > MAX_FRAME or headers_len > total - 16:
                raise _frame_error(f"impossible frame lengths {total}/{headers_len}")
            if len(self._buf) < total:
                break
            frame = bytes(self._buf[:total])
            del self._buf[:total]
            (message_crc,) = struct.unpack_from(">I", frame, total - 4)
            if zlib.crc32(frame[:-4]) != message_crc:
                raise _frame_error("message checksum mismatch")
            out.append((_decode_headers(frame[12:12 + headers_len]), frame[12 + headers_len:-4]))
        return out

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not finished."""
        return len(self._buf)


def _frame_event(headers: dict[str, Any], payload: bytes) -> ServerEvent | None:
    kind = headers.get(":message-type", "event")
    try:
        body = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        if kind == "event":
            raise _frame_error("payload is not JSON") from None
        body = {"message": payload.decode("utf-8", "replace")[:500]}
    if kind == "exception":
        message = str((body.get("message") or body.get("Message")) if isinstance(body, dict) else body)
        raise bedrock_error(None, str(headers.get(":exception-type") or ""), message or "stream exception")
    if kind == "error":
        code = str(headers.get(":error-code") or "")
        raise bedrock_error(None, code, str(headers.get(":error-message") or code or "stream error"))
    if kind != "event" or not isinstance(body, dict):
        return None
    return ServerEvent(data="", event=str(headers.get(":event-type") or ""), payload=body)


# ---- request ---------------------------------------------------------------------------------


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


# ---- response --------------------------------------------------------------------------------


def usage_from_bedrock(u: dict[str, Any] | None) -> dict[str, Any]:
    u = u or {}
    cache_read = int(u.get("cacheReadInputTokens") or 0)
    prompt = int(u.get("inputTokens") or 0) + cache_read + int(u.get("cacheWriteInputTokens") or 0)
    return openai_usage(prompt, int(u.get("outputTokens") or 0), cached=cache_read)


def _finish(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "", "stop")


class BedrockStream(StreamParser):
    """ConverseStream events -> OpenAI chunks; `done` once both `messageStop` and `metadata` arrived."""

    provider = SERVICE

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.created = int(time.time())
        self.started = False
        self.tools: dict[int, int] = {}  # Converse content block index -> OpenAI tool call index
        self.stopped = False
        self.metadata = False

    def _chunk(self, delta: dict[str, Any] | None = None, finish: str | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return chunk(self.ctx, delta, finish, usage, created=self.created)

    def _start(self) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, event: ServerEvent) -> list[dict[str, Any]]:
        data = event.json() or {}
        kind = event.event
        if kind == "messageStart":
            return self._start()
        if kind == "contentBlockStart":
            start = data.get("start") or {}
            if "toolUse" in start:
                tool = start["toolUse"] or {}
                index = len(self.tools)
                self.tools[int(data.get("contentBlockIndex") or 0)] = index
                call = {"index": index, "id": tool.get("toolUseId"), "type": "function",
                        "function": {"name": tool.get("name"), "arguments": ""}}
                return [*self._start(), self._chunk({"tool_calls": [call]})]
            return []
        if kind == "contentBlockDelta":
            return self._delta(int(data.get("contentBlockIndex") or 0), data.get("delta") or {})
        if kind == "messageStop":
            self.stopped = True
            return [*self._start(), self._chunk({}, _finish(data.get("stopReason")))]
        if kind == "metadata":
            self.metadata = True
            return [self._chunk(usage=usage_from_bedrock(data.get("usage")))]
        return []  # contentBlockStop, and event types added later

    def _delta(self, index: int, delta: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._start()
        if isinstance(delta.get("text"), str) and delta["text"]:
            out.append(self._chunk({"content": delta["text"]}))
        elif "toolUse" in delta:
            if index not in self.tools:
                raise GatewayError(502, "bedrock: tool input delta for a content block that never started",
                                   code="bad_upstream_response", retryable=True)
            piece = (delta["toolUse"] or {}).get("input") or ""
            if piece:
                out.append(self._chunk({"tool_calls": [{"index": self.tools[index],
                                                        "function": {"arguments": piece}}]}))
        elif "reasoningContent" in delta:
            text = (delta["reasoningContent"] or {}).get("text")
            if text:
                out.append(self._chunk({"reasoning_content": text}))
        return out

    @property
    def done(self) -> bool:
        return self.stopped and self.metadata


# ---- embeddings ------------------------------------------------------------------------------


def _embed_family(model: str) -> str | None:
    name = model.lower()
    if "titan-embed" in name:
        return "titan"
    if "cohere.embed" in name:
        return "cohere"
    return None


def _estimate_tokens(texts: list[str]) -> int:
    return sum(max(1, (len(t) + 3) // 4) for t in texts)


# ---- the adapter -----------------------------------------------------------------------------


def _region(dep: Deployment) -> str:
    if dep.region:
        return dep.region
    if dep.api_base:
        m = re.match(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com", urlsplit(dep.api_base).hostname or "")
        if m:
            return m[1]
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def _credentials(dep: Deployment, api_key: str | None) -> sigv4.Credentials | str | None:
    """SigV4 credentials, a Bedrock API key (bearer), or None: deployment first, then the environment."""
    if dep.aws_access_key_id and dep.aws_secret_access_key:
        return sigv4.Credentials(dep.aws_access_key_id, dep.aws_secret_access_key, dep.aws_session_token)
    if api_key:
        return api_key
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return sigv4.Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                                 env.get("AWS_SESSION_TOKEN") or None)
    return env.get("AWS_BEARER_TOKEN_BEDROCK") or None


class BedrockAdapter(ProviderAdapter):
    name = "bedrock"

    def _url(self, ctx: CallContext, operation: str) -> str:
        dep = ctx.deployment
        base = (dep.api_base or f"https://bedrock-runtime.{_region(dep)}.amazonaws.com").rstrip("/")
        return f"{base}/model/{quote(dep.model, safe='')}/{operation}"

    def _request(self, ctx: CallContext, operation: str, body: dict[str, Any],
                 dropped: list[str]) -> UpstreamRequest:
        url = self._url(ctx, operation)
        content = encode_json(body, ctx.body, SERVICE)
        headers = {"content-type": "application/json", **ctx.deployment.headers}
        creds = _credentials(ctx.deployment, ctx.api_key)
        if isinstance(creds, sigv4.Credentials):
            headers = sigv4.sign("POST", url, headers, content, creds, _region(ctx.deployment), SERVICE)
        elif creds:
            headers["authorization"] = f"Bearer {creds}"
        else:
            raise GatewayError(401, f"bedrock: deployment {ctx.deployment.id or ctx.deployment.model!r} has no "
                               "credentials (set aws_access_key_id and aws_secret_access_key, or api_key)",
                               code="invalid_api_key", retryable=False)
        return UpstreamRequest("POST", url, headers, content=content, dropped_params=dropped)

    # ---- chat ----
    def chat_request(self, ctx: CallContext) -> UpstreamRequest:
        body, dropped = build_body(ctx)
        return self._request(ctx, "converse-stream" if ctx.stream else "converse", body, dropped)

    def parse_chat(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        message = ((data.get("output") or {}).get("message") if isinstance(data, dict) else None) or {}
        blocks = message.get("content")
        if not isinstance(blocks, list):
            raise GatewayError(502, "bedrock: malformed response (no output.message.content)",
                               code="bad_upstream_response", retryable=True)
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in blocks:
            if isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif "toolUse" in block:
                tool = block["toolUse"] or {}
                calls.append({"id": tool.get("toolUseId"), "type": "function",
                              "function": {"name": tool.get("name"),
                                           "arguments": orjson.dumps(tool.get("input") or {}).decode()}})
            elif "reasoningContent" in block:
                text = ((block["reasoningContent"] or {}).get("reasoningText") or {}).get("text")
                if text:
                    reasoning.append(text)
        text = "".join(texts)
        out: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
        if reasoning:
            out["reasoning_content"] = "".join(reasoning)
        if calls:
            out["tool_calls"] = calls
        return completion(ctx, out, _finish(data.get("stopReason")), usage_from_bedrock(data.get("usage")))

    def stream_parser(self, ctx: CallContext) -> StreamParser:
        return BedrockStream(ctx)

    async def events(self, response: httpx.Response) -> AsyncIterator[ServerEvent]:
        decoder = EventStreamDecoder()
        async for data in response.aiter_bytes():
            for headers, payload in decoder.feed(data):
                event = _frame_event(headers, payload)
                if event is not None:
                    yield event
        if decoder.pending:
            raise GatewayError(502, "bedrock: upstream stream ended inside an event frame", code="stream_interrupted",
                               retryable=True)

    # ---- embeddings ----
    def embeddings_request(self, ctx: CallContext) -> UpstreamRequest:
        body = ctx.body
        family = _embed_family(ctx.deployment.model)
        if family is None:
            raise _bad(f"model {ctx.deployment.model!r} is not a supported embeddings model (amazon.titan-embed-* "
                       "or cohere.embed-*)", "model")
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else list(raw or []) if isinstance(raw, list) else []
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise _bad("embeddings take text input only (a non-empty string or a list of them)", "input")
        handled = {"model", "input", "encoding_format", "dimensions", "user", "metadata", *GATEWAY_FIELDS}
        out: dict[str, Any]
        if family == "titan":
            if len(texts) != 1:
                raise _bad(f"Titan embeddings take one input per request, got {len(texts)}; send one string, or "
                           "use a Cohere embed model for lists", "input")
            out = {"inputText": texts[0]}
            native: tuple[str, ...] = ("normalize",)
            if body.get("dimensions") is not None:
                out["dimensions"] = body["dimensions"]
        else:
            out = {"texts": texts, "input_type": body.get("input_type") or "search_document"}
            native = ("input_type", "truncate")
            if body.get("dimensions") is not None:
                out["output_dimension"] = body["dimensions"]
        for name in native:
            if body.get(name) is not None:
                out[name] = body[name]
        dropped = unsupported(ctx, [k for k, v in body.items() if k not in handled and k not in native
                                    and v is not None], SERVICE)
        return self._request(ctx, "invoke", out, dropped)

    def parse_embeddings(self, data: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise GatewayError(502, "bedrock: malformed embeddings response", code="bad_upstream_response",
                               retryable=True)
        raw = ctx.body.get("input")
        texts = [raw] if isinstance(raw, str) else [str(t) for t in raw or []]
        vectors: Any
        if isinstance(data.get("embedding"), list):  # Titan
            vectors = [data["embedding"]]
            tokens = int(data.get("inputTextTokenCount") or 0)
        else:  # Cohere: a list of vectors, or {"float": [...]} when embedding_types was given
            embeddings = data.get("embeddings")
            vectors = embeddings.get("float") if isinstance(embeddings, dict) else embeddings
            tokens = _estimate_tokens(texts)
        if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
            raise GatewayError(502, "bedrock: malformed embeddings response", code="bad_upstream_response",
                               retryable=True)
        as_base64 = ctx.body.get("encoding_format") == "base64"
        items = [{"object": "embedding", "index": i, "embedding": float32_base64(v) if as_base64 else v}
                 for i, v in enumerate(vectors)]
        return {"object": "list", "data": items, "model": ctx.deployment.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ---- errors ----
    def map_error(self, status: int, body: bytes, headers: httpx.Headers) -> GatewayError:
        message, err = error_message(body)
        if isinstance(err.get("Message"), str):  # some AWS front ends capitalise it
            message = err["Message"]
        kind = headers.get("x-amzn-errortype") or str(err.get("__type") or "")
        return bedrock_error(status, kind, message, retry_after_seconds(headers))

