"""Every Prometheus metric Switchyard exports, defined once; `render()` is what `GET /metrics` serves.

Every service imports this module, so every service's `/metrics` lists every family (those a service never
records have no samples there). Labels are bounded on purpose: routes are route templates, models are
configured model groups (anything else is `other`), deployments and providers come from the config;
never a key, a user or a request id.

Recording costs one dict lookup and an add per sample (prometheus-client); gauges that describe state
(breakers, pacing queues) are computed at scrape time by hooks (`on_scrape`), not on the request path.

Processes forked by a multi-process server (several uvicorn workers) set PROMETHEUS_MULTIPROC_DIR, and
`render()` then merges every process's samples from that folder (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series: half the text of a scrape, and nothing reads them

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Buckets in seconds: LLM calls run from tens of milliseconds (embeddings, cache) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)

OTHER = "other"
"""The label value of anything outside a bounded set (an unknown model, a path no route matches)."""

# ---- ingress: what callers see --------------------------------------------------------------------------

REQUESTS = Counter("switchyard_requests_total", "Requests answered by ingress.", ["route", "model", "status_code"])
REQUEST_DURATION = Histogram("switchyard_request_duration_seconds",
                             "End-to-end time at ingress, from the request to the last byte of the answer.",
                             ["route", "model"], buckets=LATENCY_BUCKETS)
OVERHEAD_DURATION = Histogram("switchyard_overhead_duration_seconds",
                              "What the gateway adds: end-to-end time at ingress minus the provider call's time.",
                              ["route"], buckets=OVERHEAD_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("switchyard_time_to_first_token_seconds",
                                "Streams: from the request reaching ingress to its first chunk going out.",
                                ["model"], buckets=LATENCY_BUCKETS)
AUTH_FAILURES = Counter("switchyard_auth_failures_total",
                        "Failed authentications at ingress (a key was offered and refused), by error code; "
                        "throttled callers (429 too_many_auth_failures) are not counted again.", ["code"])

# ---- workers: provider calls ----------------------------------------------------------------------------

PROVIDER_CALLS = Counter("switchyard_provider_calls_total",
                         "Provider calls by outcome (ok, or the error type: rate_limit, server_error, timeout...).",
                         ["provider", "deployment", "outcome"])
PROVIDER_DURATION = Histogram("switchyard_provider_duration_seconds", "Time of one provider call, start to end.",
                              ["provider", "deployment"], buckets=LATENCY_BUCKETS)
TOKENS = Counter("switchyard_tokens_total", "Tokens the providers reported, by type (input, output, cached).",
                 ["provider", "model", "type"])
COST = Counter("switchyard_cost_usd_total", "Cost of the provider calls in USD, from the pricing catalogue.",
               ["provider", "model"])
PACING_QUEUE_DEPTH = Gauge("switchyard_pacing_queue_depth",
                           "Requests waiting in this worker for room under a deployment's rate limits.",
                           ["deployment"])

# ---- router ---------------------------------------------------------------------------------------------

DEPLOYMENT_STATE = Gauge("switchyard_deployment_state",
                         "Circuit breaker of a deployment as this router sees it: 0 closed, 1 half-open, 2 open.",
                         ["deployment"])
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}

CACHE_REQUESTS = Counter("switchyard_cache_requests_total",
                         "Response cache lookups by result (hit, semantic-hit, miss, bypass).", ["result"])

# ---- every service --------------------------------------------------------------------------------------

CONSUMER_LAG = Gauge("switchyard_consumer_lag",
                     "Messages in a topic this process's consumer has not read yet (end offset minus position), "
                     "summed over the partitions it owns; sum by group and topic over every replica.",
                     ["group", "topic"])

SPANS_DROPPED = Counter("switchyard_spans_dropped_total",
                        "Finished trace spans dropped unsent: OTEL_BSP_MAX_QUEUE_SIZE spans were already waiting "
                        "for a collector that is down or slow, or the process was stopping.")

# ---- OpenTelemetry GenAI semantic conventions, under their Prometheus names -----------------------------

GEN_AI_SERVER_REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration", "GenAI server request duration in seconds (OpenTelemetry GenAI).",
    ["gen_ai_operation_name", "gen_ai_request_model", "error_type"], buckets=LATENCY_BUCKETS)
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token", "GenAI time to first token in seconds (OpenTelemetry GenAI).",
    ["gen_ai_operation_name", "gen_ai_request_model"], buckets=LATENCY_BUCKETS)
GEN_AI_CLIENT_TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage", "Tokens per provider call (OpenTelemetry GenAI), by gen_ai_token_type.",
    ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"],
    buckets=TOKEN_BUCKETS)

EXPORTED = ("switchyard_requests_total", "switchyard_request_duration_seconds", "switchyard_overhead_duration_seconds",
            "switchyard_time_to_first_token_seconds", "switchyard_provider_calls_total",
            "switchyard_provider_duration_seconds", "switchyard_tokens_total", "switchyard_cost_usd_total",
            "switchyard_deployment_state", "switchyard_consumer_lag", "switchyard_pacing_queue_depth",
            "switchyard_cache_requests_total", "gen_ai_server_request_duration", "gen_ai_server_time_to_first_token",
            "gen_ai_client_token_usage", "switchyard_auth_failures_total", "switchyard_spans_dropped_total")
"""The metric families above, as a scrape names them (deploy/grafana's test checks its queries against these)."""

_hooks: list[Callable[[], None]] = []


def on_scrape(hook: Callable[[], None]) -> None:
    """Run `hook` before every scrape: it sets the gauges that describe current state."""
    _hooks.append(hook)


def render() -> bytes:
    """The Prometheus text of this process (or, in multiprocess mode, of every process sharing the folder)."""
    for hook in _hooks:
        hook()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def model_label(model: str, known: Callable[[str], object]) -> str:
    """`model` when the config knows it, else OTHER: callers choose model names, labels must stay bounded."""
    return model if known(model) is not None else OTHER
