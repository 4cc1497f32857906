"""What a worker tells operators about each provider call: Prometheus samples and the attempt's span.

The span is an OpenTelemetry GenAI client span (`gen_ai.operation.name`, `gen_ai.provider.name`,
`gen_ai.request.model`, `gen_ai.usage.*`), child of the router's decision that sent the call here; it
never holds prompt or completion text. Metric labels are config names only (provider, deployment,
model group), so their number is bounded by the config, not by traffic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanKind

from switchyard.services.workers.calls import CallFailed, CallResult
from switchyard.shared import metrics, tracing
from switchyard.shared.config_schema import Deployment
from switchyard.shared.contracts import RequestEnvelope
from switchyard.shared.pricing import cost

_OPERATIONS = {"chat": "chat", "embeddings": "embeddings"}


def outcome(status: int) -> str:
    """A bounded name for a call's outcome: `ok`, `rate_limited`, `timeout`, `client_error`, `server_error`."""
    if status < 400:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status in (408, 504):
        return "timeout"
    return "client_error" if status < 500 else "server_error"


def start_attempt(env: RequestEnvelope, dep: Deployment) -> tracing.Hop:
    """The attempt's span, made the task's trace context: what the call produces carries it downstream."""
    operation = _OPERATIONS.get(env.kind, env.kind)
    hop = tracing.start(f"{operation} {dep.model}", tracing.received(), SpanKind.CLIENT, {
        "gen_ai.operation.name": operation, "gen_ai.provider.name": dep.provider,
        "gen_ai.request.model": dep.model, "switchyard.model_group": env.model_group or env.model,
        "switchyard.deployment": dep.id, "switchyard.attempt": env.attempt, "switchyard.request_id": env.id,
    }) if tracing.enabled() else tracing.Hop(None, tracing.received())
    tracing.use(hop.context)
    return hop


@dataclass(frozen=True, slots=True)
class _Series:
    """The labelled series one (deployment, model group, operation) records into, bound once: `labels()` costs
    more than the update itself, and a worker sees few distinct combinations (all from its config)."""

    duration: Any
    input_tokens: Any
    output_tokens: Any
    cached_tokens: Any
    cost: Any
    gen_ai_input: Any
    gen_ai_output: Any


@functools.lru_cache(maxsize=4096)
def _series(provider: str, deployment: str, model: str, operation: str) -> _Series:
    return _Series(
        metrics.PROVIDER_DURATION.labels(provider, deployment),
        metrics.TOKENS.labels(provider, model, "input"), metrics.TOKENS.labels(provider, model, "output"),
        metrics.TOKENS.labels(provider, model, "cached"), metrics.COST.labels(provider, model),
        metrics.GEN_AI_CLIENT_TOKEN_USAGE.labels(operation, provider, model, "input"),
        metrics.GEN_AI_CLIENT_TOKEN_USAGE.labels(operation, provider, model, "output"))


@functools.lru_cache(maxsize=4096)
def _calls(provider: str, deployment: str, kind: str) -> Any:
    return metrics.PROVIDER_CALLS.labels(provider, deployment, kind)


def finish_attempt(hop: tracing.Hop, env: RequestEnvelope, dep: Deployment, result: CallResult | None,
                   failed: CallFailed | None) -> None:
    """Count the call (calls, duration, tokens, cost) and end its span."""
    status = failed.error.status if failed else 200
    latency_ms = result.latency_ms if result else failed.latency_ms if failed else 0.0
    operation = _OPERATIONS.get(env.kind, env.kind)
    series = _series(dep.provider, dep.id, env.model_group or env.model, operation)
    _calls(dep.provider, dep.id, outcome(status)).inc()
    series.duration.observe(latency_ms / 1000.0)
    if result is not None:
        u = result.usage
        if u.prompt_tokens:
            series.input_tokens.inc(u.prompt_tokens)
        if u.completion_tokens:
            series.output_tokens.inc(u.completion_tokens)
        if u.cached_tokens:
            series.cached_tokens.inc(u.cached_tokens)
        usd, priced = cost(dep.provider, dep.model, u)
        if priced:
            series.cost.inc(float(usd))
        series.gen_ai_input.observe(u.prompt_tokens)
        series.gen_ai_output.observe(u.completion_tokens)
        hop.set({"gen_ai.usage.input_tokens": u.prompt_tokens, "gen_ai.usage.output_tokens": u.completion_tokens,
                 "http.response.status_code": status})
        if result.ttft_ms is not None:
            hop.set({"switchyard.ttft_ms": result.ttft_ms})
        hop.end()
        return
    hop.set({"http.response.status_code": status, "switchyard.chunks_sent": failed.chunks_sent if failed else 0})
    hop.end(error=failed.error.type if failed else "error")
