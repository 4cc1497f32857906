"""Ingress metrics and the request's root span, as one pure ASGI middleware.

For every API request it:
- honours the caller's W3C `traceparent` (or starts a trace), opens the `ingress receive` server span whose
  context the envelope carries into Kafka, and answers with `x-switchyard-trace-id`;
- counts it (`switchyard_requests_total{route, model, status_code}`) and times it end to end, to the last byte
  of the answer (`switchyard_request_duration_seconds`, `gen_ai_server_request_duration`), the gateway's own
  part of that time (`switchyard_overhead_duration_seconds`: end to end minus the provider calls' time, which
  the final reply reports) and, for streams, the time to the first chunk (`switchyard_time_to_first_token_seconds`).

Labels are bounded: `route` is the route template (`other` for paths no route matches), `model` is set by the
request handler only after the model was found in the config (`other` before that). Probes and scrapes
(/health, /ready, /metrics) are not counted. The work per request is a few dict lookups and histogram adds.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanKind

from switchyard.shared import metrics, topics, tracing

_NOT_COUNTED = frozenset({"/health", "/ready", "/metrics"})
_TRACEPARENT = topics.HEADER_TRACEPARENT.encode()
_TRACE_ID = topics.HEADER_TRACE_ID.encode()
_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/messages": "chat",
               "/v1/embeddings": "embeddings"}


@dataclass(frozen=True, slots=True)
class _Series:
    """The labelled series of one (route, model, status), bound once (`labels()` costs more than an update)."""

    requests: Any
    duration: Any
    gen_ai_duration: Any


@functools.lru_cache(maxsize=4096)
def _series(route: str, model: str, status: int, operation: str | None) -> _Series:
    """Bounded: routes are templates, models configured groups or `other`, statuses HTTP codes."""
    error = str(status) if status >= 400 else ""
    return _Series(
        metrics.REQUESTS.labels(route, model, str(status)), metrics.REQUEST_DURATION.labels(route, model),
        metrics.GEN_AI_SERVER_REQUEST_DURATION.labels(operation, model, error) if operation else None)


@functools.lru_cache(maxsize=1024)
def _overhead(route: str) -> Any:
    return metrics.OVERHEAD_DURATION.labels(route)


@functools.lru_cache(maxsize=1024)
def _ttft(model: str, operation: str | None) -> tuple[Any, Any]:
    gen_ai = metrics.GEN_AI_SERVER_TIME_TO_FIRST_TOKEN.labels(operation, model) if operation else None
    return metrics.TIME_TO_FIRST_TOKEN.labels(model), gen_ai


class ObservabilityMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _NOT_COUNTED:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        parent = None
        for name, value in scope["headers"]:
            if name == _TRACEPARENT:
                parent = tracing.parse_traceparent(value)
                break
        hop = tracing.start("ingress receive", parent, SpanKind.SERVER, new_trace=True)
        state = scope.setdefault("state", {})
        state["trace"] = hop
        status = 500
        trace_id = hop.trace_id.encode()

        async def send_with_trace(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_TRACE_ID, trace_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace)
        finally:
            self._observe(scope, state, hop, status, time.perf_counter() - started, started)

    @staticmethod
    def _observe(scope: Any, state: dict[str, Any], hop: tracing.Hop, status: int, elapsed: float,
                 started: float) -> None:
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None) or metrics.OTHER
        model = state.get("model") or metrics.OTHER
        operation = _OPERATIONS.get(route)
        series = _series(route, model, status, operation)
        series.requests.inc()
        series.duration.observe(elapsed)
        if series.gen_ai_duration is not None:
            series.gen_ai_duration.observe(elapsed)
        call = state.get("call")
        if call is not None:
            if call.provider_ms is not None:
                _overhead(route).observe(max(0.0, elapsed - call.provider_ms / 1000.0))
            if call.first_chunk_at is not None:
                ttft = call.first_chunk_at - started
                ours, gen_ai = _ttft(model, operation)
                ours.observe(ttft)
                if gen_ai is not None:
                    gen_ai.observe(ttft)
        if hop.span is not None:
            hop.rename(f"{scope['method']} {route}")
            hop.set({"http.request.method": scope["method"], "http.route": route, "http.response.status_code": status,
                     "gen_ai.request.model": model, "switchyard.request_id": state.get("request_id") or ""})
            if operation is not None:
                hop.set({"gen_ai.operation.name": operation})
            hop.end(error=str(status) if status >= 500 else None)
