"""One trace per request through Kafka, received by a real OTLP/HTTP endpoint: spans from all four services,
parented hop by hop (across a failover too), GenAI attributes on provider attempts, no prompt text."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import free_port
from tests.stack import RunningStack, start_stack, warm_up

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]
    error: bool


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint (protobuf, POST /v1/traces), as a collector would serve it."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.take(body)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes}
                    spans.append(Span(resource.get("service.name", ""), s.name, s.trace_id.hex(), s.span_id.hex(),
                                      s.parent_span_id.hex(), attributes, s.status.code == 2))
        with self.lock:
            self.raw.append(body)
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait(self, trace_id: str, done: Any, timeout_s: float = 60.0) -> list[Span]:
        deadline = time.time() + timeout_s
        while not done(spans := self.trace(trace_id)):
            if time.time() > deadline:
                pytest.fail(f"trace {trace_id} incomplete: {[(s.service, s.name) for s in spans]}")
            time.sleep(0.2)
        return spans

    def stop(self) -> None:
        self.server.shutdown()


@dataclass
class Traced:
    stack: RunningStack
    receiver: OtlpReceiver
    primary: FakeOpenAI
    secondary: FakeOpenAI


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    receiver = OtlpReceiver()
    primary, secondary = FakeOpenAI().start(), FakeOpenAI().start()
    config = f"""
models:
  - name: failover
    deployments:
      - {{provider: openai, model: gpt-4o-mini, api_base: "{primary.url}/v1", api_key: sk-primary}}
      - {{provider: openai, model: gpt-4o-mini, api_base: "{secondary.url}/v1", api_key: sk-secondary}}
"""
    cwd: Path = tmp_path_factory.mktemp("traced")
    stack = start_stack(cwd, config, extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                                                "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        warm_up(stack, "failover")
        primary.reset()
        secondary.reset()
        yield Traced(stack, receiver, primary, secondary)
    finally:
        stack.stop()
        primary.stop()
        secondary.stop()
        receiver.stop()


def services(spans: list[Span]) -> set[str]:
    return {s.service for s in spans}


FIRST_ATTEMPT = {"switchyard-ingress", "switchyard-worker-openai", "switchyard-accounting"}
"""The services a request answered at its first attempt crosses: ingress routes it straight to the worker."""
ALL_FOUR = {*FIRST_ATTEMPT, "switchyard-router"}
"""With a failover: the failed attempt goes back to a router."""


def complete(attempts: int) -> Any:
    """A trace is complete once the last attempt's usage outcome is accounted and the reply's wait is in."""
    def check(spans: list[Span]) -> bool:
        accounted = [s for s in spans if s.name == "account usage"]
        return (services(spans) >= (ALL_FOUR if attempts > 1 else FIRST_ATTEMPT) and len(accounted) >= attempts
                and any(s.name == "wait llm.replies" for s in spans))
    return check


def one(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.service, s.name) for s in spans])
    return found[0]


def test_a_request_is_one_trace_across_the_services_it_crosses(traced: Traced) -> None:
    secret_prompt = f"my-secret-prompt-{time.time()}"
    r = httpx.post(f"{traced.stack.url}/v1/chat/completions", headers={
        **traced.stack.headers(), "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}, timeout=60,
        json={"model": "failover", "messages": [{"role": "user", "content": secret_prompt}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-switchyard-trace-id"] == CALLER_TRACE
    spans = traced.receiver.wait(CALLER_TRACE, complete(1))
    by_id = {s.span_id: s for s in spans}

    ingress = one(spans, service="switchyard-ingress", name="POST /v1/chat/completions")
    assert ingress.parent == CALLER_SPAN
    assert ingress.attributes["http.response.status_code"] == 200
    route = one(spans, service="switchyard-ingress", name="route")  # ingress routes the first attempt
    assert route.parent == ingress.span_id
    assert route.attributes["switchyard.deployment"] == "failover/0"
    attempt = one(spans, service="switchyard-worker-openai", name="chat gpt-4o-mini")
    assert attempt.parent == route.span_id
    assert attempt.attributes["gen_ai.operation.name"] == "chat"
    assert attempt.attributes["gen_ai.provider.name"] == "openai"
    assert attempt.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attempt.attributes["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert attempt.attributes["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    accounted = one(spans, name="account usage")  # the call's outcome; its write-ahead record is not traced
    assert accounted.parent == attempt.span_id
    assert accounted.attributes["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    # Each wait in a topic hangs under the hop that produced into it.
    assert by_id[one(spans, name="wait llm.provider.openai").parent] is route
    assert not [s for s in spans if s.name == "wait llm.requests"], "the first attempt never waits for a router"
    assert one(spans, name="wait llm.replies").parent == attempt.span_id
    assert all(s.parent in by_id for s in spans if s is not ingress), "every span's parent is in the trace"
    # Neither the prompt nor the answer ever reach the exporter.
    with traced.receiver.lock:
        exported = b"".join(traced.receiver.raw)
    assert secret_prompt.encode() not in exported
    assert b"sk-primary" not in exported


def test_a_failover_stays_one_trace_with_an_attempt_per_deployment(traced: Traced) -> None:
    traced.primary.inject(status=503, times=1)
    r = httpx.post(f"{traced.stack.url}/v1/chat/completions", headers=traced.stack.headers(), timeout=60,
                   json={"model": "failover", "messages": [{"role": "user", "content": "fail over"}]})
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-switchyard-trace-id"]
    assert len(trace_id) == 32 and trace_id != CALLER_TRACE
    spans = traced.receiver.wait(trace_id, complete(2))
    ingress = one(spans, service="switchyard-ingress", name="POST /v1/chat/completions")
    assert ingress.parent == ""  # a new trace: the gateway's span is its root
    routes = sorted((s for s in spans if s.name == "route"), key=lambda s: s.attributes["switchyard.attempt"])
    attempts = sorted((s for s in spans if s.name == "chat gpt-4o-mini"),
                      key=lambda s: s.attributes["switchyard.attempt"])
    assert [s.attributes["switchyard.deployment"] for s in attempts] == ["failover/0", "failover/1"]
    assert [s.error for s in attempts] == [True, False]
    assert attempts[0].attributes["http.response.status_code"] == 503
    # ingress -> route (in ingress) -> failed attempt -> route again (in a router) -> the attempt that answered
    assert [s.service for s in routes] == ["switchyard-ingress", "switchyard-router"]
    assert routes[0].parent == ingress.span_id
    assert attempts[0].parent == routes[0].span_id
    assert routes[1].parent == attempts[0].span_id
    assert attempts[1].parent == routes[1].span_id
    assert one(spans, name="wait llm.replies").parent == attempts[1].span_id


def test_without_an_exporter_the_trace_id_still_comes_back(stack: RunningStack) -> None:
    """Tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT): nothing is recorded, but a caller's trace id is honoured and
    a request without one gets a fresh id to quote; a malformed traceparent starts a new trace."""
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60, headers={
        **stack.headers(), "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert r.status_code == 200
    assert r.headers["x-switchyard-trace-id"] == CALLER_TRACE
    ids = set()
    for traceparent in (None, "00-" + "0" * 32 + "-" + CALLER_SPAN + "-01", "ff-garbage", "00-" + "z" * 32 + "-x-01"):
        headers = {**stack.headers(), **({"traceparent": traceparent} if traceparent else {})}
        r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200
        ids.add(r.headers["x-switchyard-trace-id"])
    assert len(ids) == 4 and all(len(i) == 32 and int(i, 16) for i in ids)
