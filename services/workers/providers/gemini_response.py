"""Google Gemini, the answer side: answers, stream events and errors in OpenAI's shape.

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
- Thought-summary parts (`thought: true`) never enter `content`; they are returned as
  `reasoning_content`.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import httpx
import orjson

from switchyard.services.workers.providers.base import (
    CallContext,
    ServerEvent,
    StreamParser,
)
from switchyard.services.workers.providers.gemini_request import PROVIDER
from switchyard.services.workers.providers.openai_shape import (
    chunk,
    classify_status,
    completion_id,
    float32_base64,
    openai_usage,
    retry_after_seconds,
)
from switchyard.shared.errors import GatewayError

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


def openai_message(data: Any, ctx: CallContext) -> dict[str, Any]:
    """A generateContent answer as an OpenAI `chat.completion` (one choice per candidate)."""
    if not isinstance(data, dict):
        raise GatewayError(502, f"{PROVIDER}: malformed response", code="bad_upstream_response", retryable=True)
    blocked = _blocked(data, PROVIDER)
    if blocked is not None:
        raise blocked
    candidates = data.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise GatewayError(502, f"{PROVIDER}: malformed response (no candidates)", code="bad_upstream_response",
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


def openai_embeddings(data: Any, ctx: CallContext) -> dict[str, Any]:
    """A batchEmbedContents answer as an OpenAI embeddings list (usage estimated when Google reports none)."""
    if not isinstance(data, dict) or not isinstance(data.get("embeddings"), list):
        raise GatewayError(502, f"{PROVIDER}: malformed embeddings response", code="bad_upstream_response",
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
