"""Guardrails on one request at ingress: the input pass, the answer pass, the stream window, the prompt record.

Input: `mask` rewrites the body before the envelope is built, so the provider, Kafka and every log see only
placeholders; `block` refuses with 400 `guardrail_violation` before anything is queued (no provider call).
Output, non-streamed: the answer is checked before it is returned. Output on streams: a sliding window of
STREAM_WINDOW characters of each choice's text is held back and rescanned as chunks arrive, so a match split
across chunks is still masked; the held text is released as soon as it is more than STREAM_WINDOW characters
behind the newest, and all of it when the choice finishes. The first token therefore waits for at most
STREAM_WINDOW characters of output (about 30 tokens) or the end of the answer, whichever comes first, and only
when an output guardrail applies. A `block` on a stream ends it with an error event (then `[DONE]`); a schema
guardrail checks the whole text when the stream ends. Matches longer than the window are caught only when
they fit in what is held at once.
"""

from __future__ import annotations

import os
import time
from typing import Any

from shared.contracts import Reply
from shared.detectors import mask, non_overlapping
from shared.errors import GatewayError
from shared.guardrails import (
    Decision,
    Guardrail,
    Guardrails,
    check_schemas,
    count,
    guard_answer,
    guard_request,
    violation,
)
from shared.prompt_log import PromptRecord, attempts_from_route
from shared.redaction import policy
from shared.topics import HEADER_ROUTE

STREAM_WINDOW = int(os.environ.get("SWITCHYARD_GUARDRAIL_STREAM_WINDOW", "128"))


def check_key_guardrails(guardrails: Guardrails, names: list[str] | None) -> None:
    """A key may name only guardrails of the config: 400 naming the unknown ones."""
    unknown = guardrails.unknown(names or [])
    if unknown:
        raise GatewayError(400, f"Unknown guardrails: {', '.join(sorted(unknown))[:500]}.", param="guardrails",
                           code="unknown_guardrail")


class RequestGuard:
    """The guardrails of one request, its decisions, and what its prompt-log record needs."""

    def __init__(self, rails: list[Guardrail], log_prompts: bool) -> None:
        self.output = [g for g in rails if g.on("output")]
        self.input = [g for g in rails if g.on("input")]
        self.matchers = [g for g in self.output if g.detectors or g.patterns]
        self.schemas = [g for g in self.output if g.validator is not None]
        self.decisions: list[Decision] = []
        self.log_prompts = log_prompts
        self.started = time.monotonic()
        self.first_chunk_ms: float | None = None
        self.request: dict[str, Any] | None = None
        self.answer: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self._held: dict[int, str] = {}
        self._released: dict[int, int] = {}
        self._text: dict[int, list[str]] = {}
        self._last_chunk: dict[str, Any] = {}
        self.counted = False
        self.route: str | None = None
        self.status = 200
        self.usage: dict[str, Any] | None = None

    # ---- input --------------------------------------------------------------------------------------

    def check_request(self, body: dict[str, Any]) -> None:
        try:
            self.decisions.extend(guard_request(self.input, body))
        except GatewayError as e:
            self.error, self.status = e.body(), e.status
            raise
        if self.log_prompts:
            self.request = body

    # ---- output, whole answers ----------------------------------------------------------------------

    def check_answer(self, reply: Reply) -> None:
        """A non-streamed answer: masked in place, or the block's violation raised."""
        self.note(reply)
        if self.output and reply.data is not None:
            try:
                self.decisions.extend(guard_answer(self.output, reply.data))
            except GatewayError as e:
                self.error, self.status = e.body(), e.status
                raise
        if self.log_prompts:
            self.answer = reply.data

    # ---- output, streams ----------------------------------------------------------------------------

    def note(self, reply: Reply) -> None:
        """What the record keeps of any reply: the route it took, its usage, its error."""
        self.route = reply.headers.get(HEADER_ROUTE) or self.route
        usage = (reply.data or {}).get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if reply.type == "error":
            self.error, self.status = reply.data, reply.status

    def stream(self, reply: Reply) -> Reply:
        """One stream reply as the client may see it: chunk text passed through the window, an error reply
        in place of a chunk or end that a guardrail blocks."""
        self.note(reply)
        if self.first_chunk_ms is None and reply.type == "chunk":
            self.first_chunk_ms = (time.monotonic() - self.started) * 1000
        if reply.type == "error":
            return reply
        try:
            if reply.type == "chunk" and reply.data is not None:
                return reply.model_copy(update={"data": self._chunk(reply.data)})
            if reply.type == "end":
                tail = self._flush_all()
                if tail is not None:  # text still held when the stream ended without a finish chunk
                    return reply.model_copy(update={"type": "chunk", "data": tail})
        except GatewayError as e:
            self.error, self.status = e.body(), e.status
            return Reply(id=reply.id, attempt=reply.attempt, seq=reply.seq, type="error", status=e.status,
                         data=e.body())
        return reply

    def end_check(self) -> GatewayError | None:
        """After the last chunk: the schema guardrails over each choice's whole text."""
        if not self.schemas:
            return None
        try:
            for index, parts in sorted(self._text.items()) or [(0, [])]:
                check_schemas(self.schemas, "".join(parts), f"choices[{index}].message.content", self.decisions)
        except GatewayError as e:
            self.error, self.status = e.body(), e.status
            return e
        return None

    def _chunk(self, data: dict[str, Any]) -> dict[str, Any]:
        self._last_chunk = data
        if not (self.matchers or self.schemas or self.log_prompts):
            return data
        choices = []
        for choice in data.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                choices.append(choice)
                continue
            index = int(choice.get("index") or 0)
            content = delta.get("content")
            if isinstance(content, str):
                self._held[index] = self._held.get(index, "") + content
            final = choice.get("finish_reason") is not None
            released = self._release(index, final)
            if isinstance(content, str) or released:
                choice = {**choice, "delta": {**delta, "content": released}}
            choices.append(choice)
        return {**data, "choices": choices}

    def _release(self, index: int, final: bool) -> str:
        """Scan what is held of one choice; release (masked) all of it when `final`, else what lies more than
        STREAM_WINDOW characters behind the newest text and before any match still open at the edge."""
        held = self._held.get(index, "")
        if not held:
            return ""
        if not self.matchers:
            cut = len(held)
            spans: list[tuple[int, int, str]] = []
        else:
            offset = self._released.get(index, 0)
            found: list[Decision] = []
            spans = []
            for g in self.matchers:
                for start, end, label in g.find(held):
                    if g.action == "block":
                        self.decisions.append(Decision(g.name, "block", "output", label,
                                                       f"choices[{index}].message.content", offset + start,
                                                       offset + end))
                        raise violation(g.name, "output")
                    found.append(Decision(g.name, g.action, "output", label, f"choices[{index}].message.content",
                                          offset + start, offset + end))
                    if g.action == "mask":
                        spans.append((start, end, label))
            cut = len(held) if final else max(0, len(held) - STREAM_WINDOW)
            for start, end, _ in spans:
                if start < cut < end:
                    cut = start
            for d in found:
                if d.end - offset <= cut:
                    self.decisions.append(d)
        spans = non_overlapping([s for s in spans if s[1] <= cut])
        out = mask(held[:cut], spans)
        self._held[index] = held[cut:]
        self._released[index] = self._released.get(index, 0) + cut
        if self.schemas or self.log_prompts:
            self._text.setdefault(index, []).append(out)
        return out

    def _flush_all(self) -> dict[str, Any] | None:
        choices = []
        for index, held in list(self._held.items()):
            if held:
                choices.append({"index": index, "delta": {"content": self._release(index, True)},
                                "finish_reason": None})
        if not choices:
            return None
        return {**{k: v for k, v in self._last_chunk.items() if k != "choices"}, "choices": choices}

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

