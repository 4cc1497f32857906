"""What a worker tells operators about each provider call: Prometheus samples and the attempt's span.

The span is an OpenTelemetry GenAI client span (`gen_ai.operation.name`, `gen_ai.provider.name`,
`gen_ai.request.model`, `gen_ai.usage.*`), child of the router's decision that sent the call here; it
never holds prompt or completion text. Metric labels are config names only (provider, deployment,
model group), so their number is bounded by the config, not by traffic.
"""

from __future__ import annotations

from opentelemetry.trace import SpanKind

from services.workers.calls import CallFailed, CallResult
from shared import metrics, tracing
from shared.config import Deployment
from shared.contracts import RequestEnvelope
from shared.pricing import cost

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


def finish_attempt(hop: tracing.Hop, env: RequestEnvelope, dep: Deployment, result: CallResult | None,
                   failed: CallFailed | None) -> None:
    """Count the call (calls, duration, tokens, cost) and end its span."""
    status = failed.error.status if failed else 200
    latency_ms = result.latency_ms if result else failed.latency_ms if failed else 0.0
    kind = outcome(status)
    metrics.PROVIDER_CALLS.labels(dep.provider, dep.id, kind).inc()
    metrics.PROVIDER_DURATION.labels(dep.provider, dep.id).observe(latency_ms / 1000.0)
    if result is not None:
        model = env.model_group or env.model
        u = result.usage
        for token_type, n in (("input", u.prompt_tokens), ("output", u.completion_tokens),
                              ("cached", u.cached_tokens)):
            if n:
                metrics.TOKENS.labels(dep.provider, model, token_type).inc(n)
        usd, priced = cost(dep.provider, dep.model, u)
        if priced:
            metrics.COST.labels(dep.provider, model).inc(float(usd))
        operation = _OPERATIONS.get(env.kind, env.kind)
        for token_type, n in (("input", u.prompt_tokens), ("output", u.completion_tokens)):
            metrics.GEN_AI_CLIENT_TOKEN_USAGE.labels(operation, dep.provider, model, token_type).observe(n)
        hop.set({"gen_ai.usage.input_tokens": u.prompt_tokens, "gen_ai.usage.output_tokens": u.completion_tokens,
                 "http.response.status_code": status})
        if result.ttft_ms is not None:
            hop.set({"switchyard.ttft_ms": result.ttft_ms})
        hop.end()
        return
    hop.set({"http.response.status_code": status, "switchyard.chunks_sent": failed.chunks_sent if failed else 0})
    hop.end(error=failed.error.type if failed else "error")
