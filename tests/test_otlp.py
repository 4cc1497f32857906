"""Switchyard's span records are exported exactly as the OpenTelemetry SDK would export the same spans.

A collector must not be able to tell: every batch the direct encoder writes is compared byte for byte, and
decoded, against the library's encoder (`opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans`)
given the same spans as SDK `ReadableSpan`s. The batching thread is checked against its OTEL_BSP_* settings.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from switchyard.shared import metrics
from switchyard.shared.otlp import SpanBatcher, SpanRecord, encode_spans

RESOURCE = Resource.create({"service.name": "switchyard-test", "service.namespace": "switchyard"})
SCOPE = InstrumentationScope("switchyard")


def as_sdk_span(record: SpanRecord) -> ReadableSpan:
    """The SDK span with the same content: a child shares its parent's trace state, as in OpenTelemetry."""
    trace_state = record.parent.trace_state if record.parent is not None else None
    status = Status(StatusCode.ERROR, record.error or None) if record.error is not None else Status(StatusCode.UNSET)
    return ReadableSpan(
        name=record.name,
        context=SpanContext(record.trace_id, record.span_id, False, TraceFlags(TraceFlags.SAMPLED), trace_state),
        parent=record.parent, resource=RESOURCE, attributes=record.attributes, kind=SpanKind(record.kind),
        status=status, start_time=record.start_ns, end_time=record.end_ns, instrumentation_scope=SCOPE)


def assert_same_bytes(records: list[SpanRecord]) -> None:
    ours = encode_spans(records, RESOURCE, SCOPE)
    theirs = library_encode_spans([as_sdk_span(record) for record in records])
    assert ExportTraceServiceRequest.FromString(ours) == theirs
    assert ours == theirs.SerializePartialToString()


scalars = st.one_of(
    st.text(max_size=40), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
parents = st.one_of(st.none(), st.builds(
    lambda trace_id, span_id, remote, state: SpanContext(trace_id, span_id, remote, TraceFlags(1),
                                                         TraceState(state) if state else None),
    st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.booleans(),
    st.lists(st.tuples(st.sampled_from(["vendor", "rojo", "congo"]), st.text("abc123", min_size=1, max_size=8)),
             max_size=2, unique_by=lambda pair: pair[0])))
records = st.builds(
    SpanRecord,
    name=st.text(max_size=30),
    trace_id=st.integers(1, 2**128 - 1),
    span_id=st.integers(1, 2**64 - 1),
    parent=parents,
    kind=st.sampled_from([kind.value for kind in SpanKind]),
    start_ns=st.integers(1, 2**63),
    end_ns=st.integers(1, 2**63),
    attributes=st.dictionaries(st.text(min_size=1, max_size=20), scalars, max_size=8),
    error=st.one_of(st.none(), st.text(max_size=20)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(records, min_size=1, max_size=6))
def test_any_batch_of_spans_encodes_as_the_library_encodes_it(batch: list[SpanRecord]) -> None:
    assert_same_bytes(batch)


def test_a_request_shaped_trace_decodes_to_its_spans() -> None:
    caller = SpanContext(7, 9, True, TraceFlags(1), TraceState([("vendor", "abc")]))
    receive = SpanRecord("POST /v1/chat/completions", 7, 11, caller, SpanKind.SERVER.value, 1_000, 5_000,
                         {"http.route": "/v1/chat/completions", "gen_ai.request.model": "gpt-test"})
    local = SpanContext(7, 11, False, TraceFlags(1))
    wait = SpanRecord("wait llm.requests", 7, 12, local, SpanKind.CONSUMER.value, 1_500, 1_700,
                      {"messaging.system": "kafka"}, error="timeout")
    assert_same_bytes([receive, wait])
    scope = ExportTraceServiceRequest.FromString(encode_spans([receive, wait], RESOURCE, SCOPE)) \
        .resource_spans[0].scope_spans[0]
    assert scope.scope.name == "switchyard"
    first, second = scope.spans
    assert first.parent_span_id == (9).to_bytes(8, "big") and first.trace_state == "vendor=abc"
    assert second.parent_span_id == (11).to_bytes(8, "big") and second.status.code == 2
    assert second.status.message == "timeout"


def test_values_that_are_not_scalars_are_left_out_as_the_sdk_drops_them() -> None:
    record = SpanRecord("hop", 1, 2, None, 0, 1, 2, {"kept": 1, "none": None, "list": [1, 2]})  # type: ignore[dict-item]
    span = ExportTraceServiceRequest.FromString(encode_spans([record], RESOURCE, SCOPE)) \
        .resource_spans[0].scope_spans[0].spans[0]
    assert [attribute.key for attribute in span.attributes] == ["kept"]


class Collector:
    """Receives what the batcher sends. `fail` makes the next send raise, as a broken exporter would; `gate`
    holds a send until it is set, as a slow collector would."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.arrived = threading.Event()
        self.sending = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def send(self, batch: list[bytes]) -> bool:
        self.sending.set()
        self.gate.wait(30)
        if self.fail:
            self.fail = False
            raise ConnectionError("collector down")
        self.batches.append([span.decode() for span in batch])
        self.arrived.set()
        return True


def span(name: str) -> bytes:
    """An encoded span, as the batcher sees one (its bytes are opaque to it): here, its name."""
    return name.encode()


def test_a_full_batch_is_sent_at_once_in_batches_of_the_configured_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # only a full batch can wake the thread
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "3")
    collector = Collector()
    batcher = SpanBatcher(collector.send)
    for i in range(3):
        batcher.add(span(f"s{i}"))
    assert collector.arrived.wait(30)
    assert collector.batches == [["s0", "s1", "s2"]]
    batcher.add(span("s3"))
    batcher.shutdown()  # what waits is sent on shutdown
    assert collector.batches == [["s0", "s1", "s2"], ["s3"]]


def test_a_failed_send_is_logged_and_the_next_batch_still_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    collector = Collector()
    collector.fail = True
    batcher = SpanBatcher(collector.send)
    batcher.add(span("lost0"))
    batcher.add(span("lost1"))
    batcher.add(span("s0"))
    batcher.add(span("s1"))
    batcher.shutdown()
    assert collector.batches[-1] == ["s0", "s1"] and ["lost0", "lost1"] not in collector.batches


def dropped_spans() -> float:
    """switchyard_spans_dropped_total as this process's /metrics serves it."""
    for line in metrics.render().decode().splitlines():
        if line.startswith("switchyard_spans_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("switchyard_spans_dropped_total is not served")


def test_while_the_collector_is_slow_spans_past_the_queue_bound_are_dropped_and_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    collector = Collector()
    collector.gate.clear()
    batcher = SpanBatcher(collector.send)
    dropped = dropped_spans()
    batcher.add(span("a"))
    batcher.add(span("b"))
    assert collector.sending.wait(30)  # the thread holds [a, b] and waits on the collector
    for name in "cdefgh":
        batcher.add(span(name))
    assert dropped_spans() == dropped + 2
    collector.gate.set()
    batcher.shutdown()
    assert collector.batches == [["a", "b"], ["c", "d"], ["e", "f"]]


def test_shutdown_sends_what_waits_then_closes_the_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    collector = Collector()
    sent_before_close: list[list[list[str]]] = []
    batcher = SpanBatcher(collector.send, close=lambda: sent_before_close.append(list(collector.batches)))
    batcher.add(span("last"))
    batcher.shutdown()
    assert sent_before_close == [[["last"]]]


def test_spans_ended_after_shutdown_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    collector = Collector()
    batcher = SpanBatcher(collector.send)
    batcher.shutdown()
    dropped = dropped_spans()
    batcher.add(span("late"))
    assert collector.batches == [] and dropped_spans() == dropped + 1


def test_a_sampler_set_by_environment_is_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    from switchyard.shared import tracing

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert tracing.setup_tracing("test")
    try:
        hop = tracing.start("receive", None, new_trace=True)
        assert hop.span is None and hop.context is not None and not hop.context.trace_flags.sampled
        assert hop.headers() is not None  # the (unsampled) context still travels
    finally:
        tracing.shutdown()
    assert not tracing.enabled()
