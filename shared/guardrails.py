"""Guardrails: the `guardrails:` config block, compiled once at config load, and how a rule meets a text.

A guardrail finds matches (built-in detectors, extra regular expressions) or checks an answer's JSON against a
schema, and then acts: `mask` replaces each match with a typed placeholder, `block` refuses with 400
`guardrail_violation` (the message names the guardrail, never the text), `log` records the decision. A
decision (`Decision`) holds the guardrail, action, stage, detector and position, never the matched text, so
it may go to topics, logs, the usage row and the metric freely.

Which guardrails apply to a request: every guardrail whose `models` globs match the model group (default
`["*"]`; `models: []` means "only where a key names it"), plus those the caller's virtual key names.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from switchyard.shared.detectors import DETECTORS, PATTERN_LABEL, Detector, digit_runs
from switchyard.shared.errors import GatewayError
from switchyard.shared.spans import Span, mask, non_overlapping

DetectorName = Literal["email", "phone", "credit_card", "iban", "ssn", "ip_address", "secret"]
Stage = Literal["input", "output", "both"]
Action = Literal["mask", "block", "log"]

DEFAULT_REDACT: tuple[DetectorName, ...] = ("email", "phone", "credit_card", "secret")
VIOLATION_CODE = "guardrail_violation"
SCHEMA_LABEL = "json_schema"
"""The `detector` of a decision taken by a schema guardrail."""
HEADER_DECISIONS = "x-switchyard-guardrails"
"""Reply header (on `llm.replies`) by which a worker hands its output decisions to ingress; never shown to clients."""
MAX_CARRIED = 200
"""Decisions one reply carries at most (a long answer full of matches keeps its reply small)."""

GUARDRAIL_ACTIONS = Counter("switchyard_guardrail_actions_total",
                            "Guardrail decisions, one per request and guardrail that acted (mask, block, log).",
                            ["guardrail", "action"])


class GuardrailSpec(BaseModel):
    """One entry of `guardrails:`; `patterns` and `json_schema` are compiled and checked when it is loaded."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    stage: Stage = "input"
    action: Action = "mask"
    detectors: list[DetectorName] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=lambda: ["*"])
    json_schema: dict[str, Any] | None = None
    _compiled: list[re.Pattern[str]] = PrivateAttr(default_factory=list)
    _validator: Any = PrivateAttr(default=None)

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"patterns[{i}] is not a valid regular expression: {e}") from None
        return value

    @model_validator(mode="after")
    def _compile(self) -> GuardrailSpec:
        if not (self.detectors or self.patterns or self.json_schema is not None):
            raise ValueError(f"guardrail {self.name!r} needs detectors, patterns or a json_schema")
        if self.json_schema is not None:
            if self.stage != "output" or self.action == "mask":
                raise ValueError(f"guardrail {self.name!r}: a json_schema checks answers (stage: output) and can "
                                 "block or log, not mask")
            import jsonschema

            cls = jsonschema.validators.validator_for(self.json_schema)
            try:
                cls.check_schema(self.json_schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"guardrail {self.name!r}: json_schema is not a valid JSON Schema: {e.message}") \
                    from None
            self._validator = cls(self.json_schema)
        self._compiled = [re.compile(p) for p in self.patterns]
        return self


class PromptLogging(BaseModel):
    """The `logging:` block: whether requests and answers are stored, what is redacted everywhere, for how long."""

    model_config = ConfigDict(extra="forbid")

    prompts: bool = False
    redact: list[DetectorName] = Field(default_factory=lambda: list(DEFAULT_REDACT))
    retention_days: float = Field(default=30, gt=0)


@dataclass(slots=True)
class Decision:
    """What a guardrail did, where: never the matched text. `path` names the field (`messages[0].content`).

    Not frozen: a dense prompt yields dozens per request, and a frozen dataclass costs several times as much
    to build (each field set through `object.__setattr__`); nothing changes one once taken."""

    guardrail: str
    action: Action
    stage: Literal["input", "output"]
    detector: str
    path: str
    start: int
    end: int

    def as_dict(self) -> dict[str, Any]:
        return {"guardrail": self.guardrail, "action": self.action, "stage": self.stage, "detector": self.detector,
                "path": self.path, "start": self.start, "end": self.end}


def decisions_header(decisions: list[Decision]) -> dict[str, str]:
    """The reply headers that carry `decisions` (the first MAX_CARRIED): `{}` when there are none."""
    if not decisions:
        return {}
    return {HEADER_DECISIONS: orjson.dumps([d.as_dict() for d in decisions[:MAX_CARRIED]]).decode()}


def decisions_from(headers: dict[str, str]) -> list[Decision]:
    """Take the decisions out of a reply's headers (removing the header, so it never reaches a client).
    Anything malformed is dropped: a reply is never refused for its decisions."""
    raw = headers.pop(HEADER_DECISIONS, None)
    if not raw:
        return []
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    found: list[Decision] = []
    for item in items[:MAX_CARRIED] if isinstance(items, list) else []:
        try:
            found.append(Decision(str(item["guardrail"]), item["action"], item["stage"], str(item["detector"]),
                                  str(item["path"]), int(item["start"]), int(item["end"])))
        except (KeyError, TypeError, ValueError):
            continue
    return [d for d in found if d.action in ("mask", "block", "log") and d.stage in ("input", "output")]


def violation(name: str, stage: str = "input") -> GatewayError:
    """The refusal of a `block`: names the guardrail, never what matched."""
    what = "answer" if stage == "output" else "request"
    return GatewayError(400, f"The {what} was blocked by the guardrail '{name}'.", code=VIOLATION_CODE)


class Guardrail:
    """A compiled guardrail: finds its matches in a text and checks an answer against its schema."""

    def __init__(self, spec: GuardrailSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.action: Action = spec.action
        self.detectors: list[Detector] = [DETECTORS[d] for d in spec.detectors]
        self.patterns = spec._compiled
        self.validator = spec._validator

    def on(self, stage: Literal["input", "output"]) -> bool:
        return self.spec.stage in (stage, "both")

    def models_match(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.spec.models)

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        runs = digit_runs(text) if self.detectors else None  # shared by the detectors that look at digits
        for detector in self.detectors:
            spans.extend(detector.find(text, runs))
        for pattern in self.patterns:
            spans.extend((m.start(), m.end(), PATTERN_LABEL) for m in pattern.finditer(text) if m.end() > m.start())
        return non_overlapping(spans) if spans else spans

    def schema_ok(self, text: str | None) -> bool:
        if self.validator is None:
            return True
        try:
            value = orjson.loads(text or "")
        except orjson.JSONDecodeError:
            return False
        return bool(self.validator.is_valid(value))


class Guardrails:
    """Every configured guardrail, compiled; answers which apply to a (model, key) pair, cached per pair."""

    def __init__(self, specs: list[GuardrailSpec]) -> None:
        self.by_name = {spec.name: Guardrail(spec) for spec in specs}
        self._cache: dict[tuple[str, tuple[str, ...]], list[Guardrail]] = {}

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def unknown(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.by_name]

    def select(self, model: str, key_names: list[str] | tuple[str, ...] = ()) -> list[Guardrail]:
        """The model's guardrails (by `models` glob), then the key's extra ones, each once, in config order."""
        cache_key = (model, tuple(key_names))
        found = self._cache.get(cache_key)
        if found is None:
            named = set(key_names)
            found = [g for g in self.by_name.values() if g.name in named or g.models_match(model)]
            if len(self._cache) < 10_000:
                self._cache[cache_key] = found
        return found


def scan_text(guardrails: list[Guardrail], text: str, stage: Literal["input", "output"], path: str,
              decisions: list[Decision]) -> str:
    """Apply `guardrails` to one text: raises the violation of the first `block` that matches, records every
    match as a decision, and returns the text with the matches of `mask` guardrails replaced."""
    masked: list[Span] = []
    maskers = 0
    for g in guardrails:
        spans = g.find(text)
        if not spans:
            continue
        if g.action == "block":
            decisions.append(Decision(g.name, "block", stage, spans[0][2], path, spans[0][0], spans[0][1]))
            raise violation(g.name, stage)
        name, action = g.name, g.action
        decisions.extend([Decision(name, action, stage, label, path, s, e) for s, e, label in spans])
        if action == "mask":
            masked.extend(spans)
            maskers += 1
    if not masked:
        return text
    return mask(text, masked if maskers == 1 else non_overlapping(masked))  # one guardrail's are sorted already


def request_texts(body: dict[str, Any]) -> list[tuple[str, dict[str, Any] | list[Any], str | int]]:
    """Where a chat or embeddings body carries text a provider will read: (path, container, key) triples."""
    found: list[tuple[str, dict[str, Any] | list[Any], str | int]] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                found.append((f"messages[{i}].content", message, "content"))
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        found.append((f"messages[{i}].content[{j}].text", part, "text"))
            for k, call in enumerate(message.get("tool_calls") or []):
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    found.append((f"messages[{i}].tool_calls[{k}].function.arguments", function, "arguments"))
    inputs = body.get("input")
    if isinstance(inputs, str):
        found.append(("input", body, "input"))
    elif isinstance(inputs, list):
        found.extend((f"input[{i}]", inputs, i) for i, item in enumerate(inputs) if isinstance(item, str))
    return found


def guard_request(guardrails: list[Guardrail], body: dict[str, Any],
                  decisions: list[Decision] | None = None) -> list[Decision]:
    """Apply the input guardrails to a request body in place (masking), or raise the violation of a block.
    Decisions are appended to `decisions` (when given) as they are taken, so a block's survive its raise."""
    active = [g for g in guardrails if g.on("input") and (g.detectors or g.patterns)]
    decisions = [] if decisions is None else decisions
    if not active:
        return decisions
    for path, container, key in request_texts(body):
        text = container[key]  # type: ignore[index]
        new = scan_text(active, text, "input", path, decisions)
        if new is not text:
            container[key] = new  # type: ignore[index]
    return decisions


def guard_answer(guardrails: list[Guardrail], data: dict[str, Any],
                 decisions: list[Decision] | None = None) -> list[Decision]:
    """Apply output guardrails to a non-streamed chat completion in place, or raise the violation of a block.
    Decisions are appended to `decisions` (when given) as they are taken, so a block's survive its raise."""
    decisions = [] if decisions is None else decisions
    active = [g for g in guardrails if g.on("output")]
    if not active:
        return decisions
    matchers = [g for g in active if g.detectors or g.patterns]
    for i, choice in enumerate(data.get("choices") or []):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        path = f"choices[{i}].message.content"
        if isinstance(content, str) and matchers:
            message["content"] = content = scan_text(matchers, content, "output", path, decisions)
        check_schemas(active, content if isinstance(content, str) else None, path, decisions)
    return decisions


def check_schemas(guardrails: list[Guardrail], text: str | None, path: str, decisions: list[Decision]) -> None:
    """Schema guardrails over a whole answer's text: a `block` raises its violation, a `log` is recorded."""
    for g in guardrails:
        if g.validator is not None and not g.schema_ok(text):
            decisions.append(Decision(g.name, g.action, "output", SCHEMA_LABEL, path, 0, len(text or "")))
            if g.action == "block":
                raise violation(g.name, "output")


def count(decisions: list[Decision]) -> None:
    """Count each (guardrail, action) once per request on `switchyard_guardrail_actions_total`."""
    for guardrail, action in {(d.guardrail, d.action) for d in decisions}:
        GUARDRAIL_ACTIONS.labels(guardrail=guardrail, action=action).inc()
