"""Guardrails on one request at ingress: the input pass and the prompt-log record.

Input: `mask` rewrites the body before the envelope is built, so the provider, Kafka and every log see only
placeholders; `block` refuses with 400 `guardrail_violation` before anything is queued (no provider call).
Output guardrails run in the worker (services/workers/guarding.py), before an answer or a stream chunk is
produced to Kafka; their decisions come back on the final reply's headers, which `note` takes out (the header
never reaches a client) and adds to this request's decisions, so the metric, the prompt log and the usage row
see both stages.
"""

from __future__ import annotations

import time
from typing import Any

from switchyard.shared.contracts import Reply
from switchyard.shared.errors import GatewayError
from switchyard.shared.guardrails import Decision, Guardrail, Guardrails, count, decisions_from, guard_request
from switchyard.shared.prompt_log import PromptRecord, attempts_from_route
from switchyard.shared.redaction import policy
from switchyard.shared.topics import HEADER_ROUTE


def guard_batch_line(guardrails: Guardrails, body: dict[str, Any],
                     key_names: list[str]) -> tuple[GatewayError | None, list[Decision]]:
    """The input guardrails of one batch line, as an interactive request of the same key and model gets them:
    `mask` rewrites `body` in place before its envelope exists (the provider, Kafka and the logs see only the
    placeholders); a `block` is returned, to be the line's answer instead of a provider call. The decisions
    are counted on `switchyard_guardrail_actions_total` and returned (for `line_record`)."""
    decisions: list[Decision] = []
    try:
        guard_request(guardrails.select(str(body.get("model")), key_names), body, decisions)
    except GatewayError as e:
        return e, decisions
    finally:
        count(decisions)
    return None, decisions


def line_record(request_id: str, key_id: str | None, model: str, kind: str, decisions: list[Decision],
                blocked: GatewayError | None) -> PromptRecord:
    """A batch line's input decisions for accounting, which writes them onto the line's usage row (not a
    prompt-log entry: `logged` is false)."""
    return PromptRecord(request_id=request_id, logged=False, key_id=key_id, model=model, kind=kind,
                        status=blocked.status if blocked is not None else 200,
                        error=blocked.body() if blocked is not None else None,
                        guardrails=[d.as_dict() for d in decisions])


def check_key_guardrails(guardrails: Guardrails, names: list[str] | None) -> None:
    """A key may name only guardrails of the config: 400 naming the unknown ones."""
    unknown = guardrails.unknown(names or [])
    if unknown:
        raise GatewayError(400, f"Unknown guardrails: {', '.join(sorted(unknown))[:500]}.", param="guardrails",
                           code="unknown_guardrail")


class RequestGuard:
    """The guardrails of one request, its decisions, and what its prompt-log record needs."""

    def __init__(self, rails: list[Guardrail], log_prompts: bool) -> None:
        self.input = [g for g in rails if g.on("input")]
        self.decisions: list[Decision] = []
        self.log_prompts = log_prompts
        self.started = time.monotonic()
        self.first_chunk_ms: float | None = None
        self.request: dict[str, Any] | None = None
        self.answer: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self._text: dict[int, list[str]] = {}
        self.counted = False
        self.route: str | None = None
        self.status = 200
        self.usage: dict[str, Any] | None = None

    # ---- input --------------------------------------------------------------------------------------

    def check_request(self, body: dict[str, Any]) -> None:
        try:
            guard_request(self.input, body, self.decisions)
        except GatewayError as e:
            self.error, self.status = e.body(), e.status
            raise
        if self.log_prompts:
            self.request = body

    # ---- replies ----------------------------------------------------------------------------------

    def answered(self, reply: Reply) -> None:
        """A non-streamed answer (already guarded by the worker): noted, and kept for the prompt log."""
        self.note(reply)
        if self.log_prompts:
            self.answer = reply.data

    def note(self, reply: Reply) -> None:
        """What the record keeps of any reply: the route it took, its usage, its error, the worker's output
        decisions (taken out of its headers)."""
        self.decisions.extend(decisions_from(reply.headers))
        self.route = reply.headers.get(HEADER_ROUTE) or self.route
        usage = reply.usage or (reply.data or {}).get("usage")  # a native answer's, in OpenAI's shape
        if isinstance(usage, dict):
            self.usage = usage
        if reply.type == "error":
            self.error, self.status = reply.data, reply.status

    def streamed(self, reply: Reply) -> None:
        """One stream reply on its way to the client: noted, the text of each of its chunks kept for the prompt
        log."""
        self.note(reply)
        chunks = reply.pieces()
        if chunks and self.first_chunk_ms is None:
            self.first_chunk_ms = (time.monotonic() - self.started) * 1000
        if reply.type == "chunk":  # `note` took the first chunk's usage; a later one's is the stream's
            for chunk in reply.chunks:
                if isinstance(chunk.get("usage"), dict):
                    self.usage = chunk["usage"]
        if self.log_prompts:
            for chunk in chunks:
                self._keep_text(chunk, reply.format)

    def _keep_text(self, chunk: dict[str, Any], format: str | None) -> None:
        if format == "anthropic":  # Anthropic's own stream events: the text is in its text deltas
            delta = chunk.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                self._text.setdefault(0, []).append(delta["text"])
            return
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                try:
                    index = int(choice.get("index") or 0)
                except (TypeError, ValueError):
                    index = 0
                self._text.setdefault(index, []).append(content)

    # ---- the end ------------------------------------------------------------------------------------

    def _count(self) -> None:
        if not self.counted:
            self.counted = True
            count(self.decisions)

    def record(self, request_id: str, key_id: str | None, model: str, kind: str, stream: bool) -> PromptRecord | None:
        """The request's record for `llm.prompts`, redacted; None when there is nothing to store."""
        self._count()
        if not (self.log_prompts or self.decisions):
            return None
        redactor = policy()
        answer = self.answer
        if answer is None and self.log_prompts and self._text:
            answer = {"choices": [{"index": i, "message": {"role": "assistant", "content": "".join(parts)}}
                                  for i, parts in sorted(self._text.items())]}
        route = self.route
        status = self.status
        timings = {"total_ms": round((time.monotonic() - self.started) * 1000, 3)}
        if self.first_chunk_ms is not None:
            timings["first_chunk_ms"] = round(self.first_chunk_ms, 3)
        return PromptRecord(
            request_id=request_id, logged=self.log_prompts, key_id=key_id, model=model, kind=kind, stream=stream,
            status=status, route=route, attempts=attempts_from_route(route),
            request=redactor.value(self.request) if self.log_prompts and self.request is not None else None,
            answer=redactor.value(answer) if self.log_prompts and answer is not None else None,
            error=redactor.value(self.error) if self.error is not None else None,
            timings=timings, usage=self.usage,
            guardrails=[d.as_dict() for d in self.decisions])

