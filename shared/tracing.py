"""Traces that follow a request through Kafka: W3C trace context in Kafka headers, one span per hop.

- Ingress honours a caller's `traceparent` (or starts a trace) and answers with `x-switchyard-trace-id`.
- Every message a hop produces for the request carries `traceparent` naming that hop's span, so the next
  hop's spans are its children: ingress receive -> (wait in llm.requests) router decision -> (wait in
  llm.provider.<p>) provider attempt -> (wait in llm.usage) accounting, and a failed attempt's retry goes
  back through the router as a child of that attempt.
- Spans are recorded and exported (OTLP/HTTP through the OpenTelemetry exporter, batched off the request path
  by otlp.py, which says why spans are records and not SDK spans) only when
  OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set. Otherwise nothing is
  recorded: hops only forward the trace context they received, which costs a header and no span.
- Spans carry names, ids, models, deployments, token counts and status codes; never prompt or completion
  text, never keys.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from switchyard.shared.otlp import SpanBatcher, SpanRecord, encode_span
from switchyard.shared.topics import HEADER_TRACEPARENT

Headers = list[tuple[str, bytes]]
Attributes = Mapping[str, str | int | float | bool]

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)

_batcher: SpanBatcher | None = None
"""Where finished spans go while exporting is on; None while it is off."""
_sampler: Any = None
"""The SDK sampler OTEL_TRACES_SAMPLER names; None for the default, parent-based always-on, decided inline."""


def setup_tracing(service: str) -> bool:
    """Export this process's spans over OTLP/HTTP when an endpoint is configured; returns whether it is on."""
    global _batcher, _sampler
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        _batcher = None
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.sampling import _get_from_env_or_default
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from switchyard.shared.otlp import Sender

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or f"switchyard-{service}",
                                "service.namespace": "switchyard"})
    sender = Sender(resource, InstrumentationScope("switchyard"))
    chosen = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    _sampler = None if chosen in ("", "parentbased_always_on") else _get_from_env_or_default()
    _batcher = SpanBatcher(sender.send, close=sender.shutdown)
    return True


def enabled() -> bool:
    return _batcher is not None


def shutdown() -> None:
    """Send the spans not exported yet and close the exporter (at process exit); tracing is off after it."""
    global _batcher
    if _batcher is not None:
        _batcher.shutdown()
    _batcher = None


def parse_traceparent(value: bytes | str | None) -> SpanContext | None:
    """A valid W3C `traceparent` (version 00 layout) as a remote span context; anything else is None."""
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    parts = text.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        version, trace_id, span_id, flags = int(parts[0], 16), int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if version == 0xFF or trace_id == 0 or span_id == 0 or (version == 0 and len(parts) != 4):
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0x01))


def format_traceparent(ctx: SpanContext) -> bytes:
    return b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, int(ctx.trace_flags))


def traceparent_header(headers: Iterable[tuple[str, bytes]] | None) -> bytes | None:
    """The `traceparent` among a Kafka record's headers."""
    for key, value in headers or ():
        if key == HEADER_TRACEPARENT:
            return value
    return None


@dataclass(slots=True)
class Hop:
    """One hop's span (None while tracing is off or the trace is not sampled) and the trace context its messages
    carry downstream."""

    span: SpanRecord | None
    context: SpanContext | None

    @property
    def trace_id(self) -> str:
        return f"{self.context.trace_id:032x}" if self.context is not None else ""

    def headers(self) -> Headers | None:
        """Kafka headers for what this hop produces (None when there is no trace context to carry)."""
        return [(HEADER_TRACEPARENT, format_traceparent(self.context))] if self.context is not None else None

    def rename(self, name: str) -> None:
        if self.span is not None:
            self.span.name = name

    def set(self, attributes: Attributes) -> None:
        if self.span is not None:
            self.span.attributes.update(attributes)

    def end(self, error: str | None = None, end_ns: int | None = None) -> None:
        """Finish the span (once: a second end changes nothing) with status ERROR and `error.type` on error."""
        span = self.span
        if span is None or span.end_ns or _batcher is None:
            return
        if error is not None:
            span.error = error
            span.attributes["error.type"] = error
        span.end_ns = end_ns or time.time_ns()
        _batcher.add(encode_span(span))


def _sampled(name: str, parent: SpanContext | None, trace_id: int, kind: SpanKind,
             attributes: Attributes | None) -> bool:
    """The sampling decision: the default follows the parent (a new trace is sampled); any other sampler set by
    OTEL_TRACES_SAMPLER is the SDK's own, asked as the SDK would ask it."""
    if _sampler is None:
        return parent is None or parent.trace_flags.sampled
    context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    return bool(_sampler.should_sample(context, trace_id, name, kind, attributes).decision.is_sampled())


def start(name: str, parent: SpanContext | None, kind: SpanKind = SpanKind.INTERNAL,
          attributes: Attributes | None = None, start_ns: int | None = None, new_trace: bool = False) -> Hop:
    """A span named `name`, child of `parent` (a new trace when there is none).

    While tracing is off no span exists: the hop carries `parent` on unchanged, or, with `new_trace` (ingress),
    a fresh trace id, so that the caller still gets a trace id to quote.
    """
    if _batcher is None:
        if parent is None and new_trace:
            parent = SpanContext(random.getrandbits(128) or 1, random.getrandbits(64) or 1, is_remote=False)
        return Hop(None, parent)
    trace_id = parent.trace_id if parent is not None else random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    trace_state = parent.trace_state if parent is not None else None
    if not _sampled(name, parent, trace_id, kind, attributes):
        return Hop(None, SpanContext(trace_id, span_id, False, _NOT_SAMPLED, trace_state))
    record = SpanRecord(name, trace_id, span_id, parent, kind.value, start_ns or time.time_ns(),
                        attributes=dict(attributes) if attributes else {})
    return Hop(record, SpanContext(trace_id, span_id, False, _SAMPLED, trace_state))


def wait_in_topic(topic: str, parent: SpanContext | None, produced_ms: int,
                  attributes: Attributes | None = None) -> None:
    """A span for the time a message waited in `topic`: from its Kafka timestamp to now (tracing on only)."""
    if _batcher is None or parent is None:
        return
    name = f"wait {topic}"
    attrs: dict[str, str | int | float | bool] = {"messaging.system": "kafka", "messaging.destination.name": topic,
                                                   "messaging.operation.type": "receive"}
    if attributes:
        attrs.update(attributes)
    if not _sampled(name, parent, parent.trace_id, SpanKind.CONSUMER, attrs):
        return
    now = time.time_ns()
    _batcher.add(encode_span(SpanRecord(name, parent.trace_id, random.getrandbits(64) or 1, parent,
                                        SpanKind.CONSUMER.value, min(now, produced_ms * 1_000_000), now, attrs)))


def from_record(headers: Iterable[tuple[str, bytes]] | None) -> SpanContext | None:
    """The trace context a Kafka record carries."""
    return parse_traceparent(traceparent_header(headers))


_current: ContextVar[tuple[SpanContext, bytes] | None] = ContextVar("switchyard_trace_context", default=None)
"""The trace context of the hop the running task works for, with its `traceparent` already formatted (a call
produces several messages under one context): tasks started from it (acks, deliveries) inherit it, so whatever
they produce carries it without threading it through every call."""


def _with_header(context: SpanContext | None) -> tuple[SpanContext, bytes] | None:
    return (context, format_traceparent(context)) if context is not None else None


def use(context: SpanContext | None) -> None:
    """Make `context` the running task's trace context (what `current_headers()` carries)."""
    _current.set(_with_header(context))


_received: ContextVar[SpanContext | None] = ContextVar("switchyard_trace_received", default=None)


def receive(context: SpanContext | None) -> None:
    """The trace context of the message the running task handles: the parent of each span it starts for it
    (a worker's second call for one message is the sibling of its first, not its child)."""
    _received.set(context)
    _current.set(_with_header(context))


def received() -> SpanContext | None:
    return _received.get()


def current() -> SpanContext | None:
    current = _current.get()
    return current[0] if current is not None else None


def current_headers() -> Headers | None:
    """Kafka headers carrying the running task's trace context (None when it has none)."""
    current = _current.get()
    return [(HEADER_TRACEPARENT, current[1])] if current is not None else None
