"""Output guardrails in the worker: an answer is masked, logged or blocked before it is produced to Kafka.

The worker is where a provider's answer first exists, so it is the only place the output stage can run and
keep the rule that nothing unmasked reaches a topic (`llm.replies` included), a log or a span.

Which apply: the guardrails of the requested model group (by `models` glob, from the config the worker loads)
plus those the caller's key names (`RequestEnvelope.guardrails`, set by ingress), each once.

Non-streamed answers are masked in place, or the block's violation is raised (the worker answers 400
`guardrail_violation` instead). On streams a sliding window of STREAM_WINDOW characters of each choice's text
is held back and rescanned as chunks arrive, so a match split across chunks is still masked; held text is
released as soon as it is more than STREAM_WINDOW characters behind the newest, and all of it when the choice
finishes. The first token therefore waits for at most STREAM_WINDOW characters of output (about 30 tokens) or
the end of the answer, whichever comes first, and only when an output guardrail applies. A `block` on a
stream ends it with an error reply; a schema guardrail checks each choice's whole text when the stream ends.
A match longer than the window is caught only when it fits in what is held at once.

Decisions (never the matched text) go back to ingress on the final reply's headers (`decisions_header`), so
ingress counts them and puts them on the prompt log and the usage row as it does for the input stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from switchyard.services.workers.calls import ChunkSink
from switchyard.shared.contracts import RequestEnvelope
from switchyard.shared.errors import GatewayError
from switchyard.shared.guardrails import (
    Decision,
    Guardrail,
    Guardrails,
    check_schemas,
    decisions_header,
    guard_answer,
    violation,
)
from switchyard.shared.spans import Span, mask, non_overlapping

STREAM_WINDOW = int(os.environ.get("SWITCHYARD_GUARDRAIL_STREAM_WINDOW", "128"))


class OutputGuard:
    """The output guardrails of one provider call, its decisions, and what a stream still holds back.

    With no output guardrail it changes nothing and holds nothing (`active` is False)."""

    def __init__(self, rails: list[Guardrail]) -> None:
        self.output = [g for g in rails if g.on("output")]
        self.matchers = [g for g in self.output if g.detectors or g.patterns]
        self.schemas = [g for g in self.output if g.validator is not None]
        self.active = bool(self.output)
        self.decisions: list[Decision] = []
        self.blocked: GatewayError | None = None
        """Set once a block ended the stream: the chunks that follow are dropped."""
        self._held: dict[int, str] = {}
        self._released: dict[int, int] = {}
        self._text: dict[int, list[str]] = {}
        self._last_chunk: dict[str, Any] = {}

    @classmethod
    def of(cls, guardrails: Guardrails, env: RequestEnvelope) -> OutputGuard:
        return cls(guardrails.select(env.model, env.guardrails) if guardrails else [])

    def headers(self) -> dict[str, str]:
        """The reply headers carrying this call's decisions to ingress."""
        return decisions_header(self.decisions)

    # ---- whole answers ------------------------------------------------------------------------------

    def answer(self, data: dict[str, Any] | None) -> None:
        """A non-streamed chat answer: masked in place, or the violation of a block raised."""
        if self.active and data is not None and "choices" in data:
            guard_answer(self.output, data, self.decisions)

    # ---- streams ------------------------------------------------------------------------------------

    def guarded(self, sink: ChunkSink, on_block: Callable[[GatewayError], None]) -> ChunkSink:
        """`sink` behind the window: each chunk leaves with only the text that is safe to show. A block calls
        `on_block` with the violation once and drops every chunk after it (the provider call goes on, so its
        usage is still counted)."""
        if not self.active:
            return sink

        async def add(chunk: dict[str, Any]) -> None:
            if self.blocked is not None:
                return
            try:
                shown = self._chunk(chunk)
            except GatewayError as e:
                self.blocked = e
                on_block(e)
                return
            await sink(shown)

        return add

    def close(self) -> dict[str, Any] | None:
        """The stream ended: a chunk with the text still held (None when nothing is), after the schema
        guardrails checked each choice's whole text. A block raises its violation (nothing held is shown)."""
        if not self.active or self.blocked is not None:
            return None
        tail = self._flush_all()
        for index, parts in sorted(self._text.items()) or [(0, [])]:
            check_schemas(self.schemas, "".join(parts), f"choices[{index}].message.content", self.decisions)
        return tail

    def _chunk(self, data: dict[str, Any]) -> dict[str, Any]:
        self._last_chunk = data
        choices = []
        for choice in data.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                choices.append(choice)
                continue
            index = _index(choice)
            content = delta.get("content")
            if isinstance(content, str):
                self._held[index] = self._held.get(index, "") + content
            released = self._release(index, choice.get("finish_reason") is not None)
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
        offset = self._released.get(index, 0)
        path = f"choices[{index}].message.content"
        found: list[Decision] = []
        spans: list[Span] = []
        for g in self.matchers:
            for start, end, label in g.find(held):
                decision = Decision(g.name, g.action, "output", label, path, offset + start, offset + end)
                if g.action == "block":
                    self.decisions.append(decision)
                    raise violation(g.name, "output")
                found.append(decision)
                if g.action == "mask":
                    spans.append((start, end, label))
        cut = len(held) if final else max(0, len(held) - STREAM_WINDOW)
        for start, end, _ in spans:
            if start < cut < end:
                cut = start
        self.decisions.extend(d for d in found if d.end - offset <= cut)  # the rest is found again later
        out = mask(held[:cut], non_overlapping([s for s in spans if s[1] <= cut]))
        self._held[index] = held[cut:]
        self._released[index] = offset + cut
        if self.schemas:
            self._text.setdefault(index, []).append(out)
        return out

    def _flush_all(self) -> dict[str, Any] | None:
        choices = [{"index": index, "delta": {"content": self._release(index, True)}, "finish_reason": None}
                   for index, held in list(self._held.items()) if held]
        if not choices:
            return None
        return {**{k: v for k, v in self._last_chunk.items() if k != "choices"}, "choices": choices}


def _index(choice: dict[str, Any]) -> int:
    try:
        return int(choice.get("index") or 0)
    except (TypeError, ValueError):
        return 0
