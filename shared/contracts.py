"""Message contracts carried on Kafka: one pydantic model per message kind, versioned by `v`.

A consumer that meets a newer `v` than it knows refuses the message loudly
instead of guessing; add fields with defaults to stay compatible.
"""

from __future__ import annotations

import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, field_validator, model_validator

CONTRACT_VERSION = 1
ENVELOPE_VERSION = 2
"""Version 2 of `RequestEnvelope` added `NativeRequest.lossy`. Only an envelope that sets it is written as 2 (every
other stays 1, readable by older routers and workers), so routers and workers upgrade before ingress: an older
router refuses a version-2 envelope instead of serving its OpenAI body without the part the translation lost."""

RequestKind = Literal["chat", "embeddings"]
Priority = Literal["interactive", "batch"]


def now_ms() -> int:
    return int(time.time() * 1000)


MAX_JSON_DEPTH = 64
"""The deepest nesting of objects and arrays a request body may have (the body object itself is level 1).

Every stage must be able to read what ingress accepts, and the tightest limit downstream is the JSON
parser of pydantic-core (jiter) that decodes envelopes in the router and the workers: it refuses more
than 200 levels, and a body sits one level down in its envelope. Serialising (orjson, pydantic-core)
stops at 255 levels. Translations add a level or two (an Anthropic `input_schema` becomes
`function.parameters`, provider adapters wrap messages), so 64 leaves a wide margin everywhere while
being far deeper than any real request (JSON Schemas of tools, structured output) needs.
"""


_CONTAINERS = (dict, list)


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` (parsed JSON) nests objects/arrays more than `limit` levels deep.

    Walks one level at a time, iteratively (no recursion limit of its own): each element of each
    container is looked at once at most (about 5 µs for a 2 KB chat body, about what orjson takes to
    parse it), and it returns as soon as the level past `limit` is not empty, without walking it.
    """
    if not isinstance(value, _CONTAINERS):
        return False
    level: list[Any] = [value]
    for _ in range(limit):
        below: list[Any] = []
        for node in level:
            for child in node.values() if isinstance(node, dict) else node:
                if isinstance(child, _CONTAINERS):
                    below.append(child)
        if not below:
            return False
        level = below
    return True


class AttemptRecord(BaseModel):
    """One failed attempt, carried in the envelope so any router replica can continue the request."""

    deployment: str
    status: int
    error_type: str
    message: str
    retry_after_s: float | None = None
    code: str | None = None
    param: str | None = None
    """The parameter the error names (a request the provider format cannot express): the caller is told."""
    latency_ms: float = 0.0
    """How long the failed provider call took (0 when no call was made): ingress counts it as provider time."""


NativeFormat = Literal["anthropic"]
"""Provider wire formats a caller can speak to Switchyard besides OpenAI's (`POST /v1/messages`)."""


class LossyPart(BaseModel):
    """The first part of a native request its OpenAI translation cannot express, as the caller is told of it."""

    param: str
    """The request parameter, e.g. `tools[0].type`."""
    message: str
    """What it is, e.g. "Tool type 'web_search_20250305' is Anthropic's own"."""


class NativeRequest(BaseModel):
    """The caller's request exactly as written in a provider's own format, next to its OpenAI translation.

    A worker whose provider speaks `format` sends `body` as it is (only `model` replaced by the
    deployment's), so nothing the translation cannot express (`thinking`, `top_k`, cache-control marks,
    fields newer than Switchyard) is lost; any other provider serves the envelope's OpenAI `body`.
    """

    format: NativeFormat
    body: dict[str, Any]
    headers: dict[str, str] = Field(default_factory=dict)
    """Provider request headers the caller set that shape the answer (`anthropic-beta`); never credentials."""
    lossy: LossyPart | None = None
    """Set when the OpenAI `body` leaves out part of the request (an Anthropic server tool, a web-search result
    block): then only a deployment of `format` may serve it, sent `body` here as written (ENVELOPE_VERSION 2)."""


class RequestEnvelope(BaseModel):
    """A request on its way to a provider: written by ingress or any batch producer to `llm.requests`.

    Batch producers fill `id`, `model`, `body`, `reply_topic` (and usually `custom_id`,
    `priority="batch"`, `deadline_ms`); everything else has a default.
    """

    v: int = CONTRACT_VERSION
    id: str
    kind: RequestKind = "chat"
    model: str
    body: dict[str, Any]
    stream: bool = False
    reply_topic: str
    reply_partition: int | None = None
    created_ms: int = Field(default_factory=now_ms)
    deadline_ms: int = Field(default_factory=lambda: now_ms() + 24 * 3600 * 1000)
    priority: Priority = "interactive"
    custom_id: str | None = None
    key_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    route_headers: dict[str, str] = Field(default_factory=dict)
    """Request headers that routing rules look at (only those the config names; never credentials)."""
    allowed_models: list[str] = Field(default_factory=list)
    """The model groups the caller's key may use (empty: any). The router never leaves them: not by a
    routing rule, a configured fallback, a request's `fallbacks` nor a context-window or policy switch."""
    guardrails: list[str] = Field(default_factory=list)
    """The extra guardrails the caller's key names: the worker applies their output stage on top of the model's."""
    native: NativeRequest | None = None
    """The caller's own provider-format request, for a deployment of that format to send unchanged."""
    # Set by the router.
    attempt: int = 0
    model_group: str | None = None
    deployment: str | None = None
    history: list[AttemptRecord] = Field(default_factory=list)
    not_before_ms: int = 0
    """A retry waits until then (backoff / Retry-After) before it is sent."""
    announce_start: bool = True
    """Whether the worker tells every router when the call begins (a `start` event on `llm.events`). Routers
    need it only to count a least-busy group's calls in flight and to see a half-open breaker's probe taken,
    so routing sets it for those calls alone; an envelope written before this field existed announces."""

    def expired(self, at_ms: int | None = None) -> bool:
        return (at_ms or now_ms()) >= self.deadline_ms

    @model_validator(mode="after")
    def _lossy_is_version_2(self) -> RequestEnvelope:
        """An envelope whose OpenAI body lost part of a native request says so in its version (ENVELOPE_VERSION)."""
        if self.native is not None and self.native.lossy is not None and self.v < ENVELOPE_VERSION:
            self.v = ENVELOPE_VERSION
        return self


ReplyType = Literal["response", "chunk", "end", "error", "part"]
REPLY_VERSION = 3
"""Version 2 of `Reply` added `chunks` (one message may carry several stream chunks) and `part` replies (a
response too large for one message, in pieces); version 3 lets a stream's `end` carry its last chunks in
`chunks`. An older reader would drop chunks, so readers (ingress, batch readers) upgrade before workers."""
OUT_OF_BAND = 1_000_000
"""`seq` of a terminal error sent by a router or by a worker before any chunk: it ends the request at once."""


class Reply(BaseModel):
    """One message on a reply topic.

    Non-streaming: a single `response` or `error`. Streaming: `chunk` messages with
    increasing `seq`, then exactly one `end` (or an `error`). Ingress and batch readers
    drop anything already seen for the same (id, seq), so redelivery is harmless.
    A response too large for one Kafka message comes in pieces: `part` messages (seq 0..n-1, each
    `data={"text": ...}`) and then the `response` itself with `parts=n`, `seq=n` and no data; the
    parts' texts joined in seq order are its data's JSON (shared/parts.py joins them).
    """

    v: int = REPLY_VERSION
    id: str
    attempt: int = 0
    seq: int = 0
    type: ReplyType
    status: int = 200
    data: dict[str, Any] | None = None
    chunks: list[dict[str, Any]] = Field(default_factory=list)
    """On a `chunk` message: the stream chunks that follow `data`, in order (chunks that arrived while the
    previous message was being acknowledged travel together). On an `end`: the stream's last chunks, which
    arrived after the last chunk message left."""
    headers: dict[str, str] = Field(default_factory=dict)
    custom_id: str | None = None
    parts: int = 0
    """On a `response` sent in pieces: how many `part` messages before it carry its data (shared/parts.py)."""
    call: str | None = None
    """The event id of the provider call that produced it: a stream whose call was redone after a crash
    cannot be continued by the new call's chunks (ingress ends it with an error instead)."""
    provider_ms: float | None = None
    """On a `response` or `end`: milliseconds spent in provider calls for this request, every attempt's
    (ingress subtracts it from its end-to-end time to measure the gateway's own overhead)."""
    format: NativeFormat | None = None
    """On a `response` or `chunk`: `data` is the provider's own answer or stream event in this format (the
    envelope's `native` request was sent), not OpenAI's; ingress relays it unchanged. On an `end`: so are
    its `chunks`."""
    usage: dict[str, Any] | None = None
    """On a `response` in a native `format`: its usage in OpenAI's shape (what limits and logs count)."""

    def pieces(self) -> list[dict[str, Any]]:
        """The stream chunks this message carries, in order: a `chunk` message's `data` then its `chunks`, an
        `end`'s `chunks` (its `data` is the stream's usage), none on any other message."""
        if self.type == "chunk":
            return [self.data, *self.chunks] if self.data is not None else self.chunks
        return self.chunks if self.type == "end" else []


ModelT = TypeVar("ModelT", bound=BaseModel)


def without_nul(value: Any) -> Any:
    """`value` with every NUL character removed from its strings (dict keys too), nested dicts and lists
    included: PostgreSQL stores no NUL in text or JSONB. Returns `value` itself when it holds none."""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value


def scrub_nul(model: ModelT) -> ModelT:
    """`model` with every NUL character removed from its string, dict and list fields (`without_nul`), in place.

    Run after validation (`model_validator(mode="after")`), so pydantic reads the JSON straight into the model;
    a NUL scrub before validation made it build every value as a Python object first (three times the cost of
    reading a usage event). A NUL in a field that only takes fixed values (a `kind`) fails validation instead.
    """
    fields = model.__dict__
    for name, value in fields.items():
        if type(value) is str:
            if "\x00" in value:
                fields[name] = value.replace("\x00", "")
        elif isinstance(value, (dict, list)):
            fields[name] = without_nul(value)
    return model


MAX_TOKENS = 2**31 - 1
"""The most tokens a Usage counts of each kind: far beyond any context window, so only a broken or hostile
provider reports more; clamping keeps the priced cost and the spend totals within what PostgreSQL stores."""


class Usage(BaseModel):
    """Token counts, each clamped to [0, MAX_TOKENS]."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @field_validator("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
    @classmethod
    def _bounded(cls, value: int) -> int:
        return min(max(value, 0), MAX_TOKENS)


IN_DOUBT = 0
"""UsageEvent.status of a call recorded before it was made; stays so if its worker died mid-call."""


class UsageEvent(BaseModel):
    """One provider call, published by a worker to `llm.usage`; accounting prices and stores it.

    `event_id` is unique per provider call, so a redelivered event is stored once and a
    call redone after a crash is stored as its own row. A worker publishes each call twice
    with the same `event_id`: with `status` 0 before calling (the write-ahead record: a call
    whose worker dies mid-call stays stored "in doubt") and with its outcome afterwards, which
    completes that row. `call_seq` counts the calls one delivery of an attempt made (a 429
    retried on another key is the next call); accounting marks `redelivered` on every call
    after the first for the same (request, attempt, call_seq): work redone after a crash.
    """

    v: int = CONTRACT_VERSION
    event_id: str
    request_id: str
    attempt: int
    ts_ms: int = Field(default_factory=now_ms)
    kind: RequestKind = "chat"
    provider: str
    deployment: str
    model_group: str
    provider_model: str
    key_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: Usage = Field(default_factory=Usage)
    call_seq: int = 0
    status: int = 200
    """The provider's status, or IN_DOUBT (0) in the record published before the call."""
    ok: bool = True
    stream: bool = False
    latency_ms: float = 0.0
    """The provider call's own time, start to end."""
    ttft_ms: float | None = None
    """Streams: from the start of the provider call to its first chunk."""
    total_ms: float | None = None
    """From ingress accepting the request (`created_ms`) to the end of this call: queues, earlier attempts and
    the call itself (records written before v1 carried timings have none)."""
    priority: Priority = "interactive"
    redelivered: bool = False
    """Set by accounting, never by workers: not the first call stored for this attempt."""
    cache_hit: bool = False
    """Answered from the response cache (by ingress, no provider call): stored at cost 0, with the cost the
    provider call that produced the entry would have had (`usage`, `provider`, `provider_model`) as saved."""

    @model_validator(mode="after")
    def _no_nul(self) -> UsageEvent:
        """Strings carry no NUL (accounting stores them as text and JSONB, which refuse it)."""
        return scrub_nul(self)


class AttemptEvent(BaseModel):
    """The outcome of one provider attempt on `llm.events`: every router derives health from these."""

    v: int = CONTRACT_VERSION
    request_id: str
    attempt: int
    ts_ms: int = Field(default_factory=now_ms)
    deployment: str
    provider: str
    model_group: str
    ok: bool
    status: int = 200
    error_type: str | None = None
    retry_after_s: float | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    phase: Literal["start", "end"] = "end"
    """`start` when a worker begins a call (least-busy routing), `end` with the outcome."""


class KeyEvent(BaseModel):
    """A virtual-key change that every ingress replica applies within seconds."""

    v: int = CONTRACT_VERSION
    key_id: str
    action: Literal["created", "revoked", "updated", "budget_exceeded", "budget_reset", "budget_alert"]
    ts_ms: int = Field(default_factory=now_ms)
    detail: dict[str, Any] = Field(default_factory=dict)


class CancelRequest(BaseModel):
    """Ingress's signal on `llm.cancel` that a request's client went away: a worker holding a provider call for
    it stops that call (and still publishes its usage, as a cancelled call). Best effort: a call that already
    finished, or that no worker holds yet, is not affected."""

    v: int = CONTRACT_VERSION
    request_id: str
    ts_ms: int = Field(default_factory=now_ms)
