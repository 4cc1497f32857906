"""Traces that follow a request through Kafka: W3C trace context in Kafka headers, one span per hop.

- Ingress honours a caller's `traceparent` (or starts a trace) and answers with `x-switchyard-trace-id`.
- Every message a hop produces for the request carries `traceparent` naming that hop's span, so the next
  hop's spans are its children: ingress receive -> (wait in llm.requests) router decision -> (wait in
  llm.provider.<p>) provider attempt -> (wait in llm.usage) accounting, and a failed attempt's retry goes
  back through the router as a child of that attempt.
- Spans are recorded and exported (OpenTelemetry SDK, OTLP/HTTP, batched off the request path) only when
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
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from switchyard.shared.topics import HEADER_TRACEPARENT

Headers = list[tuple[str, bytes]]
Attributes = Mapping[str, str | int | float | bool]

_tracer: trace.Tracer | None = None
"""The SDK tracer while exporting is on; None while it is off."""


def setup_tracing(service: str) -> bool:
    """Export this process's spans over OTLP/HTTP when an endpoint is configured; returns whether it is on."""
    global _tracer
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        _tracer = None
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from switchyard.shared.otlp import SpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or f"switchyard-{service}",
                                "service.namespace": "switchyard"})
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER (default: parent-based, on)
    provider.add_span_processor(BatchSpanProcessor(SpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("switchyard")
    return True


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Flush the spans not exported yet (at process exit)."""
    provider = trace.get_tracer_provider()
    if _tracer is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


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
    """One hop's span (None while tracing is off) and the trace context its messages carry downstream."""

    span: Any
    context: SpanContext | None

    @property
    def trace_id(self) -> str:
        return f"{self.context.trace_id:032x}" if self.context is not None else ""

    def headers(self) -> Headers | None:
        """Kafka headers for what this hop produces (None when there is no trace context to carry)."""
        return [(HEADER_TRACEPARENT, format_traceparent(self.context))] if self.context is not None else None

    def set(self, attributes: Attributes) -> None:
        if self.span is not None:
            self.span.set_attributes(attributes)

    def end(self, error: str | None = None, end_ns: int | None = None) -> None:
        if self.span is not None:
            if error is not None:
                self.span.set_status(Status(StatusCode.ERROR, error))
                self.span.set_attribute("error.type", error)
            self.span.end(end_time=end_ns)


def start(name: str, parent: SpanContext | None, kind: SpanKind = SpanKind.INTERNAL,
          attributes: Attributes | None = None, start_ns: int | None = None, new_trace: bool = False) -> Hop:
    """A span named `name`, child of `parent` (a new trace when there is none).

    While tracing is off no span exists: the hop carries `parent` on unchanged, or, with `new_trace` (ingress),
    a fresh trace id, so that the caller still gets a trace id to quote.
    """
    if _tracer is None:
        if parent is None and new_trace:
            parent = SpanContext(random.getrandbits(128) or 1, random.getrandbits(64) or 1, is_remote=False)
        return Hop(None, parent)
    ctx = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    span = _tracer.start_span(name, context=ctx, kind=kind, attributes=attributes, start_time=start_ns)
    return Hop(span, span.get_span_context())


def wait_in_topic(topic: str, parent: SpanContext | None, produced_ms: int,
                  attributes: Attributes | None = None) -> None:
    """A span for the time a message waited in `topic`: from its Kafka timestamp to now (tracing on only)."""
    if _tracer is None or parent is None:
        return
    attrs: dict[str, str | int | float | bool] = {"messaging.system": "kafka", "messaging.destination.name": topic,
                                                   "messaging.operation.type": "receive"}
    if attributes:
        attrs.update(attributes)
    now = time.time_ns()
    hop = start(f"wait {topic}", parent, SpanKind.CONSUMER, attrs, start_ns=min(now, produced_ms * 1_000_000))
    hop.end(end_ns=now)


def from_record(headers: Iterable[tuple[str, bytes]] | None) -> SpanContext | None:
    """The trace context a Kafka record carries."""
    return parse_traceparent(traceparent_header(headers))


_current: ContextVar[SpanContext | None] = ContextVar("switchyard_trace_context", default=None)
"""The trace context of the hop the running task works for: tasks started from it (acks, deliveries)
inherit it, so whatever they produce carries it without threading it through every call."""


def use(context: SpanContext | None) -> None:
    """Make `context` the running task's trace context (what `current_headers()` carries)."""
    _current.set(context)


_received: ContextVar[SpanContext | None] = ContextVar("switchyard_trace_received", default=None)


def receive(context: SpanContext | None) -> None:
    """The trace context of the message the running task handles: the parent of each span it starts for it
    (a worker's second call for one message is the sibling of its first, not its child)."""
    _received.set(context)
    _current.set(context)


def received() -> SpanContext | None:
    return _received.get()


def current() -> SpanContext | None:
    return _current.get()


def current_headers() -> Headers | None:
    """Kafka headers carrying the running task's trace context (None when it has none)."""
    context = _current.get()
    return [(HEADER_TRACEPARENT, format_traceparent(context))] if context is not None else None
