"""OTLP/HTTP span export: span records, a direct protobuf encoder, and a thread that sends them in batches.

Why not the SDK's spans: in place, an SDK span cost about 90 µs to start, end and hand to its
BatchSpanProcessor on a loaded 2-core machine (a live span with locks, bounded attributes, a read-only copy at
its end), and a request has eight; a `SpanRecord` costs about 5 µs. The records are encoded straight into the
OTLP `ExportTraceServiceRequest` bytes: tests/test_otlp.py checks, byte for byte, that they are exactly what the
library's encoder writes for the same spans as SDK `ReadableSpan`s, so no collector can tell the difference.

What stays the library's: the resource (`Resource.create`, so OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
apply), the sampler for anything but the default (tracing.py), and the transport: `OTLPSpanExporter`'s HTTP
client, configured by the standard OTEL_EXPORTER_OTLP_* variables (endpoint, headers, TLS, compression, timeouts,
retries). Batching follows the BatchSpanProcessor's OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE and
OTEL_BSP_MAX_EXPORT_BATCH_SIZE, with the same defaults.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanContext

from switchyard.shared import metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger("switchyard.otlp")

Scalar = str | int | float | bool

_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack

_KINDS = tuple(b"\x30" + bytes((kind + 1,)) for kind in range(5))
"""The Span.kind field for each SpanKind value: INTERNAL (0) is SPAN_KIND_INTERNAL (1), and so on."""
_FLAGS_LOCAL_PARENT = b"\x85\x01" + _pack_fixed32(0x100)  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE
_FLAGS_REMOTE_PARENT = b"\x85\x01" + _pack_fixed32(0x300)  # ... and SPAN_FLAGS_CONTEXT_IS_REMOTE
_STATUS_UNSET = b"\x7a\x00"
_STATUS_ERROR = 2


@dataclass(slots=True)
class SpanRecord:
    """One finished (once `end_ns` is set) span: what the OTLP Span message holds for Switchyard's spans.

    Its trace state is its parent's, as a child span's is in OpenTelemetry; its status is unset or, with
    `error`, ERROR with that description.
    """

    name: str
    trace_id: int
    span_id: int
    parent: SpanContext | None
    kind: int
    start_ns: int
    end_ns: int = 0
    attributes: dict[str, Scalar] = field(default_factory=dict)
    error: str | None = None


def _varint(value: int) -> bytes:
    value &= 0xFFFF_FFFF_FFFF_FFFF  # negative int64: ten bytes of two's complement, as protobuf writes it
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = tuple(bytes((value,)) for value in range(0x80))
"""The one-byte varints: most lengths here are under 128."""


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (`tag` is the field number shifted, with wire type 2, as one byte)."""
    size = len(payload)
    return tag + (_SMALL[size] if size < 0x80 else _varint(size)) + payload


def _string(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode("utf-8", "replace"))


def _any_value(value: Scalar) -> bytes:
    """An AnyValue (oneof: written even when it holds the default)."""
    if isinstance(value, str):
        return _string(b"\x0a", value)
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    return b"\x21" + _pack_double(value)


_KEPT_PER_KEY = 64
_KEPT_KEYS = 1024
_encoded_values: dict[str, dict[Any, bytes]] = {}
"""Encoded KeyValue fields, by key, then by value (integers by type and value, so that True and 1 stay apart;
floats are not kept: 0.0 and -0.0 are equal keys with different bytes). Most attributes repeat across requests
(topics, models, routes, status codes) and cost one lookup. A key whose values outgrow `_KEPT_PER_KEY` (request
ids) is not cached further: its values are encoded each time, and the values kept for it keep their place.
Past `_KEPT_KEYS` keys, new keys are not cached at all."""
_encoded_keys: dict[str, bytes] = {}
"""Each key's own field, for values encoded each time."""


def _attribute(key: str, value: Any) -> bytes:
    """One KeyValue field; nothing for a value that is not a scalar (the SDK drops those too)."""
    if isinstance(value, str):
        by_value: Any = value
    elif isinstance(value, int):
        by_value = (type(value), value)
    elif isinstance(value, float):
        return _field(b"\x4a", _string(b"\x0a", key) + _field(b"\x12", _any_value(value)))
    else:
        return b""
    kept = _encoded_values.get(key)
    if kept is not None:
        encoded = kept.get(by_value)
        if encoded is not None:
            return encoded
    elif len(_encoded_values) < _KEPT_KEYS:
        kept = _encoded_values[key] = {}
    key_field = _encoded_keys.get(key)
    if key_field is None:
        key_field = _string(b"\x0a", key)
        if len(_encoded_keys) < _KEPT_KEYS:
            _encoded_keys[key] = key_field
    encoded = _field(b"\x4a", key_field + _field(b"\x12", _any_value(value)))
    if kept is not None and len(kept) < _KEPT_PER_KEY:
        kept[by_value] = encoded
    return encoded


_names: dict[str, bytes] = {}
"""Encoded span names: a few per service (hop names, one per model)."""


def _span(record: SpanRecord) -> bytes:
    """One Span message."""
    parent = record.parent
    parts = [b"\x0a\x10", record.trace_id.to_bytes(16, "big"), b"\x12\x08", record.span_id.to_bytes(8, "big")]
    if parent is not None:
        if parent.trace_state:
            parts.append(_string(b"\x1a", ",".join(f"{key}={value}" for key, value in parent.trace_state.items())))
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    if record.name:
        name = _names.get(record.name)
        if name is None:
            name = _string(b"\x2a", record.name)
            if len(_names) < _KEPT_KEYS:
                _names[record.name] = name
        parts.append(name)
    parts.append(_KINDS[record.kind])
    if record.start_ns:
        parts += (b"\x39", _pack_fixed64(record.start_ns))
    if record.end_ns:
        parts += (b"\x41", _pack_fixed64(record.end_ns))
    parts += map(_attribute, record.attributes.keys(), record.attributes.values())
    if record.error is None:
        parts.append(_STATUS_UNSET)
    else:
        parts.append(_field(b"\x7a", (_string(b"\x12", record.error) if record.error else b"") + b"\x18\x02"))
    parts.append(_FLAGS_REMOTE_PARENT if parent is not None and parent.is_remote else _FLAGS_LOCAL_PARENT)
    return b"".join(parts)


def encode_span(record: SpanRecord) -> bytes:
    """One finished span as a ScopeSpans `spans` field: what `export_request` joins into a request."""
    return _field(b"\x12", _span(record))


def export_request(spans: Sequence[bytes], resource: Resource, scope: InstrumentationScope) -> bytes:
    """The serialized `ExportTraceServiceRequest` for spans that `encode_span` wrote, of one resource and scope."""
    from opentelemetry.exporter.otlp.proto.common._internal import _encode_instrumentation_scope, _encode_resource

    scope_spans = [_field(b"\x0a", _encode_instrumentation_scope(scope).SerializePartialToString()), *spans]
    if scope.schema_url:
        scope_spans.append(_string(b"\x1a", scope.schema_url))
    resource_spans = [_field(b"\x0a", _encode_resource(resource).SerializePartialToString()),
                      _field(b"\x12", b"".join(scope_spans))]
    if resource.schema_url:
        resource_spans.append(_string(b"\x1a", resource.schema_url))
    return _field(b"\x0a", b"".join(resource_spans))


def encode_spans(records: Sequence[SpanRecord], resource: Resource, scope: InstrumentationScope) -> bytes:
    """The serialized `ExportTraceServiceRequest` for `records`, all of one resource and one scope."""
    return export_request([encode_span(record) for record in records], resource, scope)


class Sender:
    """The library's OTLP/HTTP exporter, sending encoded spans as one process's resource.

    The exporter (and with it protobuf and an HTTP client) is imported only here, when tracing is turned on.
    """

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        self._exporter = OTLPSpanExporter()
        self.resource = resource
        self.scope = scope

    def send(self, spans: Sequence[bytes]) -> bool:
        return bool(self._exporter._client.export(export_request(spans, self.resource, self.scope)).success)

    def shutdown(self) -> None:
        self._exporter.shutdown()  # type: ignore[no-untyped-call]  # the library leaves it unannotated


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


class SpanBatcher:
    """Finished spans, encoded (`encode_span`), wait here; a daemon thread sends them in batches, off the request path.

    Spans are encoded when they end, on the thread that ends them: the sending thread only joins bytes and sends
    them, so it never holds the GIL for milliseconds to encode a batch while the event loop waits for it.

    It wakes every OTEL_BSP_SCHEDULE_DELAY ms (default 5,000), or as soon as OTEL_BSP_MAX_EXPORT_BATCH_SIZE spans
    (512) are waiting, and sends all that wait, a batch at a time. Past OTEL_BSP_MAX_QUEUE_SIZE waiting spans
    (2,048: a collector that is down or slow) new spans are dropped and counted in
    `switchyard_spans_dropped_total`, so tracing never holds more memory than that. A failed send is logged and not
    retried beyond what the exporter itself retries.
    """

    def __init__(self, send: Callable[[list[bytes]], bool], close: Callable[[], None] | None = None) -> None:
        self._send = send
        self._close = close
        self._queue: deque[bytes] = deque()
        self._max_queue = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self._batch = min(_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self._max_queue)
        self._delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)
        self._thread.start()

    def add(self, span: bytes) -> None:
        queue = self._queue
        if self._stopping or len(queue) >= self._max_queue:
            metrics.SPANS_DROPPED.inc()
            return
        queue.append(span)
        if len(queue) == self._batch:
            self._wake.set()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Send what waits, stop the thread, then `close` what sends (the exporter)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._close is not None:
            self._close()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch = [queue.popleft() for _ in range(min(len(queue), self._batch))]
            try:
                if not self._send(batch):
                    log.warning("could not export spans", extra={"spans": len(batch)})
            except Exception:  # noqa: BLE001 - a collector's failure must never stop the sending thread
                log.exception("could not export spans")
