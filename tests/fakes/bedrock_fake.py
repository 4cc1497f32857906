"""Fake Amazon Bedrock Runtime: Converse, ConverseStream (AWS binary event stream) and InvokeModel for
Titan and Cohere embeddings, at their real paths, with Bedrock's auth, checks, answers and errors.

Auth, checked like AWS does before anything else:
- `Authorization: AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/bedrock/aws4_request, SignedHeaders=...,
  Signature=...`: the shape, the scope (service `bedrock`, the fake's `region`, the date of
  `x-amz-date`), `host` and `x-amz-date` among the signed headers, a known access key and its session
  token, and then the signature itself, recomputed from the request exactly as received (raw path,
  query, headers, body) with the key's secret. Each step fails with Bedrock's own error type
  (`MissingAuthenticationTokenException`, `IncompleteSignatureException`,
  `UnrecognizedClientException`, `InvalidSignatureException`), always 403 as AWS answers.
- or `Authorization: Bearer <Bedrock API key>`, one of `api_keys`.

It refuses (ValidationException) what Converse refuses in the ways an adapter can get wrong: fields
Converse does not have, an empty or non-alternating `messages`, a first turn that is not the user's,
blank text blocks, an unknown image format, tool blocks without `toolConfig`, tool results that answer
no tool use, `toolChoice` without tools. It answers deterministically: "Echo: <last user text>"
(plus " [N image(s)]"), cut to `maxTokens` words (`max_tokens`) or before a stop sequence
(`stop_sequence`); a `toolUse` of the first offered tool (the one `toolChoice.tool` names) with
{"query": <last user text>} unless the last turn carries tool results; "[[guardrail]]" in the last
user text ends with `guardrail_intervened`. `respond(...)` scripts the next answer's exact blocks.
Prompt caching is modelled: the prompt up to the last `cachePoint` is written on first sight
(`cacheWriteInputTokens`) and read after (`cacheReadInputTokens`); `inputTokens` counts the rest.

Streams are real event-stream frames (prelude, prelude CRC32, string headers `:event-type`,
`:content-type`, `:message-type`, JSON payload with Bedrock's `p` padding, message CRC32), written in
small slices so frames straddle reads. Stream faults: `cut_after` (base class) stops after N frames;
`stream_exception(after, kind, message)` sends an exception frame after N frames; `corrupt_crc_at`
breaks that frame's message CRC; `cut_inside_frame` stops halfway through the frame after the last
whole one.

Errors are Bedrock-shaped: `{"message": ...}` with `x-amzn-ErrorType: <Type>:http://internal.amazon.com/
coral/com.amazon.bedrock/`. `inject(status=...)` picks the type from the status;
`inject_error(kind, status, message)` names it.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from switchyard.devstack.demo_provider import count_tokens
from switchyard.services.workers.providers import sigv4
from tests.fakes.server import FakeProvider, Fault

DEFAULT_TYPES = {400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
                 408: "ModelTimeoutException", 424: "ModelErrorException", 429: "ThrottlingException",
                 500: "InternalServerException", 503: "ServiceUnavailableException"}
TYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"

_FIELDS = {"messages", "system", "inferenceConfig", "toolConfig", "guardrailConfig", "additionalModelRequestFields",
           "additionalModelResponseFieldPaths", "performanceConfig", "promptVariables", "requestMetadata"}
_INFERENCE = {"maxTokens", "temperature", "topP", "stopSequences"}
_IMAGE_FORMATS = {"png", "jpeg", "gif", "webp"}


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude, prelude CRC, string headers (type 7), payload, message CRC."""
    raw_headers = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        raw_headers += bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(raw_headers))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return head + struct.pack(">I", zlib.crc32(head))


def event_frame(event_type: str, payload: dict[str, Any]) -> bytes:
    body = orjson.dumps({**payload, "p": PADDING[: 1 + len(event_type) % len(PADDING)]})
    return encode_frame({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
                        body)


def exception_frame(kind: str, message: str) -> bytes:
    return encode_frame({":exception-type": kind, ":content-type": "application/json",
                         ":message-type": "exception"}, orjson.dumps({"message": message}))


@dataclass
class Scripted:
    content: list[dict[str, Any]]
    stop_reason: str = "end_turn"


def _texts(blocks: list[dict[str, Any]]) -> str:
    out = []
    for b in blocks or []:
        if isinstance(b.get("text"), str):
            out.append(b["text"])
        elif "toolResult" in b:
            out.append(_texts(b["toolResult"].get("content") or []))
    return " ".join(x for x in out if x)


class FakeBedrock(FakeProvider):
    name = "bedrock"

    def __init__(self, region: str = "us-west-2") -> None:
        self.region = region
        # access key id -> (secret, session token or None)
        self.credentials: dict[str, tuple[str, str | None]] = {
            "AKIDFAKE": ("fake-secret/key+value", None),
            "ASIATEMP": ("temp-secret", "session-token-123"),
        }
        self.api_keys = {"bedrock-api-key"}
        self.scripted: deque[Scripted] = deque()
        self.cache: set[str] = set()
        self._fault_types: dict[int, str] = {}
        self._stream_exception: tuple[int, str, str] | None = None
        self.corrupt_crc_at: int | None = None
        self.cut_inside_frame = False
        self.auth_failures: list[str] = []
        super().__init__()

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.scripted.clear()
            self.cache.clear()
            self._fault_types.clear()
            self.auth_failures.clear()
        self._stream_exception = None
        self.corrupt_crc_at = None
        self.cut_inside_frame = False

    # ---- scripting and faults ----
    def respond(self, content: list[dict[str, Any]], stop_reason: str = "end_turn") -> None:
        """Answer the next request with exactly these Converse content blocks."""
        with self._lock:
            self.scripted.append(Scripted(content, stop_reason))

    def inject_error(self, kind: str, status: int, message: str | None = None, times: int = 1) -> None:
        fault = Fault(status=status, message=message, times=times)
        with self._lock:
            self._fault_types[id(fault)] = kind
            self.faults.append(fault)

    def stream_exception(self, after: int, kind: str = "throttlingException",
                         message: str = "Too many tokens, please wait before trying again.") -> None:
        self._stream_exception = (after, kind, message)

    def bedrock_error(self, status: int, message: str, kind: str | None = None) -> Response:
        kind = kind or DEFAULT_TYPES.get(status, "InternalServerException")
        return Response(orjson.dumps({"message": message}), status_code=status, media_type="application/json",
                        headers={"x-amzn-errortype": kind + TYPE_SUFFIX, "x-amzn-requestid": "fake-request-id"})

    async def fault_response(self, fault: Fault | None) -> Response | None:
        if fault is not None and fault.status and fault.status >= 400:
            if fault.latency_ms:
                await asyncio.sleep(fault.latency_ms / 1000.0)
            response = self.bedrock_error(fault.status, fault.message or f"injected fault {fault.status}",
                                          self._fault_types.get(id(fault)))
            if fault.retry_after is not None:
                response.headers["retry-after"] = str(fault.retry_after)
            return response
        return await super().fault_response(fault)

    # ---- auth ----
    def check_auth(self, request: Request, raw_body: bytes) -> Response | None:
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            if auth[7:] in self.api_keys:
                return None
            return self._deny("UnrecognizedClientException", "Invalid API Key format: Must start with pre-defined "
                              "prefix")
        if not auth:
            return self._deny("MissingAuthenticationTokenException", "Missing Authentication Token")
        parsed = sigv4.parse_authorization(auth)
        if parsed is None:
            return self._deny("IncompleteSignatureException", f"Authorization header requires 'Credential', "
                              f"'SignedHeaders' and 'Signature' parameters. Authorization={auth[:40]}...")
        amz_date = request.headers.get("x-amz-date", "")
        if not amz_date:
            return self._deny("IncompleteSignatureException", "Authorization header requires existence of either "
                              "a 'X-Amz-Date' or a 'Date' header.")
        if parsed.service != "bedrock" or parsed.region != self.region or parsed.date != amz_date[:8]:
            return self._deny("InvalidSignatureException", f"Credential should be scoped to a valid region and "
                              f"service: got {parsed.date}/{parsed.region}/{parsed.service}")
        if "host" not in parsed.signed_headers or "x-amz-date" not in parsed.signed_headers:
            return self._deny("InvalidSignatureException", "SignedHeaders must include host and x-amz-date")
        known = self.credentials.get(parsed.access_key_id)
        if known is None:
            return self._deny("UnrecognizedClientException", "The security token included in the request is invalid.")
        secret, token = known
        if token is not None and (request.headers.get("x-amz-security-token") != token
                                  or "x-amz-security-token" not in parsed.signed_headers):
            return self._deny("UnrecognizedClientException", "The security token included in the request is invalid.")
        received: dict[str, str] = {}
        for name, value in request.headers.raw:
            key = name.decode("latin-1").lower()
            received[key] = received[key] + "," + value.decode("latin-1") if key in received \
                else value.decode("latin-1")
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        canonical = sigv4.canonical_request(request.method, raw_path.decode("latin-1"),
                                            request.scope.get("query_string", b"").decode("latin-1"), received,
                                            parsed.signed_headers, sigv4.sha256_hex(raw_body), "bedrock")
        expected = sigv4.signature(secret, amz_date, self.region, "bedrock", canonical)
        if expected != parsed.signature:
            return self._deny("InvalidSignatureException", "The request signature we calculated does not match the "
                              "signature you provided. Check your AWS Secret Access Key and signing method.")
        return None

    def _deny(self, kind: str, message: str) -> Response:
        with self._lock:
            self.auth_failures.append(kind)
        return self.bedrock_error(403, message, kind)

    # ---- routes ----
    def routes(self) -> None:
        @self.app.post("/model/{rest:path}")
        async def model_operation(rest: str, request: Request) -> Response:
            raw_body = await request.body()
            await self.record(request)
            raw_path = (request.scope.get("raw_path") or b"").decode("latin-1")
            parts = raw_path.split("/")  # "", "model", <encoded model id>, <operation>
            if len(parts) != 4 or parts[3] not in ("converse", "converse-stream", "invoke"):
                return Response(orjson.dumps({"message": "Not Found"}), status_code=404,
                                media_type="application/json",
                                headers={"x-amzn-errortype": "UnknownOperationException"})
            denied = self.check_auth(request, raw_body)
            if denied is not None:
                return denied
            fault = self.take_fault(request)
            early = await self.fault_response(fault)
            if early is not None:
                return early
            from urllib.parse import unquote

            model, operation = unquote(parts[2]), parts[3]
            try:
                body = orjson.loads(raw_body)
            except orjson.JSONDecodeError:
                return self.bedrock_error(400, "Malformed input request, please reformat your input and try again.")
            if operation == "invoke":
                return self.invoke(model, body)
            problem = self.problem(body)
            if problem:
                return self.bedrock_error(400, problem)
            content, stop = self.answer(body)
            if operation == "converse":
                return Response(orjson.dumps({
                    "output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop,
                    "usage": self.usage(body, content), "metrics": {"latencyMs": 12}}),
                    media_type="application/json")
            frames = list(self.stream_frames(body, content, stop))
            return StreamingResponse(self.write(frames, fault.cut_after if fault else None),
                                     media_type="application/vnd.amazon.eventstream")

    async def write(self, frames: list[bytes], cut_after: int | None):  # type: ignore[no-untyped-def]
        exc = self._stream_exception
        out = b""
        for i, frame in enumerate(frames):
            if cut_after is not None and i >= cut_after:
                break
            if exc is not None and i >= exc[0]:
                out += exception_frame(exc[1], exc[2])
                break
            if self.corrupt_crc_at == i:
                frame = frame[:-4] + struct.pack(">I", (struct.unpack(">I", frame[-4:])[0] + 1) & 0xFFFFFFFF)
            out += frame
        if self.cut_inside_frame and cut_after is not None and cut_after < len(frames):
            out += frames[cut_after][: len(frames[cut_after]) // 2]
        for start in range(0, len(out), 45):  # frames straddle the reads
            yield out[start:start + 45]
            await asyncio.sleep(0)

    # ---- Converse's checks ----
    def problem(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Malformed input request, please reformat your input and try again."
        extra = sorted(set(body) - _FIELDS)
        if extra:
            return f"Malformed input request: extraneous key [{extra[0]}] is not permitted, please reformat your input"
        bad_config = sorted(set(body.get("inferenceConfig") or {}) - _INFERENCE)
        if bad_config:
            return f"Malformed input request: extraneous key [inferenceConfig.{bad_config[0]}] is not permitted"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "A conversation must start with a user message. Try again with a conversation that starts with " \
                   "a user message."
        tools = (body.get("toolConfig") or {}).get("tools") or []
        if body.get("toolConfig") and not tools:
            return "The toolConfig field must contain at least one tool."
        if (body.get("toolConfig") or {}).get("toolChoice") and not tools:
            return "toolChoice requires tools."
        pending: set[str] = set()
        for i, m in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if m.get("role") != want:
                if i == 0:
                    return "A conversation must start with a user message. Try again with a conversation that " \
                           "starts with a user message."
                return "A conversation must alternate between user and assistant roles. Make sure the conversation " \
                       "alternates between user and assistant roles and try again."
            content = m.get("content")
            if not isinstance(content, list) or not content:
                return f"The content field in the Message object at messages.{i} is empty. Add a ContentBlock " \
                       "object to the content field and try again."
            for j, block in enumerate(content):
                if "text" in block and not str(block["text"]).strip():
                    return f"The text field in the ContentBlock object at messages.{i}.content.{j} is blank. Add " \
                           "text to the text field, and try again."
                if "image" in block and block["image"].get("format") not in _IMAGE_FORMATS:
                    return f"messages.{i}.content.{j}.image.format: unsupported image format"
                if ("toolUse" in block or "toolResult" in block) and not tools:
                    return "The toolConfig field must be defined when using toolUse and toolResult content blocks."
                if "toolUse" in block:
                    pending.add(block["toolUse"].get("toolUseId"))
                if "toolResult" in block and block["toolResult"].get("toolUseId") not in pending:
                    return f"messages.{i}.content.{j}: toolResult {block['toolResult'].get('toolUseId')!r} does not " \
                           "match any toolUse block in the previous turn"
        for j, block in enumerate(body.get("system") or []):
            if "text" in block and not str(block["text"]).strip():
                return f"The text field in the SystemContentBlock at system.{j} is blank."
        return None

    # ---- answers ----
    @staticmethod
    def last_user_text(body: dict[str, Any]) -> str:
        for m in reversed(body.get("messages") or []):
            if m.get("role") == "user":
                text = " ".join(b["text"] for b in m.get("content") or [] if isinstance(b.get("text"), str))
                if text:
                    return text
        return ""

    def answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        with self._lock:
            scripted = self.scripted.popleft() if self.scripted else None
        if scripted is not None:
            return scripted.content, scripted.stop_reason
        user_text = self.last_user_text(body)
        if "[[guardrail]]" in user_text:
            return [{"text": "Sorry, the model cannot answer this question."}], "guardrail_intervened"
        tool_config = body.get("toolConfig") or {}
        specs = [t["toolSpec"] for t in tool_config.get("tools") or [] if "toolSpec" in t]
        last = (body.get("messages") or [{}])[-1]
        answered = any("toolResult" in b for b in last.get("content") or [])
        if specs and not answered:
            name = ((tool_config.get("toolChoice") or {}).get("tool") or {}).get("name") or specs[0]["name"]
            tool_id = "tooluse_" + hashlib.sha1(orjson.dumps(body)).hexdigest()[:16]
            return [{"toolUse": {"toolUseId": tool_id, "name": name, "input": {"query": user_text}}}], "tool_use"
        images = sum(1 for m in body.get("messages") or [] for b in m.get("content") or [] if "image" in b)
        text = f"Echo: {user_text}" + (f" [{images} image(s)]" if images else "")
        config = body.get("inferenceConfig") or {}
        for stop in config.get("stopSequences") or []:
            if stop in text:
                return [{"text": text[: text.index(stop)]}], "stop_sequence"
        words = text.split(" ")
        limit = config.get("maxTokens")
        if isinstance(limit, int) and len(words) > limit:
            return [{"text": " ".join(words[:limit])}], "max_tokens"
        return [{"text": text}], "end_turn"

    def usage(self, body: dict[str, Any], content: list[dict[str, Any]]) -> dict[str, Any]:
        """Tokens ~ chars/4 over the prompt's text; the prefix up to the last cachePoint is cached."""
        pieces: list[str] = []
        cached_upto = 0
        sections = [("tools", (body.get("toolConfig") or {}).get("tools") or []), ("system", body.get("system") or [])]
        sections += [(f"m{i}", m.get("content") or []) for i, m in enumerate(body.get("messages") or [])]
        for _, blocks in sections:
            for block in blocks:
                if "cachePoint" in block:
                    cached_upto = len(pieces)
                elif "toolSpec" in block:
                    pieces.append(orjson.dumps(block["toolSpec"]).decode())
                else:
                    pieces.append(_texts([block]) or orjson.dumps(block).decode()[:64])
        total = count_tokens(" ".join(pieces))
        read = write = 0
        if cached_upto:
            prefix = " ".join(pieces[:cached_upto])
            key = hashlib.sha256(prefix.encode()).hexdigest()
            with self._lock:
                hit = key in self.cache
                self.cache.add(key)
            tokens = min(total, count_tokens(prefix))
            read, write = (tokens, 0) if hit else (0, tokens)
        out_text = " ".join(b.get("text") or orjson.dumps(b).decode() for b in content)
        output = count_tokens(out_text)
        usage = {"inputTokens": total - read - write, "outputTokens": output,
                 "totalTokens": total + output}
        if cached_upto:
            usage["cacheReadInputTokens"] = read
            usage["cacheWriteInputTokens"] = write
        return usage

    def stream_frames(self, body: dict[str, Any], content: list[dict[str, Any]], stop: str):  # type: ignore[no-untyped-def]
        yield event_frame("messageStart", {"role": "assistant"})
        for i, block in enumerate(content):
            if "text" in block:
                words = block["text"].split(" ")
                for n, word in enumerate(words):
                    yield event_frame("contentBlockDelta", {"contentBlockIndex": i,
                                                            "delta": {"text": word if n == 0 else " " + word}})
            elif "toolUse" in block:
                tool = block["toolUse"]
                yield event_frame("contentBlockStart", {"contentBlockIndex": i, "start": {
                    "toolUse": {"toolUseId": tool["toolUseId"], "name": tool["name"]}}})
                raw = orjson.dumps(tool.get("input") or {}).decode()
                step = max(1, len(raw) // 3)
                for start in range(0, len(raw), step):
                    yield event_frame("contentBlockDelta", {"contentBlockIndex": i,
                                                            "delta": {"toolUse": {"input": raw[start:start + step]}}})
            elif "reasoningContent" in block:
                text = block["reasoningContent"]["reasoningText"]["text"]
                yield event_frame("contentBlockDelta", {"contentBlockIndex": i,
                                                        "delta": {"reasoningContent": {"text": text}}})
                yield event_frame("contentBlockDelta", {"contentBlockIndex": i,
                                                        "delta": {"reasoningContent": {"signature": "sig"}}})
            yield event_frame("contentBlockStop", {"contentBlockIndex": i})
        yield event_frame("messageStop", {"stopReason": stop})
        yield event_frame("metadata", {"usage": self.usage(body, content), "metrics": {"latencyMs": 12}})

    # ---- InvokeModel: embeddings ----
    def invoke(self, model: str, body: Any) -> Response:
        if not isinstance(body, dict):
            return self.bedrock_error(400, "Malformed input request, please reformat your input and try again.")
        if "titan-embed" in model:
            extra = sorted(set(body) - {"inputText", "dimensions", "normalize", "embeddingTypes"})
            if extra:
                return self.bedrock_error(400, f"Malformed input request: extraneous key [{extra[0]}] is not "
                                          "permitted, please reformat your input and try again.")
            text = body.get("inputText")
            if not isinstance(text, str) or not text:
                return self.bedrock_error(400, "Malformed input request: #/inputText: expected type: String")
            size = int(body.get("dimensions") or 1024)
            if size not in (256, 512, 1024):
                return self.bedrock_error(400, "Malformed input request: #/dimensions: 100 is not a valid enum value")
            return Response(orjson.dumps({"embedding": self.vector(text, size),
                                          "inputTextTokenCount": count_tokens(text)}), media_type="application/json")
        if "cohere.embed" in model:
            extra = sorted(set(body) - {"texts", "images", "input_type", "truncate", "embedding_types",
                                        "output_dimension"})
            if extra:
                return self.bedrock_error(400, f"Malformed input request: extraneous key [{extra[0]}] is not "
                                          "permitted, please reformat your input and try again.")
            texts = body.get("texts")
            if not isinstance(texts, list) or not 0 < len(texts) <= 96:
                return self.bedrock_error(400, "Malformed input request: #/texts: expected minimum item count: 1")
            if body.get("input_type") not in ("search_document", "search_query", "classification", "clustering"):
                return self.bedrock_error(400, "Malformed input request: #/input_type: is not a valid enum value")
            size = int(body.get("output_dimension") or 1024)
            return Response(orjson.dumps({"embeddings": [self.vector(t, size) for t in texts], "id": "emb-1",
                                          "response_type": "embeddings_floats", "texts": texts}),
                            media_type="application/json")
        return self.bedrock_error(400, f"The model {model} does not support InvokeModel with this body.")

    @staticmethod
    def vector(text: str, size: int) -> list[float]:
        digest = hashlib.sha256(text.encode()).digest() * (size // 32 + 1)
        return [round(b / 255.0, 6) for b in digest[:size]]
