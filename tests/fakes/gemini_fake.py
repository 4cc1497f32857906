"""Fake Google Gemini (Generative Language API): generateContent, streamGenerateContent (SSE) and
batchEmbedContents at their real paths, with Google-shaped answers, usage and errors.

Behaviour, deterministic so tests can check every byte:
- the answer echoes the last user text ("Echo: ..."), plus " [N image(s)]" when inlineData/fileData
  parts were sent; `maxOutputTokens` cuts it to that many words (finishReason MAX_TOKENS);
- with functionDeclarations, mode not NONE and a last turn that is not a functionResponse, it
  calls the first allowed function with {"query": <last user text>} (and a thoughtSignature);
- `candidateCount` answers that many candidates;
- usage: promptTokenCount/candidatesTokenCount ~ 1 token per 4 chars; `implicit_cache` (Gemini's
  implicit caching) adds cachedContentTokenCount; a thinkingConfig adds thoughtsTokenCount (and a thought part when
  `includeThoughts`);
- "[[unsafe]]" in the last user text ends the candidate with finishReason SAFETY; "[[block]]"
  blocks the prompt (promptFeedback.blockReason, no candidates); "[[stream-error]]" makes a
  stream send an in-band error object after its first event;
- the key must come in `x-goog-api-key` (missing: 403; "bad-key": Google's 400 "API key not valid").
Faults (see tests/fakes/server.py) answer with Google's error body; `retry_delay_in_body` puts a
429's Retry-After into RetryInfo details instead of the header, `error_as_list` wraps the body
in a list, as some Google endpoints do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from switchyard.devstack.demo_provider import count_tokens
from tests.fakes.server import FakeProvider, Fault

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 503: "UNAVAILABLE",
                504: "DEADLINE_EXCEEDED"}
SIGNATURE = "ZmFrZS10aG91Z2h0LXNpZ25hdHVyZQ=="


def _texts(content: dict[str, Any]) -> str:
    return " ".join(p["text"] for p in content.get("parts") or [] if isinstance(p.get("text"), str))


class FakeGemini(FakeProvider):
    name = "gemini"

    def __init__(self) -> None:
        self.retry_delay_in_body = False
        self.error_as_list = False
        self.implicit_cache = False
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.retry_delay_in_body = False
        self.error_as_list = False
        self.implicit_cache = False

    # ---- Google error bodies ----
    def error_body(self, status: int, message: str, retry_delay: float | None = None) -> Any:
        err: dict[str, Any] = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
        if retry_delay is not None:
            err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_delay}s"}]
        body = {"error": err}
        return [body] if self.error_as_list else body

    def google_error(self, status: int, message: str, google_status: str | None = None,
                     details: list[dict[str, Any]] | None = None) -> Response:
        body = self.error_body(status, message)
        err = body[0]["error"] if isinstance(body, list) else body["error"]
        if google_status:
            err["status"] = google_status
        if details:
            err["details"] = details
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    async def fault_response(self, fault: Fault | None) -> Response | None:
        if (fault is not None and fault.status == 429 and fault.retry_after is not None
                and self.retry_delay_in_body):
            body = self.error_body(429, fault.message or "Resource has been exhausted (e.g. check quota).",
                                   retry_delay=fault.retry_after)
            return Response(orjson.dumps(body), status_code=429, media_type="application/json")
        return await super().fault_response(fault)

    # ---- routes ----
    def routes(self) -> None:
        @self.app.post("/{version}/models/{target}")
        async def model_method(version: str, target: str, request: Request) -> Response:
            await self.record(request)
            model, _, method = target.partition(":")
            if method not in ("generateContent", "streamGenerateContent", "batchEmbedContents"):
                return self.google_error(404, f"Method {method!r} not found on models/{model}.")
            key = request.headers.get("x-goog-api-key")
            if not key:
                return self.google_error(403, "Method doesn't allow unregistered callers (callers without "
                                         "established identity). Please use API Key or other form of API "
                                         "consumer identity to call this API.")
            if key == "bad-key":
                return self.google_error(400, "API key not valid. Please pass a valid API key.", details=[
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                     "domain": "googleapis.com"}])
            fault = self.take_fault(request)
            early = await self.fault_response(fault)
            if early is not None:
                return early
            body = orjson.loads(await request.body())
            if method == "batchEmbedContents":
                return self.embed(model, body)
            if not body.get("contents"):
                return self.google_error(400, "* GenerateContentRequest.contents: contents is not specified")
            if method == "generateContent":
                answer = self.generate(model, body)
                if self.last_user_text(body).find("[[block]]") >= 0:
                    answer = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": answer["usageMetadata"]}
                return Response(orjson.dumps(answer), media_type="application/json")
            if request.query_params.get("alt") != "sse":
                return self.google_error(400, "this fake only streams with alt=sse")
            cut = fault.cut_after if fault else None
            events = list(self.stream_events(model, body))

            async def gen():  # type: ignore[no-untyped-def]
                for i, event in enumerate(events):
                    if cut is not None and i >= cut:
                        return
                    yield b"data: " + orjson.dumps(event) + b"\r\n\r\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

    # ---- answers ----
    @staticmethod
    def last_user_text(body: dict[str, Any]) -> str:
        for content in reversed(body.get("contents") or []):
            if content.get("role") == "user" and any("text" in p for p in content.get("parts") or []):
                return _texts(content)
        return ""

    def _function_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        declarations = [d for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]
        config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        contents = body.get("contents") or []
        last = contents[-1] if contents else {}
        if not declarations or config.get("mode") == "NONE":
            return None
        if any("functionResponse" in p for p in last.get("parts") or []):
            return None
        allowed = config.get("allowedFunctionNames") or [declarations[0]["name"]]
        return {"functionCall": {"name": allowed[0], "args": {"query": self.last_user_text(body)}},
                "thoughtSignature": SIGNATURE}

    def _reply(self, body: dict[str, Any]) -> tuple[str, str]:
        images = sum(1 for c in body.get("contents") or [] for p in c.get("parts") or []
                     if "inlineData" in p or "fileData" in p)
        text = f"Echo: {self.last_user_text(body)}"
        if images:
            text += f" [{images} image(s)]"
        limit = (body.get("generationConfig") or {}).get("maxOutputTokens")
        words = text.split(" ")
        if isinstance(limit, int) and len(words) > limit:
            return " ".join(words[:limit]), "MAX_TOKENS"
        return text, "STOP"

    def _usage(self, body: dict[str, Any], out_text: str) -> dict[str, Any]:
        prompt_text = " ".join(_texts(c) for c in body.get("contents") or [])
        system = body.get("systemInstruction")
        if system:
            prompt_text += " " + _texts(system)
        prompt = count_tokens(prompt_text)
        candidates = count_tokens(out_text) * int((body.get("generationConfig") or {}).get("candidateCount") or 1)
        usage: dict[str, Any] = {"promptTokenCount": prompt, "candidatesTokenCount": candidates}
        total = prompt + candidates
        if self.implicit_cache:
            usage["cachedContentTokenCount"] = min(prompt, 3)
        if (body.get("generationConfig") or {}).get("thinkingConfig"):
            usage["thoughtsTokenCount"] = 7
            total += 7
        usage["totalTokenCount"] = total
        return usage

    def _thinking(self, body: dict[str, Any]) -> bool:
        return bool(((body.get("generationConfig") or {}).get("thinkingConfig") or {}).get("includeThoughts"))

    def generate(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        call = self._function_call(body)
        text, reason = self._reply(body)
        if "[[unsafe]]" in self.last_user_text(body):
            parts: list[dict[str, Any]] = []
            reason = "SAFETY"
        elif call:
            parts = [call]
        else:
            parts = [{"text": text}]
        if self._thinking(body):
            parts = [{"text": "Thinking about it.", "thought": True}, *parts]
        n = int((body.get("generationConfig") or {}).get("candidateCount") or 1)
        candidates = []
        for i in range(n):
            cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "finishReason": reason, "index": i}
            if reason == "SAFETY":
                cand["safetyRatings"] = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                                          "blocked": True}]
            candidates.append(cand)
        out_text = text if not call else orjson.dumps(call["functionCall"]["args"]).decode()
        return {"candidates": candidates, "usageMetadata": self._usage(body, out_text), "modelVersion": model,
                "responseId": hashlib.sha1(orjson.dumps(body)).hexdigest()[:16]}

    def stream_events(self, model: str, body: dict[str, Any]) -> Iterator[Any]:
        full = self.generate(model, body)
        usage = full["usageMetadata"]
        meta = {"modelVersion": model, "responseId": full["responseId"]}
        user_text = self.last_user_text(body)
        if "[[block]]" in user_text:
            yield {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage, **meta}
            return
        cand = full["candidates"][0]
        parts = cand["content"]["parts"]
        pieces: list[list[dict[str, Any]]] = []
        for part in parts:
            if "text" in part and not part.get("thought"):
                words = part["text"].split(" ")
                pieces += [[{"text": w if i == 0 else " " + w}] for i, w in enumerate(words)]
            else:
                pieces.append([part])
        if not pieces:
            pieces = [[]]
        partial = {"promptTokenCount": usage["promptTokenCount"]}
        for i, group in enumerate(pieces):
            last = i == len(pieces) - 1
            out_cand: dict[str, Any] = {"content": {"role": "model", "parts": group}, "index": 0}
            if last:
                out_cand["finishReason"] = cand["finishReason"]
            yield {"candidates": [out_cand], "usageMetadata": usage if last else partial, **meta}
            if i == 0 and "[[stream-error]]" in user_text:
                yield {"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}}
                return

    def embed(self, model: str, body: dict[str, Any]) -> Response:
        out = []
        for i, req in enumerate(body.get("requests") or []):
            if req.get("model") != f"models/{model}":
                return self.google_error(400, f"* BatchEmbedContentsRequest.requests[{i}].model: the model "
                                         f"{req.get('model')!r} does not match the model in the URL models/{model}")
            text = _texts(req.get("content") or {})
            size = int(req.get("outputDimensionality") or 16)
            digest = hashlib.sha256(text.encode()).digest() * (size // 32 + 1)
            out.append({"values": [b / 255.0 for b in digest[:size]]})
        return Response(orjson.dumps({"embeddings": out}), media_type="application/json")
