"""The prompt log: the record ingress publishes to `llm.prompts` when a request ends.

A record is redacted before it is published (the policy of shared/redaction.py, on top of what `mask`
guardrails replaced), so neither the topic nor PostgreSQL ever holds what the policy names. `request` and
`answer` are set only when prompt logging is on for the request (key `log_prompts`, else the model group's,
else `logging.prompts`); a record without them still carries the guardrail decisions, which accounting
writes onto the request's usage rows. The table is `prompt_log` in shared/db.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from switchyard.shared.contracts import CONTRACT_VERSION, now_ms, scrub_nul


class PromptRecord(BaseModel):
    """One finished request on `llm.prompts` (already redacted). `logged`: store it in the prompt log."""

    v: int = CONTRACT_VERSION
    request_id: str
    ts_ms: int = Field(default_factory=now_ms)
    logged: bool = False
    key_id: str | None = None
    model: str
    kind: str = "chat"
    stream: bool = False
    status: int = 200
    route: str | None = None
    attempts: int = 1
    request: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    """`total_ms` (ingress saw the request to its last byte) and, on streams, `first_chunk_ms`."""
    usage: dict[str, Any] | None = None
    guardrails: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _no_nul(self) -> PromptRecord:
        """Strings carry no NUL, prompts and answers included (PostgreSQL's text and JSONB refuse it; a
        NUL in a prompt is no character a reader of the log needs)."""
        return scrub_nul(self)


def attempts_from_route(route: str | None) -> int:
    """`x-switchyard-route: group=…; deployment=…; attempt=N` → N + 1 attempts (1 when absent)."""
    for part in (route or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "attempt" and value.isdigit():
            return int(value) + 1
    return 1
