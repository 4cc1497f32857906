"""The direct OTLP span encoder writes exactly what the OpenTelemetry exporter's own encoder writes.

A collector must not be able to tell which encoder sent a batch: every batch is compared byte for byte, and
decoded, against `opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans`.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from switchyard.shared.otlp import encode_spans


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def recorder(service: str) -> tuple[Any, Keep]:
    kept = Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "switchyard"}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    return provider.get_tracer("switchyard", schema_url="https://opentelemetry.io/schemas/1.26.0"), kept


def assert_same_bytes(spans: list[ReadableSpan]) -> None:
    ours = encode_spans(spans)
    theirs = library_encode_spans(spans)
    assert ExportTraceServiceRequest.FromString(ours) == theirs
    assert ours == theirs.SerializePartialToString()


scalars = st.one_of(
    st.text(max_size=40), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
span_shapes = st.fixed_dictionaries({
    "name": st.text(max_size=30),
    "kind": st.sampled_from(list(SpanKind)),
    "attributes": st.dictionaries(st.text(min_size=1, max_size=20), scalars, max_size=8),
    "parent": st.one_of(st.none(), st.tuples(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.booleans())),
    "status": st.one_of(st.none(), st.sampled_from([StatusCode.OK, StatusCode.ERROR])),
    "description": st.text(max_size=20),
})


@settings(max_examples=200, deadline=None)
@given(st.lists(span_shapes, min_size=1, max_size=12))
def test_any_batch_of_switchyard_shaped_spans_encodes_as_the_library_does(shapes: list[dict[str, Any]]) -> None:
    tracer, kept = recorder("switchyard-test")
    for shape in shapes:
        context = None
        if shape["parent"] is not None:
            trace_id, span_id, remote = shape["parent"]
            context = set_span_in_context(NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=remote)))
        span = tracer.start_span(shape["name"], context=context, kind=shape["kind"], attributes=shape["attributes"])
        if shape["status"] is not None:
            span.set_status(Status(shape["status"], shape["description"] if shape["status"] == StatusCode.ERROR
                                   else None))
        span.end()
    assert_same_bytes(kept.spans)


def test_spans_of_two_processes_are_grouped_by_resource() -> None:
    ingress, kept_ingress = recorder("switchyard-ingress")
    router, kept_router = recorder("switchyard-router")
    for tracer in (ingress, router, ingress):
        tracer.start_span("hop", attributes={"messaging.destination.name": "llm.requests"}).end()
    mixed = [kept_ingress.spans[0], kept_router.spans[0], kept_ingress.spans[1]]
    assert_same_bytes(mixed)
    decoded = ExportTraceServiceRequest.FromString(encode_spans(mixed))
    assert [len(group.scope_spans[0].spans) for group in decoded.resource_spans] == [2, 1]


def test_a_trace_state_is_written() -> None:
    tracer, kept = recorder("switchyard-test")
    parent = SpanContext(7, 9, is_remote=True, trace_flags=TraceFlags(1),
                         trace_state=TraceState([("vendor", "abc"), ("other", "1")]))
    tracer.start_span("child", context=set_span_in_context(NonRecordingSpan(parent))).end()
    assert_same_bytes(kept.spans)
    span = ExportTraceServiceRequest.FromString(encode_spans(kept.spans)).resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_state == "vendor=abc,other=1"


def test_what_the_direct_encoder_does_not_cover_is_left_to_the_library() -> None:
    tracer, kept = recorder("switchyard-test")
    span = tracer.start_span("with an event", attributes={"tags": ("a", "b"), "n": 1})
    span.add_event("retry", {"attempt": 2})
    span.end()
    tracer.start_span("plain", attributes={"n": 2}).end()
    assert_same_bytes(kept.spans)
    decoded = ExportTraceServiceRequest.FromString(encode_spans(kept.spans)).resource_spans[0].scope_spans[0]
    assert decoded.spans[0].events[0].name == "retry"
    assert [value.string_value for value in decoded.spans[0].attributes[0].value.array_value.values] == ["a", "b"]
